import pytest

from labkit import memory
from labkit.widgets import memory_calculator


def test_memory_calculator_updates_live():
    box = memory_calculator("Llama-3.1-8B", "Q4_K_M", 8192)
    expected = memory.estimate("Llama-3.1-8B", quant="Q4_K_M", n_ctx=8192).total_bytes / 2**30
    assert f"{expected:.2f} GiB" in box.result.value
    before = box.result.value
    box.controls["n_ctx"].value = 32768
    assert box.result.value != before and "32,768 tokens" in box.result.value
    box.controls["kv_type"].value = "q8_0"
    assert "q8_0" in box.result.value


def test_memory_calculator_takes_a_gguf_file_and_lists_what_fits():
    from labkit import models
    path = models.get()
    box = memory_calculator("bundled", n_ctx=2048, gguf_files={"bundled": path})
    expected = memory.estimate(path, n_ctx=2048)
    assert box.controls["quant"].disabled                      # weights come from the file
    assert f"{expected.total_bytes / 2**30:.2f} GiB" in box.result.value and "from the file" in box.result.value
    assert "8 GB RAM" in box.result.value                      # a 135M model fits everywhere
    box.controls["model"].value = "Llama-3.1-70B"
    assert not box.controls["quant"].disabled
    box.controls["quant"].value = "F16"
    assert "none of the listed devices" in box.result.value    # 141 GB of weights


@pytest.mark.full     # chapter 01 runs the quant explorer in make test
def test_quant_explorer_measures_the_chosen_tensor_and_refuses_misfit_k_quants():
    import numpy as np
    from gguf import GGUFReader

    from labkit import models, quant
    from labkit.widgets import quant_explorer

    path = models.get()
    box = quant_explorer(path, "blk.0.ffn_down.weight", "Q4_K")
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    W = quant.dequantize(np.asarray(t.data).tobytes(), t.tensor_type.name, (576, 1536))
    rmse = quant.error_stats(W, quant.roundtrip(W, "Q4_K"))["rmse"]
    assert f"RMSE {rmse:.2e}" in box.result.value and "4.5 bits/weight" in box.result.value
    q4k_plot = bytes(box.plot.value)
    assert q4k_plot.startswith(b"\x89PNG")                      # the error histogram, rendered
    box.controls["qtype"].value = "Q8_0"
    assert "8.5 bits/weight" in box.result.value and bytes(box.plot.value) != q4k_plot
    box.controls["tensor"].value = "blk.0.attn_q.weight"      # rows of 576
    box.controls["qtype"].value = "Q6_K"
    assert "cannot store" in box.result.value and "576" in box.result.value


class _FakeLlama:
    """Streams like llama-cpp-python's create_chat_completion(stream=True); records what it was sent."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def create_chat_completion(self, messages, stream, **kw):
        assert stream
        self.calls.append([dict(m) for m in messages])
        if self.fail:
            raise RuntimeError("context full")
        yield {"choices": [{"delta": {"role": "assistant"}}]}
        for piece in ["Hel", "lo", "!"]:
            yield {"choices": [{"delta": {"content": piece}}]}


def test_chat_box_streams_keeps_history_and_reports_errors():
    from labkit.widgets import chat_box
    engine = _FakeLlama()
    box = chat_box(engine, system="Be brief.")
    assert box.send("Hi") == "Hello!"
    assert "Hello!" in box.transcript.value and "3 tokens" in box.status.value
    box.send("Again")
    assert [m["role"] for m in engine.calls[-1]] == ["system", "user", "assistant", "user"]
    box.clear()
    assert box.history == [{"role": "system", "content": "Be brief."}]
    broken = chat_box(_FakeLlama(fail=True))
    assert broken.send("Hi") == "" and "context full" in broken.transcript.value and broken.history == []
    import pytest
    with pytest.raises(ValueError, match="model="):
        chat_box(object())


def test_progress_bars_wrap_slow_loops_and_can_be_turned_off(monkeypatch):
    from labkit.notebook import progress
    items = [1, 2, 3]
    bar = progress(items, "work")
    from tqdm import tqdm
    assert list(bar) == items and isinstance(bar, tqdm) and bar.desc == "work"
    monkeypatch.setenv("LABKIT_PROGRESS", "0")
    assert progress(items, "work") is items

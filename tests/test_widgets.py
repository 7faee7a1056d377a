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

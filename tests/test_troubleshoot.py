"""Diagnoses of chapter 07, each against the real engine or a real induced failure."""
import pytest

from labkit import models, troubleshoot
from labkit.errors import GPURequiredError, InsufficientMemoryError
from labkit.notebook import gpu_available


def test_fit_report_adds_up():
    r = troubleshoot.fit_report("smollm2", n_ctx=2048, available_bytes=2**40)
    assert r.fits and r.total_bytes == r.weights_bytes + r.kv_bytes + r.overhead_bytes
    assert r.kv_bytes == 2 * 30 * 3 * 64 * 2048 * 2
    q8 = troubleshoot.fit_report("smollm2", n_ctx=2048, kv_type="q8_0", available_bytes=2**40)
    assert q8.kv_bytes == pytest.approx(r.kv_bytes * 1.0625 / 2)


def test_check_fits_refuses_with_numbers_and_fixes():
    with pytest.raises(InsufficientMemoryError) as info:
        troubleshoot.check_fits("smollm2", n_ctx=65536, available_bytes=600 * 2**20)
    msg = str(info.value)
    for needle in ("Refusing to load", "KV cache", "shorter context", "q8_0", "smaller quant", "n_gpu_layers"):
        assert needle in msg
    shorter = int(msg.split("n_ctx ≈ ")[1].split()[0])
    assert troubleshoot.fit_report("smollm2", n_ctx=shorter, available_bytes=600 * 2**20).fits
    with pytest.raises(InsufficientMemoryError, match="weights alone do not fit"):
        troubleshoot.check_fits("smollm2", n_ctx=2048, available_bytes=50 * 2**20)


def test_unknown_architecture_is_explained(tmp_path):
    future = troubleshoot.with_architecture(models.get("smollm2"), tmp_path / "future.gguf", "nova9")
    with pytest.raises(troubleshoot.UnsupportedModelError, match="'nova9'.*does not know.*upgrade llama-cpp-python"):
        troubleshoot.preflight_load(future)
    troubleshoot.preflight_load(models.get("smollm2"))      # the real file passes
    with pytest.raises(ValueError, match="characters"):
        troubleshoot.with_architecture(models.get("smollm2"), tmp_path / "x.gguf", "toolong")


def test_offload_report_reads_the_engines_account_of_this_build():
    """In-process, with every layer asked for: what the bindings' own log says, never nvidia-smi."""
    import llama_cpp

    from labkit import llamacpp_lab as lc
    llm, log = lc.load_with_log(models.get("smollm2"), n_gpu_layers=-1, n_ctx=256)
    llm.close()
    r = troubleshoot.offload_report(log)
    assert r.host_mib("model") > 50                       # the weights are somewhere, and the log says where
    if not llama_cpp.llama_supports_gpu_offload():         # this CPU build: no offload line, no device buffer
        assert r.offloaded is None and not r.on_device and r.verdict.startswith("CPU only")
    else:
        assert r.total == 31
    with pytest.raises(TypeError, match="load_with_log"):
        troubleshoot.offload_report(llm)


@pytest.mark.skipif(gpu_available(), reason="a GPU is present")
def test_require_gpu_fails_fast():
    with pytest.raises(GPURequiredError, match="GPU or nothing"):
        troubleshoot.require_gpu()


def test_repetition_metrics():
    assert troubleshoot.distinct_ratio("a b c d e f") == 1.0
    loop = "the cat sat " * 20
    assert troubleshoot.repetition_ratio(loop) > 0.8
    assert troubleshoot.dictionary_share("the cat xqzt", {"the", "cat"}) == pytest.approx(2 / 3)

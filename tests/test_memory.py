"""The memory formulas, checked against figures in ../shared/facts.md (with their sources)."""
import pytest

from labkit import memory


def test_kv_cache_counts_kv_heads():
    llama31_8b = next(a for a in memory.REFERENCE_MODELS if a.name == "Llama-3.1-8B")
    assert llama31_8b.kv_cache_bytes(1) == 128 * 1024                 # 128 KiB per token at f16
    assert llama31_8b.kv_cache_bytes(8192) == 2**30                   # 1 GiB at 8k context
    wrong = memory.kv_cache_bytes(32, 32, 128, 8192)                  # attention heads instead of KV heads
    assert wrong == 4 * llama31_8b.kv_cache_bytes(8192)


@pytest.mark.parametrize("name, kib", [("Qwen2.5-7B", 56), ("Qwen2.5-14B", 192), ("Qwen2.5-32B", 256)])
def test_kv_per_token(name, kib):
    arch = next(a for a in memory.REFERENCE_MODELS if a.name == name)
    assert arch.kv_cache_bytes(1) == kib * 1024


def test_quantized_kv_and_sequences():
    f16 = memory.kv_cache_bytes(32, 8, 128, 4096)
    assert memory.kv_cache_bytes(32, 8, 128, 4096, "q8_0") == pytest.approx(f16 * 1.0625 / 2)
    assert memory.kv_cache_bytes(32, 8, 128, 4096, n_seq=4) == 4 * f16


def test_weights_check_value():
    assert memory.weights_bytes(7.62e9, "Q4_K_M") / 1e9 == pytest.approx(4.66, abs=0.01)   # file: 4.68 GB
    assert memory.weights_bytes(14e9, "F16") > 24e9                   # 14B FP16 does not fit a 24 GB card
    assert memory.bits_per_weight("q8_0") == 8.5 and memory.bits_per_weight("Q6_K") == 6.56


def test_bad_input():
    with pytest.raises(ValueError, match="Unknown quantization"):
        memory.bits_per_weight("Q7_X")
    with pytest.raises(ValueError, match="positive"):
        memory.kv_cache_bytes(0, 8, 128, 4096)


def test_from_gguf_matches_header(smollm2_path):
    arch = memory.from_gguf(smollm2_path)
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert arch.kv_cache_bytes(2048) == 2 * 30 * 3 * 64 * 2048 * 2


# --- chapter 01: estimate() -------------------------------------------------------------------

def test_estimate_preset_uses_kv_heads_and_padding():
    e = memory.estimate("Llama-3.1-8B", "Q4_K_M", n_ctx=8192)
    assert e.kv_bytes == 2**30                                      # 128 KiB/token × 8192
    assert e.weights_bytes == pytest.approx(8.03e9 * 4.89 / 8)
    assert e.total_bytes == e.weights_bytes + e.kv_bytes + e.overhead_bytes
    assert memory.estimate("Llama-3.1-8B", n_ctx=8000).n_ctx_cells == 8192   # llama.cpp pads to 256
    assert memory.estimate("Qwen2.5-7B", "Q8_0", n_ctx=4096, kv_type="q8_0").kv_bytes == pytest.approx(28 * 4 * 128 * 2 * 4096 * 34 / 32)
    assert memory.estimate("Qwen2.5-7B", n_ctx=4096, n_seq=4).kv_bytes == 4 * memory.estimate("Qwen2.5-7B", n_ctx=4096).kv_bytes
    # the "what could this machine run" table is the larger presets, same numbers
    assert memory.REFERENCE_MODELS and all(memory.PRESETS[a.name] is a and a.n_params >= 4e8 for a in memory.REFERENCE_MODELS)


def test_estimate_fits():
    small = memory.estimate("Qwen2.5-0.5B", "Q4_K_M", n_ctx=4096)
    big = memory.estimate("Qwen2.5-72B", "F16", n_ctx=4096)
    assert small.fits(8e9) and not big.fits(80e9)                   # 72B FP16 ≈ 145 GB: not one 80 GB card


def test_estimate_bad_input(tmp_path):
    with pytest.raises(ValueError, match="neither a GGUF file nor a preset"):
        memory.estimate("GPT-9")
    with pytest.raises(ValueError, match="KV cache type"):
        memory.estimate("Qwen2.5-7B", kv_type="q3")
    with pytest.raises(ValueError, match="n_ctx"):
        memory.estimate("Qwen2.5-7B", n_ctx=0)
    with pytest.raises(ValueError, match="Unknown quantization"):
        memory.estimate("Qwen2.5-7B", "Q7_X")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    from labkit.errors import CorruptModelError
    with pytest.raises(CorruptModelError):
        memory.estimate(bad)


def test_estimate_from_gguf_reads_real_sizes(smollm2_path):
    from labkit.gguf import read_header
    e = memory.estimate(smollm2_path, n_ctx=2048)
    assert e.weights_bytes == read_header(smollm2_path).tensor_bytes
    assert e.kv_bytes == 2 * 30 * 3 * 64 * 2048 * 2
    assert memory.estimate(smollm2_path, "Q8_0", n_ctx=2048).weights_bytes == pytest.approx(134_515_008 * 8.5 / 8)


@pytest.mark.parametrize("n_ctx, kv_type", [(512, "f16"), (1000, "f16"), (2048, "q8_0"), (4096, "f16")])
def test_kv_bytes_equal_llamacpp_allocation(smollm2_path, n_ctx, kv_type):
    e = memory.estimate(smollm2_path, n_ctx=n_ctx, kv_type=kv_type)
    got = memory.llamacpp_allocation(smollm2_path, n_ctx, kv_type)
    assert got["cells"] == e.n_ctx_cells
    assert abs(got["kv_mib"] - e.kv_bytes / 2**20) <= 0.005          # llama.cpp prints MiB to 2 decimals
    assert abs(got["model_mib"] - e.weights_bytes / 2**20) <= 0.005


def test_total_within_15_percent_of_rss(smollm2_path):
    e = memory.estimate(smollm2_path, n_ctx=2048)
    rss = memory.measure_rss(smollm2_path, 2048, n_threads=1)["rss_delta"]
    assert abs(e.total_bytes / rss - 1) < 0.15

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

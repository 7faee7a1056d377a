"""How much memory a model needs (introduced in chapter 00, developed in chapter 01).

Two formulas, both from ggml/llama.cpp's own sizing:

* weights ≈ parameters × bits-per-weight / 8. Pure block types have exact bpw from their
  block layout (ggml ``ggml-common.h``); mixes like Q4_K_M keep some tensors at higher
  precision, so their average is higher. For a real file, read its tensor sizes instead
  (:func:`labkit.gguf.read_header`).
* KV cache = 2 (K and V) × layers × **KV heads** × head_dim × context × bytes/element × sequences.
  Grouped-query attention shares each KV head between several query heads, so using the
  attention-head count overestimates the cache (4× for Llama-3.1-8B).

>>> int(kv_cache_bytes(n_layers=32, n_kv_heads=8, head_dim=128, n_ctx=1)) // 1024   # Llama-3.1-8B, f16
128
>>> round(weights_bytes(7.62e9, "Q4_K_M") / 1e9, 2)                             # Qwen2.5-7B
4.66
"""
from __future__ import annotations

from dataclasses import dataclass

# Bits per weight of pure ggml block types: block bytes × 8 / block size (ggml-common.h).
BPW_PURE = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_0": 5.5,
            "Q5_K": 5.5, "Q4_1": 5.0, "Q4_0": 4.5, "Q4_K": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625}
# Average bpw of llama.cpp's mixed presets, as measured on Llama-3-8B (llama.cpp quantize
# README / tools/quantize). Other models differ slightly; a real file's tensors are the truth.
BPW_MIX = {"Q6_K": 6.56, "Q5_K_M": 5.70, "Q4_K_M": 4.89, "Q3_K_M": 4.00, "Q2_K": 3.16}

# KV cache bytes per element (f16 2; q8_0 34 bytes per 32 values; q4_0 18 per 32).
KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def bits_per_weight(quant: str) -> float:
    """Average bits per weight of a quantization name (mixes first, then pure types)."""
    key = quant.upper()
    if key in BPW_MIX:
        return BPW_MIX[key]
    if key in BPW_PURE:
        return BPW_PURE[key]
    raise ValueError(f"Unknown quantization {quant!r}; known: {', '.join(sorted(set(BPW_PURE) | set(BPW_MIX)))}")


def weights_bytes(n_params: float, quant: str) -> float:
    """Approximate bytes of a model's weights at a quantization level."""
    return n_params * bits_per_weight(quant) / 8


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int,
                   cache_type: str = "f16", n_seq: int = 1) -> float:
    """Bytes of the K and V caches for ``n_seq`` sequences of ``n_ctx`` tokens."""
    if min(n_layers, n_kv_heads, head_dim, n_ctx, n_seq) <= 0:
        raise ValueError("layers, KV heads, head_dim, context and sequences must all be positive")
    per_el = KV_BYTES_PER_ELEMENT[cache_type.lower()]
    return 2 * n_layers * n_kv_heads * head_dim * n_ctx * per_el * n_seq


@dataclass(frozen=True)
class Architecture:
    """The numbers the memory formulas need, with where they were read."""

    name: str
    n_params: float
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    source: str

    def weights_bytes(self, quant: str) -> float:
        return weights_bytes(self.n_params, quant)

    def kv_cache_bytes(self, n_ctx: int, cache_type: str = "f16", n_seq: int = 1) -> float:
        return kv_cache_bytes(self.n_layers, self.n_kv_heads, self.head_dim, n_ctx, cache_type, n_seq)

    def total_bytes(self, quant: str, n_ctx: int, cache_type: str = "f16", n_seq: int = 1) -> float:
        return self.weights_bytes(quant) + self.kv_cache_bytes(n_ctx, cache_type, n_seq)


# Reference architectures, each read from the model's config.json on its Hugging Face model
# card (parameter counts as the model cards state them).
REFERENCE_MODELS = [
    Architecture("Qwen2.5-0.5B", 0.49e9, 24, 14, 2, 64, "huggingface.co/Qwen/Qwen2.5-0.5B-Instruct"),
    Architecture("Llama-3.2-3B", 3.21e9, 28, 24, 8, 128, "huggingface.co/meta-llama/Llama-3.2-3B-Instruct"),
    Architecture("Qwen2.5-7B", 7.62e9, 28, 28, 4, 128, "huggingface.co/Qwen/Qwen2.5-7B-Instruct"),
    Architecture("Llama-3.1-8B", 8.03e9, 32, 32, 8, 128, "huggingface.co/meta-llama/Llama-3.1-8B-Instruct"),
    Architecture("Qwen2.5-14B", 14.7e9, 48, 40, 8, 128, "huggingface.co/Qwen/Qwen2.5-14B-Instruct"),
    Architecture("Qwen2.5-32B", 32.5e9, 64, 40, 8, 128, "huggingface.co/Qwen/Qwen2.5-32B-Instruct"),
    Architecture("Llama-3.1-70B", 70.6e9, 80, 64, 8, 128, "huggingface.co/meta-llama/Llama-3.1-70B-Instruct"),
]


def from_gguf(path) -> Architecture:
    """An :class:`Architecture` read from a GGUF file's header."""
    from .gguf import read_header
    h = read_header(path)
    n_heads = int(h.arch_value("attention.head_count"))
    n_kv = h.arch_value("attention.head_count_kv", n_heads)
    head_dim = h.arch_value("attention.key_length") or int(h.arch_value("embedding_length")) // n_heads
    return Architecture(str(h.metadata.get("general.name", path)), float(h.n_parameters),
                        int(h.arch_value("block_count")), n_heads, int(n_kv), int(head_dim), f"GGUF header of {path}")

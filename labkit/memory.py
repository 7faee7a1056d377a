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

from .quant import LAYOUTS

# Bits per weight of pure ggml block types: block bytes × 8 / block size (ggml-common.h).
BPW_PURE = {name: layout.bits_per_weight for name, layout in LAYOUTS.items()}   # from the block sizes
# Average bpw of llama.cpp's presets as llama.cpp publishes them, measured on Llama-3.1-8B (the pinned
# source's tools/quantize/README.md, "Quantization" tables). Other models differ — a large vocabulary or
# tied embeddings move the average a lot — so a real file's tensors are the truth; these are for sizing
# a model before you have it. MXFP4_MOE, TQ1_0/TQ2_0 and other presets have no published average here.
# (tools/quantize/quantize.cpp's QUANT_OPTIONS help text is no substitute: it gives K presets' sizes in GB on
# Llama-3-8B, e.g. Q4_K_S " 4.37G", and for IQ presets their base type's bpw, e.g. IQ2_XXS " 2.06 bpw".)
BPW_MIX = {"Q6_K": 6.56, "Q5_K_M": 5.70, "Q5_K_S": 5.57, "Q4_K_M": 4.89, "Q4_K_S": 4.67, "Q3_K_L": 4.30,
           "Q3_K_M": 4.00, "Q3_K_S": 3.64, "Q2_K": 3.16, "Q2_K_S": 2.97,
           "IQ4_NL": 4.68, "IQ4_XS": 4.46, "IQ3_M": 3.76, "IQ3_S": 3.66, "IQ3_XS": 3.50, "IQ3_XXS": 3.25,
           "IQ2_M": 2.93, "IQ2_S": 2.74, "IQ2_XS": 2.59, "IQ2_XXS": 2.38, "IQ1_M": 2.15, "IQ1_S": 2.00}
# The block type most of a preset's weights get (llama.cpp src/llama-quant.cpp, llama_ftype_get_default_type);
# the mix promotes some tensors (attention V, FFN down, output) to more bits, and norms stay F32.
PRESET_BASE_TYPE = {"Q2_K_S": "Q2_K", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
                    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
                    "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S",
                    "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
                    "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
                    "MXFP4_MOE": "MXFP4", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0"}


def preset_base_type(preset: str | None) -> str | None:
    """The ggml block type a llama.cpp preset stores most weights in ("Q4_K_M" -> "Q4_K"; a pure type,
    "Q4_1" or "F16", is its own); None for no preset. Chapter 00."""
    if not preset:
        return None
    return PRESET_BASE_TYPE.get(preset.upper(), preset.upper())


def block_type_bits(type_name: str) -> float:
    """Bits per weight of one ggml block type, from its block layout (the gguf package's table of ggml's sizes).

    >>> block_type_bits("Q4_K"), block_type_bits("IQ4_XS"), block_type_bits("F16")
    (4.5, 4.25, 16.0)
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    except KeyError:
        raise ValueError(f"{type_name!r} is not a ggml block type") from None
    return 8 * size / block


def preset_average(preset: str | None) -> tuple[float, str] | None:
    """(bits per weight, where the figure comes from) for a preset name, or None for an unknown preset
    (MXFP4_MOE, TQ1_0, a name llama.cpp publishes no average for): then only the file's tensors can say.

    >>> preset_average("Q4_K_S")[0], preset_average("Q4_1"), preset_average("MXFP4_MOE")
    (4.67, (5.0, 'its block layout (a pure type)'), None)
    """
    key = (preset or "").upper()
    if key in BPW_MIX:
        return BPW_MIX[key], "llama.cpp's published average (tools/quantize/README.md, Llama-3.1-8B)"
    if key in BPW_PURE:
        return BPW_PURE[key], "its block layout (a pure type)"
    return None


def type_mix(path):
    """What a GGUF's tensors are stored as, per ggml type (a DataFrame, most parameters first): ``tensors``,
    ``parameters``, ``share`` of all parameters, ``type_bits`` (the type's block layout), ``contribution``
    (share × type_bits: the column sums to the file's average bits per weight), and what the file holds:
    ``bytes_on_disk`` (:func:`labkit.gguf.tensor_spans`, padding included) and ``disk_bits`` per weight."""
    import pandas as pd

    from .gguf import read_header, tensor_spans
    header, spans = read_header(path), tensor_spans(path)
    rows = pd.DataFrame([{"type": t.type_name, "parameters": t.n_elements, "bytes_on_disk": spans[t.name]}
                         for t in header.tensors])
    mix = rows.groupby("type").agg(tensors=("parameters", "size"), parameters=("parameters", "sum"),
                                   bytes_on_disk=("bytes_on_disk", "sum"))
    mix["share"] = mix["parameters"] / mix["parameters"].sum()
    mix["type_bits"] = [block_type_bits(name) for name in mix.index]
    mix["contribution"] = mix["share"] * mix["type_bits"]
    mix["disk_bits"] = 8 * mix["bytes_on_disk"] / mix["parameters"]
    columns = ["tensors", "parameters", "share", "type_bits", "contribution", "bytes_on_disk", "disk_bits"]
    return mix[columns].sort_values("parameters", ascending=False)


def fallback_tensors(path, preset: str | None = None):
    """The weight matrices whose rows do not divide into the preset's base block type (a DataFrame: name,
    row_length, stored type, parameters). llama.cpp stores each of them in another type
    (src/llama-quant.cpp: a row length not a multiple of the type's block size makes it fall back, Q4_K to
    Q5_0 for example). ``preset`` defaults to the file's own (``general.file_type``)."""
    import pandas as pd

    from .gguf import file_type_name, read_header
    header = read_header(path)
    base = preset_base_type(preset or file_type_name(header))
    if base is None:
        raise ValueError(f"{path} records no preset (general.file_type): pass preset=, e.g. 'Q4_K_M'")
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    block = GGML_QUANT_SIZES[GGMLQuantizationType[base]][0]
    rows = [{"name": t.name, "row_length": t.shape[0], "type": t.type_name, "parameters": t.n_elements}
            for t in header.tensors if len(t.shape) >= 2 and t.shape[0] % block]
    return pd.DataFrame(rows, columns=["name", "row_length", "type", "parameters"])

# KV cache bytes per element (f16 2; q8_0 34 bytes per 32 values; q4_0 18 per 32).
KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def bits_per_weight(quant: str) -> float:
    """Average bits per weight of a quantization name (mixes first, then pure types)."""
    key = quant.upper()
    for table in (BPW_MIX, BPW_PURE, BPW_GROUPED):
        if key in table:
            return table[key]
    raise ValueError(f"Unknown quantization {quant!r}; known: {', '.join(sorted(set(BPW_PURE) | set(BPW_MIX) | set(BPW_GROUPED)))}")


def grouped_bits_per_weight(bits: int, group_size: int = 128, scale_bits: int = 16, zero_bits: int | None = None) -> float:
    """Bits per weight of a GPU checkpoint with group-wise scales (AWQ, GPTQ; chapter 01).

    Each weight is a ``bits``-bit integer; each group of ``group_size`` weights along an input row
    adds a float16 scale and a zero point packed at the same width as the weights (AutoAWQ's and
    GPTQ's ``qweight``/``qzeros``/``scales`` tensors). Embeddings and the output layer usually stay
    float16 in these checkpoints and are not covered by this figure.

    >>> round(grouped_bits_per_weight(4, 128), 4)     # AWQ / GPTQ 4-bit, group size 128
    4.1562
    """
    if bits <= 0 or group_size <= 0:
        raise ValueError("bits and group_size must be positive")
    zero_bits = bits if zero_bits is None else zero_bits
    return bits + (scale_bits + zero_bits) / group_size


# GPU formats by their usual names (4-bit, group size 128: the common published checkpoints).
BPW_GROUPED = {"AWQ": grouped_bits_per_weight(4, 128), "GPTQ-INT4": grouped_bits_per_weight(4, 128),
               "GPTQ-INT8": grouped_bits_per_weight(8, 128)}


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


def from_gguf(path) -> "ModelConfig":
    """A :class:`ModelConfig` read from a GGUF file's header (chapter 00)."""
    return config_from_gguf(path)[0]


# ---------------------------------------------------------------------------------------------
# Chapter 01: a full estimate (weights + KV cache + runtime overhead), validated against llama.cpp.

@dataclass(frozen=True)
class ModelConfig:
    """Architecture numbers of a model — published (its config.json) or read from a GGUF header —
    enough to size it: :meth:`weights_bytes`, :meth:`kv_cache_bytes` (counts **KV heads**)."""

    name: str
    n_params: float
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_embd: int
    n_ff: int
    n_vocab: int
    source: str
    n_merges: int | None = None     # BPE merge rules in the tokenizer; None: about one per token (Qwen, Llama 3)

    def weights_bytes(self, quant: str) -> float:
        return weights_bytes(self.n_params, quant)

    def kv_cache_bytes(self, n_ctx: int, cache_type: str = "f16", n_seq: int = 1) -> float:
        return kv_cache_bytes(self.n_layers, self.n_kv_heads, self.head_dim, n_ctx, cache_type, n_seq)

    def total_bytes(self, quant: str, n_ctx: int, cache_type: str = "f16", n_seq: int = 1) -> float:
        """Weights + KV cache only; :func:`estimate` adds llama.cpp's padding and runtime overhead."""
        return self.weights_bytes(quant) + self.kv_cache_bytes(n_ctx, cache_type, n_seq)


# Each row read from the model's config.json on Hugging Face (hidden_size, intermediate_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size); parameter counts
# as the model cards state them (SmolLM2: counted from the bundled GGUF's tensors).
PRESETS: dict[str, ModelConfig] = {m.name: m for m in [
    ModelConfig("SmolLM2-135M", 134_515_008, 30, 9, 3, 64, 576, 1536, 49152, "huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    ModelConfig("Qwen2.5-0.5B", 0.49e9, 24, 14, 2, 64, 896, 4864, 151936, "huggingface.co/Qwen/Qwen2.5-0.5B-Instruct"),
    ModelConfig("Qwen2.5-1.5B", 1.54e9, 28, 12, 2, 128, 1536, 8960, 151936, "huggingface.co/Qwen/Qwen2.5-1.5B-Instruct"),
    ModelConfig("Qwen2.5-3B", 3.09e9, 36, 16, 2, 128, 2048, 11008, 151936, "huggingface.co/Qwen/Qwen2.5-3B-Instruct"),
    ModelConfig("Qwen2.5-7B", 7.62e9, 28, 28, 4, 128, 3584, 18944, 152064, "huggingface.co/Qwen/Qwen2.5-7B-Instruct"),
    ModelConfig("Qwen2.5-14B", 14.7e9, 48, 40, 8, 128, 5120, 13824, 152064, "huggingface.co/Qwen/Qwen2.5-14B-Instruct"),
    ModelConfig("Qwen2.5-32B", 32.5e9, 64, 40, 8, 128, 5120, 27648, 152064, "huggingface.co/Qwen/Qwen2.5-32B-Instruct"),
    ModelConfig("Qwen2.5-72B", 72.7e9, 80, 64, 8, 128, 8192, 29568, 152064, "huggingface.co/Qwen/Qwen2.5-72B-Instruct"),
    ModelConfig("Llama-3.1-8B", 8.03e9, 32, 32, 8, 128, 4096, 14336, 128256, "huggingface.co/meta-llama/Llama-3.1-8B-Instruct"),
    ModelConfig("Llama-3.1-70B", 70.6e9, 80, 64, 8, 128, 8192, 28672, 128256, "huggingface.co/meta-llama/Llama-3.1-70B-Instruct"),
]}

# The larger presets (chapter 00's "what could this machine run" table).
REFERENCE_MODELS = [cfg for cfg in PRESETS.values() if cfg.n_params >= 4e8]

# Memory sizes to compare an estimate with (GB as vendors count them: 10^9 bytes).
# GPU figures: vendor specifications (see ../shared/facts.md).
DEVICES = [("RTX 4070 Ti (12 GB)", 12e9), ("RTX 4090 (24 GB)", 24e9), ("A100 / H100 (80 GB)", 80e9),
           ("8 GB RAM", 8e9), ("16 GB RAM", 16e9), ("32 GB RAM", 32e9), ("64 GB RAM", 64e9)]

CTX_PAD = 256                 # llama.cpp rounds the context up to a multiple of 256 cells
# Tokenizer tables in RAM (token strings, the string → id map, BPE merge ranks), from the resident memory a
# vocab_only load adds: SmolLM2 (49,152 tokens, 48,900 merges) 16.4 MiB, Gemma 3 (262,144 tokens, no merges,
# SentencePiece) 41.7 MiB; measured 2026-12-01 with the pinned llama-cpp-python.
VOCAB_BYTES_PER_TOKEN = 167
VOCAB_BYTES_PER_MERGE = 184


@dataclass(frozen=True)
class Estimate:
    """Bytes a model needs in llama.cpp, by part. ``n_ctx_cells`` is the context llama.cpp allocates."""

    model: str
    quant: str
    n_ctx: int
    n_ctx_cells: int
    kv_type: str
    n_seq: int
    weights_bytes: float
    kv_bytes: float
    overhead_bytes: float
    source: str

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes

    def fits(self, capacity_bytes: float, headroom: float = 0.9) -> bool:
        """True when the total uses at most ``headroom`` of the memory (the rest: OS, other programs)."""
        return self.total_bytes <= headroom * capacity_bytes

    def table(self) -> list[tuple[str, float]]:
        gib = 2 ** 30
        return [("weights", self.weights_bytes / gib), (f"KV cache ({self.n_ctx_cells} cells, {self.kv_type})", self.kv_bytes / gib),
                ("overhead (activations, vocab)", self.overhead_bytes / gib), ("total", self.total_bytes / gib)]


def padded_context(n_ctx: int) -> int:
    """The number of KV cells llama.cpp allocates for a requested context."""
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def overhead_bytes(cfg: ModelConfig, n_seq: int = 1, n_ubatch: int = 512) -> float:
    """Runtime memory beyond weights and KV: one micro-batch's largest activations (attention
    scores heads × batch², FFN and residual streams), the output logits, and tokenizer tables.

    An approximation (llama.cpp reserves a worst-case compute buffer, but only touched pages
    become resident), checked against measured RSS on the bundled model in chapter 01.
    """
    activations = 4 * n_ubatch * (cfg.n_heads * n_ubatch + 3 * cfg.n_ff + 4 * cfg.n_embd)
    merges = cfg.n_vocab if cfg.n_merges is None else cfg.n_merges
    tokenizer = VOCAB_BYTES_PER_TOKEN * cfg.n_vocab + VOCAB_BYTES_PER_MERGE * merges
    return activations + 4 * cfg.n_vocab * n_seq + tokenizer


def config_from_gguf(path) -> tuple[ModelConfig, float, str]:
    """(config, real tensor bytes, file type name) read from a GGUF header."""
    from .gguf import inspect
    info = inspect(path)
    h, hp = info.header, info.hparams
    k_len = h.arch_value("attention.key_length") or hp["head_dim"]
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    n_vocab = hp.get("vocab_size") or (len(tokens) if tokens else 0)
    cfg = ModelConfig(str(h.metadata.get("general.name", path)), float(h.n_parameters), int(hp["layers"]),
                      int(hp["attention_heads"]), int(hp.get("kv_heads", hp["attention_heads"])), int(k_len),
                      int(hp["embedding_length"]), int(hp.get("feed_forward_length", 4 * hp["embedding_length"])),
                      int(n_vocab), f"GGUF header of {path}", len(h.metadata.get("tokenizer.ggml.merges") or ()))
    types = info.by_type()
    return cfg, float(h.tensor_bytes), str(types.index[0])


def estimate(model, quant: str | None = None, n_ctx: int = 4096, kv_type: str = "f16", n_seq: int = 1,
             n_ubatch: int = 512) -> Estimate:
    """Memory llama.cpp needs for ``model``: weights + KV cache + overhead.

    ``model`` is a GGUF path (its real tensor sizes and hyper-parameters are read; ``quant``
    other than None re-estimates the weights at that quantization) or a preset name from
    :data:`PRESETS` (weights = parameters × bits-per-weight of ``quant``, default Q4_K_M).
    The KV cache counts **KV heads** (grouped-query attention) and the context llama.cpp
    actually allocates (rounded up to 256 cells).
    """
    from pathlib import Path
    if kv_type.lower() not in KV_BYTES_PER_ELEMENT:
        raise ValueError(f"Unknown KV cache type {kv_type!r}; known: {', '.join(KV_BYTES_PER_ELEMENT)}")
    if n_seq <= 0:
        raise ValueError(f"n_seq must be positive, got {n_seq}")
    cells = padded_context(n_ctx)
    if isinstance(model, ModelConfig):
        cfg, weights, label, source = model, None, model.name, model.source
    elif str(model) in PRESETS:
        cfg = PRESETS[str(model)]
        weights, label, source = None, cfg.name, cfg.source
    elif Path(str(model)).suffix == ".gguf" or Path(str(model)).is_file():
        cfg, weights, file_type = config_from_gguf(model)
        label, source = cfg.name, cfg.source
        if quant is None:
            quant = f"file ({file_type} mostly)"
    else:
        raise ValueError(f"{model!r} is neither a GGUF file nor a preset; presets: {', '.join(PRESETS)}")
    if weights is None or not (quant or "").startswith("file"):
        quant = quant or "Q4_K_M"
        weights = weights_bytes(cfg.n_params, quant)
    kv = kv_cache_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cells, kv_type, n_seq)
    return Estimate(label, quant, n_ctx, cells, kv_type.lower(), n_seq, float(weights), float(kv),
                    float(overhead_bytes(cfg, n_seq, n_ubatch)), source)


def llamacpp_allocation(path, n_ctx: int, kv_type: str = "f16", n_seq: int = 1) -> dict:
    """Create a llama.cpp context and read back what it allocated, from its own log lines.

    Returns ``{"kv_mib": …, "cells": …, "k_mib": …, "v_mib": …, "compute_mib": …, "model_mib": …}``
    (llama.cpp prints MiB with two decimals, so compare within 0.005 MiB).
    """
    import contextlib
    import io
    import re

    import llama_cpp
    from llama_cpp import Llama
    kw = {}
    if kv_type.lower() != "f16":
        ggml_type = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
        kw = dict(type_k=ggml_type, type_v=ggml_type, flash_attn=True)   # a quantized V cache needs flash attention
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_seq_max=n_seq, verbose=True, **kw)
        llm.close()
    text = log.getvalue()

    def grab(pattern):
        m = re.search(pattern, text)
        if not m:
            raise RuntimeError(f"llama.cpp's log has no line matching {pattern!r}; its format changed?")
        return m.groups()

    # One "llama_kv_cache: size = ..." line per cache: a model with sliding-window layers (Gemma 3)
    # gets two, one for its global-attention layers and one for its sliding-window layers.
    caches = re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells.*?"
                        r"K \(\w+\):\s*([\d.]+) MiB, V \(\w+\):\s*([\d.]+) MiB", text)
    if not caches:
        raise RuntimeError("llama.cpp's log has no 'llama_kv_cache: size = ...' line; its format changed?")
    compute, = grab(r"CPU compute buffer size =\s*([\d.]+) MiB")
    model_mib, = grab(r"model buffer size =\s*([\d.]+) MiB")
    return {"kv_mib": sum(float(c[0]) for c in caches), "cells": max(int(c[1]) for c in caches),
            "k_mib": sum(float(c[2]) for c in caches), "v_mib": sum(float(c[3]) for c in caches),
            "caches": len(caches), "compute_mib": float(compute), "model_mib": float(model_mib)}


def measure_rss(path, n_ctx: int, n_prompt: int = 512, n_threads: int | None = None, *, use_mmap: bool = True,
                use_mlock: bool = False, memlock_bytes: int | None = None) -> dict:
    """Resident memory added by loading ``path`` with ``n_ctx`` and processing a prompt, measured
    in a fresh subprocess (so nothing else in this process distorts it). Bytes.

    Also (chapter 03): ``load_s``; the process's memory after the prompt (:func:`labkit.env.process_memory`:
    ``rss_anon`` private, ``rss_file`` mapped file pages, ``locked``), and llama.cpp's warnings about
    mapping or locking. ``use_mmap``/``use_mlock`` are llama.cpp's loader options; ``memlock_bytes`` runs
    the load under that ``ulimit -l`` (:func:`labkit.env.memlock_limited`)."""
    import json
    import subprocess
    import sys

    from .env import memlock_limited
    code = f"""
import json, sys, time, psutil
import labkit  # applies labkit.repack (llama.cpp's AMX crash) before the model loads
from labkit.env import process_memory
from llama_cpp import Llama
p = psutil.Process(); before = p.memory_info().rss
t0 = time.perf_counter()
llm = Llama(model_path={str(path)!r}, n_ctx={n_ctx}, n_batch=512, n_threads={n_threads!r}, use_mmap={use_mmap!r},
            use_mlock={use_mlock!r}, verbose=True)
load_s = time.perf_counter() - t0
toks = (llm.tokenize(b"The keepers wrote down the weather at fixed hours. " * 200))[:{min(n_prompt, n_ctx - 8)}]
llm.eval(toks)
for _ in range(4):
    llm.eval([42])
sys.stdout.flush()
print(json.dumps({{"rss_delta": p.memory_info().rss - before, "load_s": load_s, **process_memory()}}))
"""
    argv, preexec = [sys.executable, "-c", code], None
    if memlock_bytes is not None:
        argv, preexec = memlock_limited(argv, memlock_bytes)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=preexec)
    if out.returncode != 0:
        raise RuntimeError(f"RSS measurement failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["warnings"] = [line.strip() for line in out.stderr.splitlines()
                          if "mlock" in line.lower() or "mmap" in line.lower() and "warning" in line.lower()
                          or "RLIMIT_MEMLOCK" in line]
    return result


# ---------------------------------------------------------------------------------------------
# Chapter 01 (scale up): how many layers of a real model fit on a GPU (-ngl / n_gpu_layers).

# ------------------------------------------------------------------ out of memory, refused early (chapter 07; labkit.serve checks it)
@dataclass
class FitReport:
    """:func:`labkit.memory.estimate` set against the memory that is free."""

    estimate: "object"          # labkit.memory.Estimate
    available_bytes: float

    weights_bytes = property(lambda self: self.estimate.weights_bytes)
    kv_bytes = property(lambda self: self.estimate.kv_bytes)
    overhead_bytes = property(lambda self: self.estimate.overhead_bytes)
    total_bytes = property(lambda self: self.estimate.total_bytes)
    n_ctx = property(lambda self: self.estimate.n_ctx)
    kv_type = property(lambda self: self.estimate.kv_type)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes


def fit_report(model=None, n_ctx: int = 2048, kv_type: str = "f16", n_seq: int = 1,
               available_bytes: float | None = None, headroom: float = 0.8) -> FitReport:
    """Memory a GGUF needs at this context (chapter 01's estimator) against free RAM × headroom."""
    from . import models
    path = models.get(model)
    if available_bytes is None:
        import psutil
        available_bytes = headroom * psutil.virtual_memory().available
    return FitReport(estimate(path, n_ctx=n_ctx, kv_type=kv_type, n_seq=n_seq), float(available_bytes))


def check_fits(model=None, n_ctx: int = 2048, kv_type: str = "f16", n_seq: int = 1,
               available_bytes: float | None = None) -> FitReport:
    """Raise :class:`InsufficientMemoryError`, naming the numbers and the fixes, unless it fits."""
    from .errors import InsufficientMemoryError
    r = fit_report(model, n_ctx, kv_type, n_seq, available_bytes)
    if not r.fits:
        gib = 2**30
        room_for_kv = r.available_bytes - r.weights_bytes - r.overhead_bytes
        shorter = int(n_ctx * room_for_kv / r.kv_bytes) // 256 * 256 if room_for_kv > 0 else 0
        context_fix = (f"a shorter context (n_ctx ≈ {shorter} would fit)" if shorter >= 256 else
                       "a shorter context will not be enough: the weights alone do not fit")
        raise InsufficientMemoryError(
            f"Refusing to load: this needs ~{r.total_bytes / gib:.2f} GiB (weights {r.weights_bytes / gib:.2f} + "
            f"KV cache {r.kv_bytes / gib:.2f} at n_ctx={n_ctx}, {kv_type} + overhead {r.overhead_bytes / gib:.2f}) "
            f"but only {r.available_bytes / gib:.2f} GiB are available. Fixes: {context_fix}, "
            "a quantized KV cache (type_k/type_v q8_0 halves it; needs flash attention), "
            "a smaller quant of the weights, or — on a GPU — fewer layers offloaded (n_gpu_layers).")
    return r


FIT_TARGET_BYTES = 1024 * 2**20   # llama.cpp's --fit-target default: 1024 MiB left free per device (llama-server --help)


@dataclass(frozen=True)
class OffloadPlan:
    """What ``-ngl`` to use for a model on a GPU of ``vram_bytes`` (see :func:`gpu_layers`)."""

    model: str
    quant: str
    n_ctx: int
    vram_bytes: float
    n_layers: int
    layers_on_gpu: int          # repeating layers that fit
    ngl: int                    # the -ngl value: 0, or 1 (the output layer) + layers_on_gpu
    per_layer_bytes: float      # one layer's weights + its KV cache (the mean, where layers differ)
    gpu_bytes: float            # what the plan puts on the GPU: output layer, layers, their KV, compute buffer
    cpu_bytes: float            # weights and KV cache left in RAM (layers that do not fit, token embeddings)
    output_bytes: float = 0.0   # the output layer (the first thing -ngl moves)
    compute_bytes: float = 0.0  # the GPU's compute buffer (:func:`device_compute_bytes`)

    @property
    def fully_offloaded(self) -> bool:
        return self.ngl == self.n_layers + 1

    def command(self, gguf: str = "MODEL.gguf") -> str:
        return f"llama-server -m {gguf} -c {self.n_ctx} -ngl {self.ngl}"


def device_compute_bytes(cfg: ModelConfig, n_ctx: int, n_ubatch: int = 512) -> float:
    """The compute buffer llama.cpp reserves on an accelerator that holds layers (chapter 01).

    With flash attention (what ``auto`` picks on GPUs and the RPC device) the attention scores are never
    stored whole. What is alive at the widest point of a layer, per token of one micro-batch: the FFN's
    gate and up projections and a few residual-width vectors in f32, plus the f16 attention mask over the
    context. An approximation (llama.cpp sizes the real buffer by reserving its worst-case graph) that
    chapter 01 compares with the buffer the engine logs.
    """
    return n_ubatch * (4 * (2 * cfg.n_ff + 4 * cfg.n_embd) + 2 * padded_context(n_ctx))


def offload_order(n_layers: int) -> list:
    """The order in which ``-ngl`` moves parts to the GPU: the output layer first (``-ngl 1`` moves only
    it), then the repeating layers from the last one down (llama.cpp ``llama-model.cpp``: layers at or
    above ``n_layer + 1 - n_gpu_layers`` are offloaded, and the output layer is index ``n_layer``)."""
    return ["output", *range(n_layers - 1, -1, -1)]


def layer_weights(model, cfg: ModelConfig, weights: float) -> tuple[list[float], float]:
    """(bytes of each repeating layer, bytes of the output layer).

    For a GGUF file, its own tensor sizes (``blk.N.*`` per layer; ``output.weight`` and the final norm,
    or the token embeddings again where the model ties them: llama.cpp then puts a copy on the GPU).
    For a preset, ``weights`` split evenly over the layers after taking out the token-embedding and
    output matrices (vocab × width each, at the same bits per weight: an approximation, since mixes
    store them differently)."""
    import re
    from pathlib import Path
    if not (isinstance(model, (str, Path)) and Path(str(model)).is_file()):
        matrix = cfg.n_vocab * cfg.n_embd * weights / cfg.n_params
        return [(weights - 2 * matrix) / cfg.n_layers] * cfg.n_layers, matrix
    from .gguf import read_header
    per_layer, output, embeddings = [0.0] * cfg.n_layers, 0.0, 0.0
    has_output = False
    for t in read_header(model).tensors:
        block = re.match(r"blk\.(\d+)\.", t.name)
        if block and int(block[1]) < cfg.n_layers:
            per_layer[int(block[1])] += t.n_bytes
        elif t.name == "token_embd.weight":
            embeddings = t.n_bytes
        elif not block:
            output += t.n_bytes
            has_output = has_output or t.name == "output.weight"
    return per_layer, output + (0.0 if has_output else embeddings)


def gpu_layers(model, vram_bytes: float, quant: str | None = None, n_ctx: int = 8192, kv_type: str = "f16",
               reserve_bytes: float = FIT_TARGET_BYTES, n_ubatch: int = 512) -> OffloadPlan:
    """How many of ``model``'s layers fit on a GPU with ``vram_bytes`` at ``n_ctx`` (chapter 01).

    ``model``: a preset name or a GGUF file (its real tensor sizes). llama.cpp keeps the token
    embeddings in RAM (a row lookup needs no GPU) and offloads in :func:`offload_order`: the output
    layer, then each repeating layer from the last, each with **its own KV cache**. The GPU also holds
    a compute buffer (:func:`device_compute_bytes`) and llama.cpp leaves ``reserve_bytes`` free
    (``--fit-target``). ``-ngl`` = layers + 1 offloads everything.
    """
    est = estimate(model, quant, n_ctx, kv_type)
    cfg = PRESETS[str(model)] if str(model) in PRESETS else (model if isinstance(model, ModelConfig) else config_from_gguf(model)[0])
    per_layer, output = layer_weights(model, cfg, est.weights_bytes)
    kv_per_layer = est.kv_bytes / cfg.n_layers
    compute = device_compute_bytes(cfg, n_ctx, n_ubatch)
    room = vram_bytes - reserve_bytes - compute
    placed: list = []
    for part in offload_order(cfg.n_layers):
        need = output if part == "output" else per_layer[part] + kv_per_layer
        if need > room:
            break
        room -= need
        placed.append(part)
    layers = [p for p in placed if p != "output"]
    on_gpu = sum(per_layer[i] + kv_per_layer for i in layers) + (output if "output" in placed else 0.0)
    mean_layer = sum(per_layer) / cfg.n_layers + kv_per_layer
    return OffloadPlan(cfg.name, est.quant, n_ctx, vram_bytes, cfg.n_layers, len(layers), len(placed), mean_layer,
                       on_gpu + (compute if placed else 0.0), est.weights_bytes + est.kv_bytes - on_gpu, output, compute)

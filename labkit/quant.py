"""Quantization from first principles: numpy reference implementations of ggml's block formats
(chapter 01).

A ggml block format stores a tensor in fixed-size *blocks* of weights. Each block holds one or
two float16 numbers (a scale ``d``, sometimes a minimum ``m``) plus a small integer per weight;
a weight is reconstructed as ``d * q`` (symmetric formats) or ``d * q + m`` (asymmetric ones).

* Legacy formats, 32 weights per block: Q8_0, Q4_0, Q5_0 (symmetric) and Q4_1, Q5_1 (with a
  minimum).
* K-quants, 256 weights per *super-block*, split into sub-blocks of 16 or 32 whose own scales are
  themselves quantized to 6 or 8 bits: Q2_K, Q4_K, Q5_K, Q6_K.

Byte layouts follow ggml's ``ggml-common.h``; the rounding follows ``ggml-quants.c``'s reference
functions (``quantize_row_*_ref``) operation by operation, in float32, so that the bytes match
llama.cpp's own quantizer and the ``gguf`` package. :func:`llamacpp_quantize` and
:func:`llamacpp_dequantize` call the ggml library that llama-cpp-python ships, so tests and the
notebook can check that claim against the real thing.

>>> import numpy as np
>>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
>>> data = quantize(w, "Q8_0")
>>> len(data), bits_per_weight("Q8_0")
(68, 8.5)
>>> float(np.abs(dequantize(data, "Q8_0", w.shape) - w).max()) < 0.004
True
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QK_K = 256        # weights per K-quant super-block
_CHUNK_ELEMENTS = 1 << 18   # work on this many weights at a time: temporaries stay in cache


@dataclass(frozen=True)
class BlockLayout:
    """How one ggml type packs weights: ``block_size`` weights in ``type_size`` bytes."""

    name: str
    ggml_type: int      # enum ggml_type value (also the GGUF tensor type id)
    block_size: int
    type_size: int
    layout: str         # the C struct, for the notebook

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


# From ggml-common.h (block_* structs); type ids from ggml.h's enum ggml_type.
LAYOUTS: dict[str, BlockLayout] = {b.name: b for b in [
    BlockLayout("F32", 0, 1, 4, "float"),
    BlockLayout("F16", 1, 1, 2, "ggml_half"),
    BlockLayout("BF16", 30, 1, 2, "bfloat16 (upper half of a float32)"),
    BlockLayout("Q8_0", 8, 32, 34, "d: f16 | qs: 32 × int8"),
    BlockLayout("Q4_0", 2, 32, 18, "d: f16 | qs: 16 bytes = 32 × 4-bit (offset 8)"),
    BlockLayout("Q4_1", 3, 32, 20, "d: f16, m: f16 | qs: 16 bytes = 32 × 4-bit"),
    BlockLayout("Q5_0", 6, 32, 22, "d: f16 | qh: 4 bytes (5th bits) | qs: 16 bytes (low 4 bits), offset 16"),
    BlockLayout("Q5_1", 7, 32, 24, "d: f16, m: f16 | qh: 4 bytes | qs: 16 bytes"),
    BlockLayout("Q2_K", 10, 256, 84, "scales: 16 bytes (4-bit scale | 4-bit min) | qs: 64 bytes (2-bit) | d, dmin: f16"),
    BlockLayout("Q3_K", 11, 256, 110, "hmask: 32 | qs: 64 (2-bit) | scales: 12 (16 × 6-bit) | d: f16"),
    BlockLayout("Q4_K", 12, 256, 144, "d, dmin: f16 | scales: 12 bytes (8 × 6-bit scale + 8 × 6-bit min) | qs: 128 bytes (4-bit)"),
    BlockLayout("Q5_K", 13, 256, 176, "d, dmin: f16 | scales: 12 | qh: 32 (5th bits) | qs: 128 (low 4 bits)"),
    BlockLayout("Q6_K", 14, 256, 210, "ql: 128 (low 4 bits) | qh: 64 (high 2 bits) | scales: 16 × int8 | d: f16"),
]}
QUANTIZE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
DEQUANTIZE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q4_K", "Q5_K", "Q6_K")


def layout(qtype: str) -> BlockLayout:
    key = str(getattr(qtype, "name", qtype)).upper()
    if key not in LAYOUTS:
        raise ValueError(f"Unknown ggml type {qtype!r}; labkit.quant knows {', '.join(LAYOUTS)}.")
    return LAYOUTS[key]


def bits_per_weight(qtype: str) -> float:
    """Bits per weight of a pure ggml type, from its block layout (bytes × 8 / weights)."""
    return layout(qtype).bits_per_weight


def n_bytes(shape, qtype: str) -> int:
    """Bytes a tensor of ``shape`` (rows in the last axis) takes in ``qtype``."""
    b = layout(qtype)
    n = int(np.prod(shape, dtype=np.int64))
    return n // b.block_size * b.type_size


# ---------------------------------------------------------------------------------------------
# Input checks: every public function fails early with a message that says what to do.

def _check_array(array, qtype: str) -> tuple[np.ndarray, BlockLayout]:
    b = layout(qtype)
    if b.name not in QUANTIZE_TYPES:
        raise ValueError(f"labkit.quant cannot quantize to {b.name} (it can: {', '.join(QUANTIZE_TYPES)}). "
                         "Use labkit.gguf.quantize for a whole model.")
    x = np.asarray(array)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"quantize needs a numeric array, got dtype {x.dtype}.")
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"quantize needs a non-empty array with at least one axis, got shape {x.shape}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % b.block_size:
        raise ValueError(f"{b.name} packs rows in blocks of {b.block_size} weights, but the rows (last axis) of this "
                         f"array have {x.shape[-1]}. llama.cpp falls back to another type for such tensors.")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"cannot quantize: the array holds {bad} NaN or infinite value(s). "
                         "Find where they come from (a diverged fine-tune, an overflow in float16) and fix them first.")
    return x, b


def _blocks_from_bytes(data, qtype: str, shape) -> tuple[np.ndarray, BlockLayout, tuple[int, ...]]:
    b = layout(qtype)
    if b.name not in DEQUANTIZE_TYPES:
        raise ValueError(f"labkit.quant cannot dequantize {b.name} (it can: {', '.join(DEQUANTIZE_TYPES)}).")
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if not shape or min(shape) <= 0:
        raise ValueError(f"shape must be non-empty with positive sizes, got {shape}.")
    if shape[-1] % b.block_size:
        raise ValueError(f"a {b.name} tensor has rows that are multiples of {b.block_size}; shape {shape} is not.")
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    expected = n_bytes(shape, b.name)
    if raw.size != expected:
        raise ValueError(f"{b.name} data for shape {shape} must be {expected:,} bytes, got {raw.size:,}: "
                         "wrong type, wrong shape or a truncated tensor.")
    return raw.reshape(-1, b.type_size), b, shape


# ---------------------------------------------------------------------------------------------
# Public API

def quantize(array, qtype: str) -> bytes:
    """Quantize ``array`` (rows along the last axis) into ggml ``qtype`` bytes.

    Bit-exact with ggml's reference quantizer (llama.cpp without an importance matrix) and,
    for the types it implements, with ``gguf.quants.quantize``.
    """
    x, b = _check_array(array, qtype)
    if b.name == "F32":
        return x.tobytes()
    if b.name == "F16":
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        if not np.isfinite(h).all():
            raise ValueError("values beyond ±65504 overflow float16; store this tensor as F32 or BF16.")
        return h.tobytes()
    if b.name == "BF16":
        return _to_bf16(x).tobytes()
    blocks = x.reshape(-1, b.block_size)
    fn = _QUANTIZERS[b.name]
    out = np.empty((blocks.shape[0], b.type_size), dtype=np.uint8)
    # Blocks of only subnormal values overflow 1/scale to inf, as in ggml (where it is undefined
    # behaviour); their stored float16 scale is 0 anyway, so the warnings carry no information.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        step = max(1, _CHUNK_ELEMENTS // b.block_size)
        for start in range(0, blocks.shape[0], step):
            out[start:start + step] = fn(blocks[start:start + step])
    return out.tobytes()


def dequantize(data, qtype: str, shape) -> np.ndarray:
    """Reconstruct float32 weights of ``shape`` from ggml ``qtype`` bytes (as llama.cpp does)."""
    blocks, b, shape = _blocks_from_bytes(data, qtype, shape)
    if b.name == "F32":
        return blocks.view(np.float32).reshape(shape).copy()
    if b.name == "F16":
        return blocks.view(np.float16).astype(np.float32).reshape(shape)
    if b.name == "BF16":
        return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    fn = _DEQUANTIZERS[b.name]
    out = np.empty((blocks.shape[0], b.block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // b.block_size)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = fn(blocks[start:start + step])
    return out.reshape(shape)


def roundtrip(array, qtype: str) -> np.ndarray:
    """``dequantize(quantize(array))``: what the model will compute with."""
    x = np.asarray(array)
    return dequantize(quantize(x, qtype), qtype, x.shape)


def error_stats(original, reconstructed) -> dict:
    """RMSE, largest absolute error and signal-to-noise ratio (dB) of a reconstruction."""
    a = np.asarray(original, dtype=np.float64)
    e = np.asarray(reconstructed, dtype=np.float64) - a
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {e.shape}")
    noise = float(np.mean(e * e))
    signal = float(np.mean(a * a))
    snr = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")
    return {"rmse": noise ** 0.5, "max_abs_error": float(np.abs(e).max()), "snr_db": snr}


# ---------------------------------------------------------------------------------------------
# Teaching versions: plain integer quantization, before block formats.

def absmax_quantize(x, bits: int = 8, block_size: int | None = None) -> np.ndarray:
    """Symmetric ("absmax") quantization and back: scale = max|x| / (2^(bits-1) - 1), zero maps to 0.

    ``block_size`` gives each block of that many values its own scale (None: one scale for all).
    Returns the reconstructed values, so errors can be measured directly.
    """
    v, shape = _blocked(x, block_size)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(v).max(axis=-1, keepdims=True) / qmax
    safe = np.where(scale == 0, 1, scale)
    q = np.clip(np.rint(v / safe), -qmax, qmax)
    return (q * scale).reshape(shape)


def zeropoint_quantize(x, bits: int = 8, block_size: int | None = None) -> np.ndarray:
    """Asymmetric quantization and back: the range [min(x, 0), max(x, 0)] maps onto 0 … 2^bits - 1 with an integer zero point."""
    v, shape = _blocked(x, block_size)
    scale, zero = _zeropoint_params(v, bits)
    return _zeropoint_apply(v, scale, zero, bits).reshape(shape)


def _zeropoint_params(v: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per row of ``v`` (min/max over the last axis).

    The range always includes 0 (as PyTorch's observers and GPTQ do), so 0.0 — padding, pruned
    weights — is stored exactly and a constant row is reproduced exactly.
    """
    lo = np.minimum(v.min(axis=-1, keepdims=True), 0.0)
    hi = np.maximum(v.max(axis=-1, keepdims=True), 0.0)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = np.where(scale == 0, 1.0, scale)     # an all-zero row: any scale reproduces it
    return scale, np.rint(-lo / scale)


def _zeropoint_apply(v: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    q = np.clip(np.rint(v / scale) + zero, 0, 2 ** bits - 1)
    return (q - zero) * scale


def _blocked(x, block_size):
    v = np.asarray(x, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError("cannot quantize NaN or infinite values")
    if block_size is None:
        return v.reshape(1, -1), v.shape
    if v.size % block_size:
        raise ValueError(f"{v.size} values do not split into blocks of {block_size}")
    return v.reshape(-1, block_size), v.shape


# ---------------------------------------------------------------------------------------------
# Calibrated weight-only quantization: what GPTQ and AWQ do, on one linear layer.
#
# A linear layer computes Y = X Wᵀ (X: tokens × in_features, W: out_features × in_features).
# Round-to-nearest (RTN) minimises the error of each *weight*; what matters is the error of the
# *output*, ‖X (W − Ŵ)ᵀ‖², which depends on the activations. With H = XᵀX / n it equals
# trace((W − Ŵ) H (W − Ŵ)ᵀ) — so calibration activations enter only through H (GPTQ) or their
# per-channel magnitudes (AWQ). Weights are quantized per output row in groups of input columns,
# asymmetric with an integer zero point, as GPTQ and AWQ checkpoints store them.

def valid_group_size(in_features: int, wanted: int = 128) -> int:
    """The group size nearest ``wanted`` that divides ``in_features`` (ties go to the smaller one).

    >>> valid_group_size(1536), valid_group_size(576), valid_group_size(576, 64)
    (128, 144, 64)
    """
    if in_features < 1 or wanted < 1:
        raise ValueError("in_features and the wanted group size must be positive")
    divisors = [g for g in range(1, in_features + 1) if in_features % g == 0]
    return min(divisors, key=lambda g: (abs(g - wanted), g))


def _check_layer(W, X=None, group_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D weight matrix (out_features × in_features), got shape {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError("cannot quantize NaN or infinite weights")
    if group_size < 1 or W.shape[1] % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features={W.shape[1]}; "
                         f"use valid_group_size({W.shape[1]}, {group_size}) = {valid_group_size(W.shape[1], max(group_size, 1))}")
    if X is None:
        return W, None
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"activations must be tokens × in_features = (n, {W.shape[1]}), got shape {X.shape}")
    if X.shape[0] == 0 or not np.isfinite(X).all():
        raise ValueError("activations must be a non-empty, finite array")
    return W, X


def rtn_quantize(W, bits: int = 4, group_size: int = 128) -> np.ndarray:
    """Round-to-nearest, asymmetric, one scale and zero point per ``group_size`` inputs of each row.

    Returns the dequantized weights Ŵ (what the layer computes with).
    """
    W, _ = _check_layer(W, None, group_size)
    return zeropoint_quantize(W, bits, group_size).reshape(W.shape)


def output_error(W, W_hat, X) -> float:
    """Relative output error ‖X (W − Ŵ)ᵀ‖² / ‖X Wᵀ‖² of a quantized layer on activations X."""
    W, X = _check_layer(W, X, 1)
    E = W - np.asarray(W_hat, dtype=np.float64)
    if E.shape != W.shape:
        raise ValueError(f"shapes differ: {W.shape} vs {E.shape}")
    return float(np.sum((X @ E.T) ** 2) / np.sum((X @ W.T) ** 2))


def awq_quantize(W, X, bits: int = 4, group_size: int = 128, n_grid: int = 20) -> tuple[np.ndarray, dict]:
    """AWQ-style activation-aware scaling, then round-to-nearest.

    Input channel j gets a scale s_j = mean|X_j|^α (normalised so max·min = 1). Quantizing W·s and
    dividing by s again leaves Ŵ's *salient* columns — those that meet large activations — with
    relatively finer steps. α is searched on a grid of ``n_grid`` values in [0, 1) to minimise the
    output error on X; α = 0 is plain RTN, so the search never does worse on the calibration set.
    (AutoAWQ also searches a per-group clipping range and folds 1/s into the previous layer; here
    1/s stays in Ŵ, which gives the same outputs.) Returns Ŵ and ``{"alpha", "scales", "errors"}``.
    """
    W, X = _check_layer(W, X, group_size)
    if n_grid < 1:
        raise ValueError("n_grid must be at least 1")
    H = X.T @ X / X.shape[0]
    channel_mean = np.abs(X).mean(axis=0)
    channel_mean = np.maximum(channel_mean, 1e-8 * max(channel_mean.max(), 1e-30))   # dead channels
    errors, best = {}, None
    for alpha in np.arange(n_grid) / n_grid:
        s = channel_mean ** alpha
        s = s / np.sqrt(s.max() * s.min())
        W_hat = zeropoint_quantize(W * s, bits, group_size).reshape(W.shape) / s
        E = W - W_hat
        err = float(np.sum((E @ H) * E))
        errors[float(alpha)] = err
        if best is None or err < best[0]:
            best = (err, float(alpha), s, W_hat)
    _, alpha, s, W_hat = best
    return W_hat, {"alpha": alpha, "scales": s, "errors": errors}


def gptq_quantize(W, X, bits: int = 4, group_size: int = 128, damp: float = 0.01,
                  block_size: int = 128) -> np.ndarray:
    """GPTQ-style error-compensated rounding (Frantar et al., 2022), column by column.

    Columns are quantized left to right. The rounding error of column i is spread over the columns
    not yet quantized, in proportion to row i of the upper Cholesky factor of H⁻¹ (H = XᵀX / n plus
    ``damp`` × its mean diagonal, for numerical stability), which is the least-squares correction
    of the layer's output. A group's scale and zero point are fixed from the *updated* weights when
    the group's first column is reached. Updates to far columns are applied once per block of
    columns (the paper's lazy batch update) — same result, fewer passes; a block is a whole number
    of groups (``block_size`` rounded down, at least one group) so every group's scale sees weights
    with all earlier updates applied.

    If H is diagonal (uncorrelated inputs) no error can be compensated and the result equals
    :func:`rtn_quantize` exactly. Returns the dequantized weights Ŵ.
    """
    W, X = _check_layer(W, X, group_size)
    if damp < 0:
        raise ValueError("damp must be non-negative")
    W = W.copy()
    n_in = W.shape[1]
    H = X.T @ X / X.shape[0]
    dead = np.diag(H) == 0             # inputs that are always 0: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(n_in)] += damp * np.mean(np.diag(H))
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T      # H⁻¹ = UᵀU, U upper triangular
    except np.linalg.LinAlgError as exc:
        raise ValueError("the activations' Hessian is not positive definite; raise `damp` "
                         "or use more calibration tokens") from exc
    W_hat = np.empty_like(W)
    scale = zero = None
    block_size = group_size * max(1, block_size // group_size)
    for start in range(0, n_in, block_size):
        end = min(start + block_size, n_in)
        errs = np.empty((W.shape[0], end - start))
        for i in range(start, end):
            if i % group_size == 0:
                scale, zero = _zeropoint_params(W[:, i:i + group_size], bits)
            q = _zeropoint_apply(W[:, i:i + 1], scale, zero, bits)[:, 0]
            W_hat[:, i] = q
            err = (W[:, i] - q) / U[i, i]
            W[:, i + 1:end] -= np.outer(err, U[i, i + 1:end])
            errs[:, i - start] = err
        W[:, end:] -= errs @ U[start:end, end:]
    return W_hat


class ActivationRecorder:
    """Calibration activations: the inputs that named linear layers see while the model reads text.

    Loads a Hugging Face model folder in transformers — for a GGUF, the float32 folder
    ``labkit.models.hf_folder(path, dtype="float32")`` makes (exact, cached) — and registers forward hooks
    on the named modules — e.g. ``"model.layers.15.mlp.down_proj"`` — the way GPTQModel and
    llm-compressor collect calibration data. :meth:`record` runs texts through the model in
    windows of ``window`` tokens and returns ``{name: tokens × in_features}``; ``weights[name]`` is
    the layer's float32 weight matrix (out × in).
    """

    def __init__(self, folder, module_names, *, window: int = 512):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if window < 2:
            raise ValueError("window must be at least 2 tokens")
        self.names, self.window = list(module_names), window
        hf_logging.disable_progress_bar()
        # Check the names on an empty (meta-device) copy first: a typo fails before the weights load.
        with torch.device("meta"):
            skeleton = dict(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).named_modules())
        missing = [n for n in self.names if n not in skeleton]
        if missing:
            linear = [n for n, m in skeleton.items() if isinstance(m, torch.nn.Linear)][:4]
            raise ValueError(f"no module named {missing} in this model; its linear layers are named like {linear}")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()
        modules = dict(self.model.named_modules())
        self._modules = {n: modules[n] for n in self.names}
        self.weights = {n: m.weight.detach().numpy().astype(np.float32) for n, m in self._modules.items()}

    def close(self) -> None:
        """Drop the model (≈ 4 bytes × parameters); ``weights`` and recorded arrays stay usable."""
        self.model = self._modules = None

    def record(self, texts) -> dict[str, np.ndarray]:
        import torch

        if self.model is None:
            raise ValueError("this recorder was closed; create a new ActivationRecorder to record more")
        if isinstance(texts, str):
            texts = [texts]
        seen: dict[str, list] = {n: [] for n in self.names}

        def hook(name):
            def keep(_module, inputs, _output):
                x = inputs[0].detach()
                seen[name].append(x.reshape(-1, x.shape[-1]).numpy().copy())
            return keep

        hooks = [m.register_forward_hook(hook(n)) for n, m in self._modules.items()]
        try:
            with torch.no_grad():
                for text in texts:
                    ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
                    for start in range(0, ids.shape[1], self.window):
                        # the decoder stack only: the output head's logits are not needed
                        self.model.model(input_ids=ids[:, start:start + self.window])
        finally:
            for h in hooks:
                h.remove()
        if not any(seen.values()):
            raise ValueError("no text to record: pass at least one non-empty string")
        return {n: np.concatenate(v) for n, v in seen.items()}


# ---------------------------------------------------------------------------------------------
# float helpers

F32 = np.float32


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 → float16 (round to nearest even, as GGML_FP32_TO_FP16 on x86/ARM) as 2 bytes each."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(values, dtype=F32).astype(np.float16).view(np.uint8).reshape(values.shape[0], -1)


def _f16(raw: np.ndarray) -> np.ndarray:
    """2-byte little-endian float16 columns → float32 column vector."""
    return np.ascontiguousarray(raw).view(np.float16).astype(F32)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    # round to nearest even on the dropped 16 bits (ggml_compute_fp32_to_bf16)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return rounded.astype(np.uint16)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (it adds 1.5·2^23 in float32), as int32."""
    return np.rint(v).astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: halves go away from zero (np.rint sends 2.5 to 2). rint, then fix the rare ties."""
    r = np.rint(v)
    tie = np.abs(v - r) == F32(0.5)          # v - rint(v) is exact in float32
    if tie.any():
        r[tie] = np.trunc(v[tie]) + np.sign(v[tie])
    return r


def _row_reduce(a: np.ndarray, op) -> np.ndarray:
    """max/min over each row by halving (much faster than numpy's reduce over a short axis)."""
    while a.shape[1] > 1 and a.shape[1] % 2 == 0:
        half = a.shape[1] // 2
        a = op(a[:, :half], a[:, half:])
    return op.reduce(a, axis=1, keepdims=True) if a.shape[1] > 1 else a


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / np.where(d == 0, F32(1), d)).astype(F32)


def _first_absmax(blocks: np.ndarray) -> np.ndarray:
    """The signed value with the largest magnitude (the first one on ties, as ggml's loop keeps)."""
    columns = np.ascontiguousarray(blocks.T)      # reductions across contiguous rows stream fast
    hi, lo = columns.max(axis=0)[:, None], columns.min(axis=0)[:, None]
    amax = np.maximum(hi, -lo)
    has_pos, has_neg = hi == amax, -lo == amax
    # an all-zero block keeps ggml's starting value +0.0 (so d = 0/-8 = -0.0, as in C)
    signed = np.where(amax == 0, F32(0), np.where(has_pos, amax, -amax))
    both = (has_pos & has_neg)[:, 0] & (amax[:, 0] > 0)
    if both.any():     # +a and -a in one block: the first one wins
        rows = blocks[both]
        signed[both, 0] = rows[np.arange(rows.shape[0]), np.abs(rows).argmax(axis=1)]
    return signed


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """32 values (0..15) per row → 16 bytes: value j in the low nibble, j+16 in the high nibble."""
    q = q.astype(np.uint8)
    return q[:, :16] & 0x0F | (q[:, 16:] << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values → a little-endian uint32 (bit j = value j)."""
    return np.packbits((q >> 4).astype(np.uint8) & 1, axis=-1, bitorder="little")


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=-1, bitorder="little")


# ---------------------------------------------------------------------------------------------
# Legacy block formats (32 weights per block)

def _quantize_q8_0(x):
    d = (_row_reduce(np.abs(x), np.maximum) / F32(127)).astype(F32)
    q = _roundf(x * _safe_inverse(d)).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _dequantize_q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(F32)


def _quantize_q4_0(x):
    d = (_first_absmax(x) / F32(-8)).astype(F32)
    # (int8_t)(x*id + 8.5f): truncation after adding 8.5 rounds half up around the offset
    q = np.minimum(np.trunc(x * _safe_inverse(d) + F32(8.5)), 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def _dequantize_q4_0(b):
    return _f16(b[:, :2]) * (_unpack_nibbles(b[:, 2:]).astype(np.int8) - 8).astype(F32)


def _quantize_q4_1(x):
    lo, hi = _row_reduce(x, np.minimum), _row_reduce(x, np.maximum)
    d = ((hi - lo) / F32(15)).astype(F32)
    q = np.minimum(np.trunc((x - lo) * _safe_inverse(d) + F32(0.5)), 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)


def _dequantize_q4_1(b):
    return _f16(b[:, :2]) * _unpack_nibbles(b[:, 4:]).astype(F32) + _f16(b[:, 2:4])


def _quantize_q5_0(x):
    d = (_first_absmax(x) / F32(-16)).astype(F32)
    q = np.minimum(np.trunc(x * _safe_inverse(d) + F32(16.5)), 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], axis=1)


def _dequantize_q5_0(b):
    q = _unpack_nibbles(b[:, 6:]) | (_unpack_high_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.astype(np.int8) - 16).astype(F32)


def _quantize_q5_1(x):
    lo, hi = _row_reduce(x, np.minimum), _row_reduce(x, np.maximum)
    d = ((hi - lo) / F32(31)).astype(F32)
    q = np.trunc((x - lo) * _safe_inverse(d) + F32(0.5)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], axis=1)


def _dequantize_q5_1(b):
    q = _unpack_nibbles(b[:, 8:]) | (_unpack_high_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.astype(F32) + _f16(b[:, 2:4])


# ---------------------------------------------------------------------------------------------
# K-quants (256 weights per super-block). ggml's reference searches for good scales with small
# per-block loops; here each loop runs once over *all* blocks at a time (vectorised across
# blocks), keeping ggml's float32 operation order so the chosen scales — and bytes — agree.

def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis, as a C loop `s += t[i]` (np.sum is pairwise)."""
    s = terms[..., 0].copy()
    for i in range(1, terms.shape[-1]):
        s += terms[..., i]
    return s


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for rows of x → (scale, L)."""
    n_rows = x.shape[0]
    amax_idx = np.abs(x).argmax(axis=1)
    max_ = x[np.arange(n_rows), amax_idx]
    zero = np.abs(max_) < F32(1e-15)
    safe_max = np.where(zero, F32(1), max_).astype(F32)
    w = x * x

    def trial(iscale):
        levels = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = levels.astype(F32)
        return levels, _seq_sum(w * x * lf), _seq_sum(w * lf * lf)

    iscale = (F32(-nmax) / safe_max).astype(F32)
    L, sumlx, suml2 = trial(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / safe_max).astype(F32)
        levels, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            L[better] = levels[better]
            new_scale = sumlx[better] / suml2[better]
            scale[better] = new_scale
            best[better] = new_scale * sumlx[better]
    L = (L + nmax).astype(np.int32)
    L[zero] = 0
    scale[zero] = 0
    return scale, L


def _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    """ggml make_qkx2_quants(..., use_mad=false) for rows of x → (scale, the_min, L)."""
    lo = x.min(axis=1)
    hi = x.max(axis=1)
    sum_w = _seq_sum(weights)
    sum_x = _seq_sum(weights * x)
    lo = np.minimum(lo, F32(0))
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo).astype(F32)

    def error(scale, mn, L):
        diff = scale[:, None] * L.astype(F32) + mn[:, None] - x
        return _seq_sum(weights * (diff * diff))

    iscale = (F32(nmax) / span).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    mn = lo.copy()
    best_error = error(scale, mn, L)
    for step in range(nstep + 1):
        # ggml reuses `min` here, so a better fit found at one step moves the grid of the next
        span = np.where(flat, F32(1), hi - mn).astype(F32)
        iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span).astype(F32)
        laux = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        lf = laux.astype(F32)
        sum_l = _seq_sum(weights * lf)
        sum_l2 = _seq_sum(weights * lf * lf)
        sum_xl = _seq_sum(weights * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_D = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_D
        positive_min = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(positive_min, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), this_scale).astype(F32)
        this_min = np.where(positive_min, F32(0), this_min).astype(F32)
        cur_error = error(this_scale, this_min, laux)
        better = ok & (cur_error < best_error)
        if better.any():
            L[better] = laux[better]
            best_error[better] = cur_error[better]
            scale[better] = this_scale[better]
            mn[better] = this_min[better]
    L[flat] = 0
    scale[flat] = 0
    mn[flat] = lo[flat]
    return scale, -mn, L


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins → 12 bytes (ggml's get_scale_min_k4 layout)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    s = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return s


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty((s.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _quantize_q4_k(x):
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt(_seq_sum(sub * sub) / F32(32)).astype(F32)
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0)).astype(F32)
    # (uint8_t)nearest_int(...) then MIN(63, ·): the cast wraps negatives, as in C
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d16 = _f16_bytes((max_scale / F32(63)).astype(F32)[:, None])
    dmin16 = _f16_bytes((max_min / F32(63)).astype(F32)[:, None])
    d = (_f16(d16) * ls.astype(F32)).reshape(nb * 8, 1)
    dm = (_f16(dmin16) * lm.astype(F32)).reshape(nb * 8, 1)
    nonzero = d[:, 0] != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((sub + dm) / np.where(d == 0, F32(1), d)), 0, 15)
    L = np.where(nonzero[:, None], requant, L).reshape(nb, 4, 2, 32)   # d == 0 keeps the search's levels
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).astype(np.uint8).reshape(nb, 128)
    return np.concatenate([d16, dmin16, _pack_k4_scales(ls, lm), qs], axis=1)


def _dequantize_q4_k(b):
    nb = b.shape[0]
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    d = _f16(b[:, 0:2]) * sc.astype(F32)          # (nb, 8)
    m = _f16(b[:, 2:4]) * mn.astype(F32)
    q = b[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (q & 0x0F).reshape(nb, 8, 32).astype(F32)
    return (d[:, :, None] * q - m[:, :, None]).reshape(nb, QK_K)


def _dequantize_q5_k(b):
    nb = b.shape[0]
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    d = _f16(b[:, 0:2]) * sc.astype(F32)
    m = _f16(b[:, 2:4]) * mn.astype(F32)
    qh = b[:, 16:48]
    ql = b[:, 48:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(nb, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1     # sub-block j uses bit j
    q = (ql | (high << 4)).astype(F32)
    return (d[:, :, None] * q - m[:, :, None]).reshape(nb, QK_K)


def _quantize_q6_k(x):
    nb = x.shape[0]
    scales, L = _make_qx_quants(x.reshape(nb * 16, 16), 32)
    scales = scales.reshape(nb, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    empty = np.abs(max_scale) < F32(1e-15)
    iscale = (F32(-128) / np.where(empty, F32(1), max_scale)).astype(F32)
    d16 = _f16_bytes((F32(1) / iscale).astype(F32)[:, None])
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    d = (_f16(d16) * sc.astype(F32)).reshape(nb * 16, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(x.reshape(nb * 16, 16) / np.where(d == 0, F32(1), d)), -32, 31) + 32
    L = np.where(d != 0, requant, L).reshape(nb, 2, 4, 32).astype(np.uint8)    # halves of 128, quarters of 32
    ql = np.concatenate([L[:, :, 0] & 0x0F | ((L[:, :, 2] & 0x0F) << 4),
                         L[:, :, 1] & 0x0F | ((L[:, :, 3] & 0x0F) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16], axis=1)
    out[empty] = 0        # an all-zero super-block is stored as zeros
    return out


def _dequantize_q6_k(b):
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 2, 32)          # half, (first|second 32 bytes), l
    qh = b[:, 128:192].reshape(nb, 2, 32)
    sc = b[:, 192:208].view(np.int8).reshape(nb, 16).astype(F32)
    d = _f16(b[:, 208:210])
    q = np.empty((nb, 2, 4, 32), dtype=np.uint8)
    q[:, :, 0] = (ql[:, :, 0] & 0x0F) | (((qh >> 0) & 3) << 4)
    q[:, :, 1] = (ql[:, :, 1] & 0x0F) | (((qh >> 2) & 3) << 4)
    q[:, :, 2] = (ql[:, :, 0] >> 4) | (((qh >> 4) & 3) << 4)
    q[:, :, 3] = (ql[:, :, 1] >> 4) | (((qh >> 6) & 3) << 4)
    qf = (q.astype(np.int8) - 32).astype(F32).reshape(nb, 16, 16)     # 16 sub-blocks of 16
    # y = d * sc * q, evaluated left to right as in C: (d * sc) * q
    return ((d * sc)[:, :, None] * qf).reshape(nb, QK_K)


def _dequantize_q2_k(b):
    nb = b.shape[0]
    scales = b[:, :16]
    qs = b[:, 16:80].reshape(nb, 2, 1, 32)
    d = _f16(b[:, 80:82])
    dmin = _f16(b[:, 82:84])
    dl = d * (scales & 0x0F).astype(F32)               # (nb, 16)
    ml = dmin * (scales >> 4).astype(F32)
    q = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3   # (nb, 2, 4, 32)
    q = q.reshape(nb, 2, 4, 2, 16).reshape(nb, 16, 16).astype(F32)            # 16 sub-blocks of 16
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(nb, QK_K)


_QUANTIZERS = {"Q8_0": _quantize_q8_0, "Q4_0": _quantize_q4_0, "Q4_1": _quantize_q4_1, "Q5_0": _quantize_q5_0,
               "Q5_1": _quantize_q5_1, "Q4_K": _quantize_q4_k, "Q6_K": _quantize_q6_k}
_DEQUANTIZERS = {"Q8_0": _dequantize_q8_0, "Q4_0": _dequantize_q4_0, "Q4_1": _dequantize_q4_1,
                 "Q5_0": _dequantize_q5_0, "Q5_1": _dequantize_q5_1, "Q2_K": _dequantize_q2_k,
                 "Q4_K": _dequantize_q4_k, "Q5_K": _dequantize_q5_k, "Q6_K": _dequantize_q6_k}


# ---------------------------------------------------------------------------------------------
# The real thing: ggml's own (de)quantizers from the library llama-cpp-python ships.

@functools.lru_cache(maxsize=1)
def _ggml_base():
    try:
        import llama_cpp
    except ImportError as exc:   # pragma: no cover - the lab always has it
        raise RuntimeError("llama-cpp-python is not installed: run `make setup`.") from exc
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not candidates:
        raise RuntimeError(f"no ggml-base library next to llama-cpp-python in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def llamacpp_quantize(array, qtype: str) -> bytes:
    """Quantize with ggml's C code (``ggml_quantize_chunk``, no importance matrix): the reference."""
    x, b = _check_array(array, qtype)
    rows = x.reshape(-1, x.shape[-1])
    out = np.zeros(n_bytes(x.shape, b.name), dtype=np.uint8)
    _ggml_base().ggml_quantize_chunk(b.ggml_type, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    return out.tobytes()


def llamacpp_dequantize(data, qtype: str, shape) -> np.ndarray:
    """Dequantize with ggml's C code (``dequantize_row_<type>``), as llama.cpp does on the CPU."""
    blocks, b, shape = _blocks_from_bytes(data, qtype, shape)
    if b.name in ("F32", "F16", "BF16"):
        return dequantize(data, qtype, shape)
    fn = getattr(_ggml_base(), f"dequantize_row_{b.name.lower().replace('_k', '_K')}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    src = np.ascontiguousarray(blocks)
    out = np.empty(int(np.prod(shape)), dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(shape)

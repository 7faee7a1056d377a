"""Measuring what quantization costs: perplexity and KL-divergence with sliding windows (chapter 01).

* **Perplexity** = exp(mean negative log-likelihood of each next token). Lower is better; a model
  that spreads probability evenly over V tokens has perplexity V.
* **KL-divergence** against a reference model (here the F16 file): for each position,
  Σ_v p_ref(v) · (log p_ref(v) − log p_model(v)), averaged. It compares whole next-token
  distributions rather than the one correct token, so it needs far fewer tokens to rank
  quantization levels reliably (llama.cpp's ``llama-perplexity --kl-divergence`` reports the same).

Texts longer than the context are scored with **sliding windows**: each window of ``window``
tokens is evaluated, and only the tokens not scored by an earlier window count, so every token
after the first is scored exactly once and (after the first window) sees at least
``window - stride`` tokens of context.

>>> sliding_windows(10, window=4, stride=2)
[(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .llamacpp_lab import all_logits

LogitsFn = Callable[[Sequence[int]], np.ndarray]   # tokens → (len(tokens), vocab) logits


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) for each window: tokens ``first_scored … end-1`` are scored in it.

    A token is predicted from the logits one position earlier, which must lie in the same
    window, so ``stride`` may be at most ``window - 1`` (``window - 1``: almost no overlap, fastest).
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be between 1 and window - 1 ({window - 1}), got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    spans, start, first = [], 0, 1
    while True:
        end = min(start + window, n_tokens)
        spans.append((start, end, first))
        if end == n_tokens:
            return spans
        start, first = start + stride, end


def llama_cpp_chunks(n_tokens: int, n_ctx: int = 512) -> list[tuple[int, int, int]]:
    """The spans ``llama-perplexity`` scores, in :func:`sliding_windows`' form: non-overlapping
    chunks of ``n_ctx`` tokens (a shorter tail is dropped), each scoring only its second half —
    the first half is context. Fewer tokens scored, each with less context than sliding windows
    give, so its perplexity is higher on the same text.

    >>> llama_cpp_chunks(1100, 512)
    [(0, 512, 257), (512, 1024, 769)]
    """
    if n_tokens < n_ctx:
        raise ValueError(f"need at least one chunk of {n_ctx} tokens, got {n_tokens}")
    return [(s, s + n_ctx, s + n_ctx // 2 + 1) for s in range(0, n_tokens - n_ctx + 1, n_ctx)]


def log_softmax(logits: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64 unless asked otherwise)."""
    x = np.asarray(logits, dtype=dtype)
    if not np.isfinite(x).all():
        raise ValueError("logits contain NaN or infinite values: the model output is broken")
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood (nats) of each target under the matching row of logits."""
    return _nll(log_softmax(logits), targets)


def _nll(logprobs: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    t = np.asarray(targets)
    if logprobs.shape[0] != t.shape[0]:
        raise ValueError(f"{logprobs.shape[0]} rows of logits for {t.shape[0]} targets")
    if t.size and (t.min() < 0 or t.max() >= logprobs.shape[-1]):
        raise ValueError(f"target token ids must be in 0…{logprobs.shape[-1] - 1}")
    return -logprobs[np.arange(t.shape[0]), t]


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(ref ‖ model) per row, in nats."""
    if np.shape(ref_logits) != np.shape(logits):
        raise ValueError(f"shapes differ: {np.shape(ref_logits)} vs {np.shape(logits)}")
    return _kl(log_softmax(ref_logits), log_softmax(logits))


def _kl(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    # clamp tiny negative values that are only rounding
    return np.maximum((np.exp(ref_logprobs) * (ref_logprobs - logprobs)).sum(axis=-1), 0.0)


def perplexity(nll: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood."""
    v = np.asarray(nll, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no tokens were scored")
    return float(np.exp(v.mean()))


@dataclass
class Score:
    """Per-model result of :func:`compare`."""

    name: str
    n_scored: int
    perplexity: float
    mean_kl: float | None           # vs the reference (None for the reference itself)
    kl_p99: float | None            # 99th percentile of per-token KL: the bad tail
    top1_agreement: float | None    # share of positions whose most likely token matches the reference
    nll: np.ndarray
    kl: np.ndarray | None

    def row(self) -> dict:
        return {"model": self.name, "tokens_scored": self.n_scored, "perplexity": self.perplexity,
                "mean_kl": self.mean_kl, "kl_p99": self.kl_p99, "top1_agreement": self.top1_agreement}


def compare(models: Mapping[str, LogitsFn], tokens: Sequence[int], *, reference: str,
            window: int = 512, stride: int = 256, spans: Sequence[tuple[int, int, int]] | None = None,
            first_token: int | None = None) -> dict[str, Score]:
    """Score every model on ``tokens`` window by window, and compare each with ``reference``.

    Models run in lockstep per window, so only one window of reference log-probabilities is
    ever held in memory (the vocabulary makes a whole text's worth large). ``spans`` replaces
    the sliding windows (e.g. :func:`llama_cpp_chunks`); ``first_token`` replaces each window's
    first token, as llama-perplexity does with BOS for models that use one.
    """
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not among the models {list(models)}")
    tokens = list(tokens)
    nll = {name: [] for name in models}
    kl = {name: [] for name in models if name != reference}
    agree = {name: [] for name in kl}
    from .env import progress
    windows = list(spans) if spans is not None else sliding_windows(len(tokens), window, stride)
    for start, end, first in progress(windows, f"scoring {len(models)} models"):
        chunk = tokens[start:end]
        if first_token is not None:
            chunk = [first_token, *chunk[1:]]
        rows = slice(first - start - 1, end - start - 1)   # logits at i predict token i+1
        targets = tokens[first:end]
        # float32 is plenty for KL of ~1e-3 nats and halves the time over a 49k-token vocabulary
        ref_lp = log_softmax(np.asarray(models[reference](chunk))[rows], np.float32)   # once per window
        nll[reference].append(_nll(ref_lp, targets))
        ref_top = ref_lp.argmax(axis=-1)
        for name, fn in models.items():
            if name == reference:
                continue
            lp = log_softmax(np.asarray(fn(chunk))[rows], np.float32)
            nll[name].append(_nll(lp, targets))
            kl[name].append(_kl(ref_lp, lp))
            agree[name].append(lp.argmax(axis=-1) == ref_top)
    out = {}
    for name in models:
        v = np.concatenate(nll[name]).astype(np.float64)
        k = np.concatenate(kl[name]) if name in kl else None
        out[name] = Score(name, int(v.size), perplexity(v),
                          None if k is None else float(k.mean()),
                          None if k is None else float(np.percentile(k, 99)),
                          None if k is None else float(np.concatenate(agree[name]).mean()), v, k)
    return out


# ---------------------------------------------------------------------------------------------
# llama.cpp adapters

class LlamaLogits:
    """A GGUF model as a ``tokens → logits`` function (llama-cpp-python, all positions' logits).

    A loaded scorer holds ~3 × n_ctx × vocabulary floats of logit buffers besides its weights
    (≈ 450 MB for SmolLM2 at n_ctx=512). ``resident=False`` loads the model for each call and
    frees it afterwards — a fraction of a second per call from the page cache — so comparing
    several models window by window needs the memory of one (chapter 01 on a 2 GB Binder).
    """

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None, n_batch: int = 512,
                 *, resident: bool = True):
        self.path = str(path)
        self._params = dict(n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads, logits_all=True, verbose=False)
        self.n_ctx = n_ctx
        self.llm = self._load() if resident else None
        self.resident = resident

    def _load(self):
        from llama_cpp import Llama
        return Llama(model_path=self.path, **self._params)

    def __call__(self, tokens: Sequence[int]) -> np.ndarray:
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        llm = self.llm if self.resident else self._load()
        try:
            llm.reset()
            llm.eval(list(tokens))
            return np.array(llm.scores[:len(tokens)], dtype=np.float32)
        finally:
            if not self.resident:
                llm.close()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def tokenize(path: str | Path, text: str) -> list[int]:
    """Token ids of ``text`` with the GGUF's own tokenizer (vocabulary only, no weights loaded)."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


def llama_cpp_tokens(path: str | Path, text: str) -> tuple[list[int], int | None]:
    """``text`` tokenized as ``llama-perplexity`` does (with BOS where the model asks for one), and
    the token it forces at the start of every chunk (BOS for such models, else None): pass both to
    :func:`compare` with ``spans=llama_cpp_chunks(...)`` to score exactly what it scores."""
    import llama_cpp
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)   # BOS only if the model adds one
        return tokens, (llm.token_bos() if add_bos else None)
    finally:
        llm.close()


def decode_speed(path: str | Path, n_tokens: int = 32, prompt: Sequence[int] | None = None,
                 n_threads: int | None = None) -> float:
    """Greedy decode tokens/s (one token per forward pass, as a chat reply is generated)."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=n_threads, verbose=False)
    try:
        prompt = list(prompt or llm.tokenize(b"The history of the lighthouse keepers", add_bos=True))
        llm.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            token = int(np.argmax(_last_logits(llm)))
            llm.eval([token])
        return n_tokens / (time.perf_counter() - t0)
    finally:
        llm.close()


def _last_logits(llm) -> np.ndarray:
    """Logits of the last evaluated position (llama-cpp-python only keeps them with logits_all)."""
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


# ----------------------------------------------------------------------------- KV cache quantization (chapter 03)
def kv_logits_drift(model_path, tokens: Sequence[int], cache_type: str = "q8_0", **params) -> dict:
    """Mean/max KL divergence and top-1 agreement of next-token distributions: KV cache in
    ``cache_type`` (with flash attention, which a quantized V cache needs) against f16 (chapter 03)."""
    import llama_cpp
    ggml = getattr(llama_cpp, f"GGML_TYPE_{cache_type.upper()}")
    ref = all_logits(model_path, tokens, flash_attn=True, **params)
    other = all_logits(model_path, tokens, flash_attn=True, type_k=ggml, type_v=ggml, **params)
    kl = kl_divergence(ref.astype(np.float64), other.astype(np.float64))
    return {"cache": cache_type, "mean KL": float(kl.mean()), "max KL": float(kl.max()),
            "top-1 agreement": float(np.mean(ref.argmax(-1) == other.argmax(-1))), "positions": len(tokens)}

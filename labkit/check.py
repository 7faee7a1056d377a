"""Instant feedback for the exercises at the end of each chapter.

``check(exercise_id, answer)`` prints a pass/fail line — with a hint aimed at the most common
mistake when it fails — and returns True/False. Expected values are computed by the same labkit
functions the chapter taught, never typed in.

>>> check("00-kv-cache", 2**30)
✅ 00-kv-cache: correct.
True
>>> check("00-kv-cache", 4 * 2**30)
❌ 00-kv-cache: 4× too large — count KV heads (8), not attention heads (32): grouped-query attention shares each KV head.
False
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Exercise:
    id: str
    chapter: str
    prompt: str
    grade: Callable[[Any], tuple[bool, str]]     # answer → (passed, hint when failed)


def _close(answer, expected, rel=0.01) -> bool:
    try:
        return math.isclose(float(answer), float(expected), rel_tol=rel)
    except (TypeError, ValueError):
        return False


def _kv_cache(answer):
    from .memory import REFERENCE_MODELS
    llama = next(a for a in REFERENCE_MODELS if a.name == "Llama-3.1-8B")
    expected = llama.kv_cache_bytes(8192)
    if _close(answer, expected):
        return True, ""
    if _close(answer, expected * llama.n_heads / llama.n_kv_heads):
        return False, (f"{llama.n_heads // llama.n_kv_heads}× too large — count KV heads ({llama.n_kv_heads}), not attention "
                       f"heads ({llama.n_heads}): grouped-query attention shares each KV head.")
    if _close(answer, expected / 2):
        return False, "half the answer — remember both K and V are cached (the factor 2)."
    return False, "bytes = 2 × layers × KV heads × head_dim × n_ctx × 2 bytes (f16). Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128."


def _weights(answer):
    from .memory import weights_bytes
    expected = weights_bytes(7.62e9, "Q4_K_M") / 1e9
    if _close(answer, expected, rel=0.02):
        return True, ""
    if _close(answer, 7.62e9 * 4 / 8 / 1e9, rel=0.02):
        return False, "Q4_K_M is not 4.0 bits per weight: its mix keeps some tensors at higher precision (≈ 4.89 bpw on average)."
    return False, "GB = parameters × bits-per-weight ÷ 8 ÷ 1e9 (labkit.memory.bits_per_weight('Q4_K_M'))."


def _paged_blocks(answer):
    lengths, block = [5, 16, 17, 100], 16
    expected = sum(-(-n // block) for n in lengths)
    if answer == expected:
        return True, ""
    if answer == sum(n // block for n in lengths):
        return False, "a partly filled block is still a whole block: round *up* (ceil), not down."
    return False, f"blocks per sequence = ceil(length ÷ {block}); add them up."


def _decode_bound(answer):
    from .bench import decode_bound
    expected = decode_bound(1008e9, 4.9e9)         # RTX 4090 bandwidth, 8B Q4_K_M weights
    if _close(answer, expected, rel=0.02):
        return True, ""
    return False, "tokens/s ≤ bandwidth (bytes/s) ÷ bytes read per token (all the weights, once per token)."


def _fits(answer):
    from .troubleshoot import fit_report
    report = fit_report("smollm2", n_ctx=32768, available_bytes=0)
    expected = report.weights_bytes + report.kv_bytes
    if _close(answer, expected, rel=0.02):
        return True, ""
    if _close(answer, report.weights_bytes, rel=0.02):
        return False, "that is the weights alone — add the KV cache for 32768 tokens."
    return False, "weights (sum of the GGUF's tensor sizes) + KV cache (labkit.memory.from_gguf(...).kv_cache_bytes(32768))."


EXERCISES: dict[str, Exercise] = {e.id: e for e in [
    Exercise("00-kv-cache", "00", "Bytes of f16 KV cache for Llama-3.1-8B at 8192 tokens, one sequence.", _kv_cache),
    Exercise("00-weights", "00", "GB (1e9 bytes) of Qwen2.5-7B's weights (7.62 B parameters) at Q4_K_M.", _weights),
    Exercise("04-paged-blocks", "04", "16-token blocks needed by four sequences of 5, 16, 17 and 100 tokens.", _paged_blocks),
    Exercise("06-decode-bound", "06", "Decode bound (tok/s) of an 8B Q4_K_M model (4.9e9 bytes) on a 1008 GB/s GPU.", _decode_bound),
    Exercise("07-fits", "07", "Bytes the bundled SmolLM2 needs for weights + f16 KV cache at n_ctx=32768.", _fits),
]}


def register(exercise: Exercise) -> None:
    """Add a chapter's exercise (chapters with their own helpers register theirs)."""
    EXERCISES[exercise.id] = exercise


def check(exercise_id: str, answer: Any) -> bool:
    """Grade an answer, print the verdict (with a hint on failure) and return it."""
    if exercise_id not in EXERCISES:
        raise KeyError(f"No exercise {exercise_id!r}; known: {', '.join(sorted(EXERCISES))}")
    if answer is None or answer is Ellipsis:
        print(f"⏳ {exercise_id}: not answered yet — replace the ... with your answer.")
        return False
    ok, hint = EXERCISES[exercise_id].grade(answer)
    print(f"✅ {exercise_id}: correct." if ok else f"❌ {exercise_id}: {hint}")
    return ok

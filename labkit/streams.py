"""Stream primitives every engine and chapter shares (introduced in chapter 03; used by 06, 09 and the servers).

* :func:`sse_payloads` — the ``data:`` payloads of a server-sent-event stream (OpenAI-compatible servers);
* :func:`piece_of` — the text a streamed chunk carries, llama-cpp-python dicts and OpenAI SDK objects alike;
* :func:`timed_stream` — consume a stream, timing each piece: a :class:`RequestTiming`
  (TTFT, inter-token latencies, decode tokens/s);
* :func:`percentile`, :func:`summarize` — the statistics the benchmark chapter reports.

They sit below the engines (they import nothing of labkit), so an engine module can time a stream
without reaching up into the benchmark chapter's module (:mod:`labkit.bench`, which re-exports them).

>>> summarize([1.0, 2.0, 3.0, 4.0, 100.0])["p50"]
3.0
>>> round(percentile([1, 2, 3, 4], 75), 2)
3.25
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


# ----------------------------------------------------------------------------- statistics
def percentile(values, q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default)."""
    if len(values) == 0:
        raise ValueError("percentile of an empty list")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(values) -> dict:
    """n, mean, stdev, p50, p95, p99, min, max of a list of numbers."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("nothing to summarize")
    return {"n": len(v), "mean": statistics.fmean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
            "p50": percentile(v, 50), "p95": percentile(v, 95), "p99": percentile(v, 99), "min": min(v), "max": max(v)}


def max_in_flight(intervals: Iterable[tuple[float, float]]) -> int:
    """The most ``(start, end)`` intervals open at one moment: how many requests a server was working on at
    once (chapter 02 introduces it). An interval ending where another starts does not overlap it.

    >>> max_in_flight([(0, 1), (1, 2), (2, 3)])      # one after another: a single stream
    1
    >>> max_in_flight([(0, 2), (0.5, 2.5), (2.5, 3)])
    2
    """
    events = sorted((t, step) for start, end in intervals for t, step in ((start, 1), (end, -1)))
    most = now = 0
    for _, step in events:          # at equal times the end (-1) sorts before the start (+1)
        now += step
        most = max(most, now)
    return most


# ----------------------------------------------------------------------------- one request
@dataclass
class RequestTiming:
    """Client-side timing of one streamed request (seconds, from the moment it was sent)."""

    ttft: float
    e2e: float
    prompt_tokens: int
    output_tokens: int
    token_times: list[float] = field(default_factory=list, repr=False)   # arrival of each content chunk
    engine: dict = field(default_factory=dict)                           # the engine's own accounting

    @property
    def decode_tps(self) -> float:
        """Tokens after the first ÷ time after the first (the first token belongs to prefill)."""
        span = self.e2e - self.ttft
        return (self.output_tokens - 1) / span if self.output_tokens > 1 and span > 0 else float("nan")

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


# ----------------------------------------------------------------------------- streams (chapter 03 introduces them)
def sse_payloads(lines: Iterable[str]):
    """The payloads of a server-sent-event stream's ``data:`` lines, ``[DONE]`` included — what an
    OpenAI-compatible server streams; comments (``: keep-alive``) and blank lines are skipped.

    >>> list(sse_payloads(['data: {"a": 1}', '', ': keep-alive', 'data: [DONE]']))
    ['{"a": 1}', '[DONE]']
    """
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def piece_of(chunk: Any) -> str | None:
    """The text a streamed chunk carries, for llama-cpp-python dicts and OpenAI SDK objects,
    chat (``delta.content``) or completion (``text``); None for role/finish/usage-only chunks."""
    if isinstance(chunk, dict):
        choices = chunk.get("choices") or []
        if not choices:
            return None
        c = choices[0]
        if "delta" in c:
            return (c.get("delta") or {}).get("content") or None
        return c.get("text") or None
    choices = getattr(chunk, "choices", None) or []
    if not choices:
        return None
    c = choices[0]
    delta = getattr(c, "delta", None)
    if delta is not None:
        return getattr(delta, "content", None) or None
    return getattr(c, "text", None) or None


def timed_stream(stream: Iterable[Any], t0: float | None = None, *, echo: Callable[[str], None] | None = None,
                 now: Callable[[], float] = time.perf_counter) -> tuple[str, RequestTiming]:
    """Consume a stream; return (text, :class:`~labkit.bench.RequestTiming`).

    ``t0`` is when the request was sent (default: now — call this right after creating the
    stream, which for llama-cpp-python does no work until iterated). Each content chunk counts
    as one token: both llama-cpp-python and its server emit one chunk per generated token
    (multi-byte characters can merge two). Tokens/s is decode only: tokens after the first ÷
    time after the first.
    """
    t0 = now() if t0 is None else t0
    pieces, times = [], []
    for chunk in stream:
        p = piece_of(chunk)
        if p:
            times.append(now() - t0)
            pieces.append(p)
            if echo:
                echo(p)
    if not times:
        raise RuntimeError("the stream produced no text (check max_tokens, stop strings, or the server log)")
    e2e = now() - t0
    return "".join(pieces), RequestTiming(times[0], e2e, -1, len(times), times)

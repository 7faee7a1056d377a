"""A benchmark harness you can trust (chapter 06).

What it measures, per request: time to first token (TTFT), inter-token latencies (ITL), decode
tokens/s (tokens after the first ÷ time after the first), end-to-end latency. Token counts come
from the engine (``usage``, perf counters), never from counting stream chunks. Runs are
summarised with medians and tail percentiles, after warm-up runs that are thrown away.

Targets:

* :func:`run_llama` — an in-process ``llama_cpp.Llama``, with llama.cpp's own perf counters
  (``llama_perf_context``) recorded beside the harness's clock, so the two can be compared.
* :func:`run_openai` — any OpenAI-compatible server (llama.cpp, vLLM, Ollama's ``/v1``),
  streamed with the async client, at a chosen concurrency.

And the physics: :func:`memory_bandwidth` (a STREAM-like triad) and :func:`decode_bound`
(tokens/s ≤ bandwidth ÷ bytes read per token).

The stream primitives (:func:`~labkit.streams.timed_stream`, :class:`~labkit.streams.RequestTiming`,
:func:`~labkit.streams.percentile`...) live in :mod:`labkit.streams`, below the engines, and the
in-process llama.cpp timers (:func:`~labkit.llamacpp_lab.time_llama`, :func:`~labkit.llamacpp_lab.run_llama`)
in :mod:`labkit.llamacpp_lab`; this module re-exports both, as chapter 06 uses them.
"""
from __future__ import annotations

import asyncio
import json
import platform
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .llamacpp_lab import DEFAULT_PROMPT, run_llama, time_llama  # noqa: F401  (bench.run_llama: chapters 06, 07)
from .llamacpp_lab import perf as llama_perf  # noqa: F401  (bench.llama_perf: chapter 06)
from .streams import RequestTiming, percentile, piece_of, sse_payloads, summarize, timed_stream  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------- Ollama's native API
def time_ollama(client, model: str, prompt: str | None = None, max_tokens: int = 64, seed: int = 0) -> RequestTiming:
    """One streamed ``/api/generate``, timed by the harness and by Ollama's own nanosecond counters."""
    t0 = time.perf_counter()
    times, final = [], None
    for chunk in client.generate(model=model, prompt=prompt or DEFAULT_PROMPT, stream=True, raw=True,
                                 options={"num_predict": max_tokens, "temperature": 0.0, "seed": seed}):
        now = time.perf_counter() - t0
        if chunk.get("response"):
            times.append(now)
        if chunk.get("done"):
            final = chunk
    e2e = time.perf_counter() - t0
    if not times or final is None:
        raise RuntimeError(f"{model}: the stream ended without tokens or without its final statistics")
    engine = {"prompt_tokens": final["prompt_eval_count"], "prompt_ms": final["prompt_eval_duration"] / 1e6,
              "decode_tokens": final["eval_count"], "decode_ms": final["eval_duration"] / 1e6,
              "load_ms": (final.get("load_duration") or 0) / 1e6, "done_reason": final.get("done_reason")}
    return RequestTiming(times[0], e2e, final["prompt_eval_count"], final["eval_count"], times, engine)


def run_ollama(server_or_url, model: str | None = None, prompt: str | None = None, max_tokens: int = 64,
               runs: int = 5, warmup: int = 1) -> list[RequestTiming]:
    """Repeated :func:`time_ollama` runs against a real Ollama or labkit's Ollama-compatible server."""
    import ollama
    host = getattr(server_or_url, "base_url", server_or_url)
    model = model or server_or_url.model
    client = ollama.Client(host=host)
    for _ in range(warmup):
        time_ollama(client, model, prompt, max_tokens)
    return [time_ollama(client, model, prompt, max_tokens) for _ in range(runs)]


# ----------------------------------------------------------------------------- OpenAI-compatible servers
async def _one_openai(client, model: str, prompt: str, max_tokens: int, extra: dict) -> RequestTiming:
    t0 = time.perf_counter()
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True}, extra_body=extra)
    times, usage, finish = [], None, None
    async for chunk in stream:
        now = time.perf_counter() - t0
        if chunk.choices:
            if chunk.choices[0].text:
                times.append(now)
            finish = chunk.choices[0].finish_reason or finish
        if getattr(chunk, "usage", None):
            usage = chunk.usage
    e2e = time.perf_counter() - t0
    if not times:
        raise RuntimeError(f"{model}: the stream produced no tokens")
    if usage is not None:
        n_prompt, n_out = usage.prompt_tokens, usage.completion_tokens
    elif finish == "length":          # engines without stream usage: a length stop means max_tokens
        n_prompt, n_out = -1, max_tokens
    else:
        raise RuntimeError("the server reported no usage and stopped early; token count unknown "
                           "(use max_tokens it cannot reach, or an engine that reports usage)")
    return RequestTiming(times[0], e2e, n_prompt, n_out, times)


async def _run_openai_async(base_url, api_key, model, prompt, max_tokens, concurrency, requests, extra):
    from openai import APIConnectionError, APITimeoutError, AsyncOpenAI
    async with AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=600) as client:
        sem = asyncio.Semaphore(concurrency)

        async def guarded(i):
            async with sem:
                try:
                    return await _one_openai(client, model, prompt, max_tokens, extra)
                except APIConnectionError as exc:
                    if isinstance(exc, APITimeoutError):
                        raise
                    # A pooled keep-alive connection the server closed as we reused it fails before any
                    # token; the OpenAI SDK retries that by default (we turned its retries off so HTTP errors
                    # stay visible). Retry once, and say so: a second failure is a real fault.
                    warnings.warn(f"request {i}: connection failed before any token ({exc!r}); retried once", stacklevel=1)
                    return await _one_openai(client, model, prompt, max_tokens, extra)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(requests)))
        return list(results), time.perf_counter() - t0


def run_openai(server_or_url, model: str | None = None, prompt: str = DEFAULT_PROMPT,
               max_tokens: int = 64, concurrency: int = 1, requests: int | None = None, warmup: int = 1,
               api_key: str | None = None, extra_body: dict | None = None) -> tuple[list[RequestTiming], float]:
    """Stream ``requests`` completions at ``concurrency``; returns (timings, wall seconds).

    ``server_or_url`` is a :class:`labkit.Server` or a ``.../v1`` base URL.
    """
    if hasattr(server_or_url, "base_url"):
        base_url, model, api_key = server_or_url.base_url + "/v1", model or server_or_url.model, api_key or server_or_url.api_key
    else:
        base_url = server_or_url
    requests = requests or max(concurrency, 4)
    runner = lambda n, c: asyncio.run(_run_openai_async(base_url, api_key, model, prompt, max_tokens, c, n, extra_body or {}))  # noqa: E731
    if warmup:
        _in_fresh_loop(runner, warmup, 1)
    return _in_fresh_loop(runner, requests, concurrency)


def _in_fresh_loop(fn, *args):
    """asyncio.run() refuses to run inside Jupyter's event loop; use a worker thread there."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def sweep_concurrency(server, levels=(1, 2, 4, 8, 16), max_tokens: int = 32, requests_per_level: int | None = None,
                      **kwargs) -> list[dict]:
    """Aggregate throughput and per-request latency at each concurrency level."""
    from .env import progress
    rows = []
    for level in progress(list(levels), "concurrency sweep"):
        timings, wall = run_openai(server, max_tokens=max_tokens, concurrency=level,
                                   requests=requests_per_level or max(level, 4), warmup=0, **kwargs)
        rows.append({"concurrency": level, "requests": len(timings),
                     "throughput_tps": sum(t.output_tokens for t in timings) / wall,
                     "ttft_p50": percentile([t.ttft for t in timings], 50),
                     "e2e_p50": percentile([t.e2e for t in timings], 50),
                     "decode_tps_p50": percentile([t.decode_tps for t in timings], 50)})
    return rows


def table(timings: list[RequestTiming]) -> dict:
    """Median and tail figures of a set of runs."""
    itl = [x for t in timings for x in t.itl]
    return {"runs": len(timings), "ttft_p50_s": percentile([t.ttft for t in timings], 50),
            "ttft_p95_s": percentile([t.ttft for t in timings], 95),
            "decode_tps_p50": percentile([t.decode_tps for t in timings], 50),
            "itl_p50_ms": 1000 * percentile(itl, 50) if itl else float("nan"),
            "itl_p99_ms": 1000 * percentile(itl, 99) if itl else float("nan"),
            "e2e_p50_s": percentile([t.e2e for t in timings], 50)}


# ----------------------------------------------------------------------------- tuning
def brute_force(measure, grid: dict) -> tuple[dict, float, list[dict]]:
    """Measure every combination of ``grid``; return (best config, its score, all rows)."""
    import itertools
    keys = list(grid)
    rows = []
    for values in itertools.product(*(grid[k] for k in keys)):
        config = dict(zip(keys, values))
        rows.append({**config, "score": float(measure(**config))})
    best = max(rows, key=lambda r: r["score"])
    return {k: best[k] for k in keys}, best["score"], rows


def coordinate_tune(measure, grid: dict, start: dict | None = None, rounds: int = 2) -> tuple[dict, float, int]:
    """Greedy coordinate search: improve one knob at a time, keeping the others fixed.

    Returns (best config, its score, number of measurements). Far fewer measurements than
    brute force when knobs are roughly independent (threads, batch size, flash attention are).
    Measurements are cached, so a configuration is never measured twice.
    """
    config = dict(start or {k: v[0] for k, v in grid.items()})
    cache: dict[tuple, float] = {}

    def score(cfg):
        key = tuple(sorted(cfg.items()))
        if key not in cache:
            cache[key] = float(measure(**cfg))
        return cache[key]

    best = score(config)
    for _ in range(rounds):
        improved = False
        for knob, values in grid.items():
            for value in values:
                candidate = {**config, knob: value}
                s = score(candidate)
                if s > best:
                    config, best, improved = candidate, s, True
        if not improved:
            break
    return config, best, len(cache)


# ----------------------------------------------------------------------------- harness overhead
def harness_overhead(n_tokens: int = 256, per_token_s: float = 0.005, repeats: int = 3) -> float:
    """Share of decode time the harness itself adds: time a no-op stream with a known schedule.

    Each fake token takes exactly ``per_token_s`` of producer time *after* the harness asked for
    it, so whatever the harness does per token adds up. Best of ``repeats``, because a busy
    machine can only make it look worse.
    """
    def fake_stream():
        for _ in range(n_tokens):
            deadline = time.perf_counter() + per_token_s
            while time.perf_counter() < deadline:     # busy-wait: sleep() granularity would dominate
                pass
            yield {"choices": [{"text": "x"}]}

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, timing = timed_stream(fake_stream(), t0)
        best = min(best, timing.e2e / (n_tokens * per_token_s) - 1)
    return best


# ----------------------------------------------------------------------------- llama-bench
def llama_bench(model_path, *, n_prompt: int = 0, n_gen: int = 64, threads: int | Sequence[int] | None = None,
                repetitions: int = 3, extra: Sequence[str] = (), timeout: float = 600) -> list[dict]:
    """Run llama.cpp's own ``llama-bench`` (built by ``make setup``) and return its JSON rows.

    Each row has ``n_prompt``/``n_gen``/``n_threads`` and ``avg_ts``/``stddev_ts`` (tokens/s,
    mean over ``repetitions`` after llama-bench's own warm-up). ``n_prompt`` alone measures
    prefill (a ``ppN`` test), ``n_gen`` alone decode from an empty context (``tgN``). This
    machine's repacking rule (:mod:`labkit.repack`) is applied; ``threads`` may be a list, and
    ``extra`` adds raw flags, e.g. ``["-b", "16,256", "-fa", "0,1"]``: every combination is run.
    """
    import subprocess

    from . import llama_tools, repack
    from .hardware import usable_cores
    argv = [str(llama_tools.program("llama-bench")), "-m", str(model_path), "-p", str(n_prompt), "-n", str(n_gen),
            "-t", ",".join(map(str, threads)) if isinstance(threads, Sequence) else str(threads or usable_cores()),
            "-r", str(repetitions), "-o", "json",
            *repack.llama_bench_args(), *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {out.returncode}): {' '.join(argv)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def combined_throughput(pp_tps: float, tg_tps: float, n_prompt: int, n_gen: int) -> float:
    """Tokens/s of one request that prefills ``n_prompt`` tokens then generates ``n_gen`` (chapter 06).

    The two phases run one after the other, so their *times* add, not their rates:
    (n_prompt + n_gen) / (n_prompt/pp + n_gen/tg).

    >>> round(combined_throughput(1000.0, 100.0, 256, 32), 1)    # 0.256 s + 0.32 s for 288 tokens
    500.0
    """
    if pp_tps <= 0 or tg_tps <= 0:
        raise ValueError(f"rates must be positive, got pp={pp_tps}, tg={tg_tps}")
    return (n_prompt + n_gen) / (n_prompt / pp_tps + n_gen / tg_tps)


def llama_bench_scores(rows: list[dict], n_prompt: int, n_gen: int) -> dict[tuple, float]:
    """Score each configuration of a :func:`llama_bench` grid as :func:`combined_throughput` (chapter 06).

    llama-bench reports a ppN row and a tgN row per configuration; they are paired on
    (n_threads, n_batch, flash_attn) and combined. A configuration missing either row is an error.
    """
    rates: dict[tuple, dict] = {}
    for r in rows:
        key = (r["n_threads"], r["n_batch"], bool(r["flash_attn"]))
        rates.setdefault(key, {})["pp" if r["n_prompt"] else "tg"] = r["avg_ts"]
    missing = [k for k, v in rates.items() if set(v) != {"pp", "tg"}]
    if missing:
        raise ValueError(f"llama-bench rows lack a prefill or a decode test for {missing}; run it with both -p and -n")
    return {k: combined_throughput(v["pp"], v["tg"], n_prompt, n_gen) for k, v in rates.items()}


# ----------------------------------------------------------------------------- physics
def memory_bandwidth(n_bytes: int = 256 * 2**20, threads: int = 1, repeats: int = 5) -> float:
    """Sustained bytes/s of a STREAM-style triad a = b + s·c (best of ``repeats``).

    Counts 3 arrays × n bytes moved per pass (read b, read c, write a), as STREAM does.
    With ``threads`` > 1 the arrays are split into chunks processed in parallel (numpy releases
    the GIL inside the kernels).
    """
    n = n_bytes // 8
    b, c = np.random.default_rng(0).random(n), np.random.default_rng(1).random(n)
    a = np.empty_like(b)
    tmp = np.empty_like(b)
    bounds = np.linspace(0, n, threads + 1, dtype=int)

    def triad(lo, hi):
        np.multiply(c[lo:hi], 3.0, out=tmp[lo:hi])
        np.add(b[lo:hi], tmp[lo:hi], out=a[lo:hi])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda k: triad(bounds[k], bounds[k + 1]), range(threads)))
            best = min(best, time.perf_counter() - t0)
    # multiply+add as two passes: read c, write tmp, read b, read tmp, write a = 5 × n × 8 bytes
    return 5 * n * 8 / best


def decode_bound(bandwidth_bytes_s: float, weight_bytes: float, kv_bytes: float = 0.0, batch: int = 1) -> float:
    """Upper bound on total decode tokens/s: every step reads all weights once plus each sequence's KV."""
    if bandwidth_bytes_s <= 0 or weight_bytes <= 0:
        raise ValueError("bandwidth and weight bytes must be positive")
    return batch * bandwidth_bytes_s / (weight_bytes + batch * kv_bytes)


# ----------------------------------------------------------------------------- cost
def cost_per_million_tokens(tokens_per_s: float, watts: float, price_per_kwh: float,
                            hardware_cost: float = 0.0, lifetime_hours: float = 3 * 365 * 24) -> float:
    """Electricity (+ amortised hardware) cost of one million generated tokens at full load."""
    if tokens_per_s <= 0:
        raise ValueError("tokens_per_s must be positive")
    hours = 1e6 / tokens_per_s / 3600
    return hours * (watts / 1000 * price_per_kwh + hardware_cost / lifetime_hours)


def break_even_tokens_per_month(local_fixed_per_month: float, local_per_million: float, api_per_million: float) -> float:
    """Monthly volume above which running locally is cheaper than the API (inf if never)."""
    saving = api_per_million - local_per_million
    return float("inf") if saving <= 0 else local_fixed_per_month / saving * 1e6


# ----------------------------------------------------------------------------- results
def fingerprint() -> dict:
    """Who produced a result: machine, engines, time (from labkit.hardware)."""
    from .hardware import probe
    hw = probe()
    return {"cpu": hw.cpu_model, "cores": hw.usable_cores, "ram_gib": round(hw.ram_total_gib, 1),
            "gpus": [g.name for g in hw.gpus], "engines": hw.engines, "os": hw.os, "node": platform.node(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_results(rows: list[dict], path, meta: dict | None = None) -> Path:
    """Write rows as JSON (with fingerprint) and a CSV beside it."""
    import pandas as pd
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint(), "meta": meta or {}, "rows": rows}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    pd.DataFrame(rows).to_csv(path.with_suffix(".csv"), index=False)
    return path.with_suffix(".json")


def load_results(paths):
    """Rows from several saved runs, each tagged with the machine it came from."""
    import pandas as pd
    frames = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        df = pd.DataFrame(data["rows"])
        df["machine"] = f"{data['fingerprint']['cpu']} / {', '.join(data['fingerprint']['gpus']) or 'no GPU'}"
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


class busy_cores:
    """Context manager: ``n`` processes spinning on the CPU, to show oversubscription.

    >>> with busy_cores(1) as hog:            # doctest: +SKIP
    ...     slow = run_llama(llm)
    """

    def __init__(self, n: int = 1):
        self.n, self.procs = n, []

    def __enter__(self):
        import subprocess
        import sys
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.3)                      # let the scheduler notice them
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()

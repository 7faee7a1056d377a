"""torch.compile cold vs warm (chapter 04): what a just-in-time compiler costs the first time, and what its
on-disk cache saves the next time.

:func:`measure` runs one small Llama-style layer (RMSNorm, SwiGLU MLP, residual; SmolLM2-135M's widths) in two
fresh Python processes that share one Inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``). Each process times
the layer eagerly, then its first compiled call (Dynamo's graph capture, AOTAutograd, Inductor's code generation
and, on a CPU, the C++ compiler — or only a cache look-up), then a second compiled call. torch's own counters say
whether the FX-graph cache and the AOTAutograd cache (torch/_inductor/config.py ``fx_graph_cache``,
torch/_functorch/config.py ``enable_autograd_cache``, both on by default) missed or hit.

>>> r = ColdWarm(Run(0.1, 8.0, 0.01, 0, 1, 0, 1, 0.0), Run(0.1, 1.5, 0.01, 1, 0, 1, 0, 0.0), {}, {})
>>> round(r.saved_s, 1), round(r.speedup, 1)
(6.5, 5.3)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# What the worker process gets: its cache, and no pool of compile workers (a pool's processes cost more than
# they save for a handful of kernels on 2 cores; vLLM's CPU platform sets the same: vllm/platforms/cpu.py).
WORKER_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
# The variables that turn torch's compile caches off (torch/compiler/config.py, torch/_inductor/config.py,
# torch/_functorch/config.py); a run with any of them set has nothing to reuse.
CACHE_OFF_VARIABLES = ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCH_COMPILE_FORCE_DISABLE_CACHES",
                       "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")


@dataclass
class Run:
    """One fresh process: seconds for an eager call, the first compiled call and a later one; torch's cache
    counters; the largest difference between compiled and eager outputs; the CPU seconds the process and the
    compilers it ran used in all (what the run costs on an idle machine, whatever else is running)."""
    eager_s: float
    first_call_s: float
    steady_s: float
    fx_graph_hits: int
    fx_graph_misses: int
    aot_autograd_hits: int
    aot_autograd_misses: int
    max_abs_diff: float
    cpu_s: float = 0.0


@dataclass
class ColdWarm:
    cold: Run
    warm: Run
    cache_after_cold: dict      # kind -> (files, bytes): :func:`cache_inventory`
    cache_after_warm: dict

    @property
    def saved_s(self) -> float:
        """Seconds the cache saved on the warm process's first compiled call."""
        return self.cold.first_call_s - self.warm.first_call_s

    @property
    def speedup(self) -> float:
        return self.cold.first_call_s / self.warm.first_call_s

    @property
    def files_written(self) -> int:
        return sum(files for files, _ in self.cache_after_cold.values())


class CompileWorkerError(RuntimeError):
    """The measuring process failed; the message carries the end of its output."""


def cache_inventory(cache_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """What an Inductor cache directory holds, by kind: (files, bytes). ``fxgraph`` and ``aotautograd`` are
    the two graph caches; the rest is generated code by suffix (``.cpp`` C++ kernels, ``.so`` their compiled
    libraries, ``.py`` wrappers, ``.gch``/``.h`` precompiled headers, ``.lock``...)."""
    found: dict[str, list[int]] = {}
    root = Path(cache_dir)
    for path in root.rglob("*") if root.exists() else ():
        if not path.is_file():
            continue
        top = path.relative_to(root).parts[0]
        kind = top if top in ("fxgraph", "aotautograd") else (path.suffix or "(no suffix)")
        files_bytes = found.setdefault(kind, [0, 0])
        files_bytes[0] += 1
        files_bytes[1] += path.stat().st_size
    return {kind: (n, size) for kind, (n, size) in sorted(found.items())}


def worker_environment(cache_dir: str | os.PathLike, base: dict | None = None) -> dict:
    """The measuring process's environment: ``base`` (default: this process's), its cache directory, no
    compile-worker pool."""
    return {**(os.environ if base is None else base), **WORKER_ENV, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}


def caches_turned_off(env: dict) -> list[str]:
    """The variables in ``env`` that turn torch's compile caches off (``"0"`` for the per-cache switches, any
    true value for the force-disable ones).

    >>> caches_turned_off({"TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"})
    ['TORCHINDUCTOR_FX_GRAPH_CACHE']
    """
    off = []
    for name in CACHE_OFF_VARIABLES:
        value = env.get(name)
        if value is None:
            continue
        if ("FORCE_DISABLE" in name and value not in ("", "0")) or ("FORCE_DISABLE" not in name and value == "0"):
            off.append(name)
    return off


def run_worker(cache_dir: str | os.PathLike, *, python: str = sys.executable, timeout: float = 900,
               env: dict | None = None) -> Run:
    """One fresh process measuring the layer against ``cache_dir``."""
    proc = subprocess.run([python, "-m", "labkit.compile_cache"], capture_output=True, text=True, timeout=timeout,
                          env=worker_environment(cache_dir, env))
    return parse_worker_output(proc.returncode, proc.stdout, proc.stderr)


def parse_worker_output(returncode: int, stdout: str, stderr: str) -> Run:
    """The worker's last stdout line is its JSON result; anything else is an error that shows its output."""
    lines = stdout.strip().splitlines()
    if returncode != 0 or not lines:
        tail = (stderr or stdout).strip()[-1500:]
        raise CompileWorkerError(
            f"the torch.compile worker exited with {returncode}. Its output ends:\n{tail}\n"
            "torch.compile on a CPU needs a C++ compiler (g++ or clang++ on PATH): `labkit doctor` checks one.")
    return Run(**json.loads(lines[-1]))


def measure(cache_dir: str | os.PathLike | None = None, *, python: str = sys.executable, timeout: float = 900,
            env: dict | None = None) -> ColdWarm:
    """The layer compiled in a process with an empty cache (cold), then in a second fresh process with the
    cache the first one left (warm). ``cache_dir`` must be empty or absent (default: a temporary directory,
    removed afterwards)."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as tmp:
            return measure(tmp, python=python, timeout=timeout, env=env)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise ValueError(f"{cache_dir} is not empty: a cold run needs an empty cache directory (pass a new one, "
                         "or None for a temporary one)")
    cold = run_worker(cache_dir, python=python, timeout=timeout, env=env)
    after_cold = cache_inventory(cache_dir)
    warm = run_worker(cache_dir, python=python, timeout=timeout, env=env)
    return ColdWarm(cold, warm, after_cold, cache_inventory(cache_dir))


def _layer():
    """A Llama-style MLP sub-layer at SmolLM2-135M's widths (576 → 1536 → 576), fixed weights."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SwiGLULayer(nn.Module):
        def __init__(self, width=576, hidden=1536):
            super().__init__()
            self.norm = nn.Parameter(torch.ones(width))
            self.gate = nn.Linear(width, hidden, bias=False)
            self.up = nn.Linear(width, hidden, bias=False)
            self.down = nn.Linear(hidden, width, bias=False)

        def forward(self, x):
            h = self.norm * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)     # RMSNorm
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    torch.manual_seed(0)
    return SwiGLULayer().eval(), torch.randn(1, 32, 576)


def _worker() -> dict:
    import time

    import torch
    from torch._dynamo.utils import counters

    layer, x = _layer()
    with torch.no_grad():
        t0 = time.perf_counter()
        expected = layer(x)
        eager_s = time.perf_counter() - t0
        compiled = torch.compile(layer)
        t0 = time.perf_counter()
        got = compiled(x)                      # graph capture + compile (or cache hit) + run
        first_call_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled(x)
        steady_s = time.perf_counter() - t0
    return asdict(Run(eager_s, first_call_s, steady_s,
                      counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"],
                      counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_miss"],
                      float((got - expected).abs().max()), _cpu_seconds()))


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the C++ compiler runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    print(json.dumps(_worker()), flush=True)

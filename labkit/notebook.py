"""Small conveniences shared by every chapter notebook (introduced in chapter 00).

* ``%load_ext labkit`` registers the ``%%gpu`` cell magic: the cell runs where a GPU exists and
  otherwise prints one line saying it was skipped. Under ``make test-gpu``
  (``LABKIT_REQUIRE_GPU=1``) a missing GPU is an error instead, so a GPU run cannot pass by
  skipping everything. Likewise a ``%%gpu`` cell that cannot import what it uses (bitsandbytes for
  QLoRA, vllm-gguf-plugin for vLLM's GGUF loading): for a learner it prints what to install and skips
  the rest of the cell; under ``make test-gpu`` it is a failure (:class:`GPUModuleMissingError`),
  since ``make setup GPU=1`` installs everything the GPU cells use. :func:`require_modules` checks
  a module a cell needs without importing it by name.
* ``%%needs vllm`` runs a cell only where vLLM is installed and otherwise skips it with one line
  (an error under CI or ``LABKIT_REQUIRE_VLLM=1``), so chapters run on Binder without vLLM;
  ``%%needs llama-server`` does the same for llama.cpp's own programs (``make setup`` builds
  them; ``LABKIT_REQUIRE_LLAMA_SERVER=1``) and ``%%needs nginx`` for nginx (chapter 08;
  ``LABKIT_REQUIRE_NGINX=1``), ``%%needs prometheus`` for Prometheus (chapter 08;
  ``LABKIT_REQUIRE_PROMETHEUS=1``). Several names (``%%needs llama-server nginx``) need them all.
* :class:`Chapter` times the whole notebook and prints its wall time against its budget.
* :func:`progress` puts a progress bar on labkit's slow loops (ladder, scoring, sweeps, indexing).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import engines
from .env import progress  # noqa: F401  (labkit.notebook.progress: public here too)
from .errors import GPURequiredError

GPU_KINDS = {"any": "a GPU (NVIDIA with CUDA, or Apple Silicon with Metal)", "cuda": "an NVIDIA GPU (CUDA)"}


def gpu_available(kind: str = "any") -> bool:
    """True when a GPU of ``kind`` is usable: ``"any"`` — NVIDIA (nvidia-smi lists one, or torch sees
    CUDA) or Apple Silicon (Metal, what llama.cpp uses there); ``"cuda"`` — NVIDIA only (vLLM's GPU
    build, bitsandbytes)."""
    from .hardware import apple_gpus, nvidia_gpus
    if kind not in GPU_KINDS:
        raise ValueError(f"%%gpu takes {' or '.join(GPU_KINDS)}; got {kind!r}")
    if nvidia_gpus() or (kind == "any" and apple_gpus()):
        return True
    import sys
    torch = sys.modules.get("torch")
    return bool(torch and torch.cuda.is_available())


def _exec_cell(source: str, namespace: dict, name: str):
    """Run a cell's code as Jupyter would: a final bare expression is displayed (and returned)."""
    import ast
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), namespace)
    if last is None:
        return None
    value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
    if value is not None:
        from IPython.display import display
        display(value)
    return value


def gpu_required() -> bool:
    return os.environ.get("LABKIT_REQUIRE_GPU", "") not in ("", "0", "false")


GPU_SETUP_HINT = "`make setup GPU=1` installs what every %%gpu cell uses"


class GPUModuleMissingError(GPURequiredError):
    """A ``%%gpu`` cell could not import a module it uses while ``LABKIT_REQUIRE_GPU`` is set
    (``make test-gpu``): the GPU set-up is incomplete, and a GPU cell that cannot run is a failure."""


def require_modules(*names: str, hint: str = "") -> None:
    """Raise :class:`ModuleNotFoundError` (saying ``hint``, e.g. what to pip install) unless every
    module in ``names`` is importable here. Nothing is imported. For modules a cell needs but does
    not import itself (bitsandbytes behind ``BitsAndBytesConfig``, a vLLM plugin): inside ``%%gpu``
    :func:`run_gpu_cell` turns the error into a printed hint, or a failure under ``make test-gpu``."""
    import importlib.util
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:          # a dotted name whose parent package is missing
            found = False
        if not found:
            raise ModuleNotFoundError(f"No module named {name!r}" + (f": {hint}" if hint else ""), name=name)


def run_gpu_cell(source: str, namespace: dict, kind: str = "any") -> bool:
    """Execute ``source`` in ``namespace`` if a GPU of ``kind`` exists (``%%gpu`` or ``%%gpu cuda``);
    return whether it ran.

    An :class:`ImportError` inside the cell (a module the GPU set-up should have installed) ends the
    cell with a printed hint, or, under ``LABKIT_REQUIRE_GPU``, raises :class:`GPUModuleMissingError`."""
    if not gpu_available(kind):
        if gpu_required():
            raise GPURequiredError(f"This cell needs {GPU_KINDS[kind]}, LABKIT_REQUIRE_GPU is set, and none is usable "
                                   "here. Run `make test-gpu` on a GPU machine.")
        print(f"Skipped: this cell needs {GPU_KINDS[kind]} and none was found on this machine.")
        return False
    try:
        _exec_cell(source, namespace, "<gpu cell>")
    except ImportError as exc:
        import sys
        what = repr(exc.name) if exc.name else "a module"
        if gpu_required():
            raise GPUModuleMissingError(
                f"This %%gpu cell could not import {what} ({exc}). LABKIT_REQUIRE_GPU is set (make test-gpu), so a GPU "
                f"cell that cannot run is a failure, not a skip: {GPU_SETUP_HINT} (this kernel runs {sys.executable})."
            ) from exc
        print(f"Skipped the rest of this cell: it needs {what}, which this environment cannot import ({exc}). "
              f"{GPU_SETUP_HINT}.")
        return False
    return True


def vllm_required() -> bool:
    """CI (``CI`` set) and ``LABKIT_REQUIRE_VLLM=1`` turn a missing vLLM into an error, not a skip."""
    return engines.get("vllm").required()


def llama_server_required() -> bool:
    """CI and ``LABKIT_REQUIRE_LLAMA_SERVER=1`` turn missing llama.cpp programs into an error."""
    return engines.get("llama-server").required()


def nginx_required() -> bool:
    """CI and ``LABKIT_REQUIRE_NGINX=1`` turn a missing nginx into an error."""
    return any(os.environ.get(v, "") not in ("", "0", "false") for v in ("CI", "LABKIT_REQUIRE_NGINX"))


def prometheus_required() -> bool:
    """CI and ``LABKIT_REQUIRE_PROMETHEUS=1`` turn a missing Prometheus into an error."""
    return any(os.environ.get(v, "") not in ("", "0", "false") for v in ("CI", "LABKIT_REQUIRE_PROMETHEUS"))


def _skip_reason(find, required: bool, what: str) -> str | None:
    """None when ``find()`` locates the engine; else why a cell needing it is skipped (raised
    instead when ``required``)."""
    from .errors import EngineNotInstalledError
    try:
        find()
    except EngineNotInstalledError as exc:
        if required:
            raise
        return f"Skipped: this cell needs {what}. {exc}"
    return None


def _run_if_installed(source: str, namespace: dict, find, required: bool, what: str) -> bool:
    """Execute ``source`` if ``find()`` locates the engine; else skip it with the reason (an error
    when ``required``). Return whether the cell ran."""
    return _run_if_all_installed(source, namespace, [(find, required, what)])


def _run_if_all_installed(source: str, namespace: dict, needs: list) -> bool:
    """``needs``: (find, required, what) triples. Every engine is checked before anything runs, so
    a cell never half-runs; the first missing one is the reason printed."""
    for find, required, what in needs:
        reason = _skip_reason(find, required, what)
        if reason:
            print(reason)
            return False
    _exec_cell(source, namespace, f"<{' + '.join(what for _, _, what in needs)} cell>")
    return True


def _nginx_need() -> tuple:
    """(find, required, what) for nginx; likewise for llama.cpp's programs below."""
    from .proxy import nginx_binary
    return nginx_binary, nginx_required(), "nginx"


def _prometheus_need() -> tuple:
    from .monitoring import prometheus_binary
    return prometheus_binary, prometheus_required(), "Prometheus"


def _engine_need(name: str) -> tuple:
    """(find, required, what) for an engine, from its record in :mod:`labkit.engines`."""
    record = engines.get(name)
    return record.find_install, record.required(), record.needs_label or name


def _llama_server_need() -> tuple:
    return _engine_need("llama-server")


def run_llama_server_cell(source: str, namespace: dict) -> bool:
    """Execute ``source`` if llama.cpp's programs are built (``make setup``); otherwise skip it with
    the reason. Return whether the cell ran."""
    return _run_if_installed(source, namespace, *_llama_server_need())


def run_nginx_cell(source: str, namespace: dict) -> bool:
    """Execute ``source`` if nginx is installed (``make setup`` as root installs Debian's); otherwise
    skip it with the reason. Return whether the cell ran."""
    return _run_if_installed(source, namespace, *_nginx_need())


def run_cell_needing(names: list[str], source: str, namespace: dict) -> bool:
    """``%%needs NAME [NAME ...]``: execute ``source`` only if every named engine (any in :mod:`labkit.engines`)
    or tool (nginx, prometheus) is installed."""
    needs = {name: (lambda name=name: _engine_need(name)) for name in engines.names()}
    needs.update({"nginx": _nginx_need, "prometheus": _prometheus_need})
    unknown = [n for n in names if n not in needs]
    if unknown or not names:
        raise ValueError(f"%%needs knows {', '.join(needs)}; got {' '.join(names)!r}")
    return _run_if_all_installed(source, namespace, [needs[n]() for n in names])


def run_vllm_cell(source: str, namespace: dict) -> bool:
    """Execute ``source`` if vLLM is installed (``.venv-vllm``); otherwise say so and skip it.

    For places that cannot hold vLLM's environment (Binder's 2 GB, a CPU-only Colab runtime):
    the rest of the chapter still runs. Return whether the cell ran.
    """
    return _run_if_installed(source, namespace, *_engine_need("vllm"))


def register_magics(ipython) -> None:
    def gpu(line, cell):
        run_gpu_cell(cell, ipython.user_ns, line.strip() or "any")

    def needs(line, cell):
        run_cell_needing(line.split(), cell, ipython.user_ns)

    ipython.register_magic_function(gpu, magic_kind="cell", magic_name="gpu")
    ipython.register_magic_function(needs, magic_kind="cell", magic_name="needs")


@dataclass
class Chapter:
    """Wall-time bookkeeping for one notebook run."""

    number: str
    budget_s: float
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def report(self) -> float:
        """Print and return the chapter's wall time so far."""
        elapsed = self.elapsed
        verdict = "within" if elapsed <= self.budget_s else "OVER"
        print(f"Chapter {self.number} wall time: {elapsed:.1f} s ({verdict} its {self.budget_s:.0f} s CPU-tier budget)")
        return elapsed

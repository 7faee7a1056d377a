"""Whether llama.cpp may repack weights on this CPU (introduced in chapter 07, "the engine crashed").

At load time llama.cpp may copy weights into *extra buffer types*: layouts interleaved for a
CPU's matrix kernels (``CPU_REPACK`` for AVX2/AVX-512/NEON, ``AMX`` for Intel's Advanced Matrix
Extensions). On Intel CPUs with AMX (Sapphire Rapids and later: AWS m7i/c7i, GCP C3, Azure v6)
the AMX buffer of the pinned llama.cpp segfaults in ``ggml_backend_amx_mul_mat`` on any prompt
longer than one token (upstream llama.cpp #20824, Ollama #17205). Turning extra buffer types
off is the known fix; this module decides when to do it, in one place, for every engine path:

* the Python bindings: :func:`install` makes ``llama_model_default_params()`` return
  ``use_extra_bufts=False``, which every ``Llama(...)`` (and ``llama_cpp.server``) starts from;
  ``import labkit`` calls it;
* subprocesses: ``python -m labkit.repack MODULE ARGS...`` runs a module with it applied (for
  ``llama_cpp.server`` also :func:`labkit.vision.guard_llama_cpp_server`: images to a text-only model get a 400;
  and :func:`labkit.llama_cpp_openai.install`: OpenAI requests translated, never a 500 for a valid one);
* the native programs: :func:`llama_server_args` / :func:`llama_bench_args`.

The rule: repacking stays **on** unless the CPU has AMX-INT8 *and* the llama.cpp build
compiled AMX kernels (a build without them never uses the AMX buffer). Only AMX machines pay,
because elsewhere repacking is what makes Q4_0/Q4_K/IQ4_NL prompt processing fast.
Override with ``LABKIT_LLAMA_REPACK=1`` (always on: reproduce the crash, or try a fixed
llama.cpp) or ``=0`` (always off); ``auto`` (the default) applies the rule.

>>> decide(cpuinfo="flags : fpu sse avx2 avx512f", env={}).enabled
True
>>> d = decide(cpuinfo="flags : avx512f amx_tile amx_int8", env={}, build_has_amx=True)
>>> d.enabled, d.cpu_features
(False, ('avx512f', 'amx_tile', 'amx_int8'))
>>> decide(cpuinfo="flags : amx_int8", env={"LABKIT_LLAMA_REPACK": "1"}, build_has_amx=True).enabled
True
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "LABKIT_LLAMA_REPACK"
# The CPU features that decide which of llama.cpp's matrix kernels run (reported by doctor).
MATRIX_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


@dataclass(frozen=True)
class RepackDecision:
    enabled: bool                 # may llama.cpp use extra buffer types (weight repacking)?
    reason: str                   # one sentence a learner can act on
    cpu_features: tuple[str, ...]  # MATRIX_FEATURES present on this CPU
    build_has_amx: bool | None    # None: llama.cpp is not importable here

    def __str__(self) -> str:
        return f"weight repacking {'on' if self.enabled else 'off'}: {self.reason}"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` text (empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def llama_build_has_amx() -> bool | None:
    """Whether the installed llama.cpp was compiled with AMX kernels (None: not installed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp
    return b"AMX_INT8 = 1" in (llama_cpp.llama_print_system_info() or b"")


def decide(cpuinfo: str | None = None, env: Mapping[str, str] | None = None,
           build_has_amx: bool | None = None) -> RepackDecision:
    """Apply the rule to this machine, or to the given ``/proc/cpuinfo`` text and environment."""
    env = os.environ if env is None else env
    flags = cpu_flags(cpuinfo)
    features = tuple(f for f in MATRIX_FEATURES if f in flags)
    choice = env.get(ENV_VAR, "auto").strip().lower()
    if choice in _ON:
        return RepackDecision(True, f"{ENV_VAR}={choice} forces it on", features, build_has_amx)
    if choice in _OFF:
        return RepackDecision(False, f"{ENV_VAR}={choice} forces it off", features, build_has_amx)
    if choice != "auto":
        raise ValueError(f"{ENV_VAR}={choice!r}: use auto, 1 or 0")
    if "amx_int8" not in flags:
        return RepackDecision(True, "no AMX on this CPU, repacked weights are safe and faster",
                              features, build_has_amx)
    if build_has_amx is None and cpuinfo is None:
        build_has_amx = llama_build_has_amx()
    if build_has_amx is False:
        return RepackDecision(True, "the CPU has AMX but this llama.cpp build has no AMX kernels",
                              features, build_has_amx)
    return RepackDecision(False, "AMX CPU: llama.cpp's AMX buffer crashes on multi-token prompts "
                          f"(llama.cpp #20824); set {ENV_VAR}=1 to opt back in", features, build_has_amx)


_installed: RepackDecision | None = None


def install() -> RepackDecision | None:
    """Make every later ``Llama(...)`` in this process follow :func:`decide` (idempotent).

    Does nothing (and imports nothing) where repacking stays on or llama-cpp-python is absent.
    """
    global _installed
    if _installed is not None:
        return _installed
    if "amx_int8" not in cpu_flags() and ENV_VAR not in os.environ:
        return None   # the common case: leave llama.cpp's defaults alone, import nothing
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    decision = decide()
    if not decision.enabled:
        import llama_cpp
        import llama_cpp.llama_cpp as native
        original = native.llama_model_default_params

        def llama_model_default_params():
            params = original()
            params.use_extra_bufts = False
            return params

        llama_model_default_params.__doc__ = f"llama.cpp's defaults with repacking off (labkit: {decision.reason})"
        native.llama_model_default_params = llama_cpp.llama_model_default_params = llama_model_default_params
    _installed = decision
    return decision


def llama_server_args(decision: RepackDecision | None = None) -> list[str]:
    """Extra ``llama-server`` arguments for this machine (``--no-repack`` where repacking is off)."""
    return [] if (decision or decide()).enabled else ["--no-repack"]


def llama_bench_args(decision: RepackDecision | None = None) -> list[str]:
    """Extra ``llama-bench`` arguments for this machine (``--repack 0`` where repacking is off)."""
    return [] if (decision or decide()).enabled else ["--repack", "0"]


def main(argv: list[str]) -> None:
    """``python -m labkit.repack MODULE ARGS...``: run MODULE as ``__main__`` with :func:`install` applied."""
    import runpy
    if not argv:
        raise SystemExit("usage: python -m labkit.repack MODULE [ARGS...]   (e.g. llama_cpp.server --model m.gguf)")
    install()
    if argv[0] == "llama_cpp.server":               # a text-only model answers an image with a 400, not a 500
        from . import llama_cpp_openai
        from .vision import guard_llama_cpp_server
        guard_llama_cpp_server(argv[1:])
        if os.environ.get("LABKIT_OPENAI_TRANSLATION") != "0":     # serve(..., openai_translation=False) turns it off
            llama_cpp_openai.install()              # after: inside the media refusal, which names images better
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])

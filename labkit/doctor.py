"""``labkit doctor``: every quick check in one place (introduced in chapter 00, used in chapter 07).

Each :class:`Check` carries what was found and, when it failed, the fix. ``run_checks`` runs
them all; the CLI prints them (or JSON with ``--json``) and exits 1 when a required check fails.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__, engines
from .env import REPO_ROOT

LOCK_FILE = REPO_ROOT / "requirements" / "lock.txt"
HEADROOM = 0.8   # plan to use at most this share of free RAM / VRAM


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True   # a failed optional check is a warning, not an exit code


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_drift(lock: Path = LOCK_FILE) -> list[tuple[str, str, str | None]]:
    """(package, locked version, installed version or None) for every mismatch with the lock."""
    if not lock.exists():
        return []
    installed = {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                 if d.metadata["Name"]}
    drift = []
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if not m:
            continue
        name, version = _normalise(m.group(1)), m.group(3)
        have = installed.get(name)
        if have is None or have.split("+")[0] != version.split("+")[0]:   # +cpu is the same release
            drift.append((name, version, have))
    return drift


def memory_need_bytes(model=None, n_ctx: int = 2048) -> float:
    """Bytes a model needs at ``n_ctx`` (GGUF: :func:`labkit.troubleshoot.fit_report`)."""
    from . import models
    from .troubleshoot import fit_report
    path = models.get(model)
    if path.is_dir():
        return float(sum(p.stat().st_size for p in path.glob("*.safetensors")))
    return fit_report(path, n_ctx, available_bytes=0).total_bytes


def repack_check() -> Check:
    """The CPU's matrix features, whether llama.cpp has AMX kernels, and the repacking choice in
    force in this process (read back from ``llama_model_default_params``, not assumed)."""
    import llama_cpp

    from . import repack
    decision = repack.decide()
    in_force = bool(llama_cpp.llama_model_default_params().use_extra_bufts)
    detail = (f"CPU: {', '.join(decision.cpu_features) or 'no AVX2/AVX-512/AMX'}; llama.cpp AMX kernels: "
              f"{'yes' if repack.llama_build_has_amx() else 'no'}; {decision}")
    if in_force != decision.enabled:
        return Check("llama.cpp weight repacking", False, detail + f" — but this process loads with repacking "
                     f"{'on' if in_force else 'off'}", "import labkit before creating Llama(...), or call labkit.repack.install()")
    unsafe = in_force and "amx_int8" in decision.cpu_features and repack.llama_build_has_amx()
    return Check("llama.cpp weight repacking", not unsafe, detail,
                 f"unset {repack.ENV_VAR}: with AMX, multi-token prompts crash (llama.cpp #20824)", required=False)


def llama_programs_check() -> Check:
    """llama.cpp's own programs are built, and from the same source as the Python bindings."""
    from . import llama_tools
    from .errors import EngineNotInstalledError
    try:
        server = llama_tools.program("llama-server")
    except EngineNotInstalledError as exc:
        return Check("llama.cpp programs (llama-server, llama-bench, ...)", False, "not built", str(exc), required=False)
    skew = llama_tools.skew()
    detail = f"{server.parent} — {llama_tools.version()}" + (f"; {skew}" if skew else "; same source as the bindings")
    return Check("llama.cpp programs (llama-server, llama-bench, ...)", skew is None, detail,
                 "make setup (rebuilds the programs from the pinned llama-cpp-python source)", required=False)


def engine_check(engine: engines.Engine) -> Check:
    """Whether an engine of :mod:`labkit.engines` is installed here (optional: chapters skip what is missing)."""
    from .errors import EngineNotInstalledError
    label = f"engine {engine.name}: {engine.summary}"
    try:
        found = engine.find_install()
    except EngineNotInstalledError as exc:
        return Check(label, False, str(exc).split(". ")[0], engine.install_hint, required=False)
    return Check(label, True, str(found) if found else "ships with labkit")


def engine_checks() -> list[Check]:
    """One :func:`engine_check` per engine in :mod:`labkit.engines`."""
    return [engine_check(engine) for engine in engines.all_engines()]


def run_checks(model=None, n_ctx: int = 2048, require_gpu: bool = False, min_free_vram_gb: float | None = None,
               ports: list[int] = (), start_engine: bool = False, lock: Path = LOCK_FILE) -> list[Check]:
    from . import hardware, models
    from .errors import LabkitError
    from .servers import port_is_free
    checks = [Check("python", sys.version_info >= (3, 10), sys.version.split()[0], "Use Python 3.10 or newer.")]
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    checks.append(Check("virtual environment", in_venv, sys.prefix,
                        "Run labkit from the lab's environment: `make lab`, or `.venv/bin/labkit ...`.", required=False))
    for name, bundled in models.BUNDLED.items():
        try:
            path = models.get(name)
            checks.append(Check(f"bundled model {name}", True, f"{path} (checksum verified)"))
        except LabkitError as exc:    # the second-architecture model is optional: only make test-models needs it
            checks.append(Check(f"bundled model {name}", False, str(exc), "make test-models" if bundled.extra else "make setup",
                                required=not bundled.extra))
    hw = hardware.probe()
    llama = hw.engines.get("llama.cpp")
    checks.append(Check("llama-cpp-python", bool(llama), llama or "not installed", "make setup"))
    if llama:
        checks.append(repack_check())
    checks += engine_checks()
    checks.append(llama_programs_check())
    label = str(model or "default model")
    try:
        need = memory_need_bytes(model, n_ctx) / 2**30
        budget = HEADROOM * hw.ram_available_gib
        checks.append(Check(f"memory for {label} at n_ctx={n_ctx}", need <= budget,
                            f"needs ~{need:.2f} GiB; {hw.ram_available_gib:.1f} GiB RAM free (plan ≤ {budget:.1f})",
                            "Use a smaller quant, a shorter context, a quantized KV cache (type_k/type_v q8_0), "
                            "or offload fewer layers to a GPU that is too small."))
    except LabkitError as exc:
        checks.append(Check(f"model {label}", False, str(exc), "Check the path or run make setup."))
    checks.append(Check("RAM available", hw.ram_available_gib >= 1.0, f"{hw.ram_available_gib:.1f} GiB of {hw.ram_total_gib:.1f} GiB",
                        "Close other programs; the CPU tier needs ~1 GiB free (vLLM chapter ~4 GiB)."))
    free_disk = shutil.disk_usage(REPO_ROOT).free / 2**30
    checks.append(Check("disk free", free_disk >= 2, f"{free_disk:.1f} GiB", "Free at least 2 GiB for caches and build/."))
    drift = lock_drift(lock)
    checks.append(Check("versions match requirements/lock.txt", not drift,
                        "all match" if not drift else "; ".join(f"{n} {have or 'missing'} (lock {want})" for n, want, have in drift[:8])
                        + (f" … and {len(drift) - 8} more" if len(drift) > 8 else ""),
                        "make setup (reinstalls from the lock)", required=False))
    for port in ports:
        free = port_is_free(port)
        checks.append(Check(f"port {port}", free, "free" if free else "in use",
                            f"Stop what listens on {port} (`ss -ltnp | grep {port}`) or use another port."))
    if start_engine and llama:
        from .servers import serve
        try:
            with serve("llama.cpp", model) as srv:
                detail = f"started and answered in {srv.ready_seconds:.1f} s"
            checks.append(Check("llama.cpp server starts", True, detail))
        except LabkitError as exc:
            checks.append(Check("llama.cpp server starts", False, str(exc)[-400:], "Read the log lines above."))
    if require_gpu or min_free_vram_gb:
        if not hw.gpus:
            checks.append(Check("GPU", False, "no usable NVIDIA GPU (nvidia-smi lists none)",
                                "Run on a GPU machine, or drop --require-gpu to allow CPU."))
        else:
            best = max(hw.gpus, key=lambda g: g.memory_free_mib or 0)
            free = (best.memory_free_mib or 0) / 1024
            checks.append(Check("GPU", True, f"{best.name}, {free:.1f} GiB free"))
            if min_free_vram_gb:
                checks.append(Check("free VRAM", free >= min_free_vram_gb, f"{free:.1f} GiB (need {min_free_vram_gb} GiB)",
                                    "Stop other GPU processes (nvidia-smi shows them) or use a smaller model/quant."))
        if hw.llama_cpp_gpu_offload is False:
            checks.append(Check("llama.cpp GPU build", False, "this llama-cpp-python was built without GPU offload",
                                "make setup GPU=1 (rebuilds with -DGGML_CUDA=on)"))
    return checks


def passed(checks: list[Check]) -> bool:
    return all(c.ok or not c.required for c in checks)


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines, failed = [], 0
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"[{mark}] {c.name.ljust(width)}  {c.detail}")
        if not c.ok:
            lines.append(f"       {''.ljust(width)}  fix: {c.fix}")
            failed += c.required
    lines.append(f"\nlabkit {__version__}: {failed} required check(s) failed" if failed
                 else f"\nlabkit {__version__}: all required checks passed")
    return "\n".join(lines)


def to_json(checks: list[Check]) -> str:
    return json.dumps({"passed": passed(checks), "checks": [asdict(c) for c in checks]}, indent=2)

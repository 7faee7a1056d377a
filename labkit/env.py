"""Facts about the environment labkit runs in — the bottom layer every other module may import.

Paths (the repository, its ``data/``, labkit's cache), file digests, loopback hosts and ports,
where the vLLM interpreter and a real Ollama are, how many cores this process may use, and
progress bars. This module imports nothing else of labkit (``tests/test_layers.py`` checks), so
anything can depend on it without an import cycle. Introduced in chapter 00.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
OLLAMA_DEFAULT_PORT = 11434


# --------------------------------------------------------------------------- paths and files
def data_path(*parts: str) -> Path:
    """A file or folder under the repository's ``data/`` (an error naming it if it is missing).

    >>> data_path("rag", "questions.jsonl").name
    'questions.jsonl'
    """
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: labkit's data files come with the repository "
                                "(run from a clone, with `make setup`)")
    return path


def cache_dir() -> Path:
    """Where labkit keeps converted models and other derived files (``LABKIT_CACHE``)."""
    path = Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) so re-verifying is free."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- hosts and ports
def is_loopback(host: str) -> bool:
    """True for the addresses only this machine can reach (servers bind these by default).

    >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
    (True, False)
    """
    return host in LOOPBACK_HOSTS


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port. SO_REUSEADDR, as servers use, so that
    connections lingering in TIME_WAIT after a server stopped do not count as "in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts a TCP connection at host:port (a wildcard host means this machine)."""
    try:
        with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 0.5) -> bool:
    """True when ``url`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


# --------------------------------------------------------------------------- engines outside this interpreter
def ollama_host() -> tuple[str, int]:
    """(host, port) of ``$OLLAMA_HOST`` as the ollama client reads it (default 127.0.0.1:11434)."""
    raw = os.environ.get("OLLAMA_HOST", f"127.0.0.1:{OLLAMA_DEFAULT_PORT}")
    raw = raw.replace("http://", "").replace("https://", "").rstrip("/")
    host, _, port = raw.rpartition(":") if ":" in raw else (raw, "", str(OLLAMA_DEFAULT_PORT))
    return (host or "127.0.0.1"), int(port or OLLAMA_DEFAULT_PORT)


def real_ollama() -> str | None:
    """How a real Ollama can be reached here: "binary", "running" (at $OLLAMA_HOST), or None."""
    host, port = ollama_host()
    if answers(f"http://{host}:{port}/api/version"):
        return "running"
    if shutil.which("ollama"):
        return "binary"
    return None


def find_vllm_python() -> str | None:
    """The interpreter that has vLLM: $LABKIT_VLLM_PYTHON, the repo's .venv-vllm, this one, or None."""
    import importlib.util
    for cand in (os.environ.get("LABKIT_VLLM_PYTHON"), str(REPO_ROOT / ".venv-vllm" / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


# --------------------------------------------------------------------------- this process
def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (containers, taskset) where the OS has one
    (Linux), else all logical cores (macOS has no ``os.sched_getaffinity``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """Threads for an engine nobody tuned: one per physical core this process may use.

    Hyper-threads share a core's arithmetic units, so llama.cpp gains little from them and loses
    to their contention (Ollama's default is likewise physical cores). Where the OS reports more
    logical than physical cores, half the usable logical cores; else all of them.
    """
    import psutil
    logical, physical = os.cpu_count() or 1, psutil.cpu_count(logical=False) or 0
    smt = physical and logical > physical
    return max(1, usable_cores() // 2) if smt else usable_cores()


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm progress bar (a widget in JupyterLab, text elsewhere) around a slow loop.

    ``LABKIT_PROGRESS=0`` turns bars off (e.g. in logs); they are also off when tqdm is missing.
    """
    if os.environ.get("LABKIT_PROGRESS", "1") in ("0", "false", ""):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:      # pragma: no cover - tqdm ships with the lab
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


# ----------------------------------------------------------------------------- a process's memory (chapter 03)
PROC_MEMORY_FIELDS = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmLck": "locked"}


def process_memory(pid: int | None = None, status_text: str | None = None) -> dict:
    """A process's resident memory from Linux's ``/proc/PID/status``, in bytes: ``rss`` (all of it),
    ``rss_anon`` (private memory: a copy of the weights, the KV cache), ``rss_file`` (pages of mapped files:
    memory-mapped weights, shared with the page cache) and ``locked`` (pinned by ``mlock``). Elsewhere
    (macOS) only ``rss``, from psutil; the others are None.

    >>> process_memory(status_text="VmLck:\\t  1024 kB\\nVmRSS:\\t 2048 kB\\nRssAnon:\\t 1536 kB\\nRssFile:\\t 512 kB\\n")
    {'rss': 2097152, 'rss_anon': 1572864, 'rss_file': 524288, 'locked': 1048576}
    """
    if status_text is None:
        status = Path(f"/proc/{pid or os.getpid()}/status")
        if not status.exists():
            import psutil
            return {"rss": psutil.Process(pid).memory_info().rss, "rss_anon": None, "rss_file": None, "locked": None}
        status_text = status.read_text()
    out = dict.fromkeys(PROC_MEMORY_FIELDS.values())
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in PROC_MEMORY_FIELDS and value.strip().endswith("kB"):
            out[PROC_MEMORY_FIELDS[key]] = int(value.split()[0]) * 1024
    return out


def memlock_limited(argv: list[str], limit_bytes: int) -> tuple[list[str], object]:
    """(argv, preexec_fn) to run ``argv`` with at most ``limit_bytes`` lockable (``ulimit -l``, RLIMIT_MEMLOCK).
    root is exempt from that limit (the CAP_IPC_LOCK capability): as root, the command runs without that
    capability (util-linux ``setpriv``), so it meets the limit as any other user would."""
    import resource

    def set_limit():
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit_bytes, limit_bytes))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            raise RuntimeError("running as root, which ignores ulimit -l, and util-linux's setpriv (to drop the "
                               "CAP_IPC_LOCK capability) is not installed: apt-get install util-linux")
        argv = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", *argv]
    return argv, set_limit

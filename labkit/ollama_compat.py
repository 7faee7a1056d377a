"""An Ollama-compatible server backed by llama-cpp-python (chapter 02's stand-in for Ollama).

Real Ollama cannot be installed on CI machines or Binder, so chapter 02 talks to this server
there, and to a real Ollama wherever one runs (``labkit.serve("ollama")`` prefers it). The
wire contract is Ollama's ``docs/api.md``, followed field for field:

* ``GET|HEAD /`` → ``Ollama is running``; ``GET /api/version``;
* ``POST /api/generate`` and ``POST /api/chat``: NDJSON streaming by default, one JSON object
  with ``"stream": false``; ``options``, ``format`` (``"json"`` or a JSON schema), ``system``,
  ``template``, ``raw``, ``keep_alive`` (``0`` unloads); the last object carries
  ``done_reason`` and ``total_duration``/``load_duration``/``prompt_eval_duration``/
  ``eval_duration`` in **nanoseconds**, ``prompt_eval_count`` and ``eval_count``;
* ``POST /api/embed`` (string or list ``input``, L2-normalised) and the legacy ``/api/embeddings``;
* ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``POST /api/create`` (documented JSON
  fields, or the legacy ``modelfile`` text; ``quantize`` through llama.cpp's quantizer),
  ``POST /api/copy``, ``DELETE /api/delete``, ``POST /api/pull`` (offline: only models that are
  already local), ``HEAD|POST /api/blobs/sha256:…``;
* OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
  ``/v1/models`` and ``/v1/models/{model}``.

Errors are ``{"error": "..."}`` with 400 (bad input), 404 (unknown model) or 500; an error after a
stream has started arrives as a last ``{"error": ...}`` line. Model names are ``name:tag``
(``latest`` by default). Models live in a store directory (``--models-dir``, else
``$OLLAMA_MODELS``, else ``~/.cache/labkit/ollama/models``); the bundled SmolLM2 is registered as
``smollm2:135m`` and MiniLM as the embedding model ``all-minilm:latest``. Several models stay
loaded at once (``OLLAMA_MAX_LOADED_MODELS``, default 3) until their keep-alive expires
(``OLLAMA_KEEP_ALIVE``, default 5m); ``OLLAMA_NUM_PARALLEL`` requests run per model.

Run it with ``python -m labkit.ollama_compat`` (binds ``$OLLAMA_HOST``, default 127.0.0.1:11434).
What differs from real Ollama: templates are the GGUF's Jinja chat template (a Modelfile
``TEMPLATE`` may use the Go-template basics ``.System``/``.Prompt``/``.Response`` with ``if``);
no GPU scheduling, images, tools, thinking, registry pulls or pushes; safetensors imports are not
converted.
"""
from __future__ import annotations

import base64
import codecs
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import modelfile as mf
from .cancellable import ClientGone, cancellable_stream, drain

VERSION = "0.0.0-labkit"          # semver-shaped, and plainly not a real Ollama release
DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE = 300.0        # seconds (Ollama: 5m)
BUNDLED_NAMES = {"smollm2": "smollm2:135m", "minilm": "all-minilm:latest"}
QUANTIZE_TYPES = ("q2_K", "q3_K_L", "q3_K_M", "q3_K_S", "q4_0", "q4_1", "q4_K_M", "q4_K_S",
                  "q5_0", "q5_1", "q5_K_M", "q5_K_S", "q6_K", "q8_0")
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "num_thread", "use_mmap", "use_mlock", "repeat_last_n")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*){0,2}(:[a-z0-9_][a-z0-9._-]{0,127})?$")


# ============================================================================ small helpers
class APIError(Exception):
    """An error with an HTTP status, sent as ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def not_found(name: str) -> APIError:
    return APIError(404, f"model '{name}' not found")


def parse_host(value: str | None) -> tuple[str, int]:
    """``OLLAMA_HOST`` the way Ollama reads it: ``[scheme://]host[:port][/path]``.

    No scheme: port 11434; ``http://`` without a port: 80; ``https://``: 443; an empty host means
    127.0.0.1. ``0.0.0.0`` binds every interface (reachable from your network!).

    >>> parse_host(None), parse_host("0.0.0.0"), parse_host(":8080"), parse_host("http://example.org")
    (('127.0.0.1', 11434), ('0.0.0.0', 11434), ('127.0.0.1', 8080), ('example.org', 80))
    >>> parse_host("[::1]:9000"), parse_host("https://ollama.local/x")
    (('::1', 9000), ('ollama.local', 443))
    """
    s = (value or "").strip()
    default_port = DEFAULT_PORT
    if "://" in s:
        scheme, s = s.split("://", 1)
        default_port = {"http": 80, "https": 443}.get(scheme.lower(), DEFAULT_PORT)
    s = s.split("/", 1)[0]
    host, port = s, ""
    if s.startswith("["):                                  # [v6]:port
        host, _, rest = s[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif s.count(":") == 1:
        host, port = s.split(":")
    try:
        port_n = int(port) if port else default_port
        if not 0 <= port_n <= 65535:
            raise ValueError
    except ValueError:
        port_n = default_port
    return (host or "127.0.0.1"), port_n


def parse_duration(value: Any, *, default: float = DEFAULT_KEEP_ALIVE) -> float:
    """A keep-alive as seconds: numbers are seconds, strings are Go durations ("5m", "1h30m",
    "300ms") or bare numbers; negative means forever (``math.inf``), 0 means unload now.

    >>> parse_duration("5m"), parse_duration(0), parse_duration("-1"), parse_duration("1h30m"), parse_duration(None)
    (300.0, 0.0, inf, 5400.0, 300.0)
    """
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise APIError(400, f"invalid keep_alive {value!r}: use a duration such as \"5m\", seconds, 0 or -1")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", body)
            if not parts or "".join(a + b for a, b in parts) != body:
                raise APIError(400, f"invalid keep_alive {value!r}: use a duration such as \"5m\", \"30s\", "
                                    "\"1h\", a number of seconds, 0 (unload now) or -1 (keep loaded)") from None
            seconds = sign * sum(float(a) * units[b] for a, b in parts)
    return math.inf if seconds < 0 else seconds


def normalize_name(name: Any, *, field_name: str = "model") -> str:
    """``name`` → ``name:tag`` (tag ``latest`` when missing), lower-case; 400 when malformed."""
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, f"{field_name} is required")
    n = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "library/"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    if not _NAME_RE.match(n):
        raise APIError(400, f"invalid model name {name!r}: use name or name:tag (letters, digits, '.', '_', '-')")
    return n if ":" in n.rsplit("/", 1)[-1] else n + ":latest"


def now_rfc3339(ts_ns: int | None = None, *, utc: bool = True) -> str:
    """RFC 3339 with nanoseconds, as Go prints times (``...T08:52:19.385406455Z``)."""
    ts_ns = time.time_ns() if ts_ns is None else ts_ns
    secs, nanos = divmod(ts_ns, 1_000_000_000)
    if utc:
        base = _dt.datetime.fromtimestamp(secs, _dt.timezone.utc)
        return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
    base = _dt.datetime.fromtimestamp(secs).astimezone()
    off = base.strftime("%z")
    return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}{off[:3]}:{off[3:]}"


def _human_params(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            value = n / div
            return f"{value:.2f}".rstrip("0").rstrip(".") + unit
    return str(int(n))


def _ftype_names() -> dict[int, str]:
    import llama_cpp
    out = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_") and attr != "LLAMA_FTYPE_GUESSED":
            out[getattr(llama_cpp, attr)] = attr.replace("LLAMA_FTYPE_MOSTLY_", "").replace("LLAMA_FTYPE_ALL_", "")
    return out


# ============================================================================ Go templates (subset)
_TAG_RE = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go_template(template: str, values: dict, *, stop_at_response: bool = True) -> str:
    """Render the Go-template basics Ollama's classic templates use: ``{{ .System }}``,
    ``{{ .Prompt }}``, ``{{ .Response }}``, ``{{ if .X }}…{{ else }}…{{ end }}`` and ``{{-``/``-}}``.
    Text after ``{{ .Response }}`` is dropped while generating, as Ollama does.

    >>> render_go_template("{{ if .System }}S:{{ .System }}\\n{{ end }}U:{{ .Prompt }}\\nA:{{ .Response }}</s>",
    ...                    {"System": "", "Prompt": "hi", "Response": ""})
    'U:hi\\nA:'
    """
    pieces: list[tuple[str, str]] = []
    pos = 0
    for m in _TAG_RE.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if pieces and pieces[-1][0] == "trim_next":
            pieces.pop()
            text = text.lstrip()
        pieces.append(("text", text))
        pieces.append(("tag", m.group(2)))
        if m.group(3):
            pieces.append(("trim_next", ""))
        pos = m.end()
    tail = template[pos:]
    if pieces and pieces[-1][0] == "trim_next":
        pieces.pop()
        tail = tail.lstrip()
    pieces.append(("text", tail))

    out: list[str] = []
    stack: list[tuple[bool, bool]] = []          # (parent active, this branch taken)
    active = True
    for kind, body in pieces:
        if kind == "text":
            if active:
                out.append(body)
            continue
        var = re.fullmatch(r"\.(\w+)", body)
        cond = re.fullmatch(r"if\s+\.(\w+)", body)
        if var:
            if active:
                if var.group(1) == "Response" and stop_at_response:
                    out.append(str(values.get("Response") or ""))
                    return "".join(out)
                out.append(str(values.get(var.group(1)) or ""))
        elif cond:
            taken = bool(values.get(cond.group(1)))
            stack.append((active, taken))
            active = active and taken
        elif body == "else":
            if not stack:
                raise APIError(400, "template error: {{ else }} without {{ if }}")
            parent, taken = stack[-1]
            active = parent and not taken
        elif body == "end":
            if not stack:
                raise APIError(400, "template error: {{ end }} without {{ if }}")
            active = stack.pop()[0]
        elif body.startswith("/*"):
            continue
        else:
            raise APIError(400, f"template uses {{{{ {body} }}}}, which labkit's stand-in does not support "
                                "(it renders .System, .Prompt, .Response and if/else/end); a real Ollama "
                                "supports full Go templates")
    if stack:
        raise APIError(400, "template error: an {{ if }} has no {{ end }}")
    return "".join(out)


# ============================================================================ model store
@dataclass
class Manifest:
    name: str
    kind: str                       # "gguf" or "sentence-transformers"
    path: str                       # weights: a .gguf file or an HF folder
    parent: str = ""
    system: str | None = None
    template: str | None = None
    parameters: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    license: list = field(default_factory=list)
    modified_ns: int = 0
    builtin: bool = False

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @property
    def digest(self) -> str:
        body = {k: v for k, v in self.to_json().items() if k not in ("name", "modified_ns")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @property
    def size(self) -> int:
        p = Path(self.path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size if p.exists() else 0


class Store:
    """Manifests under ``<root>/labkit-manifests/<name>/<tag>.json``, blobs under ``<root>/blobs``."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        self.manifests = self.root / "labkit-manifests"
        self.blobs = self.root / "blobs"
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    def _file(self, name: str) -> Path:
        base, _, tag = name.rpartition(":")
        return self.manifests / base / f"{tag}.json"

    def get(self, name: str) -> Manifest | None:
        f = self._file(name)
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        return Manifest(**data)

    def require(self, raw_name: Any) -> Manifest:
        name = normalize_name(raw_name)
        m = self.get(name)
        if m is None:
            raise not_found(raw_name if isinstance(raw_name, str) else name)
        return m

    def put(self, m: Manifest) -> None:
        m.modified_ns = time.time_ns()
        f = self._file(m.name)
        f.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(m.to_json(), indent=1))
            os.replace(tmp, f)

    def delete(self, name: str) -> bool:
        with self._lock:
            f = self._file(name)
            if not f.exists():
                return False
            f.unlink()
            for parent in f.parents:
                if parent == self.manifests:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._prune_blobs()
            return True

    def all(self) -> list[Manifest]:
        out = []
        for f in self.manifests.rglob("*.json"):
            try:
                m = Manifest(**json.loads(f.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if not Path(m.path).exists():     # its weights moved or were deleted (e.g. a rebuilt environment)
                print(f"note: {m.name} is not listed: {m.path} no longer exists", flush=True)
                continue
            out.append(m)
        return sorted(out, key=lambda m: -m.modified_ns)

    def blob_path(self, digest: str) -> Path:
        m = re.fullmatch(r"sha256[:-]([0-9a-f]{64})", digest or "")
        if not m:
            raise APIError(400, f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
        return self.blobs / f"sha256-{m.group(1)}"

    def _prune_blobs(self) -> None:
        used = {Path(m.path).resolve() for m in self.all()}
        for blob in self.blobs.glob("sha256-*"):
            if blob.resolve() not in used and not blob.name.endswith(".part"):
                # uploaded but never used blobs stay (a create may follow); generated ones go
                if (self.blobs / (blob.name + ".generated")).exists():
                    blob.unlink(missing_ok=True)
                    (self.blobs / (blob.name + ".generated")).unlink(missing_ok=True)


# ============================================================================ loaded models
@dataclass
class Loaded:
    name: str
    manifest: Manifest
    runner_opts: dict
    instances: list = field(default_factory=list)     # free llama_cpp.Llama objects (or one ST model)
    created: int = 0
    active: int = 0
    expires_at: float = 0.0                            # time.time() seconds; inf = never
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    embedder: Any = None
    formatter: Any = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def n_ctx(self) -> int:
        return int(self.runner_opts.get("num_ctx", 0))


class Scheduler:
    """Loads models on demand, shares them between requests and unloads them when they expire.

    Like Ollama's scheduler, loaded runners are keyed by the weights file: models created from
    the same weights (a Modelfile persona, a copy) share one loaded copy; their SYSTEM and
    PARAMETERs are applied per request.
    """

    def __init__(self, *, max_loaded: int, num_parallel: int, keep_alive: float, context_length: int,
                 num_thread: int):
        self.max_loaded = max(1, max_loaded)
        self.num_parallel = max(1, num_parallel)
        self.default_keep_alive = keep_alive
        self.context_length = context_length
        self.num_thread = num_thread
        self.loaded: dict[str, Loaded] = {}
        self.lock = threading.Condition()
        self._stop = threading.Event()
        threading.Thread(target=self._reaper, daemon=True, name="keep-alive").start()

    # ---------------------------------------------------------------- loading
    def runner_options(self, manifest: Manifest, options: dict) -> dict:
        opts = {"num_ctx": self.context_length, "num_thread": self.num_thread, "num_batch": 512}
        for source in (manifest.parameters, options):
            for k in RUNNER_OPTIONS:
                if k in source and source[k] not in (None, 0) or (k in source and k == "use_mmap"):
                    opts[k] = source[k]
        if manifest.kind != "gguf":
            return {}
        return opts

    def _construct(self, lm: Loaded):
        m, o = lm.manifest, lm.runner_opts
        if m.kind == "sentence-transformers":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer
            return SentenceTransformer(m.path, device="cpu")
        from llama_cpp import Llama
        kwargs = dict(model_path=m.path, n_ctx=int(o["num_ctx"]), n_batch=int(o.get("num_batch", 512)),
                      verbose=False, seed=0)
        # One thread count for decode and prompt batches: half the logical cores unless num_thread
        # says otherwise (llama-cpp-python would use every core for batches, which collapses when
        # other processes share the CPU).
        threads = int(o.get("num_thread") or max(1, (os.cpu_count() or 2) // 2))
        kwargs["n_threads"] = kwargs["n_threads_batch"] = threads
        if o.get("num_gpu") not in (None, -1):
            kwargs["n_gpu_layers"] = int(o["num_gpu"])
        else:
            kwargs["n_gpu_layers"] = -1                  # like Ollama: offload what fits (no-op on CPU builds)
        if "use_mmap" in o:
            kwargs["use_mmap"] = bool(o["use_mmap"])
        if o.get("use_mlock"):
            kwargs["use_mlock"] = True
        if o.get("repeat_last_n"):
            kwargs["last_n_tokens_size"] = int(o["repeat_last_n"])
        return Llama(**kwargs)

    def acquire(self, manifest: Manifest, options: dict) -> tuple[Loaded, Any, int]:
        """(loaded model, an instance reserved for this request, load nanoseconds)."""
        t0 = time.perf_counter_ns()
        wanted = self.runner_options(manifest, options)
        with self.lock:
            while True:
                lm = self.loaded.get(manifest.path)
                if lm and lm.runner_opts != wanted:
                    if lm.active == 0:          # reload with the new runner options (Ollama does too)
                        self._unload(lm)
                        lm = None
                    else:
                        self.lock.wait(0.5)
                        continue
                if lm is None:
                    idle = sorted((x for x in self.loaded.values() if x.active == 0), key=lambda x: x.last_used)
                    if len(self.loaded) >= self.max_loaded and not idle:
                        self.lock.wait(0.5)     # every slot busy: queue, as Ollama does
                        continue
                    while len(self.loaded) >= self.max_loaded and idle:
                        self._unload(idle.pop(0))
                    lm = Loaded(manifest.name, manifest, wanted)
                    try:
                        lm.instances.append(self._construct(lm))
                    except Exception as exc:
                        raise APIError(500, f"failed to load model '{manifest.name}' from {manifest.path}: {exc}") from exc
                    lm.created = 1
                    self.loaded[manifest.path] = lm
                lm.manifest = manifest          # the newest configuration (SYSTEM, PARAMETERs) applies
                lm.active += 1
                lm.expires_at = math.inf        # never expires while in use
                break
        # reserve an instance: a free one, a new one (up to OLLAMA_NUM_PARALLEL), or wait
        with lm.cond:
            while not lm.instances:
                if lm.created < self.num_parallel and manifest.kind == "gguf":
                    lm.created += 1
                    try:
                        inst = self._construct(lm)
                    except Exception:
                        lm.created -= 1
                        raise
                    return lm, inst, time.perf_counter_ns() - t0
                lm.cond.wait()
            inst = lm.instances.pop()
        return lm, inst, time.perf_counter_ns() - t0

    def release(self, lm: Loaded, inst: Any, keep_alive: float) -> None:
        with lm.cond:
            lm.instances.append(inst)
            lm.cond.notify()
        with self.lock:
            lm.active -= 1
            lm.last_used = time.monotonic()
            lm.expires_at = time.time() + keep_alive if keep_alive != math.inf else math.inf
            if keep_alive == 0 and lm.active == 0 and self.loaded.get(lm.manifest.path) is lm:
                self._unload(lm)
            self.lock.notify_all()

    def load_only(self, manifest: Manifest, options: dict, keep_alive: float) -> int:
        lm, inst, load_ns = self.acquire(manifest, options)
        self.release(lm, inst, keep_alive)
        return load_ns

    def unload(self, path: str) -> None:
        """Unload the runner of a weights file (now, or when its running requests finish)."""
        with self.lock:
            lm = self.loaded.get(path)
            if lm is None:
                return
            if lm.active == 0:
                self._unload(lm)
            else:
                lm.expires_at = 0.0             # the reaper unloads it once its requests finish

    def _unload(self, lm: Loaded) -> None:
        if self.loaded.get(lm.manifest.path) is lm:
            self.loaded.pop(lm.manifest.path)
        for inst in lm.instances + ([lm.embedder] if lm.embedder else []):
            close = getattr(inst, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    pass
        lm.instances.clear()
        lm.embedder = None
        gc.collect()
        print(f"unloaded {lm.manifest.name} ({lm.manifest.path})", flush=True)

    def _reaper(self) -> None:
        while not self._stop.wait(0.25):
            with self.lock:
                now = time.time()
                for lm in list(self.loaded.values()):
                    if lm.active == 0 and lm.expires_at <= now:
                        self._unload(lm)
                self.lock.notify_all()

    def snapshot(self) -> list[Loaded]:
        with self.lock:
            return list(self.loaded.values())


# ============================================================================ the service
class Service:
    def __init__(self, store: Store, sched: Scheduler):
        self.store, self.sched = store, sched
        self._info_cache: dict[str, tuple] = {}

    # ---------------------------------------------------------------- registration
    def register(self, name: str, path: Path, *, builtin: bool = True, overwrite: bool = False) -> None:
        name = normalize_name(name)
        if self.store.get(name) and not overwrite:
            return
        kind = "gguf" if Path(path).is_file() else "sentence-transformers"
        self.store.put(Manifest(name=name, kind=kind, path=str(Path(path).resolve()), builtin=builtin))

    # ---------------------------------------------------------------- model facts
    def _header(self, path: str):
        from .gguf import read_header
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._info_cache:
            self._info_cache[key] = (read_header(path),)
        return self._info_cache[key][0]

    def details(self, m: Manifest) -> dict:
        if m.kind == "gguf":
            h = self._header(m.path)
            arch = h.architecture or "unknown"
            ftype = h.metadata.get("general.file_type")
            level = _ftype_names().get(ftype, "unknown") if ftype is not None else "unknown"
            return {"parent_model": m.parent, "format": "gguf", "family": arch, "families": [arch],
                    "parameter_size": _human_params(h.n_parameters), "quantization_level": level}
        cfg = json.loads((Path(m.path) / "config.json").read_text())
        arch = cfg.get("model_type", "bert")
        n = self._st_params(m)
        return {"parent_model": m.parent, "format": "safetensors", "family": arch, "families": [arch],
                "parameter_size": _human_params(n), "quantization_level": str(cfg.get("torch_dtype", "F32")).upper()
                .replace("FLOAT32", "F32").replace("FLOAT16", "F16")}

    def _st_params(self, m: Manifest) -> int:
        total = 0
        for f in Path(m.path).glob("*.safetensors"):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    total += math.prod(v["shape"])
        return total

    def model_info(self, m: Manifest, verbose: bool) -> dict:
        if m.kind == "gguf":
            h = self._header(m.path)
            info = {}
            for k, v in h.metadata.items():
                if isinstance(v, list) and len(v) > 64 and not verbose:
                    v = []
                info[k] = v
            info["general.parameter_count"] = h.n_parameters
            return info
        cfg = json.loads((Path(m.path) / "config.json").read_text())
        arch = cfg.get("model_type", "bert")
        return {"general.architecture": arch, "general.parameter_count": self._st_params(m),
                f"{arch}.embedding_length": cfg.get("hidden_size"), f"{arch}.block_count": cfg.get("num_hidden_layers"),
                f"{arch}.attention.head_count": cfg.get("num_attention_heads"),
                f"{arch}.context_length": cfg.get("max_position_embeddings")}

    def capabilities(self, m: Manifest) -> list[str]:
        return ["completion"] if m.kind == "gguf" else ["embedding"]

    def chat_template(self, m: Manifest) -> str:
        if m.template is not None:
            return m.template
        if m.kind == "gguf":
            return str(self._header(m.path).metadata.get("tokenizer.chat_template", ""))
        return ""

    def modelfile_text(self, m: Manifest) -> str:
        header = (f'# Modelfile generated by labkit\'s Ollama-compatible server ("ollama show")\n'
                  f"# To build a new Modelfile based on this one, replace the FROM line with:\n# FROM {m.name}\n")
        return mf.render(from_=m.path, system=m.system, template=m.template, parameters=m.parameters,
                         messages=m.messages, license=m.license, header=header)

    def entry(self, m: Manifest) -> dict:
        return {"name": m.name, "model": m.name, "modified_at": now_rfc3339(m.modified_ns, utc=False),
                "size": m.size, "digest": m.digest, "details": self.details(m)}

    # ---------------------------------------------------------------- options
    @staticmethod
    def options(body: dict, manifest: Manifest) -> dict:
        raw = body.get("options") or {}
        if not isinstance(raw, dict):
            raise APIError(400, "options must be a JSON object, e.g. {\"temperature\": 0}")
        merged = dict(manifest.parameters)
        for key, value in raw.items():
            if value is None:
                continue
            if key not in mf.PARAMETER_TYPES:
                print(f"warning: invalid option provided: {key} (ignored, as Ollama does)", flush=True)
                continue
            try:
                merged[key] = mf.coerce_parameter(key, value)
            except mf.ModelfileError as exc:
                raise APIError(400, f"invalid options: {exc}") from None
        return merged

    @staticmethod
    def grammar_for(fmt: Any):
        if fmt in (None, ""):
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
        if fmt == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if isinstance(fmt, dict):
            try:
                return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
            except Exception as exc:
                raise APIError(400, f"invalid JSON schema in format: {exc}") from None
        raise APIError(400, f"invalid format {fmt!r}: use \"json\" or a JSON schema object")

    # ---------------------------------------------------------------- prompts
    def _formatter(self, lm: Loaded, inst):
        if lm.formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            tmpl = inst.metadata.get("tokenizer.chat_template")
            if not tmpl:
                raise APIError(400, f"{lm.name} has no chat template; set TEMPLATE in a Modelfile or use raw")
            eos = inst._model.token_get_text(inst.token_eos()) if inst.token_eos() >= 0 else ""
            bos = inst._model.token_get_text(inst.token_bos()) if inst.token_bos() >= 0 else ""
            lm.formatter = Jinja2ChatFormatter(template=tmpl, eos_token=eos, bos_token=bos)
        return lm.formatter

    def build_prompt(self, lm: Loaded, inst, messages: list[dict], template: str | None) -> str:
        if template:
            system = "\n".join(x["content"] for x in messages if x["role"] == "system")
            turns = [x for x in messages if x["role"] != "system"]
            out, first = [], True
            for i, msg in enumerate(turns):
                if msg["role"] != "user":
                    continue
                reply = turns[i + 1]["content"] if i + 1 < len(turns) and turns[i + 1]["role"] == "assistant" else None
                values = {"System": system if first else "", "Prompt": msg["content"], "Response": reply or ""}
                out.append(render_go_template(template, values, stop_at_response=reply is None))
                first = False
            if not out:
                out.append(render_go_template(template, {"System": system, "Prompt": "", "Response": ""}))
            return "".join(out)
        return self._formatter(lm, inst)(messages=messages).prompt

    # ---------------------------------------------------------------- generation core
    def run(self, inst, tokens: list[int], opts: dict, grammar, stats: dict) -> Iterator[str]:
        """Yield text pieces; fill ``stats`` with counts, durations (ns) and done_reason."""
        import llama_cpp
        n_ctx = inst.n_ctx()
        limit = int(opts.get("num_predict", -1))
        if len(tokens) >= n_ctx - 1:         # keep the most recent tokens, as Ollama truncates
            keep = max(1, n_ctx // 2)
            print(f"warning: prompt of {len(tokens)} tokens exceeds num_ctx={n_ctx}; truncating to {keep}", flush=True)
            tokens = tokens[-keep:]
        seed = opts.get("seed", -1)
        if seed is not None and int(seed) >= 0:
            # Reproducible outputs: evaluate the whole prompt afresh. Reusing a cached prefix
            # computes the last logits by another kernel path, and sampling at temperature > 0
            # can then pick another token.
            inst.reset()
            inst.set_seed(int(seed))
        else:
            inst.set_seed(random.getrandbits(31))
        stops = [s for s in (opts.get("stop") or []) if s]
        stats.update(prompt_eval_count=len(tokens), eval_count=0, done_reason="stop")
        gen = inst.generate(
            tokens, top_k=int(opts.get("top_k", 40)), top_p=float(opts.get("top_p", 0.9)),
            min_p=float(opts.get("min_p", 0.0)), typical_p=float(opts.get("typical_p", 1.0)),
            temp=float(opts.get("temperature", 0.8)), repeat_penalty=float(opts.get("repeat_penalty", 1.0)),
            frequency_penalty=float(opts.get("frequency_penalty", 0.0)),
            presence_penalty=float(opts.get("presence_penalty", 0.0)),
            mirostat_mode=int(opts.get("mirostat", 0)), mirostat_tau=float(opts.get("mirostat_tau", 5.0)),
            mirostat_eta=float(opts.get("mirostat_eta", 0.1)), grammar=grammar)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = inst._model.vocab
        pending, history = "", list(tokens)
        t_start = time.perf_counter_ns()
        t_first = None
        try:
            for tok in gen:
                if t_first is None:
                    t_first = time.perf_counter_ns()
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    stats["done_reason"] = "stop"
                    break
                stats["eval_count"] += 1
                piece = decoder.decode(inst.detokenize([tok], prev_tokens=history[-8:]))
                history.append(tok)
                pending += piece
                hit = min(((pending.find(s), s) for s in stops if s in pending), default=None)
                if hit:
                    out = pending[:hit[0]]
                    if out:
                        yield out
                    pending = ""
                    stats["done_reason"] = "stop"
                    break
                keep = max((k for s in stops for k in range(len(s) - 1, 0, -1) if pending.endswith(s[:k])), default=0)
                out, pending = (pending[:-keep], pending[-keep:]) if keep else (pending, "")
                if out:
                    yield out
                if (limit > 0 and stats["eval_count"] >= limit) or len(history) >= n_ctx:
                    stats["done_reason"] = "length"
                    break
            else:
                stats["done_reason"] = "stop"
            rest = pending + decoder.decode(b"", final=True)
            if rest:                          # a partial stop string that never completed is text
                yield rest
        finally:
            gen.close()
            t_end = time.perf_counter_ns()
            t_first = t_first or t_end
            stats["prompt_eval_duration"] = t_first - t_start
            stats["eval_duration"] = t_end - t_first
            stats["context"] = history


# ============================================================================ HTTP layer
def build_app(service: Service):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    store, sched = service.store, service.sched

    def err(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def oai_err(status: int, message: str) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                       "code": "model_not_found" if status == 404 else None}}, status_code=status)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"invalid JSON in request body: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    def ndjson(gen: Iterator[dict], closes: tuple[Iterator, ...] = ()) -> StreamingResponse:
        """NDJSON lines; ``gen`` (and ``closes``) are stopped and closed if the client goes away."""
        def lines():
            try:
                for obj in gen:
                    yield json.dumps(obj, ensure_ascii=False) + "\n"
            except APIError as exc:
                yield json.dumps({"error": exc.message}) + "\n"
            except Exception as exc:   # mid-stream: the status line is already sent
                yield json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n"
        return cancellable_stream(lines(), "application/x-ndjson", closes)

    def endpoint(fn, openai: bool = False):
        async def handler(request: Request):
            t0 = time.perf_counter_ns()
            try:
                return await fn(request, t0)
            except APIError as exc:
                return (oai_err if openai else err)(exc.status, exc.message)
            except ClientGone:        # nobody is listening; 499 as nginx logs it ("client closed request")
                return Response(status_code=499)
            except Exception as exc:  # never let one request take the server down
                import traceback
                traceback.print_exc()
                return (oai_err if openai else err)(500, f"{type(exc).__name__}: {exc}")
        return handler

    def stream_flag(body: dict) -> bool:
        s = body.get("stream", True)
        return True if s is None else bool(s)

    # ---------------------------------------------------------------- generation shared by generate/chat
    def prepare(body: dict, manifest: Manifest):
        if manifest.kind != "gguf":
            raise APIError(400, f"\"{manifest.name}\" does not support generate")
        if body.get("images") or any(isinstance(x, dict) and x.get("images") for x in body.get("messages") or []):
            raise APIError(400, f"\"{manifest.name}\" does not support images (it is a text-only model)")
        if body.get("tools"):
            raise APIError(400, f"\"{manifest.name}\" does not support tools")
        if body.get("think") not in (None, False):
            raise APIError(400, f"\"{manifest.name}\" does not support thinking")
        opts = service.options(body, manifest)
        grammar = service.grammar_for(body.get("format"))
        keep_alive = parse_duration(body.get("keep_alive"), default=sched.default_keep_alive)
        return opts, grammar, keep_alive

    def generation(kind: str, body: dict, manifest: Manifest, t0: int, messages_or_prompt) -> Iterator[dict]:
        opts, grammar, keep_alive = prepare(body, manifest)
        lm, inst, load_ns = sched.acquire(manifest, opts)
        try:
            if kind == "generate":
                if body.get("raw"):
                    text = messages_or_prompt
                else:
                    system = body.get("system") if body.get("system") is not None else manifest.system
                    msgs = ([{"role": "system", "content": system}] if system else []) + \
                        [{"role": "user", "content": messages_or_prompt}]
                    text = service.build_prompt(lm, inst, msgs, body.get("template") or manifest.template)
            else:
                text = service.build_prompt(lm, inst, messages_or_prompt, manifest.template)
            tokens = inst.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            if kind == "generate" and isinstance(body.get("context"), list) and body["context"]:
                tokens = [int(t) for t in body["context"]] + tokens
            stats: dict = {}
            pieces = []
            for piece in service.run(inst, tokens, opts, grammar, stats):
                pieces.append(piece)
                yield {"piece": piece}
            final = {"done_reason": stats["done_reason"],
                     "total_duration": time.perf_counter_ns() - t0, "load_duration": load_ns,
                     "prompt_eval_count": stats["prompt_eval_count"],
                     "prompt_eval_duration": stats["prompt_eval_duration"],
                     "eval_count": stats["eval_count"], "eval_duration": stats["eval_duration"]}
            if kind == "generate" and not body.get("raw"):
                final["context"] = stats["context"]
            yield {"final": final, "text": "".join(pieces)}
        finally:
            sched.release(lm, inst, keep_alive)

    def shaped(kind: str, name: str, chunk: dict, streamed: bool) -> dict:
        if "piece" in chunk:
            base = {"model": name, "created_at": now_rfc3339()}
            if kind == "generate":
                base["response"] = chunk["piece"]
            else:
                base["message"] = {"role": "assistant", "content": chunk["piece"]}
            base["done"] = False
            return base
        text = "" if streamed else chunk["text"]
        out = {"model": name, "created_at": now_rfc3339()}
        if kind == "generate":
            out["response"] = text
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["done"] = True
        out.update(chunk["final"])
        if kind == "generate" and "context" in out:      # documented order: context after done
            ctx = out.pop("context")
            out = {**{k: out[k] for k in ("model", "created_at", "response", "done", "done_reason")},
                   "context": ctx, **{k: v for k, v in out.items() if k not in
                                       ("model", "created_at", "response", "done", "done_reason")}}
        return out

    async def respond(request: Request, kind: str, body: dict, manifest: Manifest, t0: int, payload):
        name = manifest.name
        if stream_flag(body):
            gen = generation(kind, body, manifest, t0, payload)
            first = await run_in_threadpool(lambda: next(gen, None))   # errors before streaming → status code

            def rest():
                if first is not None:
                    yield shaped(kind, name, first, True)
                for chunk in gen:
                    yield shaped(kind, name, chunk, True)
            return ndjson(rest(), closes=(gen,))

        last = await drain(request, generation(kind, body, manifest, t0, payload), reduce=lambda chunks: chunks[-1])
        return JSONResponse(shaped(kind, name, last, False))

    def load_or_unload(kind: str, body: dict, manifest: Manifest) -> dict:
        keep_alive = parse_duration(body.get("keep_alive"), default=sched.default_keep_alive)
        out = {"model": manifest.name, "created_at": now_rfc3339()}
        if kind == "generate":
            out["response"] = ""
        else:
            out["message"] = {"role": "assistant", "content": ""}
        if keep_alive == 0:
            sched.unload(manifest.path)
            out.update(done_reason="unload", done=True)
        else:
            if manifest.kind != "gguf":
                raise APIError(400, f"\"{manifest.name}\" does not support {kind}")
            sched.load_only(manifest, service.options(body, manifest), keep_alive)
            out["done"] = True
            if kind == "chat":
                out = {**out, "done_reason": "load", "done": True}
        return out

    # ---------------------------------------------------------------- /api routes
    async def root(request: Request, t0):
        return PlainTextResponse("Ollama is running")

    async def version(request: Request, t0):
        return JSONResponse({"version": VERSION})

    async def generate(request: Request, t0):
        body = await body_of(request)
        manifest = store.require(body.get("model"))
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string")
        if body.get("suffix"):
            raise APIError(400, f"\"{manifest.name}\" does not support insert (suffix)")
        if not prompt and not body.get("context"):
            return JSONResponse(await run_in_threadpool(load_or_unload, "generate", body, manifest))
        return await respond(request, "generate", body, manifest, t0, prompt or "")

    async def chat(request: Request, t0):
        body = await body_of(request)
        manifest = store.require(body.get("model"))
        messages = body.get("messages")
        if messages is None:
            messages = []
        if not isinstance(messages, list) or not all(isinstance(x, dict) for x in messages):
            raise APIError(400, "messages must be a list of {\"role\": ..., \"content\": ...} objects")
        if not messages:
            return JSONResponse(await run_in_threadpool(load_or_unload, "chat", body, manifest))
        clean = []
        for x in messages:
            role = x.get("role")
            if role not in ("system", "user", "assistant", "tool"):
                raise APIError(400, f"invalid message role {role!r}: use system, user, assistant or tool")
            content = x.get("content") or ""
            if not isinstance(content, str):
                raise APIError(400, "message content must be a string")
            clean.append({"role": role, "content": content})
        history = list(manifest.messages)
        if manifest.system and not any(x["role"] == "system" for x in clean + history):
            history = [{"role": "system", "content": manifest.system}] + history
        return await respond(request, "chat", body, manifest, t0, history + clean)

    def embed_vectors(manifest: Manifest, inputs: list[str], body: dict, *, normalize: bool, truncate: bool,
                      dims: int | None) -> tuple[list, int, int]:
        opts = service.options(body, manifest)
        keep_alive = parse_duration(body.get("keep_alive"), default=sched.default_keep_alive)
        lm, inst, load_ns = sched.acquire(manifest, opts)
        try:
            if manifest.kind == "sentence-transformers":
                limit = inst.max_seq_length
                counts = [len(inst.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in inputs]
                if not truncate and any(c > limit for c in counts):
                    raise APIError(400, f"input length exceeds the context length ({max(counts)} > {limit} tokens)")
                vecs = inst.encode(inputs, normalize_embeddings=False, convert_to_numpy=True).tolist() if inputs else []
                n_tokens = sum(min(c, limit) for c in counts)
            else:
                if lm.embedder is None:
                    import llama_cpp
                    from llama_cpp import Llama
                    lm.embedder = Llama(model_path=manifest.path, embedding=True, n_ctx=lm.n_ctx or 2048,
                                        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False,
                                        n_threads=lm.runner_opts.get("num_thread") or None)
                vecs, n_tokens = [], 0
                for t in inputs:
                    toks = lm.embedder.tokenize(t.encode(), add_bos=True, special=False)
                    if len(toks) > lm.embedder.n_ctx():
                        if not truncate:
                            raise APIError(400, f"input length exceeds the context length ({len(toks)} > "
                                                f"{lm.embedder.n_ctx()} tokens)")
                        toks = toks[:lm.embedder.n_ctx()]
                        t = lm.embedder.detokenize(toks).decode("utf-8", "replace")
                    n_tokens += len(toks)
                    vecs.append(lm.embedder.embed(t, normalize=False))
        finally:
            sched.release(lm, inst, keep_alive)
        out = []
        for v in vecs:
            if dims:
                v = v[:dims]
            if normalize:
                norm = math.sqrt(sum(x * x for x in v)) or 1.0
                v = [x / norm for x in v]
            out.append(v)
        return out, n_tokens, load_ns

    async def embed(request: Request, t0):
        body = await body_of(request)
        manifest = store.require(body.get("model"))
        raw = body.get("input", "")
        if isinstance(raw, str):
            inputs = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = raw
        else:
            raise APIError(400, "invalid input type: input must be a string or a list of strings")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or dims <= 0):
            raise APIError(400, "dimensions must be a positive integer")
        truncate = body.get("truncate", True) is not False
        vecs, n, load_ns = await run_in_threadpool(embed_vectors, manifest, inputs, body, normalize=True,
                                                   truncate=truncate, dims=dims)
        return JSONResponse({"model": manifest.name, "embeddings": vecs,
                             "total_duration": time.perf_counter_ns() - t0, "load_duration": load_ns,
                             "prompt_eval_count": n})

    async def embeddings_legacy(request: Request, t0):
        body = await body_of(request)
        manifest = store.require(body.get("model"))
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string")
        if not prompt:
            return JSONResponse({"embedding": []})
        vecs, _, _ = await run_in_threadpool(embed_vectors, manifest, [prompt], body, normalize=False,
                                             truncate=True, dims=None)
        return JSONResponse({"embedding": vecs[0]})

    async def tags(request: Request, t0):
        return JSONResponse({"models": [service.entry(m) for m in store.all()]})

    async def show(request: Request, t0):
        body = await body_of(request)
        m = store.require(body.get("model") or body.get("name"))
        out = {"modelfile": service.modelfile_text(m),
               "parameters": mf.format_parameters(m.parameters),
               "template": service.chat_template(m)}
        if m.system is not None:
            out["system"] = m.system
        if m.license:
            out["license"] = "\n".join(m.license)
        if m.messages:
            out["messages"] = m.messages
        out.update(details=service.details(m), model_info=service.model_info(m, bool(body.get("verbose"))),
                   capabilities=service.capabilities(m), modified_at=now_rfc3339(m.modified_ns, utc=False))
        return JSONResponse(out)

    async def ps(request: Request, t0):
        rows = []
        for lm in sched.snapshot():
            m = lm.manifest
            size = m.size
            if m.kind == "gguf":
                try:
                    from .memory import from_gguf
                    size += int(from_gguf(m.path).kv_cache_bytes(lm.n_ctx)) * max(1, lm.created)
                except Exception:
                    pass
            expires = lm.expires_at if lm.expires_at != math.inf else time.time() + 10 * 365 * 86400 * 30
            row = {"name": m.name, "model": m.name, "size": size, "digest": m.digest, "details": service.details(m),
                   "expires_at": now_rfc3339(int(expires * 1e9), utc=False), "size_vram": 0}
            if lm.n_ctx:
                row["context_length"] = lm.n_ctx
            rows.append(row)
        return JSONResponse({"models": rows})

    async def copy(request: Request, t0):
        body = await body_of(request)
        if not body.get("source") or not body.get("destination"):
            raise APIError(400, "source and destination are required")
        src = store.require(body["source"])
        dst = normalize_name(body["destination"], field_name="destination")
        store.put(Manifest(**{**src.to_json(), "name": dst, "builtin": False}))
        return Response(status_code=200)

    async def delete(request: Request, t0):
        body = await body_of(request)
        name = normalize_name(body.get("model") or body.get("name"))
        gone = store.get(name)
        if gone is None:
            raise not_found(body.get("model") or body.get("name"))
        if not any(m.path == gone.path and m.name != name for m in store.all()):
            sched.unload(gone.path)            # nothing else uses these weights
        store.delete(name)
        return Response(status_code=200)

    async def pull(request: Request, t0):
        body = await body_of(request)
        name = normalize_name(body.get("model") or body.get("name"))
        local = store.get(name)
        if local is not None:
            steps = [{"status": "pulling manifest"}, {"status": f"{name} is already local (labkit's server "
                                                                  "never downloads)"}, {"status": "success"}]
            return ndjson(iter(steps)) if stream_flag(body) else JSONResponse({"status": "success"})
        message = (f"pull model manifest: cannot download '{name}': labkit's Ollama-compatible server works "
                   "offline and only serves models already in its store (see GET /api/tags). Create one from a "
                   "local GGUF with POST /api/create, or use a real Ollama with network access to pull.")
        if stream_flag(body):
            return ndjson(iter([{"status": "pulling manifest"}, {"error": message}]))
        raise APIError(500, message)

    async def push(request: Request, t0):
        body = await body_of(request)
        store.require(body.get("model") or body.get("name"))
        raise APIError(500, "push needs network access and an ollama.com account; labkit's server cannot push")

    async def blob(request: Request, t0):
        path = store.blob_path(request.path_params["digest"])
        if request.method == "HEAD":
            return Response(status_code=200 if path.exists() else 404)
        expected = path.name.split("-", 1)[1]
        tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.part")
        digest = hashlib.sha256()
        with open(tmp, "wb") as f:
            async for chunk in request.stream():
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise APIError(400, f"digest mismatch, expected \"sha256:{expected}\", got \"sha256:{digest.hexdigest()}\"")
        os.replace(tmp, path)
        return Response(status_code=201)

    async def create(request: Request, t0):
        body = await body_of(request)
        plan = await run_in_threadpool(plan_create, body)
        if stream_flag(body):
            return ndjson(execute_create(plan))

        def whole():
            for _ in execute_create(plan):
                pass
            return {"status": "success"}
        return JSONResponse(await run_in_threadpool(whole))

    def plan_create(body: dict) -> dict:
        name = normalize_name(body.get("model") or body.get("name"))
        fields = {k: body.get(k) for k in ("from", "files", "adapters", "template", "system", "parameters",
                                            "messages", "license")}
        base_dir = Path.cwd()
        text = body.get("modelfile")
        if text is None and body.get("path"):
            p = Path(body["path"]).expanduser()
            try:
                text = p.read_text()
            except OSError as exc:
                raise APIError(400, f"cannot read Modelfile {p}: {exc}") from None
            base_dir = p.parent
        if text is not None:
            try:
                parsed = mf.parse(text)
            except mf.ModelfileError as exc:
                raise APIError(400, f"invalid Modelfile: {exc}") from None
            for k, v in parsed.to_request().items():
                if fields.get(k) is None:
                    fields[k] = v
            if parsed.adapters:
                fields["adapters"] = parsed.adapters
        if fields["adapters"]:
            raise APIError(400, "LoRA adapters (ADAPTER / adapters) are not supported by labkit's stand-in; "
                                "a real Ollama applies them")
        # ---- the base: an existing model, a local GGUF path, or uploaded blobs
        base: Manifest | None = None
        source = fields["from"]
        if fields["files"]:
            files = fields["files"]
            if not isinstance(files, dict):
                raise APIError(400, "files must map file names to sha256 digests")
            ggufs = [(n, d) for n, d in files.items() if str(n).endswith(".gguf")]
            if len(ggufs) != 1 or len(files) != 1:
                raise APIError(400, "labkit's stand-in imports exactly one .gguf file; converting safetensors "
                                    "folders needs a real Ollama")
            blob = store.blob_path(ggufs[0][1])
            if not blob.exists():
                raise APIError(400, f"blob {ggufs[0][1]} not found on the server: push the file first with "
                                    "POST /api/blobs/<digest> (ollama.Client.create_blob does this)")
            base = Manifest(name=name, kind="gguf", path=str(blob))
            check_gguf(blob, ggufs[0][0])
        elif source:
            looks_like_path = any(c in str(source) for c in "/\\~") or str(source).lower().endswith(".gguf") \
                or str(source).startswith(".")
            existing = None
            if not looks_like_path or ":" in str(source).rsplit("/", 1)[-1]:
                try:
                    existing = store.get(normalize_name(source, field_name="from"))
                except APIError:
                    existing = None
            if existing is not None:
                base = Manifest(**{**existing.to_json(), "name": name, "builtin": False, "parent": existing.name})
            elif looks_like_path:
                p = Path(str(source)).expanduser()
                p = p if p.is_absolute() else (base_dir / p)
                if not p.exists():
                    raise APIError(400, f"FROM {source}: no such file ({p} does not exist). Give the path to a .gguf "
                                        "file (absolute, or relative to the Modelfile) or a model name from /api/tags")
                if p.is_dir():
                    raise APIError(400, f"FROM {source} is a folder: importing safetensors folders needs Ollama's "
                                        "converter; convert it to GGUF first (llama.cpp's convert_hf_to_gguf.py)")
                check_gguf(p, str(source))
                base = Manifest(name=name, kind="gguf", path=str(p.resolve()))
            else:
                raise not_found(str(source))
        else:
            raise APIError(400, "neither 'from' nor 'files' was specified: name a base model (FROM) to create from")
        # ---- the layers on top
        if fields["system"] is not None:
            if not isinstance(fields["system"], str):
                raise APIError(400, "system must be a string")
            base.system = fields["system"]
        if fields["template"] is not None:
            if not isinstance(fields["template"], str):
                raise APIError(400, "template must be a string")
            render_go_template(fields["template"], {"System": "s", "Prompt": "p", "Response": ""})  # validates
            base.template = fields["template"]
        if fields["parameters"] is not None:
            if not isinstance(fields["parameters"], dict):
                raise APIError(400, "parameters must be a JSON object")
            params = dict(base.parameters)
            for k, v in fields["parameters"].items():
                try:
                    params[k.lower()] = mf.coerce_parameter(k, v)
                except mf.ModelfileError as exc:
                    raise APIError(400, f"invalid parameters: {exc}") from None
            base.parameters = params
        if fields["messages"] is not None:
            msgs = fields["messages"]
            if not isinstance(msgs, list) or not all(isinstance(x, dict) and x.get("role") in mf.MESSAGE_ROLES
                                                     and isinstance(x.get("content"), str) for x in msgs):
                raise APIError(400, "messages must be a list of {role: system|user|assistant, content: str}")
            base.messages = [{"role": x["role"], "content": x["content"]} for x in msgs]
        if fields["license"] is not None:
            lic = fields["license"]
            base.license = [lic] if isinstance(lic, str) else list(lic)
        quantize = body.get("quantize")
        if quantize:
            match = {q.lower(): q for q in QUANTIZE_TYPES}.get(str(quantize).lower())
            if match is None:
                raise APIError(400, f"unsupported quantization type {quantize}: use one of {', '.join(QUANTIZE_TYPES)}")
            if base.kind != "gguf":
                raise APIError(400, "quantization is only supported for GGUF models")
            ftype = service._header(base.path).metadata.get("general.file_type")
            if ftype not in (0, 1, 32):          # ALL_F32, MOSTLY_F16, MOSTLY_BF16
                level = _ftype_names().get(ftype, str(ftype))
                raise APIError(400, f"quantization is only supported for F16 and F32 models (this one is {level})")
            quantize = match
        return {"manifest": base, "quantize": quantize}

    def check_gguf(path: Path, label: str) -> None:
        from .gguf import read_header
        try:
            read_header(path)
        except Exception as exc:
            raise APIError(400, f"FROM {label}: not a usable GGUF file: {exc}") from None

    def execute_create(plan: dict) -> Iterator[dict]:
        m: Manifest = plan["manifest"]
        if plan["quantize"]:
            src = m.path
            level = _ftype_names().get(service._header(src).metadata.get("general.file_type"), "F16")
            yield {"status": f"quantizing {level} model to {plan['quantize'].upper()}"}
            tmp = store.blobs / f"quantize-{uuid.uuid4().hex}.part"
            try:
                _quantize(src, tmp, plan["quantize"])
                digest = hashlib.sha256()
                with open(tmp, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                dst = store.blobs / f"sha256-{digest.hexdigest()}"
                os.replace(tmp, dst)
                (store.blobs / (dst.name + ".generated")).touch()
            finally:
                tmp.unlink(missing_ok=True)
            yield {"status": "verifying conversion"}
            m.path = str(dst)
            m.parent = m.parent or ""
            yield {"status": f"creating new layer sha256:{digest.hexdigest()}"}
        else:
            yield {"status": "parsing GGUF" if m.kind == "gguf" else "reading model metadata"}
            yield {"status": f"using existing layer sha256:{hashlib.sha256(m.path.encode()).hexdigest()}"}
        for layer in ("system", "template"):
            if getattr(m, layer) is not None:
                yield {"status": f"creating {layer} layer"}
        if m.parameters:
            yield {"status": "creating parameters layer"}
        yield {"status": "writing manifest"}
        store.put(m)
        yield {"status": "success"}

    # ---------------------------------------------------------------- OpenAI-compatible /v1
    def oai_messages(raw: Any) -> list[dict]:
        if not isinstance(raw, list) or not raw:
            raise APIError(400, "messages must be a non-empty list")
        out = []
        for x in raw:
            if not isinstance(x, dict):
                raise APIError(400, "each message must be an object")
            content = x.get("content") or ""
            if isinstance(content, list):
                texts = []
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "text":
                        texts.append(part.get("text", ""))
                    else:
                        raise APIError(400, "only text content parts are supported by this model")
                content = "".join(texts)
            role = x.get("role")
            if role == "developer":
                role = "system"
            out.append({"role": role, "content": content})
        return out

    def oai_body(body: dict, fmt_key: str = "response_format") -> dict:
        options: dict = {}
        for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                         ("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty")):
            if body.get(src) is not None:
                options[dst] = body[src]
        n = body.get("max_completion_tokens") or body.get("max_tokens")
        if n is not None:
            options["num_predict"] = n
        stop = body.get("stop")
        if stop:
            options["stop"] = [stop] if isinstance(stop, str) else stop
        out = {"model": body.get("model"), "options": options, "stream": bool(body.get("stream", False))}
        rf = body.get(fmt_key)
        if isinstance(rf, dict):
            if rf.get("type") == "json_object":
                out["format"] = "json"
            elif rf.get("type") == "json_schema":
                out["format"] = (rf.get("json_schema") or {}).get("schema") or "json"
        if body.get("tools"):
            out["tools"] = body["tools"]
        return out

    async def oai_generate(request: Request, t0, kind: str):
        body = await body_of(request)
        if not body.get("model"):
            raise APIError(400, "model is required")
        manifest = store.require(body["model"])
        ob = oai_body(body)
        if kind == "chat":
            payload = oai_messages(body.get("messages"))
            if manifest.system and not any(x["role"] == "system" for x in payload):
                payload = [{"role": "system", "content": manifest.system}] + list(manifest.messages) + payload
            gkind = "chat"
        else:
            prompt = body.get("prompt", "")
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise APIError(400, "prompt must be a string (a list of one string is accepted)")
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise APIError(400, "prompt must be a string")
            ob["raw"] = True
            payload = prompt
            gkind = "generate"
        if "temperature" not in ob["options"]:
            ob["options"]["temperature"] = 1.0            # the OpenAI default, which Ollama's /v1 also uses
        cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def usage(final):
            return {"prompt_tokens": final["prompt_eval_count"], "completion_tokens": final["eval_count"],
                    "total_tokens": final["prompt_eval_count"] + final["eval_count"]}

        def finish(final):
            return "length" if final["done_reason"] == "length" else "stop"

        if ob["stream"]:
            gen = generation(gkind, ob, manifest, t0, payload)
            first = await run_in_threadpool(lambda: next(gen, None))

            def events():
                try:
                    if kind == "chat":
                        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": manifest.name,
                               "system_fingerprint": "fp_labkit",
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]}
                    chunks = ([first] if first is not None else [])
                    for chunk in _chain(chunks, gen):
                        if "piece" in chunk:
                            choice = ({"index": 0, "delta": {"content": chunk["piece"]}, "finish_reason": None}
                                      if kind == "chat" else {"index": 0, "text": chunk["piece"], "finish_reason": None})
                            yield {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                                   "model": manifest.name, "system_fingerprint": "fp_labkit", "choices": [choice]}
                        else:
                            final = chunk["final"]
                            choice = ({"index": 0, "delta": {}, "finish_reason": finish(final)} if kind == "chat"
                                      else {"index": 0, "text": "", "finish_reason": finish(final)})
                            yield {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                                   "model": manifest.name, "system_fingerprint": "fp_labkit", "choices": [choice]}
                            if include_usage:
                                yield {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""),
                                       "created": created, "model": manifest.name, "system_fingerprint": "fp_labkit",
                                       "choices": [], "usage": usage(final)}
                except APIError as exc:
                    yield {"error": {"message": exc.message, "type": "api_error", "param": None, "code": None}}
                except Exception as exc:
                    yield {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "api_error",
                                     "param": None, "code": None}}

            def sse():
                for ev in events():
                    yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            return cancellable_stream(sse(), "text/event-stream", closes=(gen,))

        last = await drain(request, generation(gkind, ob, manifest, t0, payload), reduce=lambda chunks: chunks[-1])
        text, final = last["text"], last["final"]
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(final)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish(final)}
        return JSONResponse({"id": cid, "object": obj, "created": created, "model": manifest.name,
                             "system_fingerprint": "fp_labkit", "choices": [choice], "usage": usage(final)})

    async def v1_chat(request: Request, t0):
        return await oai_generate(request, t0, "chat")

    async def v1_completions(request: Request, t0):
        return await oai_generate(request, t0, "completion")

    async def v1_embeddings(request: Request, t0):
        body = await body_of(request)
        if not body.get("model"):
            raise APIError(400, "model is required")
        manifest = store.require(body["model"])
        raw = body.get("input")
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            inputs = raw
        else:
            raise APIError(400, "invalid input: a string or a non-empty list of strings")
        dims = body.get("dimensions")
        vecs, n, _ = await run_in_threadpool(embed_vectors, manifest, inputs, {}, normalize=True, truncate=True,
                                             dims=dims if isinstance(dims, int) and dims > 0 else None)
        b64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else v}
                for i, v in enumerate(vecs)]
        return JSONResponse({"object": "list", "data": data, "model": manifest.name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    def v1_model(m: Manifest) -> dict:
        return {"id": m.name, "object": "model", "created": m.modified_ns // 1_000_000_000, "owned_by": "library"}

    async def v1_models(request: Request, t0):
        return JSONResponse({"object": "list", "data": [v1_model(m) for m in store.all()]})

    async def v1_model_one(request: Request, t0):
        return JSONResponse(v1_model(store.require(request.path_params["model"])))

    async def not_found_route(request: Request, exc):
        return PlainTextResponse("404 page not found", status_code=404)

    async def bad_method(request: Request, exc):
        return PlainTextResponse("405 method not allowed", status_code=405)

    routes = [
        Route("/", endpoint(root), methods=["GET", "HEAD"]),
        Route("/api/version", endpoint(version), methods=["GET", "HEAD"]),
        Route("/api/generate", endpoint(generate), methods=["POST"]),
        Route("/api/chat", endpoint(chat), methods=["POST"]),
        Route("/api/embed", endpoint(embed), methods=["POST"]),
        Route("/api/embeddings", endpoint(embeddings_legacy), methods=["POST"]),
        Route("/api/tags", endpoint(tags), methods=["GET", "HEAD"]),
        Route("/api/show", endpoint(show), methods=["POST"]),
        Route("/api/ps", endpoint(ps), methods=["GET"]),
        Route("/api/create", endpoint(create), methods=["POST"]),
        Route("/api/copy", endpoint(copy), methods=["POST"]),
        Route("/api/delete", endpoint(delete), methods=["DELETE"]),
        Route("/api/pull", endpoint(pull), methods=["POST"]),
        Route("/api/push", endpoint(push), methods=["POST"]),
        Route("/api/blobs/{digest}", endpoint(blob), methods=["HEAD", "POST"]),
        Route("/v1/chat/completions", endpoint(v1_chat, openai=True), methods=["POST"]),
        Route("/v1/completions", endpoint(v1_completions, openai=True), methods=["POST"]),
        Route("/v1/embeddings", endpoint(v1_embeddings, openai=True), methods=["POST"]),
        Route("/v1/models", endpoint(v1_models, openai=True), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(v1_model_one, openai=True), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found_route, 405: bad_method})


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``) from F16/F32 to ``qtype``."""
    import ctypes
    import llama_cpp
    const = "LLAMA_FTYPE_MOSTLY_" + qtype.upper().replace("_K_", "_K_")
    ftype = getattr(llama_cpp, const, None)
    if ftype is None:
        raise APIError(400, f"llama.cpp in this environment has no {const}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).exists():
        raise APIError(500, f"llama.cpp could not quantize {src} to {qtype} (return code {rc})")


# ============================================================================ entry point
def default_models_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return Path(env).expanduser()
    from .models import cache_dir
    return cache_dir() / "ollama" / "models"


def make_service(models_dir: Path, *, model: str | None = None, name: str | None = None,
                 keep_alive: float | None = None, num_parallel: int | None = None,
                 max_loaded: int | None = None, context_length: int | None = None,
                 num_thread: int = 0) -> Service:
    env = os.environ
    store = Store(models_dir)
    sched = Scheduler(
        max_loaded=max_loaded or int(env.get("OLLAMA_MAX_LOADED_MODELS") or 0) or 3,
        num_parallel=num_parallel or int(env.get("OLLAMA_NUM_PARALLEL") or 0) or 1,
        keep_alive=keep_alive if keep_alive is not None else parse_duration(env.get("OLLAMA_KEEP_ALIVE")),
        context_length=context_length or int(env.get("OLLAMA_CONTEXT_LENGTH") or 0) or 4096,
        num_thread=num_thread)
    service = Service(store, sched)
    from . import models
    for key, registered in BUNDLED_NAMES.items():
        try:
            # overwrite: the bundled files live in the environment, whose path changes when it is rebuilt
            service.register(registered, models.get(key), overwrite=True)
        except Exception as exc:                    # a missing optional package: say so, keep serving
            print(f"note: bundled model {key!r} not registered ({exc})", flush=True)
    if model:
        service.register(name or Path(model).stem, Path(model), overwrite=True)
    return service


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m labkit.ollama_compat",
                                 description="labkit's Ollama-compatible server (llama-cpp-python inside).")
    ap.add_argument("--model", help="a GGUF file to register under --name (the bundled models are always registered)")
    ap.add_argument("--name", help="name:tag for --model (default: the file name)")
    ap.add_argument("--host", help="bind address (default: from $OLLAMA_HOST, else 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: from $OLLAMA_HOST, else 11434)")
    ap.add_argument("--any-port", action="store_true", help="if the port is busy, take a free one instead of failing")
    ap.add_argument("--models-dir", help="model store (default: $OLLAMA_MODELS, else ~/.cache/labkit/ollama/models)")
    ap.add_argument("--keep-alive", help="default keep-alive (default: $OLLAMA_KEEP_ALIVE, else 5m)")
    ap.add_argument("--num-parallel", type=int, help="parallel requests per model ($OLLAMA_NUM_PARALLEL, 1)")
    ap.add_argument("--max-loaded-models", type=int, help="models loaded at once ($OLLAMA_MAX_LOADED_MODELS, 3)")
    ap.add_argument("--context-length", type=int, help="default num_ctx ($OLLAMA_CONTEXT_LENGTH, 4096)")
    ap.add_argument("--num-thread", type=int, default=0, help="llama.cpp threads (0: llama.cpp decides)")
    args = ap.parse_args(argv)

    env_host, env_port = parse_host(os.environ.get("OLLAMA_HOST"))
    host = args.host or env_host
    port = args.port if args.port is not None else env_port
    from .servers import free_port, port_is_free
    if not port_is_free(port, host):
        if not args.any_port:
            print(f"Error: listen tcp {host}:{port}: bind: address already in use "
                  "(another Ollama? stop it, set OLLAMA_HOST to another port, or pass --any-port)", flush=True)
            return 1
        port = free_port(host)
    service = make_service(
        Path(args.models_dir).expanduser() if args.models_dir else default_models_dir(),
        model=args.model, name=args.name,
        keep_alive=parse_duration(args.keep_alive) if args.keep_alive else None,
        num_parallel=args.num_parallel, max_loaded=args.max_loaded_models,
        context_length=args.context_length, num_thread=args.num_thread)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: listening on {host}: anyone who can reach this machine can use (and delete) your "
              "models — this API has no authentication. Put a reverse proxy with auth in front of it.", flush=True)
    print(f"labkit Ollama-compatible server {VERSION} listening on http://{host}:{port} "
          f"(models in {service.store.root})", flush=True)
    import uvicorn
    uvicorn.run(build_app(service), host=host, port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

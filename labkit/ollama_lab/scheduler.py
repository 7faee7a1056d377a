"""Loaded models: which runners are in memory, who is using them, and when they go.

One runner per weights file, several loaded at once (``OLLAMA_MAX_LOADED_MODELS``), up to
``OLLAMA_NUM_PARALLEL`` llama.cpp instances each, unloaded when their keep-alive expires; at most
``OLLAMA_MAX_QUEUE`` requests wait for a busy runner, the next gets Ollama's 503. The
instances come from an engine factory (:mod:`.engine`): llama-cpp-python unless one is given.
"""
from __future__ import annotations

import gc
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .engine import EngineFactory, llama_cpp_engine
from .errors import APIError
from .store import Manifest

# Ollama's words (server/sched.go, ErrMaxQueue), sent with HTTP 503
SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "num_thread", "use_mmap", "use_mlock", "repeat_last_n")


@dataclass
class Loaded:
    name: str
    manifest: Manifest
    runner_opts: dict
    instances: list = field(default_factory=list)     # free engines (engine.TextEngine, or one SentenceEmbedder)
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
                 num_thread: int, max_queue: int = 512, engine: EngineFactory | None = None):
        self.max_loaded = max(1, max_loaded)
        self.num_parallel = max(1, num_parallel)
        self.max_queue = max(1, max_queue)      # OLLAMA_MAX_QUEUE: requests that may wait before a 503
        self.waiting = 0
        self._queue_lock = threading.Lock()
        self.default_keep_alive = keep_alive
        self.context_length = context_length
        self.num_thread = num_thread
        self.engine: EngineFactory = engine or llama_cpp_engine   # loads a model (tests pass a fake)
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
        """A new instance of ``lm``'s model, from the engine factory."""
        return self.engine(lm.manifest, lm.runner_opts)

    def acquire(self, manifest: Manifest, options: dict) -> tuple[Loaded, Any, int]:
        """(loaded model, an instance reserved for this request, load nanoseconds).

        As in Ollama, two kinds of waiting differ. A request for a loaded model whose instances are all busy
        waits for one (Ollama's runner holds it until one of its ``OLLAMA_NUM_PARALLEL`` slots frees), with
        no limit. A request that needs a model loaded while every model slot is busy
        (``OLLAMA_MAX_LOADED_MODELS``) waits in the scheduler's queue, and past ``OLLAMA_MAX_QUEUE`` gets 503."""
        t0 = time.perf_counter_ns()
        queued = [False]
        try:
            lm = self._reserve_runner(manifest, self.runner_options(manifest, options), queued)
        finally:
            if queued[0]:
                with self._queue_lock:
                    self.waiting -= 1
        return lm, self._reserve_instance(lm, manifest), time.perf_counter_ns() - t0

    def _wait_in_queue(self, queued: list) -> None:
        """Count this request as waiting for the scheduler (once), or refuse it when the queue is full.
        Ollama's queue (a channel of OLLAMA_MAX_QUEUE places) holds that many besides the one request its
        scheduler is placing: so max_queue + 1 may wait."""
        if queued[0]:
            return
        with self._queue_lock:
            if self.waiting > self.max_queue:
                raise APIError(503, SERVER_BUSY)
            self.waiting += 1
        queued[0] = True

    def _reserve_runner(self, manifest: Manifest, wanted: dict, queued: list) -> Loaded:
        """The loaded runner for ``manifest`` with ``wanted`` options, loading (and evicting) as needed."""
        with self.lock:
            while True:
                lm = self.loaded.get(manifest.runner_key)
                if lm and lm.runner_opts != wanted:
                    if lm.active == 0:          # reload with the new runner options (Ollama does too)
                        self._unload(lm)
                        lm = None
                    else:
                        self._wait_in_queue(queued)
                        self.lock.wait(0.5)
                        continue
                if lm is None:
                    idle = sorted((x for x in self.loaded.values() if x.active == 0), key=lambda x: x.last_used)
                    if len(self.loaded) >= self.max_loaded and not idle:
                        self._wait_in_queue(queued)
                        self.lock.wait(0.5)     # every slot busy: queue, as Ollama does
                        continue
                    while len(self.loaded) >= self.max_loaded and idle:
                        self._unload(idle.pop(0))
                    lm = Loaded(manifest.name, manifest, wanted)
                    try:
                        lm.instances.append(self._construct(lm))
                    except Exception as exc:  # noqa: BLE001  (any load failure becomes a 500 naming the model)
                        raise APIError(500, f"failed to load model '{manifest.name}' from {manifest.path}: {exc}") from exc
                    lm.created = 1
                    self.loaded[manifest.runner_key] = lm
                lm.manifest = manifest          # the newest configuration (SYSTEM, PARAMETERs) applies
                lm.active += 1
                lm.expires_at = math.inf        # never expires while in use
                return lm

    def _reserve_instance(self, lm: Loaded, manifest: Manifest):
        """A free instance of ``lm``, a new one (up to ``OLLAMA_NUM_PARALLEL``), or wait for one."""
        try:
            with lm.cond:
                while not lm.instances:
                    if lm.created < self.num_parallel and manifest.kind == "gguf":
                        lm.created += 1
                        try:
                            return self._construct(lm)
                        except Exception:
                            lm.created -= 1
                            raise
                    lm.cond.wait()
                return lm.instances.pop()
        except BaseException:
            with self.lock:                     # this request will not run: give the runner back
                lm.active -= 1
                if lm.active == 0:
                    lm.expires_at = time.time() + self.default_keep_alive
                self.lock.notify_all()
            raise

    def release(self, lm: Loaded, inst: Any, keep_alive: float) -> None:
        with lm.cond:
            lm.instances.append(inst)
            lm.cond.notify()
        with self.lock:
            lm.active -= 1
            lm.last_used = time.monotonic()
            lm.expires_at = time.time() + keep_alive if keep_alive != math.inf else math.inf
            if keep_alive == 0 and lm.active == 0 and self.loaded.get(lm.manifest.runner_key) is lm:
                self._unload(lm)
            self.lock.notify_all()

    def load_only(self, manifest: Manifest, options: dict, keep_alive: float) -> int:
        lm, inst, load_ns = self.acquire(manifest, options)
        self.release(lm, inst, keep_alive)
        return load_ns

    def unload(self, runner_key: str) -> None:
        """Unload the runner of a weights file, with its adapters (:attr:`Manifest.runner_key`), now or
        when its running requests finish."""
        with self.lock:
            lm = self.loaded.get(runner_key)
            if lm is None:
                return
            if lm.active == 0:
                self._unload(lm)
            else:
                lm.expires_at = 0.0             # the reaper unloads it once its requests finish

    def _unload(self, lm: Loaded) -> None:
        if self.loaded.get(lm.manifest.runner_key) is lm:
            self.loaded.pop(lm.manifest.runner_key)
        for inst in lm.instances + ([lm.embedder] if lm.embedder else []):
            close = getattr(inst, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001, S110  (a runner that fails to close is still dropped)
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

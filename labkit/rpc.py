"""llama.cpp's RPC device: the GPU lessons on any CPU (introduced in chapter 07; used in 01, 03 and 08).

llama.cpp's RPC backend (built with ``-DGGML_RPC=ON`` by ``make setup``) serves a ggml backend over
TCP: ``ggml-rpc-server`` on one side, ``llama-server --rpc HOST:PORT`` (or ``llama-cli``,
``llama-completion``, ``llama-bench``) on the other. The client's engine reports the remote backend
as a device of type GPU, so everything it does with a GPU it does with this one, in its own code:
which layers go there (``-ngl``), where their KV cache lives, how much fits its free memory
(``--fit``), how a model splits over several (``--tensor-split``), and the account it logs
(:mod:`labkit.offload`). Here the device is this CPU behind a loopback socket, so the accounting,
the placement and the failures are real; the speed is not a GPU's (each offloaded layer pays a
round trip per token, the shape of a PCIe-bound offload, not its size).

* ``labkit.serve("rpc")`` starts a device (127.0.0.1, stopped like every labkit server); its
  ``endpoint`` goes to ``labkit.serve("llama-server", model, rpc=endpoint)``.
* :func:`memory` — (free, total) MiB as the device reports it to the engine.
* :func:`capped` — options that give the engine a device of ``mib`` MiB. The pinned rpc-server has no
  memory-cap flag (its device reports the host's memory), so the cap is llama.cpp's own fitting:
  ``--fit on --fit-target`` keeps (free − mib) MiB free, leaving ``mib`` MiB to fill.
* :func:`check_endpoints` — every endpoint answers, or a clear error before the engine starts (the
  engine aborts with a core dump on an unreachable one).
* :func:`require_full_offload` — the "GPU only, fail fast" rule, from the engine's own account.
* :class:`WireCounter` — a relay in front of a device that counts the bytes crossing the wire each way
  (chapter 08: what a split model sends per token).

Security: the RPC protocol has no authentication and deserialises what it is sent. Bind it to
127.0.0.1 (labkit's default) or a network you trust, never to the internet.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading

from .env import accepts
from .errors import DeviceUnreachableError, EngineNotInstalledError, GPURequiredError
from .offload import EngineAccount


def built() -> bool:
    """Whether ``make setup`` built the RPC device (``ggml-rpc-server``) here."""
    from . import llama_tools
    try:
        llama_tools.program("ggml-rpc-server")
    except EngineNotInstalledError:
        return False
    return True


def split_endpoints(rpc: str) -> list[str]:
    """``"a:1,b:2"`` -> ``["a:1", "b:2"]`` (llama.cpp's ``--rpc`` list)."""
    return [e.strip() for e in str(rpc).split(",") if e.strip()]


def reachable(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (the device serves one client at a time;
    a connection that sends nothing is dropped without harm)."""
    host, _, port = endpoint.rpartition(":")
    return accepts(host.strip("[]") or "127.0.0.1", port, timeout)


def check_endpoints(rpc: str, gpu_only: bool = True) -> str | None:
    """The endpoints that answer, as a ``--rpc`` value; :class:`DeviceUnreachableError` when one does not
    and ``gpu_only``; with ``gpu_only=False`` the dead ones are dropped with a warning (None: none left,
    the engine runs on the CPU)."""
    wanted = split_endpoints(rpc)
    if not wanted:
        raise ValueError("rpc= needs at least one HOST:PORT endpoint, e.g. the one labkit.serve('rpc') returns")
    dead = [e for e in wanted if not reachable(e)]
    if dead and gpu_only:
        raise DeviceUnreachableError(
            f"No RPC device answers at {', '.join(dead)}: llama.cpp would abort on it. Start one with "
            "labkit.serve('rpc') (or ggml-rpc-server -H HOST -p PORT on the other machine, and open the port), "
            "or pass gpu_only=False to run on the CPU without it.")
    if dead:
        print(f"WARNING: no RPC device at {', '.join(dead)}; dropped, so those layers run on the CPU "
              "(gpu_only=False).", file=sys.stderr)
    alive = [e for e in wanted if e not in dead]
    return ",".join(alive) or None


_DEVICE_RE = re.compile(r"RPC\d+: (\S+) \(.*?(\d+) MiB, (\d+) MiB free\)")


def memory(endpoint: str) -> tuple[int, int]:
    """(free MiB, total MiB) of the device at ``endpoint``, as the engine sees it (``llama-server --rpc
    ENDPOINT --list-devices``). It is the host's memory: the pinned rpc-server cannot cap it."""
    from . import llama_tools
    if not reachable(endpoint):
        check_endpoints(endpoint)
    out = subprocess.run([str(llama_tools.program("llama-server")), "--rpc", endpoint, "--list-devices"],
                         capture_output=True, text=True, timeout=60, check=False)
    for _, total, free in _DEVICE_RE.findall(out.stdout + out.stderr):
        return int(free), int(total)
    raise RuntimeError(f"llama-server --list-devices showed no RPC device for {endpoint}:\n{out.stdout}{out.stderr}")


def capped(endpoint: str, mib: float) -> dict:
    """``serve("llama-server", ...)`` options that give the engine a device of ``mib`` MiB at ``endpoint``.

    The engine fits its unset settings (the layer count; the context too unless it is set) to the
    device's free memory minus ``--fit-target``; with the target at (free − mib) it fills ``mib`` MiB.
    The free memory is read now; what other programs allocate before the load moves the cap by as much.
    """
    free, _ = memory(endpoint)
    if mib <= 0 or mib >= free:
        raise ValueError(f"a cap of {mib} MiB needs 0 < cap < the device's {free} MiB free")
    return {"rpc": endpoint, "fit": "on", "fit_target": int(free - mib)}


def require_full_offload(acct: EngineAccount, model: str, rpc: str | None) -> None:
    """Raise :class:`GPURequiredError` unless the engine put every layer on its devices."""
    if acct.fully_offloaded:
        return
    where = f"the device{'s' if rpc and ',' in rpc else ''} at {rpc}" if rpc else "an accelerator"
    if not acct.on_device:
        what = f"no layer of {model} went to {where}: the engine would run on the CPU"
    else:
        what = (f"only {acct.offloaded} of {acct.total} layers of {model} fit on {where} "
                f"({', '.join(f'{k} {v:.0f} MiB' for k, v in acct.device_mib().items())}); the rest would run on the CPU")
    raise GPURequiredError(
        f"GPU only, fail fast: {what}. Make it fit — a smaller quantization, a shorter context (ctx_size), "
        "a quantized KV cache (cache_type_k/v q8_0), another device (rpc='a,b') — or pass gpu_only=False "
        "to accept a partial offload or the CPU.")


class WireCounter:
    """A loopback relay in front of the RPC device at ``target`` that counts the bytes crossing it (chapter 08).

    Give the engine ``endpoint`` instead of the device's: everything the engine and the device say to
    each other passes through, and ``to_device`` / ``from_device`` count the bytes so far (weights and
    inputs sent, results read back). It runs in this process, so it stops with it; use it as a context
    manager or call :meth:`close`. Both sides get TCP_NODELAY, as ggml-rpc sets on its own sockets:
    without it, the protocol's small request/reply messages would wait on delayed acknowledgements.
    """

    def __init__(self, target: str, host: str = "127.0.0.1"):
        check_endpoints(target)                 # the engine aborts on a dead device; say so before it starts
        self.target = target
        self.to_device = 0
        self.from_device = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)          # a blocked accept() would keep the port open after close()
        self.endpoint = f"{host}:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name=f"wire {self.endpoint}", daemon=True)
        self._acceptor.start()

    def counts(self) -> tuple[int, int]:
        """(bytes to the device, bytes from it) so far."""
        with self._lock:
            return self.to_device, self.from_device

    def _accept(self) -> None:
        host, _, port = self.target.rpartition(":")
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:                     # closed
                return
            client.settimeout(None)
            try:
                device = socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5)
            except OSError:
                client.close()                  # the engine then reports a failed connection itself
                continue
            device.settimeout(None)
            for sock in (client, device):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, device]
            for src, dst, field in ((client, device, "to_device"), (device, client, "from_device")):
                threading.Thread(target=self._pump, args=(src, dst, field), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, field: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    setattr(self, field, getattr(self, field) + len(data))
        except OSError:
            pass
        finally:
            for sock in (src, dst):             # one side gone: the conversation is over for both
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(timeout=2)          # the port is free once accept() stopped waiting on it
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def __enter__(self) -> "WireCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

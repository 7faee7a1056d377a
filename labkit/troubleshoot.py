"""Diagnoses for the problems chapter 07 reproduces: each turns a silent failure into a clear one.

* :func:`offload_report` — are the layers really on the GPU? The engine's own account of the load
  (layers assigned, and which device each buffer went to), the same on CUDA, Metal and RPC devices.
* :func:`require_gpu` — the "GPU or nothing" launch guard (also ``labkit doctor --require-gpu``).
* :func:`preflight_load` — load a GGUF's vocabulary in a *separate process* and explain why
  llama.cpp refused it (unknown architecture, corrupt file), without risking this kernel.
* :func:`served_model_check` — llama-cpp-python's server silently answers requests for any
  model name with its default model; this compares the name with what the server lists.
* :func:`distinct_ratio` / :func:`repetition_ratio` — numbers for "the output looks wrong".
* :func:`run_native` — run code that may crash in native code in a child process and read the
  crash the way a bug report needs it: signal, ``faulthandler``'s Python stack, llama.cpp's
  system info (:func:`system_info`).
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import GPURequiredError, LabkitError, UnsupportedModelError
from .memory import FitReport, check_fits, fit_report  # noqa: F401  (chapter 07 teaches them as troubleshoot.*)
from .offload import EngineAccount, account


# ----------------------------------------------------------------------------- GPU offload
def offload_report(source) -> EngineAccount:
    """Where a load's layers and buffers went, from the engine's own account (:mod:`labkit.offload`).

    ``source``: a server's handle (its log is read), or the log text of an in-process load
    (:func:`labkit.llamacpp_lab.load_with_log`). The same lines on CUDA, Metal and the RPC device;
    never inferred from ``nvidia-smi``, which knows nothing of Metal or RPC devices, nor of which
    process holds the memory.
    """
    if hasattr(source, "log_path"):
        source = Path(source.log_path).read_text(errors="replace")
    if not isinstance(source, str):
        raise TypeError("offload_report reads the engine's load log: pass a labkit server, or the log text from "
                        "labkit.llamacpp_lab.load_with_log(model_path, n_gpu_layers=...) for an in-process Llama")
    return account(source)


def require_gpu(min_free_gib: float = 0.0) -> None:
    """Raise :class:`GPURequiredError` unless an NVIDIA GPU with ``min_free_gib`` free exists."""
    from .hardware import nvidia_gpus
    gpus = nvidia_gpus()
    if not gpus:
        raise GPURequiredError("No usable NVIDIA GPU: nvidia-smi lists none. This launch requires a GPU "
                               "(policy: GPU or nothing) — run on a GPU machine, or drop the requirement to allow CPU.")
    best = max(gpus, key=lambda g: g.memory_free_mib or 0)
    free = (best.memory_free_mib or 0) / 1024
    if free < min_free_gib:
        raise GPURequiredError(f"{best.name} has {free:.1f} GiB free; {min_free_gib:.1f} GiB are required. "
                               "Stop other GPU processes (nvidia-smi lists them) or choose a smaller model/quant.")


# ----------------------------------------------------------------------------- loading a GGUF safely
_PREFLIGHT = r"""
import sys
from llama_cpp import Llama
Llama(model_path=sys.argv[1], vocab_only=True, verbose=True)
print("LABKIT-PREFLIGHT-OK")
"""


def preflight_load(path, timeout: float = 60) -> None:
    """Ask the installed llama.cpp to open ``path`` (vocabulary only) in a child process.

    Raises :class:`UnsupportedModelError` with the reason llama.cpp gave. A child process
    keeps a crash in native code (which a corrupt file can cause) away from the caller.
    """
    from .gguf import read_header
    path = Path(path)
    header = read_header(path)          # labkit's own checks first: magic, version, truncation
    r = subprocess.run([sys.executable, "-c", _PREFLIGHT, str(path)], capture_output=True, text=True, timeout=timeout)
    if r.returncode == 0 and "LABKIT-PREFLIGHT-OK" in r.stdout:
        return
    log = r.stderr + r.stdout
    import importlib.metadata
    version = importlib.metadata.version("llama_cpp_python")
    m = re.search(r"unknown model architecture: '([^']+)'", log)
    if m:
        raise UnsupportedModelError(
            f"{path.name} declares architecture {m.group(1)!r}, which the installed llama.cpp "
            f"(llama-cpp-python {version}) does not know. The model is newer than your engine: upgrade "
            "llama-cpp-python (bump it in requirements/lock.txt, then `make setup`), or pick a model "
            "with a supported architecture.")
    tail = "\n".join(line for line in log.splitlines() if "error" in line.lower() or "failed" in line.lower())[-800:]
    raise UnsupportedModelError(
        f"llama.cpp (llama-cpp-python {version}) could not load {path.name} "
        f"(architecture {header.architecture!r}; exit code {r.returncode}). Its messages:\n{tail or log[-800:]}")


# ----------------------------------------------------------------------------- servers
def served_model_check(client, requested: str) -> None:
    """Raise unless ``requested`` is one of the names the server lists at /v1/models."""
    served = [m.id for m in client.models.list().data]
    if requested not in served:
        raise LabkitError(f"The server does not serve {requested!r}; it serves {served}. "
                          "Some servers (llama-cpp-python's) answer with their default model anyway — "
                          "use one of the listed names.")


# ----------------------------------------------------------------------------- output quality
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def distinct_ratio(text: str, n: int = 2) -> float:
    """Distinct n-grams ÷ all n-grams (1.0: no repeats; near 0: a loop)."""
    w = _words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of n-grams that already appeared earlier in the text."""
    return 1.0 - distinct_ratio(text, n)


def dictionary_share(text: str, vocabulary: set[str]) -> float:
    """Share of words found in ``vocabulary`` — drops when sampling is too hot."""
    w = _words(text)
    return sum(x in vocabulary for x in w) / len(w) if w else 0.0


def with_architecture(src, dst, arch: str) -> Path:
    """Copy a GGUF, renaming its ``general.architecture`` (same length only, so no offset moves).

    Used to reproduce "a model newer than my llama.cpp": the copy declares an architecture the
    installed engine has never heard of.
    """
    import struct

    from .gguf import read_header
    old = read_header(src).architecture or ""
    if len(arch) != len(old):
        raise ValueError(f"the new name must have {len(old)} characters, like {old!r}")
    data = bytearray(Path(src).read_bytes())
    key = b"general.architecture"
    needle = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(old)) + old.encode()
    at = data.find(needle)
    if at < 0:
        raise ValueError("general.architecture not found where expected")
    start = at + len(needle) - len(old)
    data[start:start + len(old)] = arch.encode()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def overlapping_streams(client, model: str, max_tokens: int = 64, delay_s: float = 0.3) -> dict:
    """Start a long stream, then a second request while it runs; report what each got.

    With llama-cpp-python's default ``interrupt_requests=True`` the first stream is cut off
    silently when the second arrives; labkit starts the server with ``False`` so they queue.
    """
    import threading
    import time

    from .streams import piece_of
    out = {"first_tokens": 0, "first_finish": None, "first_error": None, "second_tokens": 0}

    def first():
        try:
            stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=max_tokens,
                                               temperature=0.0, stream=True)
            for chunk in stream:
                if piece_of(chunk):
                    out["first_tokens"] += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    out["first_finish"] = chunk.choices[0].finish_reason
        except Exception as exc:   # report, don't raise: the point is to see what the client saw
            out["first_error"] = repr(exc)

    t = threading.Thread(target=first)
    t.start()
    time.sleep(delay_s)
    r = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0.0)
    out["second_tokens"] = r.usage.completion_tokens
    t.join(timeout=120)
    return out


# ----------------------------------------------------------------------------- native crashes
@dataclass
class NativeRun:
    """What a child process that ran native code left behind."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def signal(self) -> str | None:
        """The signal that killed it (``SIGSEGV``, ``SIGABRT``, ...), None when it exited."""
        import signal
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    @property
    def crashed(self) -> bool:
        return self.returncode < 0

    @property
    def python_stack(self) -> str:
        """``faulthandler``'s dump: the fatal error and the Python line that called into native code."""
        m = re.search(r"Fatal Python error:.*?(?=\nExtension modules:|\Z)", self.stderr, re.DOTALL)
        return m.group(0).strip() if m else ""


def run_native(code: str, env: dict | None = None, timeout: float = 300) -> NativeRun:
    """Run ``code`` with ``python -X faulthandler`` in a child process, so a segfault or abort in
    llama.cpp ends the child, not this kernel, and leaves a Python stack to read."""
    import os
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})}, check=False)
    return NativeRun(out.returncode, out.stdout, out.stderr)


def system_info() -> str:
    """llama.cpp's own summary of its build (CPU features compiled in, backends) — paste it in bug reports."""
    import llama_cpp
    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


# ----------------------------------------------------------------------------- clients that go away
def abandoned_request(server, *, stream: bool, max_tokens: int = 1500, give_up_after_s: float = 0.5,
                      chat: bool = True) -> float:
    """Seconds a follow-up request waited after a client abandoned a long chat completion.

    The abandoned request asks for ``max_tokens`` tokens with hot sampling (so it would really run
    long) and is dropped after its first streamed line, or ``give_up_after_s`` into a non-streamed
    answer — what an interrupted notebook cell or a client timeout does. A server that cancels
    generation when its client leaves answers the follow-up at once; one that does not makes it
    wait for the abandoned answer to finish. ``chat=False`` sends text completions (``/v1/completions``),
    for a base model without a chat template.
    """
    import http.client
    import json
    import time
    import urllib.parse
    import urllib.request
    url = urllib.parse.urlparse(server.base_url)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {server.api_key}"} if server.api_key else {})}
    from .models import as_request
    route = "/v1/chat/completions" if chat else "/v1/completions"

    def ask(text: str) -> dict:
        return {"messages" if chat else "prompt": as_request(text, "chat" if chat else None)}
    body = {"model": server.model, "max_tokens": max_tokens, "temperature": 2.0, "top_p": 1.0, "seed": 7, "stream": stream,
            **ask("Tell me a long story about the sea.")}
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", route, body=json.dumps(body), headers=headers)
    if stream:
        conn.getresponse().readline()
    else:
        time.sleep(give_up_after_s)
    conn.sock.shutdown(2)
    conn.close()
    follow_up = {"model": server.model, "max_tokens": 4, **ask("Hi")}
    t0 = time.monotonic()
    req = urllib.request.Request(server.base_url + route, data=json.dumps(follow_up).encode(),
                                 headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=300) as resp:
        resp.read()
    return time.monotonic() - t0

"""What llama.cpp says it put where: its own account of a load (introduced in chapter 07; used in 01, 03, 08).

Every llama.cpp load logs, at the default (info) level, the same lines on CUDA, Metal, Vulkan and the
RPC device (:mod:`labkit.rpc`)::

    load_tensors: offloaded 15/31 layers to GPU
    load_tensors:   CPU_Mapped model buffer size =    87.71 MiB
    load_tensors: RPC0[127.0.0.1:50052] model buffer size =    58.28 MiB
    llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =    84.00 MiB
    sched_reserve:       RPC0[127.0.0.1:50052] compute buffer size =    66.50 MiB

:func:`account` reads them into an :class:`EngineAccount`. The "offloaded N/M" line says what the
engine *assigned*; the buffer lines say where the memory *went*. They can disagree: a build that
supports offload prints "offloaded 31/31 layers to GPU" for ``-ngl all`` even when no device is
there, and every buffer is then a CPU one. So a diagnosis reads the buffers, never ``nvidia-smi``
(which knows nothing of Metal, RPC, or which process holds the memory).

>>> a = account('''load_tensors: offloaded 15/31 layers to GPU
... load_tensors:   CPU_Mapped model buffer size =    87.71 MiB
... load_tensors: RPC0[127.0.0.1:50052] model buffer size =    58.28 MiB
... llama_kv_cache: RPC0[127.0.0.1:50052] KV buffer size =    84.00 MiB''')
>>> a.offloaded, a.total, a.device_mib()
(15, 31, {'RPC0[127.0.0.1:50052]': 142.28})
>>> a.verdict
'Partial offload: 15 of 31 layers on RPC0[127.0.0.1:50052]; the rest run on the CPU, and every token waits for them.'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_OFFLOAD_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER_RE = re.compile(r"(\S+) (model|KV|compute) buffer size = +([\d.]+) MiB")
# Buffers in host memory: the CPU backend's own (CPU, CPU_Mapped, CPU_REPACK), its AMX and KleidiAI
# weight layouts, and pinned host staging memory of a GPU backend (CUDA_Host).
_HOST_RE = re.compile(r"^(CPU|AMX|KLEIDIAI)|_Host$")


def is_host_buffer(name: str) -> bool:
    """Whether a buffer named in llama.cpp's log lives in host memory (CPU, CPU_Mapped, CUDA_Host...)."""
    return bool(_HOST_RE.search(name))


@dataclass
class EngineAccount:
    """One load as llama.cpp logged it (see the module's docstring)."""

    offloaded: int | None      # layers the engine assigned to accelerators (None: no such line, no accelerator backend)
    total: int | None          # layers it could assign (the repeating layers + the output layer)
    buffers: dict[str, dict[str, float]] = field(default_factory=dict)   # name -> {"model"|"KV"|"compute": MiB}

    def device_mib(self, kind: str | None = None) -> dict[str, float]:
        """MiB per accelerator buffer (all kinds, or one of "model", "KV", "compute")."""
        out = {}
        for name, kinds in self.buffers.items():
            if not is_host_buffer(name):
                out[name] = round(sum(v for k, v in kinds.items() if kind in (None, k)), 2)
        return out

    def host_mib(self, kind: str | None = None) -> float:
        return round(sum(v for name, kinds in self.buffers.items() if is_host_buffer(name)
                         for k, v in kinds.items() if kind in (None, k)), 2)

    @property
    def on_device(self) -> bool:
        """Whether any weights went to an accelerator (model buffers, not only a compute buffer)."""
        return any(v > 0 for v in self.device_mib("model").values())

    @property
    def fully_offloaded(self) -> bool:
        return self.on_device and self.offloaded is not None and self.offloaded == self.total

    @property
    def verdict(self) -> str:
        devices = ", ".join(self.device_mib("model")) or "an accelerator"
        if not self.on_device:
            asked = f" although it logged 'offloaded {self.offloaded}/{self.total} layers'" if self.offloaded else ""
            return (f"CPU only: no model buffer on any accelerator{asked}. Check the device (nvidia-smi, the RPC "
                    "endpoint, CUDA_VISIBLE_DEVICES) and that this build has its backend; where a GPU is required, "
                    "refuse to start rather than fall back.")
        if not self.fully_offloaded:
            return (f"Partial offload: {self.offloaded} of {self.total} layers on {devices}; the rest run on the CPU, "
                    "and every token waits for them.")
        return f"Full offload: all {self.total} layers on {devices}."


def account(log_text: str) -> EngineAccount:
    """Parse llama.cpp's load log (a server's log file, or :func:`labkit.llamacpp_lab.load_with_log`'s text).

    When the log holds several loads (a restarted server, a draft model), the last one counts: the
    buffers after the last "offloaded" line, or all of them when the build logs none.
    """
    matches = list(_OFFLOAD_RE.finditer(log_text))
    offloaded = total = None
    if matches:
        last = matches[-1]
        offloaded, total = int(last.group(1)), int(last.group(2))
        # the model buffers follow the offload line; KV and compute come later, for the same load
        log_text = log_text[last.start():]
    buffers: dict[str, dict[str, float]] = {}
    for name, kind, mib in _BUFFER_RE.findall(log_text):
        buffers.setdefault(name, {})[kind] = float(mib)
    return EngineAccount(offloaded, total, buffers)

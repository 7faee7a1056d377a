"""Exceptions raised by labkit. Every message says what went wrong *and* what to do next."""


class LabkitError(Exception):
    """Base class for every error labkit raises on purpose."""


class ModelNotFoundError(LabkitError, FileNotFoundError):
    """A model name or path that labkit cannot find (package not installed, wrong path)."""


class CorruptModelError(LabkitError, ValueError):
    """A model file that exists but is not what it claims to be (bad magic, truncated, wrong checksum)."""


class EngineNotInstalledError(LabkitError, RuntimeError):
    """An inference engine that is not installed in this environment."""


class PortInUseError(LabkitError, OSError):
    """A fixed port was requested but something is already listening on it."""


class ServerStartError(LabkitError, RuntimeError):
    """A managed server died or never became ready; the message carries its log tail, ``log_path`` the
    whole log (a root cause may sit above the tail, e.g. vLLM's engine process's error)."""

    def __init__(self, message: str, log_path=None):
        super().__init__(message)
        self.log_path = log_path


class GPURequiredError(LabkitError, RuntimeError):
    """A GPU was demanded (GPU cell under `make test-gpu`, `--require-gpu`) but none is usable."""


class InsufficientMemoryError(LabkitError, MemoryError):
    """A model/context/KV configuration that will not fit; refused before anything is loaded."""


class UnsupportedModelError(LabkitError, ValueError):
    """llama.cpp refused a GGUF (unknown architecture, corrupt tensors, ...)."""


class AdapterMismatchError(LabkitError, ValueError):
    """A LoRA adapter that does not fit the base model it is applied to (architecture, tensor shapes)."""


class DeviceUnreachableError(LabkitError, ConnectionError):
    """An accelerator endpoint (llama.cpp's RPC device) that does not answer; refused before the engine starts."""

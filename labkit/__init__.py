"""labkit — the helper package behind the Local LLM Lab workbook.

Chapter map (where each helper is introduced):

* 00 setup: :mod:`labkit.models` (bundled models), :mod:`labkit.hardware` (probe),
  :func:`labkit.serve` (managed engine servers), :mod:`labkit.runner` (notebook execution),
  :mod:`labkit.cli` (``labkit doctor|serve|run``), :mod:`labkit.gguf` (header reader).
"""
from .errors import (CorruptModelError, EngineNotInstalledError, GPURequiredError, LabkitError,
                     ModelNotFoundError, PortInUseError, ServerStartError)
from .servers import Server, serve

__version__ = "0.1.0"
__all__ = ["serve", "Server", "LabkitError", "ModelNotFoundError", "CorruptModelError",
           "EngineNotInstalledError", "PortInUseError", "ServerStartError", "GPURequiredError",
           "load_ipython_extension"]


def load_ipython_extension(ipython):
    """``%load_ext labkit`` registers the ``%%gpu`` cell magic (see :mod:`labkit.notebook`)."""
    from .notebook import register_magics
    register_magics(ipython)

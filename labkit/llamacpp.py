"""Old name of :mod:`labkit.llamacpp_lab` (the engine modules are now named ``<engine>_lab``:
``llamacpp_lab``, ``vllm_lab``, ``ollama_lab``). Kept for one release: ``from labkit import
llamacpp`` gives the same module object as ``from labkit import llamacpp_lab``."""
import sys

from . import llamacpp_lab

sys.modules[__name__] = llamacpp_lab

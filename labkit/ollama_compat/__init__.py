"""Old name of :mod:`labkit.ollama_lab` (the engine modules are now named ``<engine>_lab``). Kept
for one release: ``labkit.ollama_compat`` and each of its submodules are the very module objects
of ``labkit.ollama_lab`` (one copy of their state and classes), and ``python -m
labkit.ollama_compat`` still starts the server."""
import importlib
import pkgutil
import sys

from .. import ollama_lab

for _sub in pkgutil.iter_modules(ollama_lab.__path__):
    if _sub.name != "__main__":
        sys.modules[f"{__name__}.{_sub.name}"] = importlib.import_module(f"{ollama_lab.__name__}.{_sub.name}")
sys.modules[__name__] = ollama_lab

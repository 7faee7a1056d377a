"""llama.cpp's own programs, built from the pinned llama-cpp-python's source (introduced in chapter 03).

``make setup`` compiles ``llama-server``, ``llama-bench``, ``llama-quantize``,
``llama-perplexity``, ``llama-imatrix`` and ``llama-gguf-split`` from the llama.cpp tree
vendored in the pinned llama-cpp-python sdist (``scripts/build_llama_tools.sh``) and links them
at ``.llama.cpp/`` in the repository, with the converters ``convert_hf_to_gguf.py`` and
``convert_lora_to_gguf.py`` of the same commit. One commit for bindings and programs means one
file format, one set of kernels and numbers that can be compared.

Where they are looked up, first hit wins: ``$LABKIT_LLAMA_CPP`` (a folder with ``bin/``, or a
llama.cpp ``build/`` folder), the repository's ``.llama.cpp/``, then ``PATH`` (your own build).
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import EngineNotInstalledError

REPO_ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("llama-server", "llama-bench", "llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split")
CONVERTERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")


def _roots() -> list[Path]:
    roots = []
    if os.environ.get("LABKIT_LLAMA_CPP"):
        roots.append(Path(os.environ["LABKIT_LLAMA_CPP"]).expanduser())
    roots.append(REPO_ROOT / ".llama.cpp")
    return roots


def program(name: str) -> Path:
    """Path of one of llama.cpp's programs; a clear error with the fix when it is not built."""
    if name not in PROGRAMS:
        raise ValueError(f"unknown llama.cpp program {name!r}; labkit builds {', '.join(PROGRAMS)}")
    for root in _roots():
        for cand in (root / "bin" / name, root / name):
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
    found = shutil.which(name)
    if found:
        return Path(found)
    raise EngineNotInstalledError(
        f"llama.cpp's {name} is not built here (looked in {', '.join(str(r / 'bin') for r in _roots())} and PATH). "
        "Run `make setup`: it compiles llama.cpp's programs from the pinned llama-cpp-python source (~8 min on "
        "2 cores). With your own llama.cpp build, set LABKIT_LLAMA_CPP=/path/to/llama.cpp/build.")


def converter(name: str = "convert_hf_to_gguf.py") -> tuple[list[str], dict[str, str]]:
    """(argv prefix, extra environment) to run a converter with the ``gguf-py`` of its own commit."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; choose one of {', '.join(CONVERTERS)}")
    for root in _roots():
        src = root / "src"
        if (src / name).is_file():
            env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(src / "gguf-py"), str(src),
                                                                os.environ.get("PYTHONPATH")]))}
            return [sys.executable, str(src / name)], env
    raise EngineNotInstalledError(f"{name} is not here: run `make setup` (it keeps llama.cpp's converters in .llama.cpp/src).")


def version(name: str = "llama-server") -> str:
    """The program's own ``--version`` line, e.g. ``version: 1 (0c1e570)``."""
    out = subprocess.run([str(program(name)), "--version"], capture_output=True, text=True, timeout=30, check=False)
    text = out.stdout + out.stderr
    m = re.search(r"^version: .*$", text, re.MULTILINE)
    return m.group(0) if m else text.strip().splitlines()[-1] if text.strip() else "unknown"


def built_for() -> str | None:
    """The llama-cpp-python version whose source the programs were built from (None: unknown)."""
    for root in _roots():
        stamp = root / "LLAMA_CPP_PYTHON_VERSION"
        if stamp.is_file():
            return stamp.read_text().strip()
    return None


def skew() -> str | None:
    """Why the programs and the bindings may disagree, or None when they come from one source."""
    try:
        bindings = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "llama-cpp-python is not installed"
    source = built_for()
    if source is None:
        return f"the programs' source is unknown (not built by make setup); the bindings are {bindings}"
    if source != bindings:
        return f"programs built from llama-cpp-python {source}, bindings are {bindings}: run `make setup`"
    return None

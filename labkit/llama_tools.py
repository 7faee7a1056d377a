"""llama.cpp's own programs, built from the pinned llama-cpp-python's source (introduced in chapter 03).

``make setup`` compiles ``llama-server``, ``llama-bench``, ``llama-quantize``,
``llama-perplexity``, ``llama-imatrix``, ``llama-gguf-split``, ``llama-cli``, ``llama-completion``,
``llama-fit-params`` and the RPC device ``ggml-rpc-server`` (:mod:`labkit.rpc`) from the llama.cpp tree
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

from .env import REPO_ROOT
from .errors import EngineNotInstalledError

PROGRAMS = ("llama-server", "llama-bench", "llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split",
            "llama-cli", "llama-completion", "llama-fit-params", "ggml-rpc-server")
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


# ----------------------------------------------------------------------------- building it yourself (chapter 03)
# Older guides build llama.cpp with `make LLAMA_METAL=1` or `GGML_CUDA=1 make`. llama.cpp builds with CMake
# only (its Makefile stops: "The Makefile build is deprecated. Use the CMake build instead."), and the backend
# options are GGML_* (the Makefile said "LLAMA_CUBLAS is removed. Use GGML_CUDA instead."). Old → today's:
RENAMED_BUILD_OPTIONS = {"LLAMA_CUDA": "GGML_CUDA", "LLAMA_CUBLAS": "GGML_CUDA", "GGML_CUDA": "GGML_CUDA",
                         "LLAMA_METAL": "GGML_METAL", "GGML_METAL": "GGML_METAL",
                         "LLAMA_HIPBLAS": "GGML_HIP", "GGML_HIPBLAS": "GGML_HIP", "LLAMA_HIP": "GGML_HIP",
                         "LLAMA_VULKAN": "GGML_VULKAN", "LLAMA_SYCL": "GGML_SYCL", "LLAMA_RPC": "GGML_RPC",
                         "LLAMA_BLAS": "GGML_BLAS", "LLAMA_OPENBLAS": "GGML_BLAS"}


def modern_build_command(old: str) -> str:
    """Today's command for an old llama.cpp build line: ``make`` with ``LLAMA_*``/``GGML_*`` variables becomes
    CMake (targets kept), ``make clean`` a fresh build folder, and ``-DLLAMA_*`` options in ``cmake`` or in
    llama-cpp-python's ``CMAKE_ARGS`` get their ``GGML_*`` names.

    >>> modern_build_command("make LLAMA_METAL=1")
    'cmake -B build -DGGML_METAL=ON && cmake --build build --config Release -j'
    >>> modern_build_command("GGML_CUDA=1 make -j$(nproc) llama-server")
    'cmake -B build -DGGML_CUDA=ON && cmake --build build --config Release -j --target llama-server'
    >>> modern_build_command('CMAKE_ARGS="-DLLAMA_CUDA=on" pip install llama-cpp-python')
    'CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python'
    """
    line = old.replace("\\", "").strip()      # markdown escapes (GGML\_CUDA) as pasted from a rendered page

    def rename(m: re.Match) -> str:
        return "-D" + RENAMED_BUILD_OPTIONS.get(m.group(1), m.group(1)) + "="
    if "cmake" in line or "CMAKE_ARGS" in line:
        return re.sub(r"-D(\w+)=", rename, line)
    words = line.split()
    if "make" not in words:
        raise ValueError(f"not a make, cmake or CMAKE_ARGS build line: {old!r}")
    if words[words.index("make") + 1:words.index("make") + 2] == ["clean"]:
        return "rm -rf build"
    options, targets = [], []
    for word in words:
        var, eq, value = word.partition("=")
        if eq and var in RENAMED_BUILD_OPTIONS and value not in ("0", ""):
            options.append(f"-D{RENAMED_BUILD_OPTIONS[var]}=ON")
        elif not eq and word != "make" and not word.startswith("-"):
            targets.append(word)
    configure = " ".join(["cmake -B build", *dict.fromkeys(options)])
    build = "cmake --build build --config Release -j" + "".join(f" --target {t}" for t in targets)
    return f"{configure} && {build}"


def documented_build_options() -> set[str]:
    """The ``-D`` CMake options the installed llama-cpp-python's own README (its package metadata) uses in
    its install commands: the spellings its pinned llama.cpp takes."""
    meta = importlib.metadata.metadata("llama_cpp_python")
    text = meta.get_payload() or meta.get("Description") or ""
    return set(re.findall(r"-D(\w+)=", text))


# ----------------------------------------------------------------------------- the programs' own parsers, a terminal (chapter 03)
def parse_args(name: str, args: list[str]) -> tuple[bool, str]:
    """The built program's own argument parser on ``args``: (accepted, its error line). ``--help`` goes first:
    llama.cpp parses every argument after it (a bad flag or value exits 1 with ``error: ...``) and prints its
    usage only after a clean parse (exit 0), so nothing is loaded."""
    run_ = subprocess.run([str(program(name)), "--help", *args], capture_output=True, text=True, timeout=60, check=False)
    if run_.returncode == 0:
        return True, ""
    errors = [line for line in (run_.stdout + run_.stderr).splitlines() if line.startswith("error")]
    return False, errors[-1] if errors else f"{name} exited with code {run_.returncode}"


def cli_chat(model, messages: list[str], *, n_predict: int = 32, threads: int | None = None,
             timeout: float = 120) -> list[dict]:
    """Chat with ``llama-cli`` as a person does, in a terminal (a pseudo-terminal, through pexpect): wait for
    its ``>`` prompt, type each message, read the reply, then ``/exit``. Returns one row per turn: the message,
    the reply and llama-cli's own speeds (``[ Prompt: … t/s | Generation: … t/s ]``)."""
    import pexpect

    from . import repack
    from .env import usable_cores
    argv = ["-m", str(model), "-n", str(n_predict), "-c", "2048", "-t", str(threads or usable_cores()),
            "--color", "off", "--temp", "0", *repack.llama_server_args()]
    child = pexpect.spawn(str(program("llama-cli")), argv, encoding="utf-8", timeout=timeout, dimensions=(40, 200))
    turns = []
    try:
        child.expect(r"\n> ")
        for message in messages:
            child.sendline(message)
            child.expect(r"\n> ")
            text = child.before.replace("\r", "")
            body = text.split(message, 1)[-1]
            speeds = re.search(r"\[ Prompt: ([\d.]+) t/s \| Generation: ([\d.]+) t/s \]", body)
            reply = body[:speeds.start()] if speeds else body
            turns.append({"message": message, "reply": reply.strip(),
                          "prompt t/s": float(speeds.group(1)) if speeds else None,
                          "generation t/s": float(speeds.group(2)) if speeds else None})
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return turns


# ----------------------------------------------------------------------------- running the programs (chapter 01)
def run(name: str, *args: str, timeout: float = 600, stdout_only: bool = False) -> str:
    """Run one of the programs; its combined output (``stdout_only``: what it printed on stdout, e.g. the
    text ``llama-completion`` generates, without its log), or an error with the command and its last lines.

    Programs that compute with a model get this machine's repacking rule (:mod:`labkit.repack`).
    """
    from . import repack
    argv = [str(program(name)), *map(str, args)]
    if name in ("llama-imatrix", "llama-perplexity", "llama-completion", "llama-cli"):
        argv += repack.llama_server_args()      # the common --no-repack flag where repacking is off
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"{name} failed (exit {out.returncode}): {' '.join(argv)}\n{tail}")
    return out.stdout if stdout_only else text


def convert_hf(folder, outfile, outtype: str = "f16", timeout: float = 900) -> Path:
    """``convert_hf_to_gguf.py FOLDER --outtype OUTTYPE --outfile OUTFILE``: an HF safetensors
    folder (config, tokenizer, weights) to a GGUF, as model publishers make theirs."""
    argv, env = converter("convert_hf_to_gguf.py")
    out = subprocess.run([*argv, str(folder), "--outtype", outtype, "--outfile", str(outfile)], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **env}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return Path(outfile)


def convert_lora(adapter_dir, base_folder, outfile, outtype: str = "f32", timeout: float = 600) -> Path:
    """``convert_lora_to_gguf.py ADAPTER_DIR --base BASE_HF_DIR --outtype OUTTYPE --outfile OUTFILE``: a
    PEFT LoRA adapter folder to llama.cpp's adapter GGUF (chapter 10). ``--base`` is read for the base's
    config only (no download)."""
    argv, env = converter("convert_lora_to_gguf.py")
    out = subprocess.run([*argv, str(adapter_dir), "--base", str(base_folder), "--outfile", str(outfile),
                          "--outtype", outtype], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, check=False)
    if out.returncode != 0 or not Path(outfile).exists():
        raise RuntimeError(f"convert_lora_to_gguf.py failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return Path(outfile)


def imatrix(model, text_file, outfile, *, n_ctx: int = 512, threads: int | None = None) -> Path:
    """``llama-imatrix``: run the model over calibration text and save, per weight matrix, the mean
    squared activation of each input column — how much each column's rounding error matters."""
    from .hardware import usable_cores
    run("llama-imatrix", "-m", model, "-f", text_file, "-o", outfile, "-c", n_ctx, "-t", threads or usable_cores())
    return Path(outfile)


def quantize(src, dst, qtype: str, *, imatrix_file=None, threads: int | None = None) -> Path:
    """``llama-quantize [--imatrix FILE] SRC DST QTYPE``. Same llama.cpp function as
    :func:`labkit.gguf.quantize` (``llama_model_quantize``); the program also takes an imatrix,
    which weights each column's rounding error by its importance."""
    from .hardware import usable_cores
    args = (["--imatrix", imatrix_file] if imatrix_file else []) + [src, dst, qtype, threads or usable_cores()]
    run("llama-quantize", *args)
    return Path(dst)


_PPL_FIELDS = {"ppl": r"Final estimate: PPL = ([\d.]+)", "ppl_q": r"Mean PPL\(Q\)\s*:\s*([\d.]+)",
               "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)", "mean_kld": r"Mean\s+KLD:\s*([\d.]+)",
               "kld_p99": r"99\.0%\s+KLD:\s*([\d.]+)", "same_top_p": r"Same top p:\s*([\d.]+)"}


def perplexity(model, text_file=None, *, n_ctx: int = 512, threads: int | None = None,
               save_kl_base=None, kl_base=None, flash_attn: str | None = None) -> dict:
    """``llama-perplexity``: perplexity over non-overlapping ``n_ctx`` chunks, each scoring its
    second half. With ``save_kl_base`` it also stores the model's logits (the reference); with
    ``kl_base`` it compares against stored ones (``--kl-divergence``: the text comes from that
    file). Returns the figures it prints: ppl, and with kl_base ppl_q, ppl_ratio, mean_kld, kld_p99,
    same_top_p (%). ``flash_attn`` (``on|off|auto``, llama.cpp's default auto) changes the order of
    the attention arithmetic, and with it the last digits of every logit."""
    from .hardware import usable_cores
    args = ["-m", model, "-c", n_ctx, "-t", threads or usable_cores()] + (["-fa", flash_attn] if flash_attn else [])
    if kl_base:
        args += ["--kl-divergence-base", kl_base, "--kl-divergence"]
    else:
        args += ["-f", text_file] + (["--kl-divergence-base", save_kl_base] if save_kl_base else [])
    text = run("llama-perplexity", *args)
    found = {k: float(m.group(1)) for k, pat in _PPL_FIELDS.items() if (m := re.search(pat, text))}
    if not found:
        raise RuntimeError(f"llama-perplexity printed no figures:\n{text[-2000:]}")
    return found

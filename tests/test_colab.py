"""Colab: every chapter has the badge, the install cell and the metadata; the cell and the setup
script do the right thing on Colab (simulated) and nothing anywhere else."""
import os
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from labkit import colab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def _install_cells(nb):
    return [c for c in nb.cells if colab.INSTALL_TAG in c.metadata.get("tags", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_has_badge_install_cell_and_colab_metadata(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].source.startswith(colab.badge_markdown(path)), "run `make colab`"
    assert f"/blob/main/notebooks/{path.name})" in nb.cells[0].source
    cells = _install_cells(nb)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert cells == [first_code], "the install cell must be the first code cell (run `make colab`)"
    assert first_code.source == colab.install_cell(path), "install cell out of date: run `make colab`"
    assert nb.metadata["colab"]["name"] == path.name
    assert (nb.metadata.get("accelerator") == "GPU") == (path.name[:2] in colab.GPU_CHAPTERS)


def test_readme_has_a_colab_badge():
    text = (ROOT / "README.md").read_text()
    assert colab.badge_markdown("00_setup.ipynb") in text


def _run_cell(path, monkeypatch, tmp_path, *, on_colab, installed):
    """Execute a chapter's install cell with subprocess.run, os.kill and os.chdir recorded."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check=False: calls.append(("run", list(cmd))))
    monkeypatch.setattr(os, "kill", lambda pid, sig: calls.append(("kill", pid, sig)))
    monkeypatch.setattr(os, "chdir", lambda d: calls.append(("chdir", d)))
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists",
                        lambda p: installed if str(p).endswith(".colab-installed") else real_exists(p))
    if on_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(colab.install_cell(path), {})
    return calls


def test_install_cell_does_nothing_outside_colab(monkeypatch, tmp_path):
    assert _run_cell(NOTEBOOKS[0], monkeypatch, tmp_path, on_colab=False, installed=False) == []


def test_install_cell_on_colab_clones_installs_and_restarts_once(monkeypatch, tmp_path):
    calls = _run_cell(ROOT / "notebooks" / "04_vllm.ipynb", monkeypatch, tmp_path, on_colab=True, installed=False)
    assert calls[0] == ("run", ["git", "clone", "--depth", "1", f"https://github.com/{colab.REPO}", "/content/local-llm-lab"])
    assert calls[1] == ("run", ["bash", "/content/local-llm-lab/scripts/colab_setup.sh", "--with-vllm"])
    assert calls[2] == ("kill", os.getpid(), 9)
    # after the restart: installed, so it only moves into the notebooks folder
    calls = _run_cell(ROOT / "notebooks" / "01_quantization.ipynb", monkeypatch, tmp_path, on_colab=True, installed=True)
    assert calls == [("chdir", "/content/local-llm-lab/notebooks")]


def _setup_dry_run(tmp_path, gpu: bool, *args):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = "-L" ] && { echo "GPU 0: Tesla T4"; exit 0; }\necho "7.5"\n' if gpu else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = {**os.environ, "LABKIT_DRY_RUN": "1", "PATH": f"{fake}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "colab_setup.sh"), *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_colab_setup_builds_cuda_llama_cpp_for_the_runtime_gpu(tmp_path):
    out = _setup_dry_run(tmp_path, True, "--with-vllm")
    install = next(line for line in out.splitlines() if "llama-cpp-python[server]" in line)
    assert "CMAKE_ARGS=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=75" in install and "--no-binary llama-cpp-python" in install
    for kept_by_colab in ("jupyterlab", "ipykernel", "ipywidgets", "torch "):
        assert f" {kept_by_colab}" not in install + " "
    assert "+ python3 -m pip install vllm" in out and out.rstrip().endswith("colab_setup: done")


def test_colab_setup_on_cpu_builds_for_the_cpu_and_explains_vllm(tmp_path):
    out = _setup_dry_run(tmp_path, False, "--with-vllm")
    assert "CMAKE_ARGS" not in out and "llama-cpp-python[server]" in out
    assert "pip install vllm" not in out and "needs a GPU runtime" in out


def test_colab_constraints_keep_colabs_torch():
    # the constraints the script derives from the lock: no torch / CUDA stack pins
    script = (ROOT / "scripts" / "colab_setup.sh").read_text()
    pattern = script.split("grep -vE '", 1)[1].split("'", 1)[0]
    lock = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    out = subprocess.run(["grep", "-vE", pattern], input="\n".join(lock), capture_output=True, text=True).stdout
    assert any(line.startswith("torch==") for line in lock)
    assert not any(line.startswith(("torch==", "triton==", "nvidia-")) for line in out.splitlines())
    assert any(line.startswith("llama_cpp_python==") for line in out.splitlines())

"""Google Colab support: the badge and the install cell every chapter starts with (chapter 00).

A notebook opened from GitHub in Colab has nothing of the lab installed. Its first code cell
(tag ``colab-install``) detects Colab (``google.colab`` is imported there, nowhere else), clones
the repository, runs ``scripts/colab_setup.sh`` — which compiles llama-cpp-python with CUDA for
the runtime's GPU when there is one, and keeps Colab's own torch — then restarts the runtime
once, because packages the kernel had already imported were replaced. Anywhere else the cell
does nothing, so CI executes it too.

This module is the single source of those cells, the badges and the Colab notebook metadata;
``python -m labkit.colab`` (``make colab``) rewrites them in every notebook, and a test fails
when a notebook is out of date.

>>> badge_url("notebooks/01_quantization.ipynb", repo="me/lab")
'https://colab.research.google.com/github/me/lab/blob/main/notebooks/01_quantization.ipynb'
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# Where the workbook is published. Set LABKIT_REPO=owner/name and run `make colab` after a fork.
REPO = os.environ.get("LABKIT_REPO", "local-llm-lab/local-llm-lab")
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
INSTALL_TAG = "colab-install"
# Chapters whose GPU parts matter most on Colab: marked `accelerator: GPU` so Colab offers a T4.
GPU_CHAPTERS = ("00", "03", "04", "06")
# Chapter 04 needs vLLM itself, which on Colab goes into the runtime's Python (GPU runtimes only).
VLLM_CHAPTERS = ("04",)
_BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n*")


def badge_url(notebook: str | os.PathLike, repo: str | None = None) -> str:
    path = Path(notebook)
    return f"https://colab.research.google.com/github/{repo or REPO}/blob/{BRANCH}/notebooks/{path.name}"


def badge_markdown(notebook: str | os.PathLike, repo: str | None = None) -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})]({badge_url(notebook, repo)})"


def install_cell(notebook: str | os.PathLike, repo: str | None = None) -> str:
    """The source of a chapter's Colab install cell."""
    chapter = Path(notebook).name[:2]
    flag = ', "--with-vllm"' if chapter in VLLM_CHAPTERS else ""
    return f'''# Colab only: install the lab into this runtime, then restart once. Anywhere else this cell does nothing.
# First run: ~5 min on a CPU runtime, ~15 min on a GPU runtime (llama.cpp compiles for its GPU).
# Servers started later in the notebook die with the runtime: after any restart, run the cells again from the top.
import os, subprocess, sys
if "google.colab" in sys.modules:
    LAB = "/content/local-llm-lab"
    if not os.path.exists(f"{{LAB}}/.colab-installed"):
        if not os.path.isdir(LAB):
            subprocess.run(["git", "clone", "--depth", "1", "https://github.com/{repo or REPO}", LAB], check=True)
        subprocess.run(["bash", f"{{LAB}}/scripts/colab_setup.sh"{flag}], check=True)
        print("Installed. Colab restarts the runtime now (this is expected): then run all cells again.")
        os.kill(os.getpid(), 9)
    os.chdir(f"{{LAB}}/notebooks")'''


def update_notebook(path: str | os.PathLike, repo: str | None = None) -> bool:
    """Put the badge, the install cell and Colab metadata into one notebook; True if it changed."""
    import nbformat
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    title = nb.cells[0]
    if title.cell_type != "markdown":
        raise ValueError(f"{path.name}: the first cell must be the chapter's title (markdown)")
    text = _BADGE_RE.sub("", title.source)
    title.source = badge_markdown(path, repo) + "\n\n" + text
    source = install_cell(path, repo)
    existing = [c for c in nb.cells if INSTALL_TAG in c.get("metadata", {}).get("tags", [])]
    if existing:
        existing[0].source = source
    else:
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INSTALL_TAG]})
        nb.cells.insert(1, cell)
    colab = dict(nb.metadata.get("colab", {}))
    colab.update({"name": path.name, "provenance": []})
    if path.name[:2] in GPU_CHAPTERS:
        nb.metadata["accelerator"] = "GPU"
        colab["gpuType"] = "T4"
    else:
        nb.metadata.pop("accelerator", None)
        colab.pop("gpuType", None)
    nb.metadata["colab"] = colab
    after = nbformat.writes(nb)
    if after != before:
        nbformat.write(nb, path)
    return after != before


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv else sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9]*.ipynb"))
    for p in paths:
        print(("updated " if update_notebook(p) else "up to date ") + p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Executing the workbook's notebooks headless (used by ``make run``, ``make test`` and CI).

Each chapter notebook declares in its metadata the kernel it needs and its time budget on
the 2-core CPU tier::

    "metadata": {"kernelspec": {"name": "labkit", ...},
                 "labkit": {"chapter": "00", "budget_s": 60, "timeout_s": 600}}

:func:`execute` runs one notebook with papermill (injecting ``tier`` and any other
parameters into its ``parameters`` cell), writes the executed copy and an HTML rendering to
``build/``, and returns a :class:`NotebookResult` with its wall time.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .env import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build"
DEFAULT_TIMEOUT_S = 900


@dataclass
class NotebookResult:
    name: str
    status: str            # "ok" or "failed"
    seconds: float
    budget_s: float | None
    output: Path
    html: Path | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget_s is None else self.seconds <= self.budget_s


def discover(root: Path = NOTEBOOK_DIR) -> list[Path]:
    """Chapter notebooks in order (files named like ``00_setup.ipynb``)."""
    return sorted(p for p in root.glob("[0-9][0-9]_*.ipynb"))


def notebook_settings(path: Path) -> dict:
    """Kernel name, budget and timeout declared in a notebook's metadata."""
    meta = json.loads(Path(path).read_text())["metadata"]
    lab = meta.get("labkit", {})
    return {"kernel": meta.get("kernelspec", {}).get("name", "labkit"),
            "budget_s": lab.get("budget_s"), "timeout_s": lab.get("timeout_s", DEFAULT_TIMEOUT_S),
            "chapter": lab.get("chapter")}


def resolve(names: list[str] | None) -> list[Path]:
    """Notebook paths from names like ``00``, ``00_setup`` or a path; all chapters when empty."""
    if not names:
        return discover()
    found = []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb" and p.exists():
            found.append(p)
            continue
        matches = [q for q in discover() if q.stem == name or q.stem.startswith(name)]
        if not matches:
            raise FileNotFoundError(f"No notebook matches {name!r}; chapters are: "
                                    + ", ".join(q.stem for q in discover()))
        found += matches
    return found


def execute(path: Path, *, tier: str = "ci", out_dir: Path = BUILD_DIR, parameters: dict | None = None,
            html: bool = True, kernel: str | None = None) -> NotebookResult:
    """Run one notebook top to bottom; never raises for a failing notebook (see ``status``)."""
    import papermill as pm
    path = Path(path)
    settings = notebook_settings(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / path.name
    params = {"tier": tier, **(parameters or {})}
    t0 = time.perf_counter()
    status, error = "ok", ""
    try:
        pm.execute_notebook(str(path), str(output), parameters=params,
                            kernel_name=kernel or settings["kernel"], cwd=str(path.parent),
                            execution_timeout=settings["timeout_s"], progress_bar=False,
                            log_output=False, request_save_on_cell_execute=False)
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
        status = "failed"
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    seconds = time.perf_counter() - t0
    html_path = None
    if html and output.exists():
        try:
            from nbconvert import HTMLExporter
            body, _ = HTMLExporter().from_filename(str(output))
            html_path = output.with_suffix(".html")
            html_path.write_text(body, encoding="utf-8")
        except Exception as exc:  # a rendering problem must not hide the run's own result
            error = (error + f"\n(HTML export failed: {exc})").strip()
    return NotebookResult(path.stem, status, seconds, settings["budget_s"], output, html_path, error)


def run_all(paths: list[Path] | None = None, **kwargs) -> list[NotebookResult]:
    """Execute notebooks one at a time (vLLM chapters need the RAM to themselves)."""
    results = []
    for path in paths or discover():
        result = execute(path, **kwargs)
        print(f"  {result.name}: {result.status} in {result.seconds:.1f} s", flush=True)
        results.append(result)
    return results


def format_table(results: list[NotebookResult]) -> str:
    """A plain-text status / wall-time table."""
    rows = [("notebook", "status", "wall s", "budget s", "")]
    for r in results:
        flag = "" if r.within_budget in (None, True) else "OVER BUDGET"
        rows.append((r.name, r.status, f"{r.seconds:.1f}", "-" if r.budget_s is None else f"{r.budget_s:.0f}", flag))
    rows.append(("total", "ok" if all(r.ok for r in results) else "FAILED",
                 f"{sum(r.seconds for r in results):.1f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    out = "\n".join(lines)
    for r in results:
        if not r.ok:
            out += f"\n\n{r.name} failed: {r.error[-2000:]}\n(executed copy: {r.output})"
    return out


def write_summary(results: list[NotebookResult], path: Path = BUILD_DIR / "summary.json") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"name": r.name, "status": r.status, "seconds": round(r.seconds, 2),
                                 "budget_s": r.budget_s, "output": str(r.output)} for r in results], indent=2))
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")

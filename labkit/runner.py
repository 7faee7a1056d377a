"""Executing the workbook's notebooks headless (used by ``make run``, ``make test`` and CI).

Each chapter notebook declares in its metadata the kernel it needs and its time budget on
the 2-core CPU tier::

    "metadata": {"kernelspec": {"name": "labkit", ...},
                 "labkit": {"chapter": "00", "budget_s": 60, "timeout_s": 600}}

:func:`execute` runs one notebook with papermill (injecting ``tier`` and any other
parameters into its ``parameters`` cell), writes the executed copy and an HTML rendering to
``build/``, and returns a :class:`NotebookResult` with its wall time and its slowest cells.

Reference outputs: cells tagged ``nbval-check-output`` (nbval's own tag) keep their output in the
committed notebook (metadata ``keep_output``, which nbstripout honours), so a reader browsing the
repository sees what they should get. After papermill's run, :func:`compare_references` checks
those cells with nbval's own comparison and sanitizer patterns (``tests/nbval_sanitize.cfg``), so
each chapter executes once: papermill runs it (parameters, executed copy, per-cell times), nbval
judges the reference cells. ``labkit run --update-references`` rewrites them from a run.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .env import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build"
DEFAULT_TIMEOUT_S = 900
REFERENCE_TAG = "nbval-check-output"
SANITIZE_FILE = REPO_ROOT / "tests" / "nbval_sanitize.cfg"


@dataclass
class NotebookResult:
    name: str
    status: str            # "ok" or "failed"
    seconds: float
    budget_s: float | None
    output: Path
    html: Path | None = None
    error: str = ""
    slowest: list[tuple[int, float, str]] = field(default_factory=list)   # (cell index, seconds, first line)
    busy_at_start: float | None = None    # % CPU in use by anything when it started: timings mean little on a busy machine

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
            html: bool = True, kernel: str | None = None, references: bool | None = None) -> NotebookResult:
    """Run one notebook top to bottom; never raises for a failing notebook (see ``status``).

    ``references``: compare the reference cells with their committed outputs (default: when the
    notebook runs with its own parameters, tier ci — another model or tier prints other values)."""
    import papermill as pm
    path = Path(path)
    settings = notebook_settings(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / path.name
    params = {"tier": tier, **(parameters or {})}
    import psutil
    busy_at_start = psutil.cpu_percent(interval=0.5)    # what else runs now (a load average would still count the last chapter)
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
    if references is None:
        references = tier == "ci" and not parameters
    if references and status == "ok":
        diffs = compare_references(path, output)
        if diffs:
            status, error = "failed", "reference output changed (labkit run --update-references rewrites it " \
                                      "after a deliberate change):\n" + "\n".join(diffs)
    slowest = slowest_cells(output) if output.exists() else []
    html_path = None
    if html and output.exists():
        try:
            from nbconvert import HTMLExporter
            body, _ = HTMLExporter().from_filename(str(output))
            html_path = output.with_suffix(".html")
            html_path.write_text(body, encoding="utf-8")
        except Exception as exc:  # a rendering problem must not hide the run's own result
            error = (error + f"\n(HTML export failed: {exc})").strip()
    return NotebookResult(path.stem, status, seconds, settings["budget_s"], output, html_path, error, slowest, busy_at_start)


def _first_line(cell) -> str:
    return next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")[:60]


def slowest_cells(executed: Path, n: int = 3) -> list[tuple[int, float, str]]:
    """The ``n`` cells that took longest in a papermill run (papermill records each cell's duration)."""
    import nbformat
    nb = nbformat.read(str(executed), as_version=4)
    cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]   # the source's numbering
    timed = [(i, float((c.metadata.get("papermill") or {}).get("duration") or 0), _first_line(c))
             for i, c in enumerate(cells) if c.cell_type == "code"]
    return sorted(timed, key=lambda t: -t[1])[:n]


def _reference_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and REFERENCE_TAG in c.metadata.get("tags", [])]


def _reference_pairs(source: Path, executed: Path):
    """(committed notebook, [(committed cell, executed cell)]) for each reference cell of ``source``,
    matched by position (papermill's injected-parameters cell left out); a ValueError when the
    executed copy was not run from this source."""
    import nbformat
    nb = nbformat.read(str(source), as_version=4)
    run = [c for c in nbformat.read(str(executed), as_version=4).cells
           if "injected-parameters" not in c.metadata.get("tags", [])]
    if [c.source for c in nb.cells] != [c.source for c in run]:
        raise ValueError(f"{executed} was not executed from the current {source}: run it again first")
    return nb, [(c, r) for c, r in zip(nb.cells, run) if c.cell_type == "code" and REFERENCE_TAG in c.metadata.get("tags", [])]


class _NbvalCell:
    """Just enough of nbval's cell item for nbval's own ``compare_outputs`` to judge outputs that
    papermill produced (nbval would otherwise execute the chapter a second time)."""

    def __init__(self, patterns: dict):
        from nbval.plugin import nocolors
        # nbval's own skip list (IPyNbFile.__init__, without --nbdime): pictures are never compared
        skip = ("metadata", "traceback", "prompt_number", "output_type", "name", "execution_count",
                "application/vnd.jupyter.widget-view+json", "image/png", "image/jpeg")
        self.parent = type("Parent", (), {"skip_compare": skip, "sanitize_patterns": patterns})()
        self.colors = nocolors
        self.comparison_traceback: list[str] = []
        # outside pytest there is no assertion-repr hook: nbval then prints reference and fresh output in full
        self.config, self.ihook = None, type("NoHooks", (), {"pytest_assertrepr_compare": staticmethod(lambda **_: [])})()

    def __getattr__(self, name):          # nbval's methods, bound to this stand-in
        from nbval.plugin import IPyNbCell
        return getattr(IPyNbCell, name).__get__(self)


def sanitize_patterns(path: Path = SANITIZE_FILE) -> dict:
    from nbval.plugin import get_sanitize_patterns
    return dict(get_sanitize_patterns(Path(path).read_text())) if Path(path).exists() else {}


def compare_references(source: Path, executed: Path, sanitize_file: Path = SANITIZE_FILE) -> list[str]:
    """Each reference cell of ``source`` whose output in ``executed`` differs (nbval's comparison,
    after its sanitizer patterns): one message per cell, naming it. Empty when all match."""
    from nbval.plugin import coalesce_streams
    try:
        _, pairs = _reference_pairs(source, executed)
    except ValueError as exc:
        return [str(exc)]
    judge = _NbvalCell(sanitize_patterns(sanitize_file))
    diffs = []
    for ref, run in pairs:
        judge.comparison_traceback = []
        if not judge.compare_outputs(coalesce_streams(run.outputs), coalesce_streams(ref.outputs)):
            diffs.append(f"cell `{_first_line(ref)}`:\n" + "\n".join(map(str, judge.comparison_traceback))[-1500:])
    return diffs


def update_references(source: Path, executed: Path) -> int:
    """Copy the reference cells' outputs from an executed copy into the committed notebook (execution
    counts cleared, as nbstripout leaves them); returns how many cells were written."""
    import nbformat
    nb, pairs = _reference_pairs(source, executed)
    for ref, run in pairs:
        ref.outputs = [nbformat.from_dict({**o, "execution_count": None}) if "execution_count" in o else o for o in run.outputs]
        ref.execution_count = None
        ref.metadata["keep_output"] = True
    nbformat.write(nb, str(source))
    return len(pairs)


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
        if r.busy_at_start is not None and r.busy_at_start > 30:
            flag = (flag + f" (CPU {r.busy_at_start:.0f}% busy at start: timings unreliable)").strip()
        rows.append((r.name, r.status, f"{r.seconds:.1f}", "-" if r.budget_s is None else f"{r.budget_s:.0f}", flag))
    rows.append(("total", "ok" if all(r.ok for r in results) else "FAILED",
                 f"{sum(r.seconds for r in results):.1f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    out = "\n".join(lines)
    slow = [f"  {r.name}: " + "; ".join(f"cell {i} {sec:.0f} s `{first}`" for i, sec, first in r.slowest)
            for r in results if r.slowest]
    if slow:
        out += "\n\nslowest cells (papermill's per-cell times):\n" + "\n".join(slow)
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

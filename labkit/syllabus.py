"""How long each chapter takes to teach: reading, code, exercises and the measured run (instructors' page).

A workshop slot is 60–90 minutes, so an instructor needs each chapter's time *in the room*, not only its CPU
time. :func:`estimate` counts what a learner reads and runs and turns it into minutes with stated rates
(:data:`RATES`; pass your own):

* prose: the words of the markdown cells, at 200 words per minute (careful reading of technical text,
  slower than the 238 wpm Brysbaert (2019) measured for non-fiction in English);
* code: the non-comment lines of the code cells, at 10 lines per minute (read, not typed);
* exercises: cells that open with ``## Exercise`` or ``**Exercise``, and the numbered items under an
  ``## Exercises`` heading, 8 minutes each (try, then open the solution);
* the run: the chapter's measured wall time on the learner's machine (from ``build/summary.json``, which
  ``labkit run`` / ``make test`` writes), or its budget when no run was recorded.

>>> from pathlib import Path
>>> import json, tempfile
>>> nb = {"cells": [{"cell_type": "markdown", "source": ["word " * 400]},
...                 {"cell_type": "code", "source": ["# a comment\\n", "x = 1\\n", "\\n", "print(x)\\n"]},
...                 {"cell_type": "markdown", "source": ["**Exercise 1.** Try it."]},
...                 {"cell_type": "markdown", "source": ["## Exercises\\n\\n1. One.\\n2. Two.\\n"]}],
...       "metadata": {"labkit": {"budget_s": 120}}}
>>> path = Path(tempfile.mkdtemp()) / "99_demo.ipynb"
>>> _ = path.write_text(json.dumps(nb))
>>> row = estimate(path)
>>> (row.words, row.code_lines, row.exercises, row.run_s, row.run_source)
(410, 2, 3, 120, 'budget')
>>> round(row.minutes, 1)        # 410/200 + 2/10 + 3 × 8 + 120 s
28.2
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import runner

# Where the chapters longer than a workshop slot break into two sessions (instructors' page): each seam is the
# heading the second part starts at.
SEAMS = {"01": ["## 5."],          # formats, GGUF, the ladder, llama.cpp's pipeline | GPTQ/AWQ, memory, sizing
         "03": ["## 9."],          # the in-process engine | speculation and the servers
         "07": ["## 7."],          # the everyday failures | a native crash and the doctor
         "08": ["## 10."],         # the proxy | monitoring, systemd, containers, Kubernetes, beyond one machine
         "09": ["## 6."],          # routing, privacy, streaming | tools, MCP, the agent
         "10": ["## 10."]}         # LoRA on the CPU, shipped | the GPU tier and bad adapters
RATES = {"words_per_min": 200, "code_lines_per_min": 10, "min_per_exercise": 8}
WORKSHOP_SLOT_MIN = (60, 90)
EXERCISE = re.compile(r"^\s*(#+\s*(Graded\s+)?|\*\*)Exercise\b", re.IGNORECASE)      # "## Exercise", "**Exercise 1.**"
EXERCISE_LIST = re.compile(r"^\s*#+\s*Exercises\b", re.IGNORECASE)                     # "## Exercises" + a numbered list
NUMBERED_ITEM = re.compile(r"^\d+\.\s", re.MULTILINE)


@dataclass(frozen=True)
class ChapterTime:
    """One chapter's teaching time, and what it is made of."""

    chapter: str
    words: int
    code_lines: int
    exercises: int
    run_s: float
    run_source: str          # "measured" (build/summary.json) or "budget"
    minutes: float

    def row(self) -> dict:
        return {"chapter": self.chapter, "prose words": self.words, "code lines": self.code_lines,
                "exercises": self.exercises, f"run s ({self.run_source})": round(self.run_s),
                "estimated minutes": round(self.minutes)}


def _text(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _exercises(markdown: str) -> int:
    """Exercises a markdown cell sets: one for "## Exercise" or "**Exercise N.**", one per numbered item under
    "## Exercises" (none when the heading only introduces exercise cells that follow)."""
    if EXERCISE_LIST.match(markdown):
        return len(NUMBERED_ITEM.findall(markdown))
    return int(bool(EXERCISE.match(markdown)))


def _minutes(words: int, code_lines: int, exercises: int, run_s: float, rates: dict) -> float:
    return (words / rates["words_per_min"] + code_lines / rates["code_lines_per_min"]
            + exercises * rates["min_per_exercise"] + run_s / 60)


def _count(cells) -> tuple[int, int, int]:
    """(prose words, non-comment code lines, exercises) of ``cells``."""
    words = code_lines = exercises = 0
    for cell in cells:
        text = _text(cell)
        if cell["cell_type"] == "markdown":
            words += len(text.split())
            exercises += _exercises(text)
        elif cell["cell_type"] == "code":
            code_lines += sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    return words, code_lines, exercises


def estimate(path: Path, measured_s: float | None = None, rates: dict | None = None) -> ChapterTime:
    """The teaching time of the notebook at ``path``; ``measured_s`` is its measured wall time, if any."""
    r = {**RATES, **(rates or {})}
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    words, code_lines, exercises = _count(nb["cells"])
    budget = nb.get("metadata", {}).get("labkit", {}).get("budget_s") or 0
    run_s, source = (measured_s, "measured") if measured_s is not None else (budget, "budget")
    return ChapterTime(Path(path).stem, words, code_lines, exercises, run_s, source,
                       _minutes(words, code_lines, exercises, run_s, r))


def cell_seconds(executed: Path) -> dict[str, float]:
    """Each cell's run time in an executed copy (papermill's ``duration``), by cell id."""
    nb = json.loads(Path(executed).read_text(encoding="utf-8"))
    return {c.get("id"): (c.get("metadata", {}).get("papermill", {}).get("duration") or 0.0) for c in nb["cells"]}


def parts(path: Path, seams: list[str], executed: Path | None = None, rates: dict | None = None) -> list[ChapterTime]:
    """The chapter cut at each markdown cell with a line that starts with one of ``seams`` (``"## 10."``), each part
    timed like a chapter; its run time is the sum of its cells' times in ``executed`` (0 without one).

    A seam that matches no heading is an error: a renamed section must not silently merge two parts."""
    r = {**RATES, **(rates or {})}
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    starts = [0]
    for seam in seams:
        hit = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                    and any(line.startswith(seam) for line in _text(c).splitlines())), None)
        if hit is None:
            raise ValueError(f"{Path(path).name}: no section starts with {seam!r}")
        starts.append(hit)
    if starts != sorted(starts):
        raise ValueError(f"{Path(path).name}: seams {seams} are not in the chapter's order")
    seconds = cell_seconds(executed) if executed else {}
    out = []
    for n, (a, b) in enumerate(zip(starts, starts[1:] + [len(cells)])):
        words, code_lines, exercises = _count(cells[a:b])
        run_s = sum(seconds.get(c.get("id"), 0.0) for c in cells[a:b])
        out.append(ChapterTime(f"{Path(path).stem} part {n + 1}", words, code_lines, exercises, run_s,
                               "measured" if executed else "none", _minutes(words, code_lines, exercises, run_s, r)))
    return out


def measured_seconds(summary: Path = runner.BUILD_DIR / "summary.json") -> dict[str, float]:
    """Each chapter's wall time from the last ``labkit run`` (notebook name → seconds); {} without one."""
    if not Path(summary).exists():
        return {}
    return {r["name"]: r["seconds"] for r in json.loads(Path(summary).read_text()) if r.get("status") == "ok"}


def table(paths: list[Path] | None = None, summary: Path = runner.BUILD_DIR / "summary.json") -> list[ChapterTime]:
    """Every chapter's :class:`ChapterTime`, with measured run times where the last run recorded them."""
    seconds = measured_seconds(summary)
    return [estimate(p, seconds.get(p.stem)) for p in (paths or runner.discover())]

"""The instructors' time table (labkit.syllabus): counts from the real chapters, measured run times preferred."""
import json

import pytest

from labkit import runner, syllabus


def test_every_chapter_is_counted_and_a_measured_run_replaces_the_budget(tmp_path):
    chapters = runner.discover()
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps([{"name": chapters[0].stem, "status": "ok", "seconds": 42.0},
                                   {"name": chapters[1].stem, "status": "failed", "seconds": 3.0}]))
    rows = syllabus.table(summary=summary)
    assert [r.chapter for r in rows] == [p.stem for p in chapters]
    assert all(r.words > 500 and r.code_lines > 50 for r in rows), [r.row() for r in rows]
    assert (rows[0].run_s, rows[0].run_source) == (42.0, "measured")
    assert rows[1].run_source == "budget" and rows[1].run_s == runner.notebook_settings(chapters[1])["budget_s"]


def test_exercise_cells_are_counted_once_each():
    assert syllabus._exercises("## Exercise\n\n**Fix a broken site.**") == 1
    assert syllabus._exercises("**Exercise 2.** On a machine with a 12 GB GPU") == 1
    assert syllabus._exercises("## Exercises\n\n1. Train with r=8.\n2. Train longer.\n") == 2
    assert syllabus._exercises("## Exercises\n\nAnswer in the cell, run it.") == 0     # the exercise cells follow
    assert syllabus._exercises("An exercise in patience.") == 0


def test_parts_split_at_the_seams_and_add_up_to_the_chapter(tmp_path):
    chapter = next(p for p in runner.discover() if p.stem.startswith("08"))
    whole = syllabus.estimate(chapter, measured_s=0.0)
    halves = syllabus.parts(chapter, ["## 10."])
    assert len(halves) == 2 and all(h.words > 0 for h in halves)
    assert sum(h.words for h in halves) == whole.words and sum(h.code_lines for h in halves) == whole.code_lines
    with pytest.raises(ValueError, match="no section starts with"):
        syllabus.parts(chapter, ["## 99. A section that does not exist"])


def test_a_parts_run_time_is_the_sum_of_its_cells_times(tmp_path):
    source = {"cells": [{"cell_type": "markdown", "id": "a", "source": "## 1. One"},
                        {"cell_type": "code", "id": "b", "source": "x = 1"},
                        {"cell_type": "markdown", "id": "c", "source": "## 2. Two"},
                        {"cell_type": "code", "id": "d", "source": "y = 2"}]}
    executed = {"cells": [dict(c, metadata={"papermill": {"duration": t}})
                          for c, t in zip(source["cells"], [0.0, 3.0, 0.0, 5.5])]}
    (tmp_path / "s.ipynb").write_text(json.dumps(source))
    (tmp_path / "e.ipynb").write_text(json.dumps(executed))
    first, second = syllabus.parts(tmp_path / "s.ipynb", ["## 2."], executed=tmp_path / "e.ipynb")
    assert (first.run_s, second.run_s) == (3.0, 5.5)


def test_the_command_prints_every_chapter_and_the_long_ones_in_parts(tmp_path, capsys):
    from labkit import cli
    assert cli.main(["syllabus", "--parts", "--summary", str(tmp_path / "summary.json")]) == 0
    out = capsys.readouterr().out
    for chapter in runner.discover():
        parts = syllabus.SEAMS.get(chapter.stem[:2])
        assert (f"{chapter.stem} part {len(parts) + 1}" if parts else chapter.stem) in out, out

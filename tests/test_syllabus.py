"""The instructors' time table (labkit.syllabus): counts from the real chapters, measured run times preferred."""
import json

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

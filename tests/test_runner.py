"""labkit.runner executes notebooks for real and reports failures with the failing cell."""
import nbformat

from labkit import runner


def _nb(path, *sources, budget=5):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('tier = "full"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "labkit", "display_name": "Python (labkit)", "language": "python"}
    nb.metadata["labkit"] = {"chapter": "xx", "budget_s": budget, "timeout_s": 60}
    nbformat.write(nb, path)
    return path


def test_execute_ok_with_injected_tier(tmp_path):
    src = _nb(tmp_path / "01_ok.ipynb", "assert tier == 'ci'\nprint('tier is', tier)")
    result = runner.execute(src, out_dir=tmp_path / "build")
    assert result.ok, result.error
    assert result.html and result.html.exists()
    assert "tier is ci" in result.output.read_text()
    # where the time went, numbered as in the source notebook (papermill's injected cell left out)
    assert [i for i, _, _ in result.slowest] and {i for i, _, _ in result.slowest} <= {0, 1}
    assert any(first.startswith("assert tier") for _, _, first in result.slowest)
    assert "slowest cells" in runner.format_table([result])


def test_execute_reports_failing_cell(tmp_path):
    src = _nb(tmp_path / "02_bad.ipynb", "x = 1", "assert x == 2, 'the chapter claim is false'")
    result = runner.execute(src, out_dir=tmp_path / "build", html=False)
    assert result.status == "failed" and "the chapter claim is false" in result.error
    table = runner.format_table([result])
    assert "FAILED" in table and "02_bad failed" in table


def test_table_marks_over_budget(tmp_path):
    r = runner.NotebookResult("00_x", "ok", 12.0, 10, tmp_path / "x.ipynb")
    assert "OVER BUDGET" in runner.format_table([r])


def _reference_nb(path, source, reference_text):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata.update(tags=[runner.REFERENCE_TAG], keep_output=True)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=reference_text)]
    nb.cells = [nbformat.v4.new_code_cell("x = 6 * 7"), cell]
    nb.metadata["kernelspec"] = {"name": "labkit", "display_name": "Python (labkit)", "language": "python"}
    nb.metadata["labkit"] = {"chapter": "xx", "budget_s": 5, "timeout_s": 60}
    nbformat.write(nb, path)
    return path


def test_reference_output_that_still_holds_passes_and_a_changed_one_fails(tmp_path):
    source = 'print(f"6 x 7 = {x} at 0x7f3a2b1c9d80 from /home/someone/lab/notebooks/")'
    good = _reference_nb(tmp_path / "10_good.ipynb", source, "6 x 7 = 42 at 0x55aa00112233 from /root/x/notebooks/\n")
    result = runner.execute(good, out_dir=tmp_path / "build", html=False)
    assert result.ok, result.error           # addresses and paths are sanitised, the value is not
    bad = _reference_nb(tmp_path / "11_bad.ipynb", source, "6 x 7 = 41 at 0x55aa00112233 from /root/x/notebooks/\n")
    result = runner.execute(bad, out_dir=tmp_path / "build", html=False)
    assert result.status == "failed" and "reference output changed" in result.error
    assert "print(f\"6 x 7" in result.error and "41" in result.error      # names the cell and shows the old value
    assert runner.execute(bad, out_dir=tmp_path / "other", html=False, parameters={"model": "x"}).ok   # not checked: other model


def test_update_references_rewrites_the_tagged_cells_from_a_run(tmp_path):
    bad = _reference_nb(tmp_path / "12_bad.ipynb", "print(x)", "41\n")
    result = runner.execute(bad, out_dir=tmp_path / "build", html=False, references=False)
    assert result.ok and runner.update_references(bad, result.output) == 1
    assert runner.compare_references(bad, result.output) == []
    cell = nbformat.read(bad, as_version=4).cells[1]
    assert cell.outputs[0]["text"] == "42\n" and cell.execution_count is None and cell.metadata["keep_output"]


def test_every_chapters_reference_cells_are_compared_and_an_altered_one_fails(tmp_path):
    """The committed references against themselves match; one altered character in any of them is caught."""
    chapters = [p for p in runner.discover() if runner._reference_cells(nbformat.read(p, as_version=4))]
    assert chapters, "no chapter has reference cells"
    for path in chapters:
        assert runner.compare_references(path, path) == [], path.name
        nb = nbformat.read(path, as_version=4)
        out = runner._reference_cells(nb)[-1].outputs[-1]
        if "text" in out:
            out["text"] = out["text"] + "(altered)\n"
        else:
            key = "text/plain" if "text/plain" in out["data"] else next(iter(out["data"]))
            out["data"][key] = out["data"][key] + " (altered)"
        altered = tmp_path / path.name
        nbformat.write(nb, altered)
        assert runner.compare_references(altered, path), f"{path.name}: an altered reference output went unnoticed"

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


def test_execute_reports_failing_cell(tmp_path):
    src = _nb(tmp_path / "02_bad.ipynb", "x = 1", "assert x == 2, 'the chapter claim is false'")
    result = runner.execute(src, out_dir=tmp_path / "build", html=False)
    assert result.status == "failed" and "the chapter claim is false" in result.error
    table = runner.format_table([result])
    assert "FAILED" in table and "02_bad failed" in table


def test_table_marks_over_budget(tmp_path):
    r = runner.NotebookResult("00_x", "ok", 12.0, 10, tmp_path / "x.ipynb")
    assert "OVER BUDGET" in runner.format_table([r])

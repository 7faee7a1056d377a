"""Every chapter notebook runs top to bottom on the CPU tier (papermill), checks included.

Executed copies (and HTML) land in build/; a wall-time table is printed at the end of the run.
A notebook fails when any cell raises, which includes its final "Checks" cells.
"""
import pytest
from conftest import NOTEBOOK_RESULTS

from labkit import runner

NOTEBOOKS = runner.discover()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no chapter notebooks found in notebooks/"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    result = runner.execute(path, tier="ci")
    NOTEBOOK_RESULTS.append(result)
    assert result.ok, f"{path.name} failed: {result.error}\n(executed copy: {result.output})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_conventions(path):
    """Committed without outputs (except the reference cells nbval checks); a parameters cell with tier;
    a Checks section; a budget."""
    import json
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("execution_count") for c in code), "strip execution counts: make strip"
    for c in code:
        is_reference = runner.REFERENCE_TAG in c["metadata"].get("tags", [])
        if is_reference:
            assert c.get("outputs") and c["metadata"].get("keep_output"), \
                f"reference cell without its output (labkit run --update-references): {''.join(c['source'])[:80]}"
        else:
            assert not c.get("outputs"), "strip outputs: make strip"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "tier" in "".join(params[0]["source"])
    # papermill's own reader (papermill --help-notebook, and the parameters it documents) understands every line
    from papermill.translators import PythonTranslator
    assignments = [line for line in "".join(params[0]["source"]).splitlines() if line and not line.startswith("#")]
    assert len(PythonTranslator.inspect({"source": "".join(params[0]["source"])})) == len(assignments), assignments
    assert any(c["cell_type"] == "markdown" and "".join(c["source"]).startswith("## Checks") for c in nb["cells"])
    settings = runner.notebook_settings(path)
    assert settings["budget_s"] and settings["kernel"] in ("labkit", "labkit-vllm")
    for c in code:
        if "gpu" in c.get("metadata", {}).get("tags", []):
            assert "".join(c["source"]).startswith("%%gpu"), "gpu-tagged cells start with %%gpu"

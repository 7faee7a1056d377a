import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing in the lab may reach a hub at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NOTEBOOK_RESULTS = []   # filled by test_notebooks.py, printed as a table at the end


@pytest.fixture(scope="session")
def smollm2_path():
    from labkit import models
    return models.get("smollm2")


def pytest_terminal_summary(terminalreporter):
    if NOTEBOOK_RESULTS:
        from labkit.runner import format_table, write_summary
        terminalreporter.section("notebook wall times (CPU tier)")
        terminalreporter.write_line(format_table(NOTEBOOK_RESULTS))
        write_summary(NOTEBOOK_RESULTS)

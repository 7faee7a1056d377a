"""A chapter's checks catch a broken helper: each test injects one mutation into labkit inside the
notebook's kernel (an IPython startup file) and runs the chapter, which must then fail at the check
that guards the broken claim — not earlier, and not pass."""
import pytest

from labkit import runner

NOTEBOOKS = {p.stem[:2]: p for p in runner.discover()}


def run_mutated(chapter: str, mutation: str, tmp_path, monkeypatch) -> runner.NotebookResult:
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-mutation.py").write_text(mutation)
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))      # the kernel inherits it
    return runner.execute(NOTEBOOKS[chapter], tier="ci", out_dir=tmp_path / "build", html=False)


@pytest.mark.notebook
def test_chapter_00_catches_a_kv_formula_that_forgets_the_values(tmp_path, monkeypatch):
    mutation = (
        "from labkit import memory\n"
        "_right = memory.kv_cache_bytes\n"
        "def kv_cache_bytes(*args, **kwargs):\n"
        "    return _right(*args, **kwargs) // 2          # K counted, V forgotten\n"
        "memory.kv_cache_bytes = kv_cache_bytes\n")
    result = run_mutated("00", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 00 passed with a KV-cache formula half the right size"
    assert "kv_llamacpp_mib" in result.error, result.error      # the check against llama.cpp's own allocation

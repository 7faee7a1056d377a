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


@pytest.mark.notebook
def test_chapter_05_catches_a_retriever_that_ranks_backwards(tmp_path, monkeypatch):
    mutation = (
        "from labkit import rag\n"
        "_right = rag.rank_doc_ids\n"
        "def rank_doc_ids(*args, **kwargs):\n"
        "    return [ids[::-1] for ids in _right(*args, **kwargs)]     # worst of the top k first\n"
        "rag.rank_doc_ids = rank_doc_ids\n")
    result = run_mutated("05", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 05 passed with a retriever that ranks its hits backwards"
    assert "recall_4 >= 0.8" in result.error, result.error      # the retrieval-quality check


@pytest.mark.notebook
def test_chapter_08_catches_an_autoscaler_without_its_scale_down_window(tmp_path, monkeypatch):
    mutation = (
        "from labkit import deploy\n"
        "_right = deploy.simulate_hpa\n"
        "def simulate_hpa(*args, **kwargs):\n"
        "    return _right(*args, **{**kwargs, 'scale_down_window_s': 0})   # scales down on the first quiet sample\n"
        "deploy.simulate_hpa = simulate_hpa\n")
    result = run_mutated("08", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 08 passed with an HPA that ignores its 300 s stabilisation window"
    assert "scaled_down_at - busy[-1] >= 300" in result.error, result.error


@pytest.mark.notebook
def test_chapter_09_catches_a_circuit_breaker_that_never_opens(tmp_path, monkeypatch):
    mutation = (
        "from labkit import router\n"
        "def failure(self):\n"
        "    self.consecutive += 1        # counted, but the breaker never opens: retries and requests go on\n"
        "router.CircuitBreaker.failure = failure\n")
    result = run_mutated("09", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 09 passed with a circuit breaker that never opens"
    assert '"+ circuit breaker", "cloud requests"' in result.error, result.error

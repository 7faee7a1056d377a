"""A chapter's checks catch a broken helper: each test injects one mutation into labkit inside the
notebook's kernel (an IPython startup file) and runs the chapter, which must then fail at the check
that guards the broken claim — not earlier, and not pass."""
import pytest

from labkit import runner

# Each of these executes a whole chapter a second time: make test-full (and make test-mutations), not make test.
pytestmark = [pytest.mark.full, pytest.mark.engine]

NOTEBOOKS = {p.stem[:2]: p for p in runner.discover()}


def run_mutated(chapter: str, mutation: str, tmp_path, monkeypatch, *, in_servers: bool = False) -> runner.NotebookResult:
    """``in_servers``: the mutation also runs in every Python process the chapter starts (the servers
    labkit.serve launches inherit the kernel's environment), as a ``sitecustomize`` module."""
    if in_servers:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(mutation)
        monkeypatch.setenv("PYTHONPATH", str(site))
    else:
        startup = tmp_path / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-mutation.py").write_text(mutation)
        monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))      # the kernel inherits it
    return runner.execute(NOTEBOOKS[chapter], tier="ci", out_dir=tmp_path / "build", html=False)


def in_ollama_server(modules: str, body: str) -> str:
    """A mutation of labkit's Ollama-compatible server (``from labkit.ollama_lab import MODULES``, then
    ``body``), applied only in the processes that have that server (not, e.g., the vLLM environment)."""
    indented = "".join(f"    {line}\n" for line in body.splitlines())
    return (f"try:\n    from labkit.ollama_lab import {modules}\n"
            f"except Exception:        # a process without labkit's server\n    pass\nelse:\n{indented}")


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
def test_chapter_00_catches_kv_heads_read_as_attention_heads(tmp_path, monkeypatch):
    """The grouped-query clause: a header reader that takes attention.head_count for the KV heads sizes the
    cache n_heads / n_kv_heads times too large, and llama.cpp's own allocation says so."""
    mutation = (
        "import dataclasses\n"
        "from labkit import memory\n"
        "_right = memory.config_from_gguf\n"
        "def config_from_gguf(path):\n"
        "    cfg, weights, file_type = _right(path)\n"
        "    return dataclasses.replace(cfg, n_kv_heads=cfg.n_heads), weights, file_type   # no GQA\n"
        "memory.config_from_gguf = config_from_gguf\n")
    result = run_mutated("00", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 00 passed with KV heads read as attention heads"
    assert "kv_llamacpp_mib" in result.error, result.error


@pytest.mark.notebook
def test_chapter_00_catches_block_bits_without_their_scales(tmp_path, monkeypatch):
    """A file's average is its type mix's: bits per type that forget the blocks' scales (Q8_0 as 8, Q6_K as 6)
    no longer add up to the bytes the file's writer laid out."""
    mutation = (
        "import math\n"
        "from labkit import memory\n"
        "_right = memory.block_type_bits\n"
        "memory.block_type_bits = lambda type_name: math.floor(_right(type_name))   # the scales forgotten\n")
    result = run_mutated("00", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 00 passed with block bits that forget the scales"
    assert "disk_bpw - mix_bpw" in result.error, result.error


@pytest.mark.notebook
def test_chapter_02_catches_durations_reported_in_microseconds(tmp_path, monkeypatch):
    mutation = in_ollama_server(
        "inference, native",
        "_right = native.generation\n"
        "def generation(*args, **kwargs):\n"
        "    for event in _right(*args, **kwargs):\n"
        "        if isinstance(event, inference.Done):     # Ollama's durations are ns; these become µs\n"
        "            event.stats.update({k: v // 1000 for k, v in event.stats.items() if k.endswith('_duration')})\n"
        "        yield event\n"
        "native.generation = generation\n")
    result = run_mutated("02", mutation, tmp_path, monkeypatch, in_servers=True)
    assert result.status == "failed", "chapter 02 passed with durations in microseconds"
    assert 'r["total_duration"] / 1e9 - wall_s' in result.error, result.error


@pytest.mark.notebook
def test_chapter_02_catches_a_server_that_ignores_ollama_num_parallel(tmp_path, monkeypatch):
    mutation = in_ollama_server(
        "scheduler",
        "_right = scheduler.Scheduler.__init__\n"
        "def __init__(self, *args, **kwargs):\n"
        "    _right(self, *args, **kwargs)\n"
        "    self.num_parallel = 1                        # OLLAMA_NUM_PARALLEL read, then ignored\n"
        "scheduler.Scheduler.__init__ = __init__\n")
    result = run_mutated("02", mutation, tmp_path, monkeypatch, in_servers=True)
    assert result.status == "failed", "chapter 02 passed with a server that answers one request at a time"
    assert 'concurrency[2]["requests in flight at once"] == 2' in result.error, result.error


@pytest.mark.notebook
def test_chapter_02_catches_open_webui_without_its_openai_connection(tmp_path, monkeypatch):
    """The Open WebUI section (it runs where `make webui` installed it; the fixture installs it): settings that
    drop the llama-server connection leave its model out of the page's list, and the section's check says so."""
    from labkit import webui
    if webui.installed_version() is None:
        import subprocess
        subprocess.run(["bash", "scripts/setup_webui.sh"], check=True, cwd=runner.REPO_ROOT)
    mutation = (
        "from labkit import webui\n"
        "_right = webui.environment\n"
        "def environment(ollama, openai, *args, **kwargs):\n"
        "    return _right(ollama, None, *args, **kwargs)     # the OpenAI connection forgotten\n"
        "webui.environment = environment\n")
    result = run_mutated("02", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 02 passed with Open WebUI not connected to llama-server"
    assert "ui_llama.model == m.splitlines()[0]" in result.error, result.error


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


@pytest.mark.notebook
def test_chapter_09_catches_an_mcp_retriever_that_returns_the_wrong_passages(tmp_path, monkeypatch):
    # in the MCP server's process: search_docs answers with the k *worst* passages of the corpus
    mutation = (
        "try:\n    from labkit import mcp_server\n"
        "except Exception:        # a process without labkit (the vLLM environment)\n    pass\n"
        "else:\n"
        "    _right = mcp_server.Gateway.search\n"
        "    def search(self, query, k=2):\n"
        "        found = _right(self, query, k=40)\n"
        "        found['passages'] = found['passages'][-k:]\n"
        "        return found\n"
        "    mcp_server.Gateway.search = search\n")
    result = run_mutated("09", mutation, tmp_path, monkeypatch, in_servers=True)
    assert result.status == "failed", "chapter 09 passed with an MCP retriever that returns the wrong passages"
    assert 'first["correct"] & first["gold document retrieved"]' in result.error, result.error


# The slower chapters (2-4 min each): `make test-mutations` runs them; `make test` leaves them out.
KV_DOUBLED = (
    "from labkit import memory\n"
    "_right = memory.kv_cache_bytes\n"
    "def kv_cache_bytes(*args, **kwargs):\n"
    "    return 2 * _right(*args, **kwargs)          # K and V counted twice over\n"
    "memory.kv_cache_bytes = kv_cache_bytes\n")


@pytest.mark.notebook
def test_chapter_01_catches_a_q6_k_encoder_off_by_one_bit(tmp_path, monkeypatch):
    mutation = (
        "from labkit import quant\n"
        "_right = quant.quantize\n"
        "def quantize(x, qtype, *args, **kwargs):\n"
        "    out = _right(x, qtype, *args, **kwargs)\n"
        "    return bytes([out[0] ^ 1]) + out[1:] if qtype == 'Q6_K' else out    # one low bit of a Q6_K block\n"
        "quant.quantize = quantize\n")
    result = run_mutated("01", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 01 passed with a Q6_K encoder that differs from llama.cpp's"
    assert "assert all(exact.values())" in result.error, result.error


@pytest.mark.notebook
def test_chapter_01_catches_an_offload_prediction_with_the_output_layer_last(tmp_path, monkeypatch):
    mutation = (
        "from labkit import memory\n"
        "memory.offload_order = lambda n_layers: [*range(n_layers - 1, -1, -1), 'output']   # the old rule\n")
    result = run_mutated("01", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 01 passed with the output layer offloaded last"
    assert '"-ngl predicted"' in result.error, result.error      # the prediction-vs-engine check of section 6c


@pytest.mark.notebook
def test_chapter_03_catches_a_helper_that_drops_the_per_call_seed(tmp_path, monkeypatch):
    mutation = (
        "from labkit import llamacpp_lab\n"
        "_right = llamacpp_lab.create\n"
        "def create(llm, request, **kw):\n"
        "    kw.pop('seed', None)          # the seed never reaches llama.cpp: each call draws a fresh one\n"
        "    return _right(llm, request, **kw)\n"
        "llamacpp_lab.create = create\n")
    result = run_mutated("03", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 03 passed with sampling that ignores the seed it is given"
    assert "by_seed[0] == by_seed[1]" in result.error, result.error      # the fixed-seed table's check


@pytest.mark.notebook
def test_chapter_04_catches_a_kv_formula_twice_too_large(tmp_path, monkeypatch):
    result = run_mutated("04", KV_DOUBLED, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 04 passed with a KV-cache formula twice the right size"
    assert "kv_tokens - formula_tokens" in result.error, result.error     # vLLM's own KV capacity, counted in blocks


@pytest.mark.notebook
def test_chapter_04_catches_a_compile_cache_that_is_off(tmp_path, monkeypatch):
    """Section 2b's processes inherit the kernel's environment: with Inductor's FX-graph cache off, the second
    process compiles again and the check that it hit the cache fails (the timing alone would not: the C++
    libraries on disk are still reused)."""
    mutation = "import os\nos.environ['TORCHINDUCTOR_FX_GRAPH_CACHE'] = '0'     # torch/_inductor/config.py\n"
    result = run_mutated("04", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 04 passed with torch's FX-graph cache turned off"
    assert "jit.warm.fx_graph_hits >= 1" in result.error, result.error


@pytest.mark.notebook
def test_chapter_06_catches_a_bandwidth_bound_ten_times_too_low(tmp_path, monkeypatch):
    mutation = (
        "from labkit import bench\n"
        "_right = bench.decode_bound\n"
        "bench.decode_bound = lambda *args, **kwargs: _right(*args, **kwargs) / 10\n")
    result = run_mutated("06", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 06 passed with a decode bound below what the machine measures"
    assert "measured <= bound" in result.error, result.error


@pytest.mark.notebook
def test_chapter_07_catches_a_kv_formula_twice_too_large(tmp_path, monkeypatch):
    result = run_mutated("07", KV_DOUBLED, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 07 passed with a KV-cache formula twice the right size"
    # the memory bracket (predicted weights + KV must not exceed what a load adds) or the context-cost table
    assert 'rss["predicted w+KV MiB"]' in result.error or "KV cache MiB (formula)" in result.error, result.error


@pytest.mark.notebook
@pytest.mark.parametrize("mutation, check", [
    # a diagnosis that believes the "offloaded N/M layers" line: a build that can offload logs it with no device there
    ("offload.EngineAccount.on_device = property(lambda self: bool(self.offloaded))\n", "not fallback.on_device"),
    # a partial offload reported as full
    ("offload.EngineAccount.fully_offloaded = property(lambda self: self.on_device)\n", "not partial.fully_offloaded"),
    # a guard that lets a partial offload through
    ("rpc.require_full_offload = lambda *args, **kwargs: None\n", "device too small"),
], ids=["offload-line-believed", "partial-as-full", "guard-off"])
def test_chapter_07_catches_a_wrong_offload_diagnosis(mutation, check, tmp_path, monkeypatch):
    result = run_mutated("07", "from labkit import offload, rpc\n" + mutation, tmp_path, monkeypatch)
    assert result.status == "failed", f"chapter 07 passed with {mutation!r}"
    assert check in result.error, result.error


@pytest.mark.notebook
def test_chapter_10_catches_an_activation_estimate_half_again_too_large(tmp_path, monkeypatch):
    mutation = (
        "from labkit import finetune\n"
        "_right = finetune.activation_bytes\n"
        "finetune.activation_bytes = lambda *args, **kwargs: 1.5 * _right(*args, **kwargs)\n")
    result = run_mutated("10", mutation, tmp_path, monkeypatch)
    assert result.status == "failed", "chapter 10 passed with an activation estimate 50% too large"
    assert "abs(act_error) <= 0.10" in result.error, result.error


@pytest.mark.notebook
def test_chapter_10_catches_an_ollama_adapter_that_is_silently_dropped(tmp_path, monkeypatch):
    """The Ollama-compatible server accepts ADAPTER but never applies it: the chapter's second way of shipping
    must fail its check, not print the base model's answers."""
    mutation = in_ollama_server("create", "create._adapter_paths = lambda *args, **kwargs: []")
    result = run_mutated("10", mutation, tmp_path, monkeypatch, in_servers=True)
    assert result.status == "failed", "chapter 10 passed with an Ollama ADAPTER that changes nothing"
    assert 'ollama_vs_lora["same verdict"] >= 0.95' in result.error, result.error


@pytest.mark.notebook
def test_chapter_10_catches_a_trl_run_that_learns_the_question_too(tmp_path, monkeypatch):
    """TRL is given the user's turn as part of the completion, so its loss covers the question as well. The
    mutation reaches the training child process too, and changes the TRL run's cache key (labkit's TRL code is in it)."""
    mutation = (
        "try:\n    from labkit import finetune\n"
        "except Exception:\n    pass\n"
        "else:\n"
        "    def prompt_completion(rows):\n"
        "        return [{'prompt': r['messages'][:1], 'completion': r['messages'][1:]} for r in rows]\n"
        "    finetune.prompt_completion = prompt_completion\n")
    result = run_mutated("10", mutation, tmp_path, monkeypatch, in_servers=True)
    assert result.status == "failed", "chapter 10 passed with TRL learning the prompt's tokens"
    assert 'not trl_labels["rows_learning_otherwise"]' in result.error, result.error

"""vLLM: metrics parsing, and labkit.serve("vllm") starting and stopping the real CPU server."""
import glob
import os
import tempfile
import urllib.error
import urllib.request

import openai
import psutil
import pytest

import labkit
from labkit import memory, models, vllm_lab
from labkit.servers import port_is_free

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"     # 1×1 px

SAMPLE = """# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="smollm2"} 1234.0
vllm:prefix_cache_hits_total{engine="0",model_name="smollm2"} 1024.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="smollm2"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="smollm2"} 1.5e-1
"""


def test_parse_metrics():
    rows = vllm_lab.parse_metrics(SAMPLE)
    assert len(rows) == 5
    assert vllm_lab.metric(rows, "vllm:prefix_cache_hits_total") == 1024.0
    assert vllm_lab.metric(rows, "vllm:time_to_first_token_seconds_bucket", le="0.1") == 3.0
    assert vllm_lab.metric(rows, "vllm:time_to_first_token_seconds_sum") == pytest.approx(0.15)
    assert vllm_lab.metric(rows, "nope", default=-1) == -1


def test_kv_cache_tokens_from_log():
    assert vllm_lab.kv_cache_tokens("x\nGPU KV cache size: 1,234,560 tokens\n") == 1234560
    assert vllm_lab.kv_cache_tokens("nothing here") is None


@pytest.mark.full      # starts vLLM (~1-2 min on 2 cores); chapter 04 starts it in make test
@pytest.mark.engine
def test_serve_vllm_start_chat_metrics_stop():
    dist_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*")))
    with labkit.serve("vllm", api_key="k3y") as srv:
        family = [srv.pid] + [c.pid for c in psutil.Process(srv.pid).children(recursive=True)]
        client = srv.openai()
        r = client.completions.create(model=srv.model, prompt="The capital of France is", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        # An image to the text-only model: vLLM's chat renderer asks for the model's multimodal processor,
        # MultiModalRegistry.create_processor raises ValueError("<name> is not a multimodal model"), and the
        # server's exception handlers answer a ValueError as 400 BadRequestError (chapter 04 checks it too).
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=srv.model, max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}])
        assert refused.value.status_code == 400 and "is not a multimodal model" in str(refused.value), refused.value
        with pytest.raises(urllib.error.HTTPError) as info:     # no key, no answer
            urllib.request.urlopen(srv.base_url + "/v1/models", timeout=10)
        assert info.value.code == 401
        with urllib.request.urlopen(srv.base_url + "/metrics", timeout=10) as resp:
            rows = vllm_lab.parse_metrics(resp.read().decode())
        assert vllm_lab.metric(rows, "vllm:generation_tokens_total") >= 5
        # vLLM's KV capacity is what the KV formula predicts for VLLM_CPU_KVCACHE_SPACE=1 GiB,
        # rounded down to whole blocks.
        arch = memory.from_gguf(models.get("smollm2"))
        per_token = arch.kv_cache_bytes(1, cache_type="bf16")
        logged = vllm_lab.kv_cache_tokens(srv.logs(500))
        assert logged is not None and 0.97 < logged * per_token / 2**30 <= 1.0
        port = srv.port
    assert port_is_free(port)
    assert not [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*"))) <= dist_before


@pytest.mark.full      # two vLLM starts (~1 min); chapter 04 predicts in make test and runs this in its full tier
@pytest.mark.engine
def test_a_max_model_len_the_kv_cache_cannot_hold_is_refused_and_vllms_estimate_starts(monkeypatch):
    import json
    hf_config = json.loads((models.hf_folder("smollm2") / "config.json").read_text())
    per_token = memory.from_gguf(models.get("smollm2")).kv_cache_bytes(1, cache_type="bf16")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    predicted = vllm_lab.max_model_len_that_fits(hf_config, per_token, 2**30)
    with pytest.raises(labkit.ServerStartError) as refused:
        labkit.serve("vllm", "smollm2", max_model_len=2 * predicted).stop()
    refusal = vllm_lab.kv_refusal(refused.value.log_path.read_text(errors="replace"))
    assert refusal["max_model_len"] == 2 * predicted and refusal["needed_gib"] > refusal["available_gib"], refusal
    assert abs(refusal["estimated_max_len"] - predicted) <= vllm_lab.CPU_BLOCK_SIZE, (refusal, predicted)
    with labkit.serve("vllm", "smollm2", max_model_len=refusal["estimated_max_len"]) as fitted:
        assert vllm_lab.kv_cache_tokens(fitted.logs(2000)) >= refusal["estimated_max_len"]


# Lines of two compiled starts of the pinned vLLM (0.32.0, CPU) on one VLLM_CACHE_ROOT, 2026-12-07.
COMPILED_COLD = """(EngineCore pid=7538) INFO 12-07 18:22:44 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: \
model='/m', enforce_eager=False, compilation_config={'mode': <CompilationMode.DYNAMO_TRACE_ONCE: 2>, 'backend': 'inductor'}
(Worker pid=7775) INFO 12-07 18:23:34 [cpu_model_runner.py:87] Warming up model for the compilation...
(Worker pid=7775) INFO 12-07 18:25:59 [decorators.py:743] [backbone] saved AOT compiled function to \
/c/torch_compile_cache/torch_aot_compile/b0f3/rank_0_0/model
(Worker pid=7775) INFO 12-07 18:26:01 [monitor.py:91] [backbone] Initial profiling/warmup run took 1.92 s
(Worker pid=7775) INFO 12-07 18:26:07 [cpu_model_runner.py:91] Warming up done.
(EngineCore pid=7538) INFO 12-07 18:26:09 [core.py:402] init engine (profile, create kv cache, warmup model) took 154.46 s
"""
COMPILED_WARM = """(Worker pid=9580) INFO 12-07 23:59:58 [cpu_model_runner.py:87] Warming up model for the compilation...
(Worker pid=9580) WARNING 12-08 00:00:16 [decorators.py:333] [backbone] Compiling model again due to a load failure \
from /c/torch_compile_cache/torch_aot_compile/b0f3/rank_0_0/model, reason: 'function' object has no attribute 'finalize_loading'
(Worker pid=9580) INFO 12-08 00:03:11 [cpu_model_runner.py:91] Warming up done.
"""
EAGER = """(EngineCore pid=1) INFO 12-07 18:20:34 [core.py:133] Initializing ... compilation_config={'mode': \
<CompilationMode.NONE: 0>, 'backend': 'inductor'}
(EngineCore pid=1) INFO 12-07 18:21:30 [core.py:402] init engine (profile, create kv cache, warmup model) took 1.21 s
"""


def test_compile_report_reads_the_mode_the_artifact_and_the_warm_up():
    cold = vllm_lab.compile_report(COMPILED_COLD)
    assert cold == {"mode": "DYNAMO_TRACE_ONCE", "aot_saved": "/c/torch_compile_cache/torch_aot_compile/b0f3/rank_0_0/model",
                    "aot_loaded": None, "load_failure": None, "init_engine_s": 154.46, "warmup_s": 153.0}
    warm = vllm_lab.compile_report(COMPILED_WARM)          # across midnight: 3 min 13 s, not minus a day
    assert warm["load_failure"] == "'function' object has no attribute 'finalize_loading'" and warm["warmup_s"] == 193.0
    assert warm["aot_loaded"] is None and warm["init_engine_s"] is None
    eager = vllm_lab.compile_report(EAGER)
    assert eager["mode"] == "NONE" and eager["warmup_s"] is None and eager["aot_saved"] is None
    loaded = vllm_lab.compile_report("INFO 12-07 10:00:00 [decorators.py:319] [backbone] Directly load AOT compilation "
                                     "from path /c/model")
    assert loaded["aot_loaded"] == "/c/model"


@pytest.mark.full      # two compiled vLLM starts (minutes each on 2 cores); chapter 04 runs the same in its full tier
@pytest.mark.engine
def test_a_compiled_start_saves_its_artifact_and_the_second_start_loads_it_or_says_why_not(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    reports = []
    for _ in range(2):
        with labkit.serve("vllm", "smollm2", enforce_eager=False) as srv:
            r = srv.openai().completions.create(model=srv.model, prompt="The capital of France is", max_tokens=4)
            assert r.usage.completion_tokens == 4
            reports.append(vllm_lab.compile_report(srv.log_path.read_text(errors="replace")))
    cold, warm = reports
    assert cold["mode"] == "DYNAMO_TRACE_ONCE" and cold["aot_saved"].startswith(str(tmp_path / "vllm-cache")), cold
    assert (warm["aot_loaded"] and warm["warmup_s"] < cold["warmup_s"]) or warm["load_failure"], warm

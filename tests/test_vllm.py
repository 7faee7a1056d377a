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

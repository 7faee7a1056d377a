"""The fake engine (tests/fake_engine.py) is faithful enough to stand in for llama.cpp behind labkit's
Ollama-compatible server, and what only a fake can pin down: the exact tokens streamed, the
done_reason at ``num_predict`` and at the end of sequence, durations in nanoseconds, the options the
engine is given, the prompt it sees, and that an abandoned stream stops the generation.
All in process, in milliseconds (the contract tests run the same server for the wire format)."""
from __future__ import annotations

import http.client as httplib
import inspect
import json
import time
import urllib.parse

import httpx
import pytest
from fake_engine import BOS, EOS_TEXT, LONG_STORY, FakeEngine, FakeEngineFactory, FakeSentenceEmbedder, Script, shared_fake_server

from labkit.ollama_lab import engine as seam

CHAT = "smollm2:135m"
SCRIPT = Script(["Hel", "lo", ",", " wor", "ld", "!"])


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return shared_fake_server(tmp_path_factory)


@pytest.fixture
def http(fake):
    with httpx.Client(base_url=fake.base_url, timeout=30) as c:
        yield c


def lines_of(r) -> list[dict]:
    return [json.loads(x) for x in r.iter_lines() if x.strip()]


def stream(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        return lines_of(r)


def protocol_methods(protocol) -> list[str]:
    return [n for n, v in vars(protocol).items() if not n.startswith("_") and inspect.isfunction(v)]


def test_the_fake_and_llama_cpp_implement_the_engine_protocols(smollm2_path):
    from labkit.ollama_lab.llama_engine import LlamaEngine
    from labkit.ollama_lab.store import Manifest
    factory = FakeEngineFactory()
    gguf = Manifest(name="m:latest", kind="gguf", path=str(smollm2_path))
    engine = factory(gguf, {"num_ctx": 512})
    assert isinstance(engine, FakeEngine) and isinstance(engine, seam.TextEngine) and isinstance(engine, seam.GGUFEmbedder)
    assert engine.n_ctx() == 512 and "tokenizer.chat_template" in engine.metadata
    assert engine.token_text(engine.token_eos()) == "<|im_end|>"                 # read from the GGUF, as llama.cpp does
    methods = protocol_methods(seam.TextEngine)
    assert {"generate", "tokenize", "is_eog", "last_logprobs", "token_text"} <= set(methods)
    assert all(callable(getattr(LlamaEngine, m, None)) for m in methods)         # Llama + the three LlamaEngine adds
    assert all(callable(getattr(FakeEngine, m, None)) for m in protocol_methods(seam.GGUFEmbedder))
    for m in protocol_methods(seam.TextEngine):                                   # same parameter names as the protocol
        want = [p for p in inspect.signature(getattr(seam.TextEngine, m)).parameters if p != "self"]
        got = list(inspect.signature(getattr(FakeEngine, m)).parameters)[1:]
        assert got[:len(want)] == want or m == "generate", (m, got, want)
    tokens = engine.tokenize("héllo".encode(), add_bos=True, special=True)
    assert tokens[0] == BOS and engine.detokenize(tokens) == "héllo".encode()
    from labkit import models
    minilm = FakeSentenceEmbedder(str(models.get("minilm")))
    assert isinstance(minilm, seam.SentenceEmbedder) and minilm.encode(["a", "b"]).shape == (2, 384)


def test_a_streamed_generate_yields_exactly_the_scripted_tokens(fake, http):
    with fake.factory.scripted(SCRIPT):
        lines = stream(http, "/api/generate", {"model": CHAT, "prompt": "hi", "options": {"num_predict": 100}})
        cut = stream(http, "/api/generate", {"model": CHAT, "prompt": "hi", "options": {"num_predict": 4}})
        stopped = http.post("/api/generate", json={"model": CHAT, "prompt": "hi", "stream": False,
                                                   "options": {"stop": ["lo, w"]}}).json()
    assert [x["response"] for x in lines[:-1]] == list(SCRIPT.tokens)              # one line per token, in order
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == len(SCRIPT.tokens)   # the scripted EOS
    assert [x["response"] for x in cut[:-1]] == list(SCRIPT.tokens[:4])
    assert cut[-1]["done_reason"] == "length" and cut[-1]["eval_count"] == 4                      # num_predict
    assert stopped["response"] == "Hel" and stopped["done_reason"] == "stop"       # a stop string across tokens


def test_an_eos_in_the_script_ends_the_answer_and_a_failure_is_the_last_line(fake, http):
    with fake.factory.scripted(Script(["a", "b", EOS_TEXT, "never"])):
        r = http.post("/api/chat", json={"model": CHAT, "stream": False, "messages": [{"role": "user", "content": "x"}]}).json()
    assert r["message"]["content"] == "ab" and r["eval_count"] == 2 and r["done_reason"] == "stop"


def test_durations_are_nanoseconds(fake, http):
    delay = 0.02
    with fake.factory.scripted(Script(list(SCRIPT.tokens), delay=delay)):
        r = http.post("/api/generate", json={"model": CHAT, "prompt": "hi", "stream": False}).json()
    n = len(SCRIPT.tokens)
    # the first token's wait counts as prompt evaluation (time to first token), the rest as generation
    assert delay * 1e9 <= r["prompt_eval_duration"] < 1e9
    assert (n - 1) * delay * 1e9 <= r["eval_duration"] < 2e9
    assert r["total_duration"] >= r["prompt_eval_duration"] + r["eval_duration"] + r["load_duration"]
    assert all(isinstance(r[k], int) for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"))


def test_an_abandoned_stream_stops_the_generation_and_frees_the_model(fake):
    url = urllib.parse.urlparse(fake.base_url)
    conn = httplib.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("POST", "/api/generate", headers={"Content-Type": "application/json"},
                 body=json.dumps({"model": CHAT, "prompt": "Tell me a long story.", "options": {"num_predict": 2000}}))
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.readline())["response"] == LONG_STORY.tokens[0]
    abandoned = fake.factory.calls[-1]
    assert abandoned.script is LONG_STORY
    conn.sock.shutdown(2)
    conn.close()
    t0 = time.monotonic()
    r = httpx.post(fake.base_url + "/api/generate", timeout=10, json={"model": CHAT, "prompt": "hi", "stream": False})
    assert r.status_code == 200 and time.monotonic() - t0 < 1       # answered within a second, not after ~10 s
    produced = abandoned.yielded
    time.sleep(0.05)
    assert abandoned.yielded == produced < 200                       # stopped, far short of num_predict


@pytest.mark.parametrize("path,body", [("/api/generate", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
@pytest.mark.parametrize("stream", [True, False])
def test_the_engine_runs_only_on_labkits_short_lived_threads(fake, http, path, body, stream):
    """With llama.cpp's OpenMP build, computing on one thread while a long-lived other thread (Starlette's
    pool) held an OpenMP pool made every answer ~2.7x slower: every token, the first included, comes from
    labkit's own threads that end with the request (cancellable.in_fresh_thread and its Producer)."""
    with fake.factory.scripted(SCRIPT):
        r = http.post(path, json={"model": CHAT, "stream": stream, **body})
    assert r.status_code == 200
    threads = fake.factory.calls[-1].threads
    assert threads and set(threads) <= {"labkit-engine-call", "labkit-generation"}, threads


def test_the_options_reach_the_engine(fake, http):
    opts = {"temperature": 0.3, "top_k": 7, "top_p": 0.5, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.3,
            "frequency_penalty": 0.2, "presence_penalty": 0.4, "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2,
            "seed": 5, "num_ctx": 1024}
    assert http.post("/api/generate", json={"model": CHAT, "prompt": "hi", "stream": False, "options": opts}).status_code == 200
    call = fake.factory.calls[-1]
    assert {k: call.sampling[k] for k in ("temp", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
                                          "presence_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta")} == {
        "temp": 0.3, "top_k": 7, "top_p": 0.5, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.3,
        "frequency_penalty": 0.2, "presence_penalty": 0.4, "mirostat_mode": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2}
    assert call.seed == 5 and call.reset and call.sampling["grammar"] is None    # a seed: the prompt is evaluated afresh
    assert fake.factory.loads[-1][1]["num_ctx"] == 1024                           # a runner option: loaded with it
    http.post("/api/generate", json={"model": CHAT, "prompt": "hi", "stream": False})
    call = fake.factory.calls[-1]
    assert not call.reset                                                         # no seed: a random one, the cache kept
    assert (call.sampling["temp"], call.sampling["top_k"], call.sampling["top_p"]) == (0.8, 40, 0.9)   # Ollama's defaults
    r = http.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}],
                                                "response_format": {"type": "json_object"}}).json()
    call = fake.factory.calls[-1]
    assert call.sampling["temp"] == 1.0 and call.sampling["grammar"].format == "json"          # OpenAI's default temperature
    assert r["usage"]["completion_tokens"] <= 3


def test_the_engine_sees_the_templated_prompt(fake, http):
    http.post("/api/chat", json={"model": CHAT, "stream": False, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]})
    prompt = fake.factory.calls[-1].prompt
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
                      "<|im_start|>assistant\n")                                  # SmolLM2's own chat template
    http.post("/api/generate", json={"model": CHAT, "prompt": "[INST] raw [/INST]", "raw": True, "stream": False})
    assert fake.factory.calls[-1].prompt == "[INST] raw [/INST]"


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
TEXT_ONLY = f'"{CHAT}" does not support images (it is a text-only model)'


@pytest.mark.parametrize("streamed", [True, False])
def test_an_image_to_the_text_only_model_is_a_400_on_every_route(fake, http, streamed):
    """/api/generate's images, /api/chat's messages[].images and /v1's image_url parts (which Ollama's OpenAI
    middleware turns into images) all get the same 400 before any token is generated: Ollama's form for a
    missing capability, never a silent answer that ignored the picture."""
    calls = len(fake.factory.calls)
    requests = [
        ("/api/generate", {"model": CHAT, "prompt": "What is this?", "images": [PNG], "stream": streamed}),
        ("/api/chat", {"model": CHAT, "stream": streamed, "messages": [
            {"role": "user", "content": "What is this?", "images": [PNG]}]}),
        ("/v1/chat/completions", {"model": CHAT, "stream": streamed, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]}),
    ]
    for path, body in requests:
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        if path.startswith("/v1"):                 # OpenAI's error object on /v1
            assert r.json()["error"]["message"] == TEXT_ONLY and r.json()["error"]["type"] == "invalid_request_error"
        else:
            assert r.json() == {"error": TEXT_ONLY}
    assert len(fake.factory.calls) == calls        # refused before the engine was asked anything


@pytest.mark.full
@pytest.mark.engine
def test_the_real_sentence_embedder_leaves_llama_cpp_the_cores():
    """torch's OpenMP threads next to llama.cpp's in the stand-in made every later generation ~2.5x slower:
    the real factory loads sentence-transformers with one torch thread."""
    import subprocess
    import sys
    probe = ("import torch\n"
             "from labkit import models\n"
             "from labkit.ollama_lab.engine import llama_cpp_engine\n"
             "from labkit.ollama_lab.store import Manifest\n"
             "before = torch.get_num_threads()\n"
             "embedder = llama_cpp_engine(Manifest('all-minilm:latest', 'sentence-transformers', str(models.get('minilm'))), {})\n"
             "print(before, torch.get_num_threads(), len(embedder.encode(['a'])[0]))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    before, after, dims = map(int, out.stdout.split()[-3:])
    assert after == 1 and dims == 384, out.stdout

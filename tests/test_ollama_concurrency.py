"""Ollama's concurrency settings on labkit's Ollama-compatible server, as its FAQ documents them
("How does Ollama handle concurrent requests?"): ``OLLAMA_NUM_PARALLEL`` requests per model at once,
the rest queued in order; beyond ``OLLAMA_MAX_QUEUE`` waiting, HTTP 503 with Ollama's words; beyond
``OLLAMA_MAX_LOADED_MODELS``, the idle model unloaded. On the fake engine, in milliseconds; chapter 02
measures the same on the real one."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fake_engine import Script, fake_server

from labkit import servers
from labkit.ollama_lab.scheduler import SERVER_BUSY
from labkit.ollama_lab.settings import scheduler_settings
from labkit.streams import max_in_flight

CHAT = "smollm2:135m"
SLOW = Script([f" w{i}" for i in range(8)], delay=0.015)    # ~0.12 s per answer


@pytest.fixture
def server(tmp_path):
    started = []

    def start(**settings):
        srv = fake_server(tmp_path / f"models-{len(started)}", **settings)
        started.append(srv)
        return srv
    yield start
    for srv in started:
        srv.stop()


def burst(srv, n: int, path: str = "/api/generate") -> list[dict]:
    """``n`` streamed requests sent at once: each one's status, first-token and last-line times (s from the start)."""
    t0 = time.perf_counter()

    def one(i):
        with httpx.Client(base_url=srv.base_url, timeout=30) as http, \
                http.stream("POST", path, json={"model": CHAT, "prompt": f"request {i}"}) as r:
            first, lines = None, []
            for line in r.iter_lines():
                if line and first is None:
                    first = time.perf_counter() - t0
                lines.append(line)
            return {"status": r.status_code, "first": first, "done": time.perf_counter() - t0, "body": "\n".join(lines)}
    with srv.factory.scripted(SLOW), ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_one_parallel_request_per_model_by_default_the_rest_wait_their_turn(server):
    srv = server()
    rows = burst(srv, 3)
    assert [r["status"] for r in rows] == [200] * 3
    assert max_in_flight((r["first"], r["done"]) for r in rows) == 1
    assert len(srv.factory.engines) == 1


def test_num_parallel_two_answers_two_at_once_on_two_engine_instances(server):
    srv = server(num_parallel=2)
    rows = burst(srv, 3)
    assert [r["status"] for r in rows] == [200] * 3
    assert max_in_flight((r["first"], r["done"]) for r in rows) == 2
    assert len(srv.factory.engines) == 2          # a third request waited for one of them, none was added


def test_requests_waiting_for_a_busy_instance_are_not_limited_by_max_queue(server):
    srv = server(num_parallel=1, max_queue=1)       # Ollama's runner holds these, outside the scheduler's queue
    assert sorted(r["status"] for r in burst(srv, 4)) == [200] * 4


def while_busy(srv, n: int, path: str, body: dict) -> tuple[int, list[httpx.Response]]:
    """``n`` requests for another model sent at once while the chat model streams a long answer: the long
    answer's status and the others' responses."""
    def one(_):
        return httpx.post(srv.base_url + path, json=body, timeout=30)
    with srv.factory.scripted(Script([" busy"] * 40, delay=0.02)), \
            httpx.stream("POST", srv.base_url + "/api/generate", timeout=30,
                         json={"model": CHAT, "prompt": "a long answer"}) as long_answer:
        lines = long_answer.iter_lines()
        next(lines)                                     # the chat model is loaded and busy
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(one, range(n)))
        list(lines)
    return long_answer.status_code, answers


def test_past_max_queue_requests_waiting_for_the_scheduler_get_ollamas_503(server):
    # one model slot, busy: requests for another model wait for it in the scheduler's queue, which holds
    # max_queue of them besides the one being placed (Ollama's channel); the rest are refused
    srv = server(max_loaded=1, max_queue=1)
    status, answers = while_busy(srv, 4, "/api/embed", {"model": "all-minilm", "input": "hi"})
    assert status == 200
    assert sorted(a.status_code for a in answers) == [200, 200, 503, 503], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.json() == {"error": SERVER_BUSY}
    with httpx.Client(base_url=srv.base_url, timeout=30) as http:     # nothing wedged; the idle chat model made room
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == ["all-minilm:latest"]
        assert http.post("/api/generate", json={"model": CHAT, "prompt": "hi", "stream": False}).status_code == 200


def test_a_refused_openai_request_gets_the_503_in_openais_error_shape(server):
    srv = server(max_loaded=1, max_queue=1)
    _, answers = while_busy(srv, 3, "/v1/embeddings", {"model": "all-minilm", "input": "hi"})
    refused = [a for a in answers if a.status_code == 503]
    assert len(refused) == 1 and refused[0].json()["error"]["message"] == SERVER_BUSY


def test_max_loaded_models_one_unloads_the_idle_model_for_the_next(server):
    srv = server(max_loaded=1)
    with httpx.Client(base_url=srv.base_url, timeout=30) as http:
        assert http.post("/api/generate", json={"model": CHAT, "prompt": "hi", "stream": False}).status_code == 200
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [CHAT]
        assert http.post("/api/embed", json={"model": "all-minilm", "input": "hi"}).status_code == 200
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == ["all-minilm:latest"]


def test_the_settings_come_from_ollamas_variables_with_its_defaults(monkeypatch):
    for var in ("OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS", "OLLAMA_MAX_QUEUE"):
        monkeypatch.delenv(var, raising=False)
    defaults = scheduler_settings()
    assert (defaults["num_parallel"], defaults["max_loaded"], defaults["max_queue"]) == (1, 3, 512)
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "4")
    monkeypatch.setenv("OLLAMA_MAX_QUEUE", "7")
    chosen = scheduler_settings()
    assert (chosen["num_parallel"], chosen["max_queue"]) == (4, 7)
    assert scheduler_settings(num_parallel=2)["num_parallel"] == 2      # an explicit value wins


def test_serve_passes_the_server_settings_as_ollama_variables_to_either_server(monkeypatch, tmp_path):
    options = {"num_parallel": 2, "max_queue": 8, "max_loaded_models": 1}
    want = {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_MAX_QUEUE": "8", "OLLAMA_MAX_LOADED_MODELS": "1"}
    monkeypatch.setattr(servers.shutil, "which", lambda name: None)
    argv, env = servers.ollama_command(tmp_path / "m.gguf", "m:latest", "127.0.0.1", 11500, None,
                                       {**options, "num_thread": 1})
    assert env == want and "--num-thread" in argv and "--num-parallel" not in argv
    monkeypatch.setattr(servers.shutil, "which", lambda name: "/usr/bin/ollama")
    argv, env = servers.ollama_command(tmp_path / "m.gguf", "m:latest", "127.0.0.1", 11500, None, options)
    assert argv == ["/usr/bin/ollama", "serve"] and env == {**want, "OLLAMA_HOST": "127.0.0.1:11500"}
    with pytest.raises(ValueError, match="num_thread"):
        servers.ollama_command(tmp_path / "m.gguf", "m:latest", "127.0.0.1", 11500, None, {"num_thread": 1})

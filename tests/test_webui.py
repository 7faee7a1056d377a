"""Open WebUI in front of the lab's servers (labkit.webui; chapter 02, `make webui`).

The settings and refusals are unit tests on fakes; the real Open WebUI (its own environment, .venv-webui,
installed by `make webui` or `WITH_WEBUI=1 make setup`) runs in the `full` tier: its API on the lab's servers,
and a real browser (Playwright + Debian's chromium) chatting through its page.
"""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from labkit import doctor, webui
from labkit.errors import EngineNotInstalledError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- settings (fast)
def test_environment_is_offline_loopback_lab_settings(tmp_path):
    env = webui.environment("http://127.0.0.1:1234/", "http://127.0.0.1:5678", tmp_path, "/models/minilm", "s3cret")
    assert env["OLLAMA_BASE_URL"] == "http://127.0.0.1:1234"            # trailing slash dropped
    assert env["OPENAI_API_BASE_URLS"] == "http://127.0.0.1:5678/v1"
    assert env["OPENAI_API_KEYS"] == "no-key-needed"
    assert env["OFFLINE_MODE"] == "true" and env["HF_HUB_OFFLINE"] == "1"
    assert env["WEBUI_AUTH"] == "False" and env["WEBUI_SECRET_KEY"] == "s3cret"
    assert env["ENABLE_PERSISTENT_CONFIG"] == "False"   # new ports at each start must win over the database
    assert env["DATA_DIR"] == str(tmp_path)
    assert env["RAG_EMBEDDING_MODEL"] == "/models/minilm" and "BYPASS_EMBEDDING_AND_RETRIEVAL" not in env
    assert json.loads(env["DEFAULT_MODEL_PARAMS"]) == {"function_calling": "legacy", "max_tokens": 256}
    assert json.loads(env["TASK_MODEL_PARAMS"]) == {"max_tokens": 48}


def test_environment_turns_off_what_is_not_given(tmp_path):
    env = webui.environment("http://127.0.0.1:1", None, tmp_path, None, "k")
    assert env["ENABLE_OPENAI_API"] == "False" and "OPENAI_API_BASE_URLS" not in env
    assert env["BYPASS_EMBEDDING_AND_RETRIEVAL"] == "True"
    with pytest.raises(ValueError, match="at least one server"):
        webui.environment(None, None, tmp_path, None, "k")


def test_missing_install_says_how_to_install(tmp_path):
    with pytest.raises(EngineNotInstalledError, match="make webui"):
        webui.program(tmp_path / "no-env")
    assert webui.installed_version(tmp_path / "no-env") is None


def test_refuses_to_bind_beyond_loopback_without_a_login(tmp_path):
    fake = tmp_path / "env"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "open-webui").write_text("#!/bin/sh\nexit 1\n")
    with pytest.raises(ValueError, match="loopback only"):
        webui.start("http://127.0.0.1:1", host="0.0.0.0", env=fake, data_dir=tmp_path / "data")


def test_installed_version_read_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "lib" / "python3.11" / "site-packages" / "open_webui-0.12.4.dist-info").mkdir(parents=True)
    assert webui.installed_version(tmp_path) == "0.12.4"
    monkeypatch.setattr(webui, "ENV_LINK", tmp_path)
    row = doctor.webui_check()
    assert row.ok and "0.12.4" in row.detail and not row.required
    monkeypatch.setattr(webui, "ENV_LINK", tmp_path / "absent")
    row = doctor.webui_check()
    assert not row.ok and "make webui" in row.fix and not row.required


# --------------------------------------------------------------------------- the real Open WebUI (full tier)
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Open WebUI on the Ollama-compatible server and llama-server; installs it first (`make test-full` does)."""
    if webui.installed_version() is None:
        subprocess.run(["bash", str(REPO / "scripts" / "setup_webui.sh")], check=True, cwd=REPO)
    data = tmp_path_factory.mktemp("webui-data")
    with webui.start_lab(data_dir=data) as running:
        yield running
    assert not [p for p in running.webui.pids() if _exists(p)]      # nothing left behind


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _chat(api, model: str, text: str, stream: bool):
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
    return api.post("/api/chat/completions", json=body)


@pytest.mark.full
@pytest.mark.engine
def test_api_lists_the_bundled_models_and_answers(lab):
    with webui.client(lab.base_url) as api:
        ids = {m["id"] for m in api.get("/api/models").json()["data"]}
        assert lab.ollama.model in ids          # from the Ollama-compatible server
        assert lab.llama_server.model in ids    # from llama-server, the OpenAI connection
        for model in (lab.ollama.model, lab.llama_server.model):
            reply = _chat(api, model, "Say hello.", stream=False)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"].strip()


@pytest.mark.full
@pytest.mark.engine
def test_background_request_the_server_cannot_serve_is_refused_clearly(lab):
    """Open WebUI's native function calling sends its built-in tools with every chat: to a model without the tools
    capability the lab's server answers 400 and says why (as Ollama does), within seconds; /api/show of a model it
    does not have is a 4xx that names it. Never a 500 or a hang."""
    with webui.client(lab.base_url, timeout=60) as api:
        t0 = time.monotonic()
        shown = api.post("/ollama/api/show", json={"model": "no-such-model:latest"})
        assert 400 <= shown.status_code < 500 and "not found" in shown.text.lower(), shown.text
        tools = [{"type": "function", "function": {"name": "search_chats", "description": "Search the user's chats",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        refused = api.post("/ollama/api/chat", json={"model": lab.ollama.model, "stream": False, "tools": tools,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 400 and "does not support tools" in refused.text, refused.text
        assert time.monotonic() - t0 < 30


@pytest.mark.full
@pytest.mark.engine
def test_chat_in_a_real_browser_streams_stops_and_answers_again(lab):
    if webui.chromium() is None:
        message = "chromium is missing: `make setup` installs it as root on Debian/Ubuntu (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from labkit.webui import chat_in_browser
    shot = REPO / "build" / "webui-chat.png"
    result = chat_in_browser(lab.base_url, lab.ollama.model, shot)
    names = {entry.splitlines()[0] for entry in result.model_list}      # each entry: the name, then its size
    assert {lab.ollama.model, lab.llama_server.model} <= names, result.model_list
    assert len(result.partial_texts) >= 2 and result.partial_texts[0] != result.partial_texts[-1]   # streamed in
    assert result.stopped_text is not None and result.next_reply.strip()
    assert result.next_reply_seconds < 30
    assert shot.exists() and shot.stat().st_size > 10_000

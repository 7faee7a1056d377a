"""labkit.llama_cpp_openai: the OpenAI layer in front of llama-cpp-python's server, against a fake downstream
app (fast), and against the real server with the OpenAI SDK (``engine``; the whole LangChain suite is in
tests/test_langchain_standard.py)."""
import json

import pytest

from labkit import llama_cpp_openai as lco

TOOL_HISTORY = [{"role": "user", "content": "17 + 25?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}


def streamed_call(name="Joke", pieces=('{"to', 'pic": ', '"cats"}')) -> list[dict]:
    """Chunks as llama-cpp-python's server streams a tool call: id, type and name repeated in every delta."""
    call = {"index": 0, "id": "call_0", "type": "function"}
    return [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": None}}]}] + [
        {"choices": [{"index": 0, "delta": {"tool_calls": [{**call, "function": {"name": name, "arguments": p}}]}}]}
        for p in pieces]


def fake_server(received: list, chunks: list[dict] | None = None, split_at: int = 7):
    """Stands for llama-cpp-python's app: records the body it read; answers JSON, or ``chunks`` as server-sent
    events cut into pieces of ``split_at`` bytes (a line may span pieces, as it may on the wire)."""
    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        received.append(json.loads(body) if body.startswith(b"{") else body)
        if chunks is None:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": b'{"ok": true}'})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        wire = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        for i in range(0, len(wire), split_at):
            await send({"type": "http.response.body", "body": wire[i:i + split_at], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return app


def client(app, check=None):
    from starlette.testclient import TestClient
    return TestClient(lco.TranslateOpenAI(app, check=check))


def test_requests_are_translated_to_what_the_server_accepts():
    received = []
    http = client(fake_server(received))
    body = {"model": "m", "messages": TOOL_HISTORY, "max_completion_tokens": 7,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA, "strict": True}}}
    assert http.post("/v1/chat/completions", json=body).json() == {"ok": True}
    sent = received[-1]
    assert sent["messages"][1] == {**TOOL_HISTORY[1], "content": ""} and sent["messages"][2] == TOOL_HISTORY[2]
    assert sent["response_format"] == {"type": "json_object", "schema": SCHEMA} and sent["max_tokens"] == 7
    listed = {"model": "m", "max_tokens": 2, "messages": [
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "any"}}}
    http.post("/v1/chat/completions", json=listed)
    assert received[-1]["messages"][0]["content"] == "ab" and received[-1]["max_tokens"] == 2
    assert received[-1]["response_format"] == {"type": "json_object"}


def test_tool_choice_required_names_the_one_tool_or_is_refused():
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    body = {"messages": [], "tools": [tool], "tool_choice": "required"}
    assert lco.translate_request(body)[0]["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    r = client(fake_server([])).post("/v1/chat/completions", json={**body, "tools": [tool, tool]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.json()
    assert lco.translate_request({**body, "tool_choice": "auto"})[0]["tool_choice"] == "auto"


def test_other_routes_and_bodies_pass_unchanged():
    received = []
    http = client(fake_server(received))
    body = {"model": "m", "prompt": "x", "max_completion_tokens": 3}
    http.post("/v1/completions", json=body)
    assert received[-1] == body
    http.post("/v1/chat/completions", content=b"not json")      # the server's own validation answers that
    assert received[-1] == b"not json"


def test_what_it_cannot_translate_is_a_400_naming_the_field():
    received = []
    http = client(fake_server(received), check=lco.llama_cpp_schema_check)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                "response_format": {"type": "grammar"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type", r.json()
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]", r.json()
    # the server's own schema, asked first: what its route would have answered with a 500
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.json()
    assert "greater than or equal to 0" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages[0]"), r.json()
    assert received == []                                       # none of them reached the server


def test_streamed_tool_calls_name_the_function_once_as_openai_does():
    from labkit.streams import sse_payloads
    for split_at in (1, 7, 10_000):
        http = client(fake_server([], streamed_call(), split_at=split_at))
        with http.stream("POST", "/v1/chat/completions", json={"messages": [], "stream": True}) as r:
            payloads = list(sse_payloads(r.iter_lines()))
        assert payloads[-1] == "[DONE]"
        calls = [c for p in payloads[:-1] for c in json.loads(p)["choices"][0]["delta"].get("tool_calls") or []]
        assert calls[0] == {"index": 0, "id": "call_0", "type": "function", "function": {"name": "Joke", "arguments": '{"to'}}
        assert calls[1:] == [{"index": 0, "function": {"arguments": 'pic": '}}, {"index": 0, "function": {"arguments": '"cats"}'}}]
        assert "".join(c["function"].get("name", "") for c in calls) == "Joke"     # not "JokeJokeJoke"


def test_fields_the_server_ignores_are_named_in_a_header_and_logged(capsys):
    http = client(fake_server([], streamed_call()))
    body = {"messages": [], "stream": True, "n": 2, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.read()
    assert r.headers[lco.IGNORED_HEADER] == "n, stream_options.include_usage"
    assert "ignores n, stream_options.include_usage" in capsys.readouterr().err
    r = client(fake_server([])).post("/v1/chat/completions", json={"messages": [], "n": 1})
    assert lco.IGNORED_HEADER not in r.headers


def test_the_layer_goes_into_llama_cpp_pythons_app(monkeypatch):
    import llama_cpp.server.app as server_app
    from starlette.applications import Starlette
    monkeypatch.setattr(server_app, "create_app", lambda **kw: Starlette())
    lco.install()
    assert server_app.create_app().user_middleware[-1].cls is lco.TranslateOpenAI


def test_serve_can_start_the_server_as_upstream_ships_it(tmp_path):
    from labkit import servers
    argv, env = servers.llama_cpp_python_command(tmp_path / "m.gguf", "m", "127.0.0.1", 1, None, {})
    assert env == {} and "openai_translation" not in " ".join(argv)
    argv, env = servers.llama_cpp_python_command(tmp_path / "m.gguf", "m", "127.0.0.1", 1, None, {"openai_translation": False})
    assert env == {"LABKIT_OPENAI_TRANSLATION": "0"} and "openai_translation" not in " ".join(argv)


@pytest.mark.engine
@pytest.mark.full      # the same paths run in tests/test_conformance.py and chapter 03 in make test
def test_the_openai_sdk_gets_no_500_from_labkit_serve_llama_cpp():
    """What the issue found answered 500 (or misread) upstream, through the OpenAI SDK on the real server."""
    import labkit
    with labkit.serve("llama.cpp", "smollm2", chat_format="chatml-function-calling") as srv:
        sdk = srv.openai(max_retries=0)
        second = sdk.chat.completions.create(model=srv.model, messages=TOOL_HISTORY, max_tokens=8, temperature=0)
        structured = sdk.chat.completions.create(
            model=srv.model, temperature=0, max_completion_tokens=40, messages=[{"role": "user", "content": "A colour, in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
        tool = {"type": "function", "function": {"name": "Joke", "parameters": {
            "type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}}}
        stream = sdk.chat.completions.create(model=srv.model, temperature=0, max_tokens=30, stream=True, tools=[tool],
                                             messages=[{"role": "user", "content": "A joke about cats."}],
                                             tool_choice={"type": "function", "function": {"name": "Joke"}})
        names = [c.function.name for chunk in stream for c in (chunk.choices[0].delta.tool_calls or []) if c.function.name]
    assert second.choices[0].message.content is not None
    assert set(json.loads(structured.choices[0].message.content)) == {"colour"}, structured
    assert names == ["Joke"], names


def test_a_client_that_leaves_before_its_body_reaches_neither_layer_nor_server():
    import asyncio

    from labkit.vision import RefuseMedia
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    for layer in (lco.TranslateOpenAI, RefuseMedia):
        received, sent = [], []
        messages = iter([{"type": "http.request", "body": b'{"messages": [', "more_body": True}, {"type": "http.disconnect"}])

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)
        asyncio.run(layer(fake_server(received))(scope, receive, send))
        assert received == [] and sent == [], (layer, received, sent)     # nothing forwarded, nothing answered

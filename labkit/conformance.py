"""The OpenAI requests real clients send, probed against a server (chapter 03).

"OpenAI-compatible" covers a range. LangChain's ``ChatOpenAI`` and the OpenAI SDK send fields that
a server may refuse, ignore silently, or honour, and an application only finds out when a user
does. :func:`probe` sends each request of :data:`PROBES` over plain HTTP and records what came
back — the status, and whether the reply did what the field asks — so that chapter 03 can put
llama-cpp-python's server and llama.cpp's ``llama-server`` side by side on measured rows:

* ``max_completion_tokens`` — OpenAI's newer name for ``max_tokens`` (``ChatOpenAI`` sends only it);
* ``json_schema`` — ``response_format: {"type": "json_schema", ...}`` (``with_structured_output``);
* ``include_usage`` — ``stream_options: {"include_usage": true}`` (token counts of a stream);
* ``tool history`` — the second turn of every tool loop: an assistant message with
  ``content: null`` and ``tool_calls``, then a ``role: "tool"`` message;
* ``tool_choice required`` — the model must call one of the tools.

Outcomes: ``"honoured"`` (200 and the reply shows it), ``"ignored"`` (200, no effect: the worst
case, silent), ``"ignored, said so"`` (200, no effect, but the response's ``X-Labkit-Ignored-Fields`` header
names what was ignored, as labkit's servers do), ``"refused 4xx"`` (a clear client error), ``"server error 5xx"`` (a validation
problem reported as the server's fault) or ``"no response"`` (the connection closed), each with a
short detail.

>>> classify(200, True), classify(200, False), classify(400, None), classify(500, None)
('honoured', 'ignored', 'refused 4xx', 'server error 5xx')
>>> classify(200, False, said="n, stream_options.include_usage")
'ignored, said so'

"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from .llama_cpp_openai import IGNORED_HEADER
from .streams import sse_payloads

QUESTION = [{"role": "user", "content": "Name one colour. Answer in JSON."}]
ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
COLOUR_SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
                 "additionalProperties": False}


def classify(status: int, effect: bool | None, said: str = "") -> str:
    """The outcome of one probe from its HTTP status and whether the field took effect (``None``: the reply
    cannot tell, e.g. the model stopped before a limit could bite); ``said``: the fields the server named as
    ignored in its response header."""
    if status >= 500:
        return "server error 5xx"
    if status >= 400:
        return "refused 4xx"
    if effect is None:
        return "inconclusive"
    return "honoured" if effect else "ignored, said so" if said else "ignored"


@dataclass(frozen=True)
class Probe:
    """One request and how to tell that its field took effect (``check(reply) -> (effect, detail)``)."""

    name: str
    field: str
    body: dict
    check: Callable[[object], tuple[bool, str]]
    stream: bool = False


def _content(reply: dict) -> str:
    return reply["choices"][0]["message"].get("content") or ""


def _max_completion_tokens(reply):
    used, finish = reply["usage"]["completion_tokens"], reply["choices"][0].get("finish_reason")
    if used < 3 and finish != "length":     # the model stopped by itself: the limit was never tested
        return None, f"{used} completion tokens, finish_reason {finish!r}: the model stopped before the limit of 3"
    return used <= 3, f"{used} completion tokens for a limit of 3"


def _json_schema(reply):
    import jsonschema

    def matches(candidate: str) -> bool:
        try:
            jsonschema.validate(json.loads(candidate), COLOUR_SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    text = _content(reply)
    if matches(text):
        return True, f"valid: {text[:60]}"
    # A grammar fixes the form, not the length: a model that rambles inside a string (a base model) is cut by
    # max_tokens. The schema held if closing the open string and object gives a valid reply.
    if reply["choices"][0].get("finish_reason") == "length" and any(matches(text + end) for end in ('"}', "}")):
        return True, f"valid until max_tokens cut it: {text[:60]!r}"
    return False, f"reply does not match the schema: {text[:60]!r}"


def _include_usage(events):
    usage = [e["usage"] for e in events if e.get("usage")]
    return bool(usage), (f"usage chunk: {usage[-1]}" if usage else f"{len(events)} chunks, none with usage")


def _answered(reply):
    text = _content(reply)
    return True, f"answered: {text[:60]!r}"


def _tool_called(reply):
    calls = reply["choices"][0]["message"].get("tool_calls") or []
    return bool(calls), (f"called {calls[0]['function']['name']}" if calls else f"text instead: {_content(reply)[:50]!r}")


TOOL_HISTORY = [{"role": "user", "content": "What is 17 plus 25?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]

PROBES = [
    Probe("max_completion_tokens", "max_completion_tokens: 3",
          {"messages": QUESTION, "max_completion_tokens": 3}, _max_completion_tokens),
    Probe("json_schema", 'response_format: {"type": "json_schema"}',
          {"messages": QUESTION, "max_tokens": 40, "response_format": {
              "type": "json_schema", "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA, "strict": True}}},
          _json_schema),
    Probe("include_usage", 'stream_options: {"include_usage": true}',
          {"messages": QUESTION, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
          _include_usage, stream=True),
    Probe("tool history", "assistant content: null + tool_calls, then role tool",
          {"messages": TOOL_HISTORY, "tools": [ADD_TOOL], "max_tokens": 8}, _answered),
    Probe("tool_choice required", 'tool_choice: "required"',
          {"messages": [{"role": "user", "content": "What is 17 plus 25?"}], "tools": [ADD_TOOL],
           "tool_choice": "required", "max_tokens": 40}, _tool_called),
]


def _send(client, url: str, probe: Probe, model: str):
    """(status, reply, the fields the server says it ignored)."""
    body = {"model": model, "temperature": 0, **probe.body}
    if not probe.stream:
        r = client.post(url, json=body)
        return r.status_code, (r.json() if r.status_code == 200 else r.text), r.headers.get(IGNORED_HEADER, "")
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text, ""
        events = [json.loads(payload) for payload in sse_payloads(r.iter_lines()) if payload != "[DONE]"]
        return 200, events, r.headers.get(IGNORED_HEADER, "")


def probe(server, probes: list[Probe] = PROBES, *, timeout: float = 120.0) -> list[dict]:
    """Send every probe to ``server`` (a :class:`labkit.Server`, or anything with ``base_url`` and
    ``model``); one row each: probe, field, status, outcome, detail."""
    import httpx
    url = server.base_url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {server.api_key}"} if getattr(server, "api_key", None) else {}
    rows = []
    # a new connection per probe: a kept-alive one the server has meanwhile closed would fail the
    # next POST with "Server disconnected" — the client's race, not the server's answer
    with httpx.Client(timeout=timeout, headers=headers, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for p in probes:
            try:
                status, reply, said = _send(client, url, p, server.model)
            except httpx.TransportError as exc:
                rows.append({"probe": p.name, "field": p.field, "status": None, "outcome": "no response",
                             "detail": f"{type(exc).__name__}: {exc}"})
                continue
            if status == 200:
                try:
                    effect, detail = p.check(reply)
                except (KeyError, IndexError, TypeError) as exc:      # a reply without the expected shape
                    effect, detail = False, f"unexpected reply shape ({type(exc).__name__}: {exc})"
            else:
                effect, detail = None, " ".join(str(reply).split())[:120]
            if said and effect is False:
                detail += f" ({IGNORED_HEADER}: {said})"
            rows.append({"probe": p.name, "field": p.field, "status": status,
                         "outcome": classify(status, effect, said), "detail": detail})
    return rows

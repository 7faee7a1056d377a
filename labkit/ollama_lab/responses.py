"""OpenAI's Responses API (``POST /v1/responses``) as a translator around the native chat handler,
as Ollama serves it (its ``docs/api/openai-compatibility.mdx``: stateless only).

A request becomes an ``/api/chat`` request: ``instructions`` is the system message, ``input`` (a string,
or a list of messages, ``function_call`` and ``function_call_output`` items) the messages,
``max_output_tokens``/``temperature``/``top_p`` the options, ``text.format`` the ``format``,
function ``tools`` the tools and ``reasoning.effort`` the ``think`` value. The answer is a ``response``
object (``output``: a message with ``output_text``, and ``function_call`` items), or with
``"stream": true`` the server-sent events ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta`` ...
``response.completed``. Stateful fields (``previous_response_id``, ``conversation``, ``store``) and
anything else this server cannot honour are a 400 naming the field.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..cancellable import cancellable_stream, drain, in_fresh_thread
from .errors import APIError, error_body
from .inference import Done, Piece, generation
from .native import body_of
from .openai import reasoning_think
from .service import Service

STATEFUL = ("previous_response_id", "conversation")


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of input_text parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{where}: content part {kind!r} is not supported by this text-only model "
                                "(use input_text parts)")
        texts.append(part.get("text", ""))
    return "".join(texts)


def input_messages(body: dict) -> list[dict]:
    """``instructions`` and ``input`` as native chat messages."""
    messages = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": str(body["instructions"])})
    raw = body.get("input")
    if isinstance(raw, str):
        return messages + [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "input is required: a string, or a list of messages")
    names: dict[str, str] = {}
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer")
            messages.append({"role": role, "content": _text_of(item.get("content", ""), where)})
        elif kind == "function_call":
            try:
                args = json.loads(item.get("arguments") or "{}")
            except ValueError:
                raise APIError(400, f"{where}.arguments is not JSON") from None
            call = {"id": item.get("call_id"), "function": {"name": item.get("name"), "arguments": args}}
            names[item.get("call_id")] = item.get("name")
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msg = {"role": "tool", "content": out if isinstance(out, str) else json.dumps(out)}
            if names.get(item.get("call_id")):
                msg["tool_name"] = names[item["call_id"]]
            messages.append(msg)
        else:
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported (messages, function_call "
                                "and function_call_output are)")
    return messages


def native_body(body: dict) -> dict:
    """The ``/api/chat`` body (less messages) of a Responses request; 400 for what cannot be honoured."""
    for key in STATEFUL:
        if body.get(key):
            raise APIError(400, f"{key} is not supported: Ollama's /v1/responses is stateless; send the whole "
                                "conversation in input instead")
    if body.get("store"):
        raise APIError(400, "store: true is not supported: responses are not stored (stateless); send \"store\": false")
    if body.get("truncation") not in (None, "disabled"):
        raise APIError(400, "truncation is not supported (only \"disabled\")")
    if body.get("background"):
        raise APIError(400, "background is not supported: responses run in the foreground")
    options = {"temperature": body["temperature"] if body.get("temperature") is not None else 1.0}
    if body.get("top_p") is not None:
        options["top_p"] = body["top_p"]
    if body.get("max_output_tokens") is not None:
        options["num_predict"] = body["max_output_tokens"]
    out: dict = {"model": body.get("model"), "options": options, "stream": bool(body.get("stream"))}
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["format"] = "json"
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["format"] = fmt.get("schema") or "json"
    tools = body.get("tools") or []
    if tools and body.get("tool_choice") != "none":
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                kind = t.get("type") if isinstance(t, dict) else t
                raise APIError(400, f"tools[{i}]: tool type {kind!r} is not supported (only function tools)")
        out["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                          if k in t}} for t in tools]
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise APIError(400, "tool_choice other than \"auto\" or \"none\" is not supported")
    think = reasoning_think(body)
    if think is not None:
        out["think"] = think
    return out


class ResponseBuilder:
    """The ``response`` object and its stream events, built from :func:`generation` items."""

    def __init__(self, body: dict, model: str):
        self.id = "resp_" + uuid.uuid4().hex
        self.msg_id = "msg_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.body, self.model = body, model
        self.text, self.calls, self.seq = "", [], 0

    def response(self, status: str, final: dict | None = None) -> dict:
        output = []
        if self.text or (status != "in_progress" and not self.calls):
            output.append(self.message("completed" if status != "in_progress" else "in_progress"))
        output += [self.call_item(c) for c in self.calls]
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "error": None, "incomplete_details": None, "instructions": self.body.get("instructions"),
               "max_output_tokens": self.body.get("max_output_tokens"), "model": self.model, "output": output,
               "parallel_tool_calls": True, "temperature": self.body.get("temperature", 1.0),
               "text": {"format": {"type": "text"}}, "tool_choice": self.body.get("tool_choice", "auto"),
               "tools": self.body.get("tools") or [], "top_p": self.body.get("top_p", 1.0),
               "truncation": "disabled", "metadata": {}, "usage": None}
        if final is not None:
            if final["done_reason"] == "length":
                out["status"], out["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
            out["usage"] = {"input_tokens": final["prompt_eval_count"], "output_tokens": final["eval_count"],
                            "total_tokens": final["prompt_eval_count"] + final["eval_count"],
                            "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens_details": {"reasoning_tokens": 0}}
        return out

    def message(self, status: str) -> dict:
        return {"id": self.msg_id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": self.text, "annotations": []}]}

    @staticmethod
    def call_item(call: dict) -> dict:
        return {"id": "fc_" + call["id"], "type": "function_call", "status": "completed", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": json.dumps(call["function"]["arguments"])}

    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def events(self, items: Iterator[Piece | Done]) -> Iterator[dict]:
        """The stream: created, in_progress, the message's text deltas, function calls, completed."""
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))
        opened = False
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        for item in items:
            if isinstance(item, Done):
                yield from self.finished(item, opened, where)
                continue
            if item.text:
                if not opened:
                    opened = True
                    yield self.event("response.output_item.added", output_index=0, item=self.message("in_progress"))
                    yield self.event("response.content_part.added", **where,
                                     part={"type": "output_text", "text": "", "annotations": []})
                self.text += item.text
                yield self.event("response.output_text.delta", **where, delta=item.text, logprobs=[])
            for call in item.tool_calls:
                self.calls.append(call)
                index = len(self.calls) - (0 if opened else 1)
                done = self.call_item(call)
                yield self.event("response.output_item.added", output_index=index, item={**done, "status": "in_progress"})
                yield self.event("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                                 arguments=done["arguments"])
                yield self.event("response.output_item.done", output_index=index, item=done)

    def finished(self, done: Done, opened: bool, where: dict) -> Iterator[dict]:
        """The stream's last events: the message closed (unless the answer was only tool calls), completed."""
        if opened or not self.calls:
            if not opened:
                yield self.event("response.output_item.added", output_index=0, item=self.message("in_progress"))
            yield self.event("response.output_text.done", **where, text=self.text, logprobs=[])
            yield self.event("response.content_part.done", **where,
                             part={"type": "output_text", "text": self.text, "annotations": []})
            yield self.event("response.output_item.done", output_index=0, item=self.message("completed"))
        response = self.response("completed", done.stats)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield self.event(kind, response=response)


def _sse(events: Iterator[dict]) -> Iterator[str]:
    try:
        for ev in events:
            yield f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False)}\n\n"
    except APIError as exc:        # mid-stream: the status line is already sent
        yield f"event: error\ndata: {json.dumps({'type': 'error', **error_body(500, exc.message, openai=True)})}\n\n"
    except Exception as exc:  # noqa: BLE001  (mid-stream: the status line is already sent)
        err = error_body(500, f"{type(exc).__name__}: {exc}", openai=True)
        yield f"event: error\ndata: {json.dumps({'type': 'error', **err})}\n\n"


async def v1_responses(service: Service, request: Request, t0: int):
    """``POST /v1/responses``: the text subset (plus function tools) of OpenAI's Responses API."""
    body = await body_of(request)
    if not body.get("model"):
        raise APIError(400, "model is required")
    manifest = service.store.require(body["model"])
    ob = native_body(body)
    messages = input_messages(body)
    if manifest.system and not any(x["role"] == "system" for x in messages):
        messages = [{"role": "system", "content": manifest.system}] + list(manifest.messages) + messages
    builder = ResponseBuilder(body, manifest.name)
    if ob["stream"]:
        gen = generation(service, "chat", ob, manifest, t0, messages)
        first = await in_fresh_thread(lambda: next(gen, None))    # errors before streaming → status code

        def items():
            if first is not None:
                yield first
            yield from gen
        return cancellable_stream(_sse(builder.events(items())), "text/event-stream", closes=(gen,))
    done = await drain(request, generation(service, "chat", ob, manifest, t0, messages), reduce=lambda events: events[-1])
    builder.text, builder.calls = done.text, done.tool_calls
    return JSONResponse(builder.response("completed", done.stats))

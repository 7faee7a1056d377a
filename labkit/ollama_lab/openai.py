"""The OpenAI-compatible API (``/v1/*``) as a translator around the native service, the way
Ollama's own ``openai`` middleware is: an OpenAI request becomes an Ollama request
(:func:`translate`), runs through the same generation and embeddings as ``/api/*``
(:mod:`.inference`), and the answer is reshaped into OpenAI's objects and server-sent events.
Errors here are OpenAI-shaped (:func:`labkit.ollama_lab.errors.error_body`).
"""
from __future__ import annotations

import base64
import json
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..cancellable import cancellable_stream, drain, in_fresh_thread
from ..llama_cpp_openai import IGNORED_HEADER  # one header name for every labkit server
from .errors import APIError, error_body
from .inference import Done, Piece, embed_vectors, generation
from .native import body_of
from .service import Service
from .store import Manifest
from .tools import normalize_tool_calls
from .types import FinalStats, Usage


def oai_messages(raw: Any) -> list[dict]:
    """OpenAI chat messages as Ollama's: text content parts joined, ``image_url`` parts as ``images`` (which
    the model then refuses or reads, as on ``/api/chat``), ``developer`` read as ``system``,
    assistant ``tool_calls`` (arguments as JSON strings) as objects, a ``tool`` message's
    ``tool_call_id`` resolved to the name of the function it answers (as Ollama's middleware does)."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list")
    out, names = [], {}
    for i, x in enumerate(raw):
        if not isinstance(x, dict):
            raise APIError(400, "each message must be an object")
        content = x.get("content") or ""
        images = []
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(part.get("text", ""))
                elif kind == "image_url":      # Ollama's middleware moves these to the message's images
                    images.append(part.get("image_url"))
                else:
                    raise APIError(400, "only text and image_url content parts are supported by this model")
            content = "".join(texts)
        role = x.get("role")
        if role == "developer":
            role = "system"
        msg = {"role": role, "content": content}
        if images:                             # refused by the model's capabilities, as /api/chat refuses them
            msg["images"] = images
        if x.get("tool_calls"):
            msg["tool_calls"] = normalize_tool_calls(x["tool_calls"], f"messages[{i}]")
            names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if c.get("id")})
        if role == "tool":
            name = x.get("name") or names.get(x.get("tool_call_id"))
            if name:
                msg["tool_name"] = name
        if x.get("reasoning"):
            raise APIError(400, f"messages[{i}].reasoning: this model does not support thinking")
        out.append(msg)
    return out


# Documented OpenAI fields that Ollama's compatibility layer lists as unsupported yet accepts, ignoring them (its
# request types have no such field). A client that sends them must work here as it works against Ollama, so they
# are accepted too; what was ignored is never silent: a response header names it and the server logs it.
IGNORED = {
    "chat": ("logit_bias", "n", "tool_choice", "user"),
    "completion": ("best_of", "echo", "logit_bias", "n", "user"),
}


def ignored_fields(body: dict, kind: str) -> list[str]:
    """The fields of ``body`` that Ollama would ignore and that ask for something other than the default
    (``n``/``best_of`` above 1, ``tool_choice`` other than "auto"/"none" — "none" drops the tools, which is done)."""
    out = []
    for key in IGNORED[kind]:
        value = body.get(key)
        if value in (None, {}, False, "") or (key in ("n", "best_of") and value == 1):
            continue
        if key == "tool_choice" and value in ("auto", "none"):
            continue
        out.append(key)
    return out


def ignored_headers(body: dict, kind: str) -> dict:
    """The response header naming what this request asked for and did not get (empty when nothing), logged too."""
    ignored = ignored_fields(body, kind)
    if not ignored:
        return {}
    print(f"ollama_lab: ignored OpenAI field(s) {', '.join(ignored)} in a {kind} request, as Ollama does "
          f"(header {IGNORED_HEADER})", file=sys.stderr, flush=True)
    return {IGNORED_HEADER: ", ".join(ignored)}


def reasoning_think(body: dict) -> Any:
    """``reasoning_effort`` / ``reasoning.effort`` as Ollama's ``think`` value (Ollama's mapping: none →
    false, minimal → low, xhigh/ultra → max); None when neither is set."""
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    effort = effort if effort is not None else body.get("reasoning_effort")
    if effort in (None, ""):
        return None
    mapping = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "max": "max",
               "xhigh": "max", "ultra": "max"}
    if effort not in mapping:
        raise APIError(400, f"invalid reasoning value: {effort!r} (must be \"minimal\", \"low\", \"medium\", "
                            "\"high\", \"xhigh\", \"ultra\", \"max\", or \"none\")")
    return mapping[effort]


def oai_body(body: dict, fmt_key: str = "response_format") -> dict:
    """An OpenAI request's sampling fields, ``stream`` and ``response_format`` as an Ollama request body."""
    options: dict = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                     ("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty")):
        if body.get(src) is not None:
            options[dst] = body[src]
    n = body.get("max_completion_tokens") or body.get("max_tokens")
    if n is not None:
        options["num_predict"] = n
    stop = body.get("stop")
    if stop:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    out = {"model": body.get("model"), "options": options, "stream": bool(body.get("stream", False))}
    rf = body.get(fmt_key)
    if isinstance(rf, dict):
        if rf.get("type") == "json_object":
            out["format"] = "json"
        elif rf.get("type") == "json_schema":
            out["format"] = (rf.get("json_schema") or {}).get("schema") or "json"
    if body.get("tools") and body.get("tool_choice") != "none":
        out["tools"] = body["tools"]
    return out


def translate(body: dict, manifest: Manifest, kind: str) -> tuple[dict, str, Any]:
    """An OpenAI chat (``kind="chat"``) or completion request as a native one:
    (Ollama body, ``"chat"`` or ``"generate"``, messages or raw prompt)."""
    ob = oai_body(body)
    if kind == "chat":
        payload = oai_messages(body.get("messages"))
        if manifest.system and not any(x["role"] == "system" for x in payload):
            payload = [{"role": "system", "content": manifest.system}] + list(manifest.messages) + payload
        gkind = "chat"
        think = reasoning_think(body)
        if think is not None:
            ob["think"] = think
        if body.get("logprobs") is not None or body.get("top_logprobs") is not None:
            ob["logprobs"], ob["top_logprobs"] = body.get("logprobs"), body.get("top_logprobs")
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise APIError(400, "prompt must be a string (a list of one string is accepted)")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string")
        if body.get("suffix"):
            raise APIError(400, f"\"{manifest.name}\" does not support insert (suffix)")
        n = body.get("logprobs")
        if n is not None and n is not False:        # legacy completions: logprobs is the number of alternatives
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20:
                raise APIError(400, "logprobs must be an integer between 0 and 20 for /v1/completions")
            ob["logprobs"], ob["top_logprobs"] = True, n
        ob["raw"] = True
        payload = prompt
        gkind = "generate"
    if "temperature" not in ob["options"]:
        ob["options"]["temperature"] = 1.0            # the OpenAI default, which Ollama's /v1 also uses
    return ob, gkind, payload


def usage(final: FinalStats) -> Usage:
    """Ollama's final counts as OpenAI's ``usage``."""
    return Usage(prompt_tokens=final["prompt_eval_count"], completion_tokens=final["eval_count"],
                 total_tokens=final["prompt_eval_count"] + final["eval_count"])


def finish(final: dict, tool_calls: bool = False) -> str:
    if final["done_reason"] == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def oai_tool_calls(calls: list[dict]) -> list[dict]:
    """Ollama's ``tool_calls`` as OpenAI's (arguments as a JSON string)."""
    return [{"id": c["id"], "index": c["function"]["index"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
            for c in calls]


def choice_logprobs(kind: str, entries: list[dict], offset: int = 0) -> dict:
    """Ollama's logprob entries as OpenAI's: ``{"content": [...]}`` for chat (the same fields), the
    legacy ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset`` lists for completions."""
    if kind == "chat":
        return {"content": [{**e, "top_logprobs": e.get("top_logprobs", [])} for e in entries]}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
            "text_offset": offsets}


def chunk_choice(kind: str, piece: Piece, offset: int) -> dict:
    """The choice of one streamed chunk: a content (or text) delta, tool calls, logprobs."""
    if kind == "chat":
        delta: dict = {"content": piece.text}
        if piece.tool_calls:
            delta["tool_calls"] = oai_tool_calls(piece.tool_calls)
        choice = {"index": 0, "delta": delta, "finish_reason": None}
    else:
        choice = {"index": 0, "text": piece.text, "finish_reason": None}
    if piece.logprobs:
        choice["logprobs"] = choice_logprobs(kind, piece.logprobs, offset)
    return choice


def events(kind: str, cid: str, created: int, obj: str, model: str, include_usage: bool,
           first: Piece | Done | None, gen: Iterator[Piece | Done]) -> Iterator[dict]:
    """The streamed chunks of a completion: ``first`` and the rest of ``gen``, as OpenAI's objects
    (a role-only chunk first for chat, a usage chunk last if asked); an error is a last chunk."""
    head = {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created, "model": model,
            "system_fingerprint": "fp_labkit"}
    try:
        if kind == "chat":
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        chunks = ([first] if first is not None else [])
        offset, called = 0, False
        for event in _chain(chunks, gen):
            if isinstance(event, Piece):
                called = called or bool(event.tool_calls)
                yield {**head, "choices": [chunk_choice(kind, event, offset)]}
                offset += len(event.text)
                continue
            final = event.stats
            choice = ({"index": 0, "delta": {}, "finish_reason": finish(final, called)} if kind == "chat"
                      else {"index": 0, "text": "", "finish_reason": finish(final)})
            yield {**head, "choices": [choice]}
            if include_usage:
                yield {**head, "choices": [], "usage": usage(final)}
    except APIError as exc:       # mid-stream: the status line is already sent
        yield error_body(500, exc.message, openai=True)
    except Exception as exc:  # noqa: BLE001  (mid-stream: the status line is already sent)
        yield error_body(500, f"{type(exc).__name__}: {exc}", openai=True)


def sse(items: Iterator[dict]) -> Iterator[str]:
    """Server-sent events, ending with OpenAI's ``data: [DONE]``."""
    for ev in items:
        yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


async def oai_generate(service: Service, request: Request, t0: int, kind: str):
    """``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions``, through the native generation."""
    body = await body_of(request)
    if not body.get("model"):
        raise APIError(400, "model is required")
    manifest = service.store.require(body["model"])
    ob, gkind, payload = translate(body, manifest, kind)
    cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    headers = ignored_headers(body, kind)

    if ob["stream"]:
        gen = generation(service, gkind, ob, manifest, t0, payload)
        first = await in_fresh_thread(lambda: next(gen, None))
        items = events(kind, cid, created, obj, manifest.name, include_usage, first, gen)
        return cancellable_stream(sse(items), "text/event-stream", closes=(gen,), headers=headers)

    done = await drain(request, generation(service, gkind, ob, manifest, t0, payload),
                       reduce=lambda events: events[-1])
    final = done.stats
    if kind == "chat":
        message = {"role": "assistant", "content": done.text}
        if done.tool_calls:
            message["tool_calls"] = oai_tool_calls(done.tool_calls)
        choice = {"index": 0, "message": message, "finish_reason": finish(final, bool(done.tool_calls))}
    else:
        choice = {"index": 0, "text": done.text, "finish_reason": finish(final)}
    if done.logprobs is not None:
        choice["logprobs"] = choice_logprobs(kind, done.logprobs)
    return JSONResponse({"id": cid, "object": obj, "created": created, "model": manifest.name,
                         "system_fingerprint": "fp_labkit", "choices": [choice], "usage": usage(final)},
                        headers=headers)


async def v1_chat(service: Service, request: Request, t0: int):
    return await oai_generate(service, request, t0, "chat")


async def v1_completions(service: Service, request: Request, t0: int):
    return await oai_generate(service, request, t0, "completion")


async def v1_embeddings(service: Service, request: Request, t0: int):
    body = await body_of(request)
    if not body.get("model"):
        raise APIError(400, "model is required")
    manifest = service.store.require(body["model"])
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = raw
    else:
        raise APIError(400, "invalid input: a string or a non-empty list of strings")
    dims = body.get("dimensions")
    vecs, n, _ = await in_fresh_thread(embed_vectors, service, manifest, inputs, {}, normalize=True,
                                         truncate=True, dims=dims if isinstance(dims, int) and dims > 0 else None)
    b64 = body.get("encoding_format") == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else v}
            for i, v in enumerate(vecs)]
    return JSONResponse({"object": "list", "data": data, "model": manifest.name,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})


def v1_model(m: Manifest) -> dict:
    return {"id": m.name, "object": "model", "created": m.modified_ns // 1_000_000_000, "owned_by": "library"}


async def v1_models(service: Service, request: Request, t0: int):
    return JSONResponse({"object": "list", "data": [v1_model(m) for m in service.store.all()]})


async def v1_model_one(service: Service, request: Request, t0: int):
    return JSONResponse(v1_model(service.store.require(request.path_params["model"])))

"""The OpenAI-compatible API (``/v1/*``) as a translator around the native service, the way
Ollama's own ``openai`` middleware is: an OpenAI request becomes an Ollama request
(:func:`translate`), runs through the same generation and embeddings as ``/api/*``
(:mod:`.inference`), and the answer is reshaped into OpenAI's objects and server-sent events.
Errors here are OpenAI-shaped (:func:`labkit.ollama_compat.errors.error_body`).
"""
from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..cancellable import cancellable_stream, drain
from .errors import APIError, error_body
from .inference import embed_vectors, generation
from .native import body_of
from .service import Service
from .store import Manifest


def oai_messages(raw: Any) -> list[dict]:
    """OpenAI chat messages as Ollama's: text content parts joined, ``developer`` read as ``system``."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list")
    out = []
    for x in raw:
        if not isinstance(x, dict):
            raise APIError(400, "each message must be an object")
        content = x.get("content") or ""
        if isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    texts.append(part.get("text", ""))
                else:
                    raise APIError(400, "only text content parts are supported by this model")
            content = "".join(texts)
        role = x.get("role")
        if role == "developer":
            role = "system"
        out.append({"role": role, "content": content})
    return out


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
    if body.get("tools"):
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
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise APIError(400, "prompt must be a string (a list of one string is accepted)")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string")
        ob["raw"] = True
        payload = prompt
        gkind = "generate"
    if "temperature" not in ob["options"]:
        ob["options"]["temperature"] = 1.0            # the OpenAI default, which Ollama's /v1 also uses
    return ob, gkind, payload


def usage(final: dict) -> dict:
    return {"prompt_tokens": final["prompt_eval_count"], "completion_tokens": final["eval_count"],
            "total_tokens": final["prompt_eval_count"] + final["eval_count"]}


def finish(final: dict) -> str:
    return "length" if final["done_reason"] == "length" else "stop"


def events(kind: str, cid: str, created: int, obj: str, model: str, include_usage: bool,
           first: dict | None, gen: Iterator[dict]) -> Iterator[dict]:
    """The streamed chunks of a completion: ``first`` and the rest of ``gen``, as OpenAI's objects
    (a role-only chunk first for chat, a usage chunk last if asked); an error is a last chunk."""
    try:
        if kind == "chat":
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "fp_labkit",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None}]}
        chunks = ([first] if first is not None else [])
        for chunk in _chain(chunks, gen):
            if "piece" in chunk:
                choice = ({"index": 0, "delta": {"content": chunk["piece"]}, "finish_reason": None}
                          if kind == "chat" else {"index": 0, "text": chunk["piece"], "finish_reason": None})
                yield {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                       "model": model, "system_fingerprint": "fp_labkit", "choices": [choice]}
            else:
                final = chunk["final"]
                choice = ({"index": 0, "delta": {}, "finish_reason": finish(final)} if kind == "chat"
                          else {"index": 0, "text": "", "finish_reason": finish(final)})
                yield {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                       "model": model, "system_fingerprint": "fp_labkit", "choices": [choice]}
                if include_usage:
                    yield {"id": cid, "object": obj + (".chunk" if kind == "chat" else ""),
                           "created": created, "model": model, "system_fingerprint": "fp_labkit",
                           "choices": [], "usage": usage(final)}
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

    if ob["stream"]:
        gen = generation(service, gkind, ob, manifest, t0, payload)
        first = await run_in_threadpool(lambda: next(gen, None))
        items = events(kind, cid, created, obj, manifest.name, include_usage, first, gen)
        return cancellable_stream(sse(items), "text/event-stream", closes=(gen,))

    last = await drain(request, generation(service, gkind, ob, manifest, t0, payload),
                       reduce=lambda chunks: chunks[-1])
    text, final = last["text"], last["final"]
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(final)}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish(final)}
    return JSONResponse({"id": cid, "object": obj, "created": created, "model": manifest.name,
                         "system_fingerprint": "fp_labkit", "choices": [choice], "usage": usage(final)})


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
    vecs, n, _ = await run_in_threadpool(embed_vectors, service, manifest, inputs, {}, normalize=True,
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

"""Ollama's native API (``/api/*``, ``/``) over HTTP: read the request, call the service, shape
the answer as Ollama's ``docs/api.md`` documents it (NDJSON streams by default).

Every handler is ``async def handler(service, request, t0)``; :func:`labkit.ollama_lab.app.build_app`
wires them to routes and maps the :class:`APIError` they raise to ``{"error": ...}`` responses.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Iterator

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .. import modelfile as mf
from ..cancellable import cancellable_stream, drain, in_fresh_thread
from .create import execute_create, plan_create
from .errors import APIError, error_body, not_found
from .inference import Done, Piece, embed_vectors, generation, load_or_unload
from .names import normalize_name, now_rfc3339
from .service import Service
from .settings import VERSION
from .store import Manifest
from .tools import normalize_tool_calls
from .types import ChatResponse, EmbedResponse, GenerateResponse, Kind, RunningModel, ShowResponse


async def body_of(request: Request) -> dict:
    """The request's JSON object (``{}`` for an empty body); 400 for anything else."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def stream_flag(body: dict) -> bool:
    """Ollama streams unless ``"stream": false``."""
    s = body.get("stream", True)
    return True if s is None else bool(s)


def ndjson(gen: Iterator[dict], closes: tuple[Iterator, ...] = ()) -> StreamingResponse:
    """NDJSON lines; ``gen`` (and ``closes``) are stopped and closed if the client goes away."""
    def lines():
        try:
            for obj in gen:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        except APIError as exc:
            yield json.dumps(error_body(exc.status, exc.message)) + "\n"
        except Exception as exc:  # noqa: BLE001  (mid-stream: the status line is already sent)
            yield json.dumps(error_body(500, f"{type(exc).__name__}: {exc}")) + "\n"
    return cancellable_stream(lines(), "application/x-ndjson", closes)


def shaped(kind: Kind, name: str, event: Piece | Done, streamed: bool) -> GenerateResponse | ChatResponse:
    """A :func:`generation` event as Ollama's generate/chat object (the final one carries the stats)."""
    final = isinstance(event, Done)
    text = ("" if streamed else event.text) if final else event.text
    out = {"model": name, "created_at": now_rfc3339()}
    if kind == "generate":
        out["response"] = text
    else:
        out["message"] = {"role": "assistant", "content": text}
        if event.tool_calls and not (final and streamed):
            out["message"]["tool_calls"] = event.tool_calls
    out["done"] = final
    if not final:
        if event.logprobs:
            out["logprobs"] = event.logprobs
        return out
    out.update(event.stats)
    if kind == "generate" and "context" in out:      # documented order: context after done
        ctx = out.pop("context")
        out = {**{k: out[k] for k in ("model", "created_at", "response", "done", "done_reason")},
               "context": ctx, **{k: v for k, v in out.items() if k not in
                                   ("model", "created_at", "response", "done", "done_reason")}}
    if event.logprobs is not None and not streamed:
        out["logprobs"] = event.logprobs
    return out


async def respond(service: Service, request: Request, kind: Kind, body: dict, manifest: Manifest, t0: int,
                  payload):
    """A generate/chat answer: streamed as NDJSON, or one JSON object with ``"stream": false``."""
    name = manifest.name
    if stream_flag(body):
        gen = generation(service, kind, body, manifest, t0, payload)
        first = await in_fresh_thread(lambda: next(gen, None))   # errors before streaming → status code

        def rest():
            if first is not None:
                yield shaped(kind, name, first, True)
            for chunk in gen:
                yield shaped(kind, name, chunk, True)
        return ndjson(rest(), closes=(gen,))

    last = await drain(request, generation(service, kind, body, manifest, t0, payload), reduce=lambda chunks: chunks[-1])
    return JSONResponse(shaped(kind, name, last, False))


# ---------------------------------------------------------------- /api routes
async def root(service: Service, request: Request, t0: int):
    return PlainTextResponse("Ollama is running")


async def version(service: Service, request: Request, t0: int):
    return JSONResponse({"version": VERSION})


async def generate(service: Service, request: Request, t0: int):
    body = await body_of(request)
    manifest = service.store.require(body.get("model"))
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string")
    if body.get("suffix"):
        raise APIError(400, f"\"{manifest.name}\" does not support insert (suffix)")
    if not prompt and not body.get("context"):
        return JSONResponse(await in_fresh_thread(load_or_unload, service, "generate", body, manifest))
    return await respond(service, request, "generate", body, manifest, t0, prompt or "")


async def chat(service: Service, request: Request, t0: int):
    body = await body_of(request)
    manifest = service.store.require(body.get("model"))
    messages = body.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list) or not all(isinstance(x, dict) for x in messages):
        raise APIError(400, "messages must be a list of {\"role\": ..., \"content\": ...} objects")
    if not messages:
        return JSONResponse(await in_fresh_thread(load_or_unload, service, "chat", body, manifest))
    clean = [chat_message(x, i) for i, x in enumerate(messages)]
    history = list(manifest.messages)
    if manifest.system and not any(x["role"] == "system" for x in clean + history):
        history = [{"role": "system", "content": manifest.system}] + history
    return await respond(service, request, "chat", body, manifest, t0, history + clean)


def chat_message(x: dict, i: int) -> dict:
    """A checked ``/api/chat`` message: role, content, and the tool fields (``tool_calls`` of an
    assistant, ``tool_name`` of a tool result) that the template renders."""
    role = x.get("role")
    if role not in ("system", "user", "assistant", "tool"):
        raise APIError(400, f"invalid message role {role!r}: use system, user, assistant or tool")
    content = x.get("content") or ""
    if not isinstance(content, str):
        raise APIError(400, "message content must be a string")
    msg = {"role": role, "content": content}
    if x.get("tool_calls"):
        msg["tool_calls"] = normalize_tool_calls(x["tool_calls"], f"messages[{i}]")
    if x.get("tool_name"):
        msg["tool_name"] = str(x["tool_name"])
    if x.get("thinking"):
        raise APIError(400, f"messages[{i}].thinking: this model does not support thinking, so its template "
                            "cannot show a thinking trace; drop the field or put the text in content")
    return msg


async def embed(service: Service, request: Request, t0: int):
    body = await body_of(request)
    manifest = service.store.require(body.get("model"))
    raw = body.get("input", "")
    if isinstance(raw, str):
        inputs = [raw] if raw else []
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        inputs = raw
    else:
        raise APIError(400, "invalid input type: input must be a string or a list of strings")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or dims <= 0):
        raise APIError(400, "dimensions must be a positive integer")
    truncate = body.get("truncate", True) is not False
    vecs, n, load_ns = await in_fresh_thread(embed_vectors, service, manifest, inputs, body, normalize=True,
                                               truncate=truncate, dims=dims)
    return JSONResponse(EmbedResponse(model=manifest.name, embeddings=vecs, total_duration=time.perf_counter_ns() - t0,
                                      load_duration=load_ns, prompt_eval_count=n))


async def embeddings_legacy(service: Service, request: Request, t0: int):
    body = await body_of(request)
    manifest = service.store.require(body.get("model"))
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string")
    if not prompt:
        return JSONResponse({"embedding": []})
    vecs, _, _ = await in_fresh_thread(embed_vectors, service, manifest, [prompt], body, normalize=False,
                                         truncate=True, dims=None)
    return JSONResponse({"embedding": vecs[0]})


async def tags(service: Service, request: Request, t0: int):
    return JSONResponse({"models": [service.entry(m) for m in service.store.all()]})


async def show(service: Service, request: Request, t0: int):
    body = await body_of(request)
    m = service.store.require(body.get("model") or body.get("name"))
    out: ShowResponse = {"modelfile": service.modelfile_text(m),
           "parameters": mf.format_parameters(m.parameters),
           "template": service.chat_template(m)}
    if m.system is not None:
        out["system"] = m.system
    if m.license:
        out["license"] = "\n".join(m.license)
    if m.messages:
        out["messages"] = m.messages
    out.update(details=service.details(m), model_info=service.model_info(m, bool(body.get("verbose"))),
               capabilities=service.capabilities(m), modified_at=now_rfc3339(m.modified_ns, utc=False))
    return JSONResponse(out)


async def ps(service: Service, request: Request, t0: int):
    rows = []
    for lm in service.sched.snapshot():
        m = lm.manifest
        size = m.size
        if m.kind == "gguf":
            try:
                from ..memory import from_gguf
                size += int(from_gguf(m.path).kv_cache_bytes(lm.n_ctx)) * max(1, lm.created)
            except Exception:  # noqa: BLE001, S110  (the size without the KV cache is still an answer)
                pass
        expires = lm.expires_at if lm.expires_at != math.inf else time.time() + 10 * 365 * 86400 * 30
        row = RunningModel(name=m.name, model=m.name, size=size, digest=m.digest, details=service.details(m),
                           expires_at=now_rfc3339(int(expires * 1e9), utc=False), size_vram=0)
        if lm.n_ctx:
            row["context_length"] = lm.n_ctx
        rows.append(row)
    return JSONResponse({"models": rows})


async def copy(service: Service, request: Request, t0: int):
    body = await body_of(request)
    if not body.get("source") or not body.get("destination"):
        raise APIError(400, "source and destination are required")
    src = service.store.require(body["source"])
    dst = normalize_name(body["destination"], field_name="destination")
    service.store.put(Manifest(**{**src.to_json(), "name": dst, "builtin": False}))
    return Response(status_code=200)


async def delete(service: Service, request: Request, t0: int):
    body = await body_of(request)
    name = normalize_name(body.get("model") or body.get("name"))
    gone = service.store.get(name)
    if gone is None:
        raise not_found(body.get("model") or body.get("name"))
    if not any(m.runner_key == gone.runner_key and m.name != name for m in service.store.all()):
        service.sched.unload(gone.runner_key)    # nothing else uses these weights
    service.store.delete(name)
    return Response(status_code=200)


async def pull(service: Service, request: Request, t0: int):
    body = await body_of(request)
    name = normalize_name(body.get("model") or body.get("name"))
    local = service.store.get(name)
    if local is not None:
        steps = [{"status": "pulling manifest"}, {"status": f"{name} is already local (labkit's server "
                                                              "never downloads)"}, {"status": "success"}]
        return ndjson(iter(steps)) if stream_flag(body) else JSONResponse({"status": "success"})
    message = (f"pull model manifest: cannot download '{name}': labkit's Ollama-compatible server works "
               "offline and only serves models already in its store (see GET /api/tags). Create one from a "
               "local GGUF with POST /api/create, or use a real Ollama with network access to pull.")
    if stream_flag(body):
        return ndjson(iter([{"status": "pulling manifest"}, error_body(500, message)]))
    raise APIError(500, message)


async def push(service: Service, request: Request, t0: int):
    body = await body_of(request)
    service.store.require(body.get("model") or body.get("name"))
    raise APIError(500, "push needs network access and an ollama.com account; labkit's server cannot push")


async def blob(service: Service, request: Request, t0: int):
    path = service.store.blob_path(request.path_params["digest"])
    if request.method == "HEAD":
        return Response(status_code=200 if path.exists() else 404)
    expected = path.name.split("-", 1)[1]
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:  # noqa: ASYNC230  (local disk writes between network reads, as before)
        async for chunk in request.stream():
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise APIError(400, f"digest mismatch, expected \"sha256:{expected}\", got \"sha256:{digest.hexdigest()}\"")
    os.replace(tmp, path)
    return Response(status_code=201)


async def create(service: Service, request: Request, t0: int):
    body = await body_of(request)
    plan = await in_fresh_thread(plan_create, service, body)
    if stream_flag(body):
        return ndjson(execute_create(service, plan))

    def whole():
        for _ in execute_create(service, plan):
            pass
        return {"status": "success"}
    return JSONResponse(await in_fresh_thread(whole))


async def page_not_found(request: Request, exc) -> PlainTextResponse:
    """Unknown paths answer as Ollama's Go server does."""
    return PlainTextResponse("404 page not found", status_code=404)


async def method_not_allowed(request: Request, exc) -> PlainTextResponse:
    return PlainTextResponse("405 method not allowed", status_code=405)

"""Generation and embeddings for one request, shared by the native ``/api/*`` handlers and the
OpenAI translator (``/v1/*``). No HTTP here: these take the service and the request body and
reserve a model from the scheduler for as long as they run.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError
from .names import now_rfc3339
from .service import Service
from .settings import parse_duration
from .store import Manifest
from .tools import ToolCallParser, call_objects, normalize_tools
from .types import ChatResponse, DoneStats, GenerateResponse, Kind


@dataclass
class Piece:
    """Part of an answer as it is generated: its text, the tool calls completed in it, and the
    log-probabilities of its tokens (when the request asked for them)."""
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class Done:
    """The end of an answer: Ollama's final fields (``done_reason``, counts, durations in ns, and
    ``context`` for ``/api/generate``), the whole text, every tool call, and every token's
    log-probability — ``None`` when the request did not ask for them."""
    stats: DoneStats
    text: str
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] | None = None


def prepare(service: Service, body: dict, manifest: Manifest, messages: list | None = None) -> tuple[dict, Any, float]:
    """The options, grammar and keep-alive of a generate/chat request; 400 for what this model cannot do.
    ``messages``: the chat's messages where ``body`` does not hold them (an OpenAI request, translated)."""
    if manifest.kind != "gguf":
        raise APIError(400, f"\"{manifest.name}\" does not support generate")
    messages = [*(body.get("messages") or []), *(messages or [])]
    if body.get("images") or any(isinstance(x, dict) and x.get("images") for x in messages):
        # Ollama's own wording for a missing capability ("%q does not support ...", server/routes.go) with its
        # app's words for this one ("This model does not support images"); Ollama's server itself checks no
        # capability for images and leaves them to the runner
        raise APIError(400, f"\"{manifest.name}\" does not support images (it is a text-only model)")
    if body.get("tools") and not service.supports_tools(manifest):
        raise APIError(400, f"\"{manifest.name}\" does not support tools")
    if body.get("think") not in (None, False):
        raise APIError(400, f"\"{manifest.name}\" does not support thinking")
    opts = service.options(body, manifest)
    grammar = service.grammar_for(body.get("format"))
    keep_alive = parse_duration(body.get("keep_alive"), default=service.sched.default_keep_alive)
    return opts, grammar, keep_alive


def logprob_request(body: dict) -> int | None:
    """How many alternatives a request wants per token (``top_logprobs``), or None without ``logprobs``."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want not in (None, True, False):
        raise APIError(400, "logprobs must be true or false")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise APIError(400, "top_logprobs must be between 0 and 20")
    if top and not want:
        raise APIError(400, "top_logprobs needs \"logprobs\": true (it is the number of alternatives per "
                            "returned token)")
    return int(top or 0) if want else None


def generation(service: Service, kind: Kind, body: dict, manifest: Manifest, t0: int,
               messages_or_prompt) -> Iterator[Piece | Done]:
    """Generate for ``/api/generate`` (``kind="generate"``) or ``/api/chat``: :class:`Piece` events,
    then one :class:`Done`. The model is held until the generator is closed."""
    sched = service.sched
    opts, grammar, keep_alive = prepare(service, body, manifest, messages_or_prompt if kind == "chat" else None)
    top = logprob_request(body)
    tools = normalize_tools(body["tools"]) if body.get("tools") else None
    lm, inst, load_ns = sched.acquire(manifest, opts)
    try:
        tokens = _prompt_tokens(service, kind, body, manifest, lm, inst, messages_or_prompt, tools)
        parser = ToolCallParser(service.tool_tag(manifest), [t["function"]["name"] for t in tools]) if tools else None
        stats: dict = {}
        texts, calls, logprobs = [], [], []
        run_args = {"top_logprobs": top} if top is not None else {}
        for piece in _pieces(service.run(inst, tokens, opts, grammar, stats, **run_args), parser, stats, calls):
            if piece.text or piece.tool_calls or piece.logprobs:
                texts.append(piece.text)
                logprobs.extend(piece.logprobs)
                yield piece
        final = {"done_reason": stats["done_reason"],
                 "total_duration": time.perf_counter_ns() - t0, "load_duration": load_ns,
                 "prompt_eval_count": stats["prompt_eval_count"],
                 "prompt_eval_duration": stats["prompt_eval_duration"],
                 "eval_count": stats["eval_count"], "eval_duration": stats["eval_duration"]}
        if kind == "generate" and not body.get("raw"):
            final["context"] = stats["context"]
        yield Done(final, "".join(texts), calls, logprobs if top is not None else None)
    finally:
        sched.release(lm, inst, keep_alive)


def _prompt_tokens(service: Service, kind: Kind, body: dict, manifest: Manifest, lm, inst, messages_or_prompt,
                   tools: list | None) -> list[int]:
    """The prompt's tokens: raw, or through the template (with the request's tools), after any ``context``."""
    if kind == "generate":
        if body.get("raw"):
            text = messages_or_prompt
        else:
            system = body.get("system") if body.get("system") is not None else manifest.system
            msgs = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": messages_or_prompt}]
            text = service.build_prompt(lm, inst, msgs, body.get("template") or manifest.template)
    else:
        text = service.build_prompt(lm, inst, messages_or_prompt, manifest.template, tools)
    tokens = inst.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    if kind == "generate" and isinstance(body.get("context"), list) and body["context"]:
        tokens = [int(t) for t in body["context"]] + tokens
    return tokens


def _pieces(texts: Iterator[str], parser: ToolCallParser | None, stats: dict, calls: list) -> Iterator[Piece]:
    """A :class:`Piece` for each text the model yields, then one for what the tool-call parser held back."""
    for text in texts:
        yield _piece(text, parser, stats, calls)
    found, rest = parser.finish() if parser else ([], "")
    yield _piece(rest, None, stats, calls, found)


def _piece(text: str, parser: ToolCallParser | None, stats: dict, calls: list, found: list | None = None) -> Piece:
    """The content of ``text`` (tool-call markup removed), the calls completed so far, its tokens' logprobs."""
    found = list(found or [])
    if parser is not None:
        more, text = parser.add(text)
        found += more
    piece = Piece(text)
    if found:
        piece.tool_calls = call_objects(found, start=len(calls))
        calls.extend(piece.tool_calls)
    if stats.get("logprobs"):
        piece.logprobs = stats.pop("logprobs")
    return piece


def load_or_unload(service: Service, kind: Kind, body: dict, manifest: Manifest) -> GenerateResponse | ChatResponse:
    """A generate/chat request without a prompt or messages: load the model (or unload it with keep_alive 0)."""
    sched = service.sched
    keep_alive = parse_duration(body.get("keep_alive"), default=sched.default_keep_alive)
    out = {"model": manifest.name, "created_at": now_rfc3339()}
    if kind == "generate":
        out["response"] = ""
    else:
        out["message"] = {"role": "assistant", "content": ""}
    if keep_alive == 0:
        sched.unload(manifest.runner_key)
        out.update(done_reason="unload", done=True)
    else:
        if manifest.kind != "gguf":
            raise APIError(400, f"\"{manifest.name}\" does not support {kind}")
        sched.load_only(manifest, service.options(body, manifest), keep_alive)
        out["done"] = True
        if kind == "chat":
            out = {**out, "done_reason": "load", "done": True}
    return out


def embed_vectors(service: Service, manifest: Manifest, inputs: list[str], body: dict, *, normalize: bool,
                  truncate: bool, dims: int | None) -> tuple[list, int, int]:
    """(vectors, tokens read, load nanoseconds) for ``inputs``, cut to ``dims`` and L2-normalised if asked."""
    sched = service.sched
    opts = service.options(body, manifest)
    keep_alive = parse_duration(body.get("keep_alive"), default=sched.default_keep_alive)
    lm, inst, load_ns = sched.acquire(manifest, opts)
    try:
        if manifest.kind == "sentence-transformers":
            limit = inst.max_seq_length
            counts = [len(inst.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in inputs]
            if not truncate and any(c > limit for c in counts):
                raise APIError(400, f"input length exceeds the context length ({max(counts)} > {limit} tokens)")
            vecs = inst.encode(inputs, normalize_embeddings=False, convert_to_numpy=True).tolist() if inputs else []
            n_tokens = sum(min(c, limit) for c in counts)
        else:
            if lm.embedder is None:
                lm.embedder = sched.engine(manifest, lm.runner_opts, embedding=True)
            vecs, n_tokens = [], 0
            for t in inputs:
                toks = lm.embedder.tokenize(t.encode(), add_bos=True, special=False)
                if len(toks) > lm.embedder.n_ctx():
                    if not truncate:
                        raise APIError(400, f"input length exceeds the context length ({len(toks)} > "
                                            f"{lm.embedder.n_ctx()} tokens)")
                    toks = toks[:lm.embedder.n_ctx()]
                    t = lm.embedder.detokenize(toks).decode("utf-8", "replace")
                n_tokens += len(toks)
                vecs.append(lm.embedder.embed(t, normalize=False))
    finally:
        sched.release(lm, inst, keep_alive)
    out = []
    for v in vecs:
        if dims:
            v = v[:dims]
        if normalize:
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            v = [x / norm for x in v]
        out.append(v)
    return out, n_tokens, load_ns

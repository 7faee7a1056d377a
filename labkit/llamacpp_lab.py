"""llama.cpp through llama-cpp-python, measured (chapter 03).

Each helper does one thing the chapter would otherwise repeat, with the edge cases handled:

* :func:`load` — load a ``Llama`` and measure what it cost (seconds, resident memory added).
* :func:`thread_sweep` — prefill and decode speed at several thread counts (llama.cpp's own
  counters, medians of repeats). ``n_threads`` only drives single-token decoding; prompt
  batches use ``n_threads_batch``, which llama-cpp-python defaults to *all* CPUs — so the
  sweep sets both.
* :func:`token_pieces` — what the tokenizer did to a text (ids, byte pieces).
* :func:`chat_template` / :func:`render_chat` — the template stored in the GGUF, rendered the
  way llama-cpp-python renders it (jinja2, with the file's BOS/EOS strings); :func:`chat_prompt` —
  the prompt a chat request really becomes (the fallback format when the GGUF has no template);
  :func:`use_chat_template` — chat with a template the GGUF lacks (a base model's, chapter 10).
* :func:`as_request` / :func:`create` / :func:`generate` / :func:`server_create` — one request for
  chat models (messages) and base models (a plain-text prompt: they continue text).
* :func:`sampling_table` / :func:`greedy_runs` — fixed-seed comparisons and greedy determinism.
* :func:`timed_stream` — a streaming timer (TTFT, inter-token latency, tokens/s) for chunks from
  llama-cpp-python *or* the OpenAI SDK, from :mod:`labkit.streams`; it returns its
  :class:`~labkit.streams.RequestTiming`, the type chapter 06's benchmark harness uses.
* :func:`perf` / :func:`time_llama` / :func:`run_llama` — llama.cpp's own counters, and timed in-process
  completions (chapter 06's harness re-exports them as ``bench.llama_perf``, ``bench.run_llama``).
* :func:`schema_grammar` / :func:`validate_json` — JSON schema → GBNF, and structural validation.
* :func:`embed` / :func:`retrieval_scores` — sentence vectors with an explicit pooling type, and
  recall@1 / MRR on a small labelled set (``data/llamacpp/retrieval.json``).
* :func:`all_logits` — the logits at every position (what :func:`labkit.quality.kv_logits_drift`
  compares, for a quantized KV cache against f16).
* :func:`prefix_reuse` — save the state after a long shared prefix, restore it per question,
  and count the prompt tokens llama.cpp actually evaluated.
* :func:`compare_lookup_decoding` — tokens/s with and without ``LlamaPromptLookupDecoding``
  (same greedy request, interleaved repeats, prompt already cached so generation is timed).
* :func:`stream_interleaving` — whether concurrent streams from a server were served one at a time.
* :func:`llama_server_command` — the equivalent stand-alone ``llama-server`` command line.
* :func:`offloaded_layers` — "offloaded N/M layers to GPU" read from llama.cpp's load information.

>>> stream_interleaving([("a", 0.1), ("a", 0.2), ("b", 0.3), ("b", 0.4)])
1
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import offload
from .env import DATA_DIR, is_loopback
from .models import as_request  # noqa: F401  (lc.as_request: chapters 03 and 04)
from .streams import RequestTiming, piece_of, timed_stream  # noqa: F401  (lc.piece_of / lc.timed_stream: chapter 03)

DEFAULT_PROMPT = "Once upon a time, in a lighthouse at the edge of a cold northern sea, there lived"

RETRIEVAL_SET = DATA_DIR / "llamacpp" / "retrieval.json"


# ----------------------------------------------------------------------------- perf counters
def reset_perf(llm) -> None:
    import llama_cpp
    llama_cpp.llama_perf_context_reset(llm.ctx)


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadCost:
    seconds: float
    rss_added_bytes: int      # resident memory added by the load and one evaluated token
    params: dict

    def row(self) -> dict:
        return {**self.params, "load s": self.seconds, "RSS added MiB": self.rss_added_bytes / 2**20}


def load(model_path, **params):
    """``(Llama, LoadCost)``: load with ``params`` and measure seconds and resident memory added.

    The memory is read after one token was evaluated: with ``use_mmap`` (the default) weights
    become resident only when they are first touched, so RSS right after the constructor
    under-reports them.
    """
    import psutil
    from llama_cpp import Llama
    params = {"verbose": False, **params}
    proc = psutil.Process()
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    llm = Llama(model_path=str(model_path), **params)
    seconds = time.perf_counter() - t0
    llm.eval(llm.tokenize(b"Hello", add_bos=False)[:1])
    llm.reset()
    shown = {k: v for k, v in params.items() if k != "verbose"}
    return llm, LoadCost(seconds, proc.memory_info().rss - before, shown)


# ----------------------------------------------------------------------------- timing in-process (chapter 06's harness uses these)
def perf(llm) -> dict:
    """llama.cpp's own counters since the last reset: prefill/decode tokens and milliseconds
    (chapter 03; ``labkit.bench.llama_perf`` in chapter 06)."""
    import llama_cpp
    d = llama_cpp.llama_perf_context(llm.ctx)
    return {"prompt_tokens": int(d.n_p_eval), "prompt_ms": float(d.t_p_eval_ms),
            "decode_tokens": int(d.n_eval), "decode_ms": float(d.t_eval_ms)}


def _end_tokens(llm) -> list[int]:
    """Token ids that would end generation early (EOS and the chat template's end-of-turn)."""
    ids = {llm.token_eos()}
    for text in (b"<|im_end|>", b"<|endoftext|>", b"<|eot_id|>", b"</s>"):
        toks = llm.tokenize(text, add_bos=False, special=True)
        if len(toks) == 1:
            ids.add(toks[0])
    return sorted(i for i in ids if i >= 0)


def time_llama(llm, prompt: str = None, max_tokens: int = 64) -> RequestTiming:
    """One streamed completion from an in-process ``Llama``, timed by the harness and by llama.cpp.

    End-of-text tokens are banned (the equivalent of vLLM's ``ignore_eos``) so every run
    generates exactly ``max_tokens`` tokens and runs are comparable.
    """
    import llama_cpp
    llm.reset()                                    # no KV reuse between runs: every run does full prefill
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    stream = llm.create_completion(prompt or DEFAULT_PROMPT, max_tokens=max_tokens, temperature=0.0, stream=True,
                                   logit_bias={i: -1e9 for i in _end_tokens(llm)})
    _, timing = timed_stream(stream, t0)
    counters = perf(llm)
    # llama.cpp evaluates every generated token except the last one (nothing follows it)
    n_out = counters["decode_tokens"] + 1
    return RequestTiming(timing.ttft, timing.e2e, counters["prompt_tokens"], n_out, timing.token_times, counters)


def run_llama(llm, prompt: str | None = None, max_tokens: int = 64, runs: int = 5, warmup: int = 1) -> list[RequestTiming]:
    for _ in range(warmup):
        time_llama(llm, prompt, max_tokens)
    return [time_llama(llm, prompt, max_tokens) for _ in range(runs)]


# ----------------------------------------------------------------------------- threads
SWEEP_PROMPT = ("The lighthouse keeper kept a careful log. Every evening he wrote the wind, the sea, "
                "the ships that passed and the hour the lamp was lit. ") * 2


def speed(llm, prompt: str = SWEEP_PROMPT, max_tokens: int = 32, repeats: int = 3) -> dict:
    """Median prefill and decode tokens/s of ``llm`` (llama.cpp's counters), after one warm-up."""
    time_llama(llm, prompt, max_tokens=4)          # warm-up: first touches of the weights
    runs = [time_llama(llm, prompt, max_tokens=max_tokens) for _ in range(max(1, repeats))]
    pre = [r.engine["prompt_tokens"] / r.engine["prompt_ms"] * 1000 for r in runs if r.engine["prompt_ms"] > 0]
    dec = [r.engine["decode_tokens"] / r.engine["decode_ms"] * 1000 for r in runs if r.engine["decode_ms"] > 0]
    if not pre or not dec:
        raise RuntimeError("llama.cpp reported no timed prompt or decode work; is max_tokens > 1?")
    return {"prefill tok/s": statistics.median(pre), "decode tok/s": statistics.median(dec),
            "prompt tokens": runs[0].engine["prompt_tokens"]}


def thread_sweep(model_path, threads: Iterable[int], n_ctx: int = 512, max_tokens: int = 32,
                 repeats: int = 3, rounds: int = 2) -> list[dict]:
    """Prefill and decode tokens/s at each thread count (``n_threads`` = ``n_threads_batch``).

    Thread counts are measured in interleaved ``rounds`` and each keeps its best round, so a
    burst of load from another process does not decide the winner alone.
    """
    from llama_cpp import Llama

    from .env import progress
    threads = [int(t) for t in threads]
    if not threads or min(threads) < 1:
        raise ValueError("threads must be a non-empty list of positive integers")
    models = {t: Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=t, n_threads_batch=t, verbose=False)
              for t in threads}
    best: dict[int, dict] = {}
    try:
        schedule = [t for _ in range(max(1, rounds)) for t in threads]
        for t in progress(schedule, "thread sweep"):
            s = speed(models[t], max_tokens=max_tokens, repeats=repeats)
            old = best.get(t)
            best[t] = s if old is None else {k: max(old[k], s[k]) for k in s}
    finally:
        for m in models.values():
            m.close()
    return [{"threads": t, **best[t]} for t in threads]


# ----------------------------------------------------------------------------- tokens
def token_pieces(llm, text: str, *, special: bool = False) -> list[tuple[int, bytes]]:
    """(token id, the bytes it stands for). Pieces are *bytes*: one character of a non-Latin
    script is often split over two or three tokens, so a piece alone may not be valid UTF-8."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
    return [(i, llm.detokenize([i], special=True)) for i in ids]


def show_piece(piece: bytes) -> str:
    """A printable form of a token's bytes: the text if it decodes, else its hex bytes."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + " ".join(f"{b:02x}" for b in piece) + ">"


def count_words(text: str) -> int:
    """Whitespace-separated words. Scripts written without spaces (Japanese, Chinese) count as
    one "word" per run of text — which is exactly why word counts say little about tokens."""
    return len(text.split())


# ----------------------------------------------------------------------------- chat templates
def chat_template(llm) -> str:
    """The Jinja chat template stored in the GGUF (``tokenizer.chat_template``)."""
    tpl = llm.metadata.get("tokenizer.chat_template")
    if not tpl:
        raise LookupError("This GGUF carries no tokenizer.chat_template: pass chat_format=... (e.g. 'chatml', "
                          "'llama-3') that matches how the model was trained, or it will see the wrong format.")
    return tpl


def special_token(llm, which: str) -> str:
    """The text of the model's BOS or EOS token ("" when it has none)."""
    tid = llm.token_bos() if which == "bos" else llm.token_eos()
    if tid is None or tid < 0:
        return ""
    return llm.detokenize([tid], special=True).decode("utf-8", errors="replace")


def render_chat(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """Render ``messages`` with a Jinja chat template, as llama-cpp-python does (sandboxed jinja2,
    ``trim_blocks``/``lstrip_blocks``)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content': {m!r}")
    fmt = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token,
                              add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages).prompt


def use_chat_template(llm, template: str):
    """Make ``llm.create_chat_completion`` render ``template`` (Jinja, with the model's own BOS/EOS) instead of
    the GGUF's template or llama-cpp-python's fallback — for a base model given a chat format (chapter 10)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    llm.chat_handler = Jinja2ChatFormatter(template, eos_token=special_token(llm, "eos"),
                                           bos_token=special_token(llm, "bos")).to_chat_handler()
    return llm


# Templates of *other* model families, written here to show what a mismatch does. They are
# structurally the published formats (Llama 3 headers; Mistral [INST] blocks).
LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL_STYLE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def complete_raw(llm, prompt: str, max_tokens: int = 48, **kw) -> dict:
    """Greedy completion of an exact prompt string (special tokens in it are parsed as such)."""
    r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, **kw)
    c = r["choices"][0]
    return {"text": c["text"], "finish": c["finish_reason"], "tokens": r["usage"]["completion_tokens"]}



# ----------------------------------------------------------------------------- base models (no chat template)
def chat_prompt(llm, messages: list[dict]) -> str:
    """The prompt text ``llm.create_chat_completion(messages)`` feeds the model: the GGUF's template
    rendered, or — for a GGUF without one — llama-cpp-python's fallback format (``llm.chat_format``,
    "llama-2" in this version), a format the model may never have seen."""
    tpl = llm.metadata.get("tokenizer.chat_template")
    if llm.chat_format == "chat_template.default" and tpl:
        return render_chat(tpl, messages, bos_token=special_token(llm, "bos"), eos_token=special_token(llm, "eos"))
    from llama_cpp import llama_chat_format
    formatter = getattr(llama_chat_format, "format_" + re.sub(r"[^a-z0-9]", "", str(llm.chat_format).lower()), None)
    if formatter is None:
        raise LookupError(f"no formatter for chat_format={llm.chat_format!r} in llama_cpp.llama_chat_format")
    return formatter(messages=messages).prompt


def _json_grammar(response_format: dict | None, as_text: bool = False):
    """The grammar llama-cpp-python builds for ``response_format`` in a chat request (None if none)."""
    if not response_format or response_format.get("type") != "json_object":
        return None
    from llama_cpp import llama_grammar
    if as_text:
        return schema_gbnf(response_format["schema"]) if "schema" in response_format else llama_grammar.JSON_GBNF
    if "schema" in response_format:
        return schema_grammar(response_format["schema"])
    return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)


def create(llm, request: list[dict] | str, **kw):
    """``create_chat_completion`` for chat messages (a list), ``create_completion`` for a plain-text
    prompt (a str: what a base model gets). ``response_format={"type": "json_object"[, "schema": ...]}``
    works for both: for a prompt it becomes the grammar llama-cpp-python builds for a chat request."""
    if isinstance(request, str):
        grammar = _json_grammar(kw.pop("response_format", None))
        if grammar is not None:
            kw["grammar"] = grammar
        return llm.create_completion(request, **kw)
    return llm.create_chat_completion(messages=request, **kw)


def server_create(client, model: str, request: list[dict] | str, **kw):
    """The OpenAI-SDK twin of :func:`create`: ``/v1/chat/completions`` for messages, ``/v1/completions``
    for a plain-text prompt — there ``response_format`` travels as the equivalent GBNF ``grammar``,
    which the completion routes of llama-cpp-python's server and of llama-server accept."""
    if isinstance(request, str):
        grammar = _json_grammar(kw.pop("response_format", None), as_text=True)
        if grammar is not None:
            kw["extra_body"] = {**kw.get("extra_body", {}), "grammar": grammar}
        return client.completions.create(model=model, prompt=request, **kw)
    return client.chat.completions.create(model=model, messages=request, **kw)


def reply_text(reply) -> str:
    """The text of a finished reply: chat (``message.content``) or completion (``text``), from
    llama-cpp-python (a dict) or the OpenAI SDK (an object)."""
    c = reply["choices"][0] if isinstance(reply, dict) else reply.choices[0]
    if isinstance(c, dict):
        return (c.get("message") or {}).get("content") or c.get("text") or ""
    message = getattr(c, "message", None)
    return (message.content if message is not None else getattr(c, "text", None)) or ""


def generate(llm, request: list[dict] | str, **kw) -> dict:
    """One reply to ``request`` (see :func:`create`): ``{"text", "finish", "tokens"}``."""
    r = create(llm, request, **kw)
    return {"text": reply_text(r), "finish": r["choices"][0]["finish_reason"], "tokens": r["usage"]["completion_tokens"]}


# ----------------------------------------------------------------------------- sampling
def sampling_table(llm, messages: list[dict] | str, settings: dict[str, dict], seeds: Sequence[int],
                   max_tokens: int = 24) -> list[dict]:
    """One row per (setting, seed): the reply to ``messages`` (chat messages, or a plain-text prompt
    for a base model: :func:`as_request`) under each sampling setting.

    The seed is passed *per call*: without one, each call's seed is drawn from the previous call's, so
    ``Llama(seed=...)`` fixes only the sequence of a fresh load; ``Llama(seed=0)`` is no seed at all (0 is
    treated as unset and becomes ``LLAMA_DEFAULT_SEED``), measured in chapter 03.
    """
    rows = []
    for name, kw in settings.items():
        for s in seeds:
            r = create(llm, messages, max_tokens=max_tokens, seed=int(s), **kw)
            rows.append({"setting": name, "seed": int(s), "reply": reply_text(r)})
    return rows


def greedy_runs(llm, messages: list[dict] | str, n: int = 3, max_tokens: int = 32) -> list[str]:
    """``n`` greedy replies (temperature 0) to chat messages or a plain-text prompt, each from a
    cold cache so nothing is reused."""
    out = []
    for _ in range(n):
        llm.reset()
        out.append(generate(llm, messages, max_tokens=max_tokens, temperature=0.0)["text"])
    return out


# ----------------------------------------------------------------------------- streaming
def schema_gbnf(schema: dict) -> str:
    """The GBNF grammar llama.cpp's converter generates for a JSON schema."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    return json_schema_to_gbnf(json.dumps(schema))


def schema_grammar(schema: dict):
    """A ``LlamaGrammar`` that only admits JSON matching ``schema``."""
    from llama_cpp import LlamaGrammar
    return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)


def validate_json(text: str, schema: dict | None = None) -> tuple[bool, str]:
    """(ok, reason): parses as JSON and, if given, matches ``schema`` (jsonschema)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        return False, f"not JSON: {exc}"
    if schema is not None:
        import jsonschema
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            return False, f"schema: {exc.message}"
    return True, "ok"


# ----------------------------------------------------------------------------- embeddings
def embed(llm, texts: Sequence[str]) -> np.ndarray:
    """One L2-normalised vector per text from a ``Llama(embedding=True, pooling_type=...)``.

    Refuses a context without pooling: such a model returns one vector *per token*, and
    silently averaging them here would hide the setting the learner has to choose.
    """
    import llama_cpp
    if int(llm.pooling_type()) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
        raise ValueError("this context has no pooling, so it returns one vector per token: create the Llama with "
                         "pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN (or CLS/LAST) for sentence vectors")
    vecs = np.asarray(llm.embed(list(texts)), dtype=np.float32)
    if vecs.ndim != 2:
        raise ValueError(f"expected one vector per text, got shape {vecs.shape}")
    return normalise(vecs)


def normalise(vecs) -> np.ndarray:
    v = np.asarray(vecs, dtype=np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n == 0, 1, n)


def load_retrieval_set(path=RETRIEVAL_SET) -> tuple[list[str], list[str], list[str], list[str]]:
    """(passage ids, passages, queries, relevant passage id per query)."""
    data = json.loads(Path(path).read_text())
    ids, passages = list(data["passages"]), list(data["passages"].values())
    queries = [q["query"] for q in data["queries"]]
    relevant = [q["relevant"] for q in data["queries"]]
    unknown = set(relevant) - set(ids)
    if unknown:
        raise ValueError(f"queries point at unknown passages: {sorted(unknown)}")
    return ids, passages, queries, relevant


def retrieval_scores(query_vecs, passage_vecs, passage_ids: Sequence[str], relevant: Sequence[str]) -> dict:
    """Recall@1, recall@3 and mean reciprocal rank of cosine-similarity retrieval."""
    q, p = normalise(query_vecs), normalise(passage_vecs)
    if len(q) != len(relevant) or len(p) != len(passage_ids):
        raise ValueError("one vector per query and per passage, please")
    sims = q @ p.T
    order = np.argsort(-sims, axis=1, kind="stable")
    ranks = []
    for i, rel in enumerate(relevant):
        j = list(passage_ids).index(rel)
        ranks.append(int(np.nonzero(order[i] == j)[0][0]) + 1)
    ranks = np.array(ranks)
    return {"recall@1": float(np.mean(ranks == 1)), "recall@3": float(np.mean(ranks <= 3)),
            "MRR": float(np.mean(1.0 / ranks)), "ranks": ranks.tolist()}


# ----------------------------------------------------------------------------- KV cache
def all_logits(model_path, tokens: Sequence[int], **params) -> np.ndarray:
    """The logits at every position of ``tokens`` (one forward pass, ``logits_all=True``)."""
    from llama_cpp import Llama
    params = {"n_ctx": max(512, len(tokens) + 8), "verbose": False, **params}
    llm = Llama(model_path=str(model_path), logits_all=True, **params)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


# ----------------------------------------------------------------------------- state save/restore
def prefix_reuse(llm, prefix: str, questions: Sequence[str], max_tokens: int = 16) -> list[dict]:
    """Answer each question after ``prefix`` twice: cold (cache cleared, whole prompt evaluated)
    and warm (the state saved after the prefix restored first). Rows carry the prompt tokens
    llama.cpp evaluated and the seconds each took.

    Prompts are token lists (prefix tokens + question tokens), so the prefix tokenizes the same
    way in both runs — joining strings could merge tokens at the boundary and defeat the reuse.
    """
    pre = llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=True)
    if len(pre) + 8 >= llm.n_ctx():
        raise ValueError(f"prefix has {len(pre)} tokens; n_ctx={llm.n_ctx()} leaves no room for questions")
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(pre)
    prefix_s = time.perf_counter() - t0
    state = llm.save_state()
    rows = []
    for q in questions:
        prompt = pre + llm.tokenize(q.encode("utf-8"), add_bos=False, special=True)
        for mode in ("cold", "warm"):
            if mode == "cold":
                llm.reset()
            else:
                llm.load_state(state)
            reset_perf(llm)
            t0 = time.perf_counter()
            r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
            dt = time.perf_counter() - t0
            p = perf(llm)
            rows.append({"question": q, "mode": mode, "prompt tokens": len(prompt),
                         "evaluated prompt tokens": p["prompt_tokens"], "seconds": dt,
                         "reply": r["choices"][0]["text"]})
    rows.append({"question": "(prefix once)", "mode": "save", "prompt tokens": len(pre),
                 "evaluated prompt tokens": len(pre), "seconds": prefix_s, "reply": "",
                 "state MiB": state.llama_state_size / 2**20})
    return rows


# ----------------------------------------------------------------------------- speculative decoding
def compare_lookup_decoding(plain, spec, messages: list[dict] | str, max_tokens: int = 128, repeats: int = 3) -> dict:
    """Greedy replies and generation tokens/s of two ``Llama`` objects on the same request (chat
    messages, or a plain-text prompt for a base model):
    ``plain`` and ``spec`` (created with ``draft_model=LlamaPromptLookupDecoding(...)``).

    Each model answers once untimed, which also leaves the prompt in its KV cache; timed repeats
    then alternate between the two, so both time *generation* (not prompt processing) under the
    same background load. Returns medians, the speed-up and both texts.
    """
    texts, tps = {}, {"plain": [], "spec": []}
    llms = {"plain": plain, "spec": spec}
    for name, llm in llms.items():
        llm.reset()
        texts[name] = generate(llm, messages, max_tokens=max_tokens, temperature=0.0)["text"]
    counters, passes, evaluated = {}, {}, {}
    for _ in range(max(1, repeats)):
        for name, llm in llms.items():
            reset_perf(llm)
            with _count_evals(llm) as calls:
                t0 = time.perf_counter()
                r = generate(llm, messages, max_tokens=max_tokens, temperature=0.0)
                dt = time.perf_counter() - t0
            n = r["tokens"]
            if r["text"] != texts[name]:
                raise RuntimeError(f"{name}: greedy output changed between runs")
            tps[name].append(n / dt)
            counters[name], passes[name], evaluated[name] = perf(llm), calls[0], calls[1]
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {"plain tok/s": med["plain"], "lookup tok/s": med["spec"], "speedup": med["spec"] / med["plain"],
            "identical": texts["plain"] == texts["spec"], "plain text": texts["plain"], "lookup text": texts["spec"],
            "completion tokens": n, "plain forward passes": passes["plain"], "lookup forward passes": passes["spec"],
            "lookup tokens evaluated": evaluated["spec"],
            "plain counters": counters["plain"], "lookup counters": counters["spec"], "runs": tps}


def chat_with_timings(server, messages: list[dict] | str, max_tokens: int = 64) -> tuple[str, dict]:
    """One greedy reply from ``llama-server`` and the ``timings`` it adds to the OpenAI reply (chapter 03):
    a chat reply to messages, or a plain completion of a prompt string (a base model).

    llama-server extends the OpenAI response with its own counters — ``prompt_n``,
    ``predicted_n``, ``predicted_per_second`` and, when speculative decoding drafted anything,
    ``draft_n`` (tokens proposed) and ``draft_n_accepted``. Absent draft counters read as 0.
    A server without ``timings`` (any other engine) is an error, not a zero.
    """
    reply = server_create(server.openai(), server.model, messages, max_tokens=max_tokens, temperature=0.0)
    timings = (reply.model_extra or {}).get("timings")
    if not timings:
        raise ValueError(f"{server.engine} returned no `timings`; only llama-server reports them")
    return reply_text(reply), {"draft_n": 0, "draft_n_accepted": 0, **timings}


def speculation_table(model_path, setups: dict[str, dict], tasks: dict[str, list[dict] | str], *,
                      max_tokens: int = 64, repeats: int = 2, **serve_options) -> list[dict]:
    """Decode speed of ``llama-server`` under several speculative set-ups, on several chat tasks (chapter 03).

    ``setups`` maps a label to extra ``labkit.serve`` options (``{}`` is plain decoding, the
    reference); each set-up gets one server, answers every task once untimed, then ``repeats``
    times; the best generation rate counts (``serve_options``, e.g. ``threads``, apply to every
    set-up). Each row says whether the text equals plain decoding's, which share of plain decoding's
    text it repeats before the first difference ("same start"), and how many drafted tokens the
    target accepted.
    """
    from .servers import serve
    if "plain" not in setups:
        raise ValueError("setups needs a 'plain' entry (no speculation) to compare against")
    rows, plain_text = [], {}
    for label in ["plain", *(k for k in setups if k != "plain")]:      # plain first: the reference text
        with serve("llama-server", model_path, **serve_options, **setups[label]) as srv:
            for task, messages in tasks.items():
                text, _ = chat_with_timings(srv, messages, max_tokens)
                runs = [chat_with_timings(srv, messages, max_tokens)[1] for _ in range(max(1, repeats))]
                best = max(runs, key=lambda t: t["predicted_per_second"])
                if label == "plain":
                    plain_text[task] = text
                rows.append({"set-up": label, "task": task, "tok/s": best["predicted_per_second"],
                             "drafted": best["draft_n"], "accepted": best["draft_n_accepted"],
                             "acceptance": best["draft_n_accepted"] / best["draft_n"] if best["draft_n"] else float("nan"),
                             "same text as plain": text == plain_text[task],
                             "same start": len(os.path.commonprefix([text, plain_text[task]])) / max(1, len(plain_text[task]))})
    for row in rows:
        row["speed-up"] = row["tok/s"] / next(r["tok/s"] for r in rows if r["set-up"] == "plain" and r["task"] == row["task"])
    return rows


@contextlib.contextmanager
def _count_evals(llm):
    """Count ``llm.eval`` calls (one forward pass each) and the tokens they processed:
    ``[passes, tokens]``."""
    calls = [0, 0]
    original = llm.eval

    def counting(tokens):
        calls[0] += 1
        calls[1] += len(tokens)
        return original(tokens)
    llm.eval = counting
    try:
        yield calls
    finally:
        del llm.eval            # back to the class's method


def batch_efficiency(llm, k: int = 16, repeats: int = 5) -> dict:
    """Per-token cost of one k-token forward pass against k single-token passes, at the same
    position (medians). Verifying a draft costs one k-token pass, so speculative decoding can
    only pay off where ``efficiency`` (single ms/token ÷ batched ms/token) is well above 1 —
    memory-bound decoding (big models, GPUs), not a tiny compute-bound model on a CPU."""
    base = llm.tokenize(SWEEP_PROMPT.encode(), add_bos=True)
    if len(base) < 32 + k:
        raise ValueError("the built-in prompt is too short for this k")
    ctx, extra = base[:32], base[32:32 + k]
    llm.reset()
    llm.eval(ctx)
    single, batched = [], []
    for _ in range(max(1, repeats)):
        llm.n_tokens = len(ctx)
        t0 = time.perf_counter()
        for t in extra:
            llm.eval([t])
        single.append((time.perf_counter() - t0) / k)
        llm.n_tokens = len(ctx)
        t0 = time.perf_counter()
        llm.eval(extra)
        batched.append((time.perf_counter() - t0) / k)
    llm.reset()
    s, b = statistics.median(single), statistics.median(batched)
    return {"k": k, "single ms/token": 1000 * s, "batched ms/token": 1000 * b, "efficiency": s / b}


# ----------------------------------------------------------------------------- servers
def stream_interleaving(arrivals: Sequence[tuple[Any, float]]) -> int:
    """How often consecutive token arrivals switch from one stream to another.

    ``arrivals`` are (stream id, arrival time) pairs. Streams served one at a time switch
    ``streams - 1`` times; streams decoded together in a batch switch at almost every token.
    """
    ordered = [sid for sid, _ in sorted(arrivals, key=lambda a: a[1])]
    return sum(1 for a, b in zip(ordered, ordered[1:]) if a != b)


def concurrent_streams(client, model: str, prompts: Sequence[str], max_tokens: int = 24, *, chat: bool = True) -> dict:
    """Send ``prompts`` as simultaneous streamed requests — chat messages, or with ``chat=False``
    plain-text completions (a base model) — and record every token's arrival."""
    import threading
    t0 = time.perf_counter()
    arrivals: list[tuple[int, float]] = []
    results: dict[int, dict] = {}
    lock = threading.Lock()

    def one(i, prompt):
        sent = time.perf_counter() - t0
        request = [{"role": "user", "content": prompt}] if chat else prompt
        stream = server_create(client, model, request, stream=True, max_tokens=max_tokens, temperature=0.0)
        times = []
        for chunk in stream:
            if piece_of(chunk):
                now = time.perf_counter() - t0
                times.append(now)
                with lock:
                    arrivals.append((i, now))
        results[i] = {"sent": sent, "first token": times[0] if times else float("nan"),
                      "done": time.perf_counter() - t0, "tokens": len(times)}

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return {"requests": [results[i] for i in sorted(results)], "switches": stream_interleaving(arrivals),
            "wall": time.perf_counter() - t0}


def llama_server_command(model_path, *, n_ctx: int = 2048, port: int = 8080, host: str = "127.0.0.1",
                         n_gpu_layers: int | None = None, flash_attn: str | None = None,
                         api_key_env: str | None = "LLAMA_API_KEY", alias: str | None = None) -> str:
    """The stand-alone ``llama-server`` (llama.cpp's C++ server) command equivalent to labkit.serve.

    Flags as of current llama.cpp: ``-ngl`` counts layers of *this* model, ``-fa`` takes
    ``on|off|auto``, ``--api-key`` enables bearer-token auth. The port is always explicit.
    ``--no-repack`` is added on CPUs where :mod:`labkit.repack` turns weight repacking off.
    """
    from . import repack
    if flash_attn not in (None, "on", "off", "auto"):
        raise ValueError("llama-server's -fa takes on, off or auto")
    parts = ["llama-server", "-m", str(model_path), "--host", host, "--port", str(port), "-c", str(n_ctx)]
    if alias:
        parts += ["--alias", alias]
    if n_gpu_layers is not None:
        parts += ["-ngl", str(n_gpu_layers)]
    if flash_attn:
        parts += ["-fa", flash_attn]
    parts += repack.llama_server_args()
    if api_key_env:
        parts += ["--api-key", f'"${api_key_env}"']
    if not is_loopback(host) and not api_key_env:
        raise ValueError(f"refusing to print a command that listens on {host} without an API key")
    return " ".join(parts)


# ----------------------------------------------------------------------------- GPU offload
def offloaded_layers(log_text: str) -> tuple[int, int]:
    """(layers offloaded, layers in total) from llama.cpp's load information (an info-level
    line of the default verbose log, printed by ``load_tensors``; :func:`labkit.offload.account`
    reads the buffers too)."""
    acct = offload.account(log_text)
    if acct.offloaded is None:
        raise LookupError("no 'offloaded N/M layers to GPU' line: load with verbose=True, and check that this "
                          "llama.cpp build has a GPU backend (llama_supports_gpu_offload())")
    return acct.offloaded, acct.total


def load_with_log(model_path, **params):
    """``(Llama, log text)``: load with ``verbose=True`` and capture llama.cpp's load log
    (llama-cpp-python routes it through Python's ``sys.stderr``)."""
    from llama_cpp import Llama
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        llm = Llama(model_path=str(model_path), verbose=True, **params)
    llm.verbose = False
    return llm, buf.getvalue()

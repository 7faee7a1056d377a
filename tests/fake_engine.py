"""A fake engine for labkit's Ollama-compatible server, and the servers the Ollama tests share.

:class:`FakeEngineFactory` stands where llama-cpp-python stands (``make_service(engine=...)``, the
seam of :mod:`labkit.ollama_lab.engine`); its :class:`FakeEngine` yields *scripted* tokens instead of
sampling a model, the way Ollama's route tests put a ``mockRunner`` behind its handlers
(``server/routes_generate_test.go``). Everything above the engine is the real server: store,
scheduler, prompt templates, the token loop (stop strings, ``num_predict``, logprobs), tool-call
parsing, NDJSON/SSE, errors, cancellation. Loading a "model" reads its GGUF header (the chat template,
the special tokens), never its weights, so a request is answered in milliseconds.

The fake's vocabulary: ids 0-255 are bytes (a prompt is tokenized byte by byte after ``BOS``), 256 is
``BOS``, 257 ``EOS``, and each distinct scripted string gets an id from 258 on. What it answers is
picked from the prompt: the first :class:`Script` of :data:`RULES` whose key occurs in the prompt
(a long story, a pirate), else :data:`DEFAULT` — so the same test body runs against the fake and the
real engine. A request with ``format`` gets the smallest JSON value its schema allows (the fake cannot
run a grammar; :func:`fake_service` hands it the request's format beside the real, validated grammar).

The servers: :func:`fake_server` (uvicorn in a thread on a free loopback port, in this process) and
:func:`engine_server` (``python -m labkit.ollama_lab``, the real engine, one per test session).
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOS, EOS = 256, 257
EOS_TEXT = "</s>"       # in a script: the end-of-sequence token (the answer ends here, done_reason "stop")


@dataclass(frozen=True)
class Fail:
    """In a script: the engine raises ``RuntimeError(message)`` here (a model that fails mid-answer)."""
    message: str


@dataclass(frozen=True)
class Script:
    """What the fake answers: ``tokens`` (strings, one token each; :data:`EOS_TEXT` ends the answer,
    a :class:`Fail` raises), then EOS — or, with ``repeat``, the tokens over and over until the server
    stops asking (``num_predict``, the context, a client gone). ``delay``: seconds per token."""
    tokens: Sequence[str | Fail]
    repeat: bool = False
    delay: float = 0.0

    @property
    def text(self) -> str:
        """The whole answer (without repeats), as the server would send it with no stop strings."""
        out = []
        for t in self.tokens:
            if t == EOS_TEXT:
                break
            out.append(t if isinstance(t, str) else "")
        return "".join(out)


DEFAULT = Script(["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", ".",
                  "\n", "Air", " scatters", " blue", " light", " most", "."])
LONG_STORY = Script(["Once", " upon", " a", " time", ",", " the", " sea", " was", " calm", "."], repeat=True, delay=0.005)
PIRATE = Script(["Arr", "!", " The", " treasure", " be", " buried", " on", " the", " island", ",", " matey", "."])
RULES: list[tuple[str, Script]] = [
    ("long story", LONG_STORY),          # the abandoned requests of the cancellation tests: ~10 s unless stopped
    ("Once upon a time", LONG_STORY),
    ("pirate", PIRATE),                  # a SYSTEM persona visibly changes the answer
]


def minimal_json(schema: Any, root: Any = None) -> Any:
    """The smallest value ``schema`` (a JSON schema, or ``"json"``) allows: what the fake writes for ``format``.

    >>> minimal_json({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]})
    {'a': 0}
    >>> minimal_json({"anyOf": [{"properties": {"name": {"const": "f"}}, "required": ["name"]}]}), minimal_json("json")
    ({'name': 'f'}, {})
    """
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return {}
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return minimal_json(target, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return minimal_json(schema[key][0], root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties", {})
        return {k: minimal_json(props.get(k, {}), root) for k in schema.get("required", [])}
    if kind == "array":
        return [minimal_json(schema.get("items", {}), root) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        n = max(1, schema.get("minLength", 0))
        return "x" * min(n, schema.get("maxLength", n))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return {}


@dataclass
class FormatHint:
    """A request's ``format`` with the real grammar llama.cpp would get (see :func:`fake_service`)."""
    grammar: Any
    format: Any


@dataclass
class Call:
    """What one :meth:`FakeEngine.generate` was asked: the prompt, its tokens, the sampling arguments,
    the seed and whether the prompt cache was reset first."""
    prompt: str
    tokens: list[int]
    sampling: dict
    seed: int | None
    reset: bool
    script: Script
    yielded: int = 0          # tokens produced so far (a cancelled generation stops counting)
    threads: list[str] = field(default_factory=list)    # the name of the thread that produced each token


class Vocab:
    """Scripted strings ↔ ids (258, 259, ... in order of first use), shared by a factory's engines."""

    def __init__(self):
        self.texts: list[str] = []
        self.ids: dict[str, int] = {}
        self.lock = threading.Lock()

    def id_of(self, text: str) -> int:
        with self.lock:
            if text not in self.ids:
                self.ids[text] = EOS + 1 + len(self.texts)
                self.texts.append(text)
            return self.ids[text]

    def __len__(self) -> int:
        return EOS + 1 + len(self.texts)


@functools.lru_cache(maxsize=16)
def _gguf_facts(path: str, mtime_ns: int) -> tuple[dict, str, str, int]:
    """(string metadata, BOS text, EOS text, embedding length) of a GGUF file: its header only."""
    from labkit.gguf import read_header
    h = read_header(path)
    md = h.metadata
    tokens = md.get("tokenizer.ggml.tokens") or []

    def text(key: str, fallback: str) -> str:
        i = md.get(key)
        return str(tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else fallback
    strings = {k: str(v) for k, v in md.items() if not isinstance(v, list)}
    width = int(md.get(f"{h.architecture}.embedding_length", 64) or 64)
    return strings, text("tokenizer.ggml.bos_token_id", "<s>"), text("tokenizer.ggml.eos_token_id", EOS_TEXT), width


def _unit_vector(text: str, dims: int) -> list[float]:
    """A deterministic vector for ``text`` (not normalised: the server normalises)."""
    seed = hashlib.sha256(text.encode()).digest()
    out, block = [], seed
    while len(out) < dims:
        block = hashlib.sha256(block).digest()
        out.extend((b - 127.5) / 64 for b in block)
    return out[:dims]


class FakeEngine:
    """A :class:`labkit.ollama_lab.engine.TextEngine` (and ``GGUFEmbedder``) that answers from scripts."""

    def __init__(self, factory: FakeEngineFactory, path: str, options: dict, *, embedding: bool = False):
        self.factory, self.options, self.embedding = factory, dict(options), embedding
        self.metadata, self.bos_text, self.eos_text, self.width = _gguf_facts(path, os.stat(path).st_mtime_ns)
        self._n_ctx = int(options.get("num_ctx", 0)) or 2048
        self.seed: int | None = None
        self._reset = False
        self._last = EOS
        self.closed = False

    # the TextEngine protocol
    def n_ctx(self) -> int:
        return self._n_ctx

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return ([BOS] if add_bos else []) + list(text)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        out = bytearray()
        for t in tokens:
            if t < 256:
                out.append(t)
            elif t in (BOS, EOS):
                out += (self.bos_text if t == BOS else self.eos_text).encode() if special else b""
            else:
                out += self.factory.vocab.texts[t - EOS - 1].encode()
        return bytes(out)

    def token_bos(self) -> int:
        return BOS

    def token_eos(self) -> int:
        return EOS

    def token_text(self, token: int) -> str:
        return self.detokenize([token], special=True).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def reset(self) -> None:
        self._reset = True

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def generate(self, tokens: Sequence[int], **sampling) -> Iterator[int]:
        prompt = self.detokenize(list(tokens)).decode("utf-8", "replace")
        script = self.factory.pick(prompt, sampling.get("grammar"))
        call = Call(prompt, list(tokens), sampling, self.seed, self._reset, script)
        self.factory.calls.append(call)
        self._reset = False
        return self._tokens(script, call)

    def _tokens(self, script: Script, call: Call) -> Iterator[int]:
        def items():
            while script.tokens or not script.repeat:
                yield from script.tokens
                if not script.repeat:
                    yield EOS_TEXT
                    return
        for item in items():
            if script.delay:
                time.sleep(script.delay)
            if isinstance(item, Fail):
                raise RuntimeError(item.message)
            self._last = EOS if item == EOS_TEXT else self.factory.vocab.id_of(item)
            call.yielded += 1
            call.threads.append(threading.current_thread().name)
            yield self._last
            if self._last == EOS:
                return

    def last_logprobs(self):
        """A distribution peaked on the token just yielded (as greedy decoding implies), then the next two ids."""
        import numpy as np
        n = len(self.factory.vocab)
        logits = np.zeros(n, dtype=np.float64)
        logits[self._last] = 4.0
        logits[(self._last + 1) % n] = 2.0
        logits[(self._last + 2) % n] = 1.0
        return logits - (math.log(np.exp(logits - logits.max()).sum()) + logits.max())

    def close(self) -> None:
        self.closed = True

    # the GGUFEmbedder protocol
    def embed(self, input: str, normalize: bool = True) -> list[float]:
        v = _unit_vector(input, self.width)
        if normalize:
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            v = [x / norm for x in v]
        return v


class FakeSentenceEmbedder:
    """A :class:`labkit.ollama_lab.engine.SentenceEmbedder` for an embedding folder (``all-minilm``):
    its width from config.json, a token per word plus [CLS] and [SEP]."""

    def __init__(self, path: str):
        cfg = json.loads((Path(path) / "config.json").read_text())
        self.width = int(cfg.get("hidden_size", 384))
        st = Path(path) / "sentence_bert_config.json"
        self.max_seq_length = int(json.loads(st.read_text()).get("max_seq_length", 256)) if st.exists() else 256

    def tokenizer(self, text: str, add_special_tokens: bool = True) -> dict:
        words = [101 + i for i, _ in enumerate(text.split())]
        return {"input_ids": ([101] + words + [102]) if add_special_tokens else words}

    def encode(self, sentences: list[str], normalize_embeddings: bool = False, convert_to_numpy: bool = True):
        import numpy as np
        return np.array([_unit_vector(s, self.width) for s in sentences], dtype=np.float32).reshape(len(sentences), self.width)


class FakeEngineFactory:
    """An :class:`labkit.ollama_lab.engine.EngineFactory` of fake engines. ``loads`` lists what it loaded
    (name, options, embedding), ``calls`` each generation it was asked for (:class:`Call`)."""

    def __init__(self, rules: Sequence[tuple[str, Script]] | None = None, default: Script = DEFAULT):
        self.rules = list(RULES if rules is None else rules)
        self.default = default
        self.vocab = Vocab()
        self.loads: list[tuple[str, dict, bool]] = []
        self.calls: list[Call] = []
        self.engines: list[FakeEngine] = []

    def __call__(self, manifest, options: dict, *, embedding: bool = False):
        self.loads.append((manifest.name, dict(options), embedding))
        if manifest.kind == "sentence-transformers":
            return FakeSentenceEmbedder(manifest.path)
        engine = FakeEngine(self, manifest.path, options, embedding=embedding)
        self.engines.append(engine)
        return engine

    def pick(self, prompt: str, grammar: Any) -> Script:
        if isinstance(grammar, FormatHint):
            text = json.dumps(minimal_json(grammar.format))
            return Script([text[i:i + 4] for i in range(0, len(text), 4)])
        return next((script for key, script in self.rules if key in prompt), self.default)

    @contextmanager
    def scripted(self, script: Script, when: str = ""):
        """Answer prompts containing ``when`` (every prompt by default) with ``script`` inside the block."""
        rule = (when, script)
        self.rules.insert(0, rule)
        try:
            yield script
        finally:
            self.rules.remove(rule)


def fake_service(models_dir: Path, factory: FakeEngineFactory | None = None, **kwargs):
    """``make_service`` over ``models_dir`` with a fake engine: (service, factory). ``format`` still goes
    through the real grammar (a bad schema is the real 400); the fake gets a :class:`FormatHint`."""
    from labkit.ollama_lab import make_service
    factory = factory or FakeEngineFactory()
    service = make_service(models_dir, engine=factory, **{"num_thread": 1, **kwargs})
    real = service.grammar_for

    def grammar_for(fmt):
        grammar = real(fmt)
        return None if grammar is None else FormatHint(grammar, fmt)
    service.grammar_for = grammar_for
    return service, factory


# ------------------------------------------------------------------------------------------ servers
class InProcessServer:
    """An ASGI app served by uvicorn in a daemon thread on a free loopback port: a real socket (clients,
    disconnects) at in-process speed."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@dataclass
class FakeServer:
    base_url: str
    service: Any
    factory: FakeEngineFactory
    server: InProcessServer = field(repr=False)

    def stop(self) -> None:
        self.server.stop()


def fake_server(models_dir: Path, factory: FakeEngineFactory | None = None, **kwargs) -> FakeServer:
    """The whole server (the bundled models registered) over a fake engine, on a loopback port."""
    from labkit.ollama_lab import build_app
    service, factory = fake_service(models_dir, factory, **kwargs)
    srv = InProcessServer(build_app(service))
    return FakeServer(srv.base_url, service, factory, srv)


_SHARED: dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(key: str, start):
    """One server per test session, whichever test module asks first (stopped when pytest exits)."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            srv = start()
            _SHARED[key] = srv
            atexit.register(srv.stop)
        return _SHARED[key]


def shared_fake_server(tmp_path_factory) -> FakeServer:
    """The session's fake-engine server (its store in a temporary folder)."""
    return _shared("fake", lambda: fake_server(tmp_path_factory.mktemp("ollama-fake-models")))


def engine_server(tmp_path_factory):
    """The session's real-engine server (``python -m labkit.ollama_lab``, llama.cpp, one thread): a
    :class:`labkit.servers.Server` with ``base_url``. Started once for every module that needs it."""
    def start():
        from labkit import servers
        port = servers.free_port()
        argv = [sys.executable, "-m", "labkit.ollama_lab", "--host", "127.0.0.1", "--port", str(port),
                "--models-dir", str(tmp_path_factory.mktemp("ollama-models")), "--num-thread", "1"]
        return servers._start("ollama", "smollm2:135m", "127.0.0.1", port, None, argv, {}, "/api/version", 120)
    return _shared("engine", start)

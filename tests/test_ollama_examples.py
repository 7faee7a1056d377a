"""Every request example of Ollama's API documentation (docs/api.md, docs/openapi.yaml's code samples,
docs/api/openai-compatibility.mdx) and of ollama-python's examples/, run against labkit's
Ollama-compatible server.

An example either runs (the documented response fields come back), or, where it needs what the lab
does not have (a vision or thinking model, a code model with fill-in-the-middle, the network), the
server refuses it with a 4xx (5xx for the network, as a real Ollama offline) whose message names
the missing feature — never a silent 200. Model names are swapped for the lab's: smollm2:135m for
chat, smollm2-tools:135m where an example sends tools, all-minilm for embeddings. Generation is cut to a
few tokens (``num_predict``) to keep the whole file fast; the tally is printed at the end.

Each example runs against the server over the fake engine of ``tests/fake_engine.py`` (in process,
milliseconds: the requests, the refusals and the response shapes are the server's, whatever engine),
and in ``make test-full`` against the server with llama.cpp (markers ``full``, ``engine``).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter

import httpx
import pytest
from fake_engine import engine_server, shared_fake_server

CHAT, TOOLS, EMBED = "smollm2:135m", "smollm2-tools:135m", "all-minilm"
TALLY: Counter = Counter()
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a given city",
                                            "parameters": {"type": "object", "required": ["city"], "properties": {
                                                "city": {"type": "string", "description": "The city to get the weather for"}}}}}
CURRENT_WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather for a location",
    "parameters": {"type": "object", "required": ["location", "format"], "properties": {
        "location": {"type": "string", "description": "The location to get the weather for, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
COUNTRIES = {"type": "object", "required": ["countries"], "properties": {"countries": {"type": "array", "items": {
    "type": "object", "required": ["country", "population"],
    "properties": {"country": {"type": "string"}, "population": {"type": "integer"}}}}}}
AGE = {"type": "object", "properties": {"age": {"type": "integer"}, "available": {"type": "boolean"}},
       "required": ["age", "available"]}
SKY = [{"role": "user", "content": "why is the sky blue?"}]
HISTORY_WITH_TOOLS = [{"role": "user", "content": "what is the weather in Toronto?"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"function": {"name": "get_weather", "arguments": {"city": "Toronto"}}}]},
                      {"role": "tool", "content": "11 degrees celsius", "tool_name": "get_weather"}]
ALL_OPTIONS = {"num_keep": 5, "seed": 42, "num_predict": 100, "top_k": 20, "top_p": 0.9, "min_p": 0.0, "typical_p": 0.7,
               "repeat_last_n": 33, "temperature": 0.8, "repeat_penalty": 1.2, "presence_penalty": 1.5,
               "frequency_penalty": 1.0, "penalize_newline": True, "stop": ["\n", "user:"], "numa": False, "num_ctx": 1024,
               "num_batch": 2, "num_gpu": 1, "main_gpu": 0, "use_mmap": True, "num_thread": 8}

AGE_PROMPT = "Ollama is 22 years old and is busy saving the world. Respond using JSON"
SKY_JSON = "What color is the sky at different times of the day? Respond using JSON"
AGE_CHAT = "Ollama is 22 years old and busy saving the world. Return a JSON object with the age and availability."
POPULATIONS = "What are the populations of the United States and Canada?"
EMBED_TEXT = "Generate embeddings for this text"
FRIENDS = ("I have two friends. The first is Ollama 22 years old busy saving the world, and the second is Alonso 23 "
           "years old and wants to hang out. Return a list of friends in JSON format")
TEST_PROMPT = "Say this is a test"
OK = "ok"


def refused(*words: str, status: int = 400) -> tuple:
    return ("refused", status, words)


# (source, method, path, body, expectation): docs/api.md and docs/openapi.yaml, in their order
DOC_EXAMPLES = [
    ("generate streaming", "POST", "/api/generate", {"model": CHAT, "prompt": "Why is the sky blue?"}, OK),
    ("generate no streaming", "POST", "/api/generate", {"model": CHAT, "prompt": "Why is the sky blue?", "stream": False}, OK),
    ("generate with suffix", "POST", "/api/generate", {"model": CHAT, "prompt": "def compute_gcd(a, b):",
                                                       "suffix": "    return result", "options": {"temperature": 0},
                                                       "stream": False}, refused("suffix")),
    ("generate structured outputs", "POST", "/api/generate", {"model": CHAT, "stream": False, "format": AGE,
                                                              "prompt": AGE_PROMPT}, OK),
    ("generate structured outputs (openapi)", "POST", "/api/generate", {
        "model": CHAT, "prompt": POPULATIONS, "stream": False,
        "format": COUNTRIES}, OK),
    ("generate JSON mode", "POST", "/api/generate", {"model": CHAT, "format": "json", "stream": False,
                                                     "prompt": SKY_JSON}, OK),
    ("generate with images", "POST", "/api/generate", {"model": CHAT, "prompt": "What is in this picture?", "stream": False,
                                                       "images": [PNG]}, refused("images")),
    ("generate raw mode", "POST", "/api/generate", {"model": CHAT, "prompt": "[INST] why is the sky blue? [/INST]",
                                                    "raw": True, "stream": False}, OK),
    ("generate reproducible outputs", "POST", "/api/generate", {"model": CHAT, "prompt": "Why is the sky blue?",
                                                                "options": {"seed": 123}}, OK),
    ("generate with options (every option)", "POST", "/api/generate", {"model": CHAT, "prompt": "Why is the sky blue?",
                                                                       "stream": False, "options": ALL_OPTIONS}, OK),
    ("generate with options (openapi)", "POST", "/api/generate", {"model": CHAT, "prompt": "Why is the sky blue?",
                                                                  "options": {"temperature": 0.8, "top_p": 0.9, "seed": 42}}, OK),
    ("generate load a model", "POST", "/api/generate", {"model": CHAT}, OK),
    ("generate unload a model", "POST", "/api/generate", {"model": CHAT, "keep_alive": 0}, OK),
    ("chat streaming", "POST", "/api/chat", {"model": CHAT, "messages": SKY}, OK),
    ("chat streaming with tools", "POST", "/api/chat", {"model": TOOLS, "stream": True, "tools": [WEATHER],
                                                        "messages": [{"role": "user", "content": "what is the weather in tokyo?"}]}, OK),
    ("chat no streaming", "POST", "/api/chat", {"model": CHAT, "messages": SKY, "stream": False}, OK),
    ("chat no streaming with tools", "POST", "/api/chat", {"model": TOOLS, "stream": False, "tools": [WEATHER],
                                                           "messages": [{"role": "user", "content": "what is the weather in tokyo?"}]}, OK),
    ("chat tools on a model without tools", "POST", "/api/chat", {"model": CHAT, "stream": False, "tools": [WEATHER],
                                                                  "messages": SKY}, refused("does not support tools")),
    ("chat structured outputs", "POST", "/api/chat", {"model": CHAT, "stream": False, "format": AGE, "options": {"temperature": 0},
                                                      "messages": [{"role": "user", "content": AGE_CHAT}]}, OK),
    ("chat structured outputs (openapi)", "POST", "/api/chat", {"model": CHAT, "stream": False, "format": COUNTRIES,
                                                                "messages": [{"role": "user", "content": POPULATIONS}]}, OK),
    ("chat with history", "POST", "/api/chat", {"model": CHAT, "messages": [
        {"role": "user", "content": "why is the sky blue?"}, {"role": "assistant", "content": "due to rayleigh scattering."},
        {"role": "user", "content": "how is that different than mie scattering?"}]}, OK),
    ("chat with history, with tools", "POST", "/api/chat", {"model": TOOLS, "messages": HISTORY_WITH_TOOLS, "stream": False,
                                                            "tools": [WEATHER]}, OK),
    ("chat with images", "POST", "/api/chat", {"model": CHAT, "messages": [{"role": "user", "content": "what is in this image?",
                                                                            "images": [PNG]}]}, refused("images")),
    ("chat reproducible outputs", "POST", "/api/chat", {"model": CHAT, "messages": [{"role": "user", "content": "Hello!"}],
                                                        "options": {"seed": 101, "temperature": 0}}, OK),
    ("chat with tools", "POST", "/api/chat", {"model": TOOLS, "stream": False, "tools": [CURRENT_WEATHER],
                                              "messages": [{"role": "user", "content": "What is the weather today in Paris?"}]}, OK),
    ("chat thinking (openapi)", "POST", "/api/chat", {"model": CHAT, "think": "low",
                                                      "messages": [{"role": "user", "content": "What is 1+1?"}]}, refused("thinking")),
    ("chat load a model", "POST", "/api/chat", {"model": CHAT, "messages": []}, OK),
    ("chat unload a model", "POST", "/api/chat", {"model": CHAT, "messages": [], "keep_alive": 0}, OK),
    ("create a new model", "POST", "/api/create", {"model": "mario", "from": CHAT, "system": "You are Mario from Super Mario Bros."}, OK),
    ("create from existing (openapi)", "POST", "/api/create", {"model": "ollama", "from": CHAT, "system": "You are Ollama the llama."}, OK),
    ("quantize a model (the lab's model is Q4_1, not F16)", "POST", "/api/create",
     {"model": "smollm2:quantized", "from": CHAT, "quantize": "q4_K_M"}, refused("F16 and F32")),
    ("create from a Safetensors directory", "POST", "/api/create", {"model": "fred", "files": {
        "config.json": "sha256:" + "d" * 64, "model.safetensors": "sha256:" + "1" * 64}}, refused("safetensors")),
    ("check if a blob exists", "HEAD", "/api/blobs/sha256:29fdb92e57cf0827ded04ae6461b5931d01fa595843f55d36f5b275a52087dd2",
     None, OK),
    ("list local models", "GET", "/api/tags", None, OK),
    ("show model information", "POST", "/api/show", {"model": CHAT}, OK),
    ("show verbose (openapi)", "POST", "/api/show", {"model": CHAT, "verbose": True}, OK),
    ("copy a model", "POST", "/api/copy", {"source": CHAT, "destination": "smollm2-backup"}, OK),
    ("delete a model", "DELETE", "/api/delete", {"model": "smollm2-backup"}, OK),
    ("pull a model (already local)", "POST", "/api/pull", {"model": CHAT}, OK),
    ("pull a model (needs the network)", "POST", "/api/pull", {"model": "llama3.2", "stream": False}, refused("offline", status=500)),
    ("push a model (needs the network)", "POST", "/api/push", {"model": CHAT}, refused("push", status=500)),
    ("embed", "POST", "/api/embed", {"model": EMBED, "input": "Why is the sky blue?"}, OK),
    ("embed multiple input", "POST", "/api/embed", {"model": EMBED, "input": ["Why is the sky blue?", "Why is the grass green?"]}, OK),
    ("embed truncation (openapi)", "POST", "/api/embed", {"model": EMBED, "input": EMBED_TEXT, "truncate": True}, OK),
    ("embed dimensions (openapi)", "POST", "/api/embed", {"model": EMBED, "input": EMBED_TEXT, "dimensions": 128}, OK),
    ("list running models", "GET", "/api/ps", None, OK),
    ("generate embedding (legacy)", "POST", "/api/embeddings", {"model": EMBED, "prompt": "Here is an article about llamas..."}, OK),
    ("version", "GET", "/api/version", None, OK),
    ("openai: chat completions", "POST", "/v1/chat/completions", {"model": CHAT, "messages": [
        {"role": "user", "content": TEST_PROMPT}]}, OK),
    ("openai: responses", "POST", "/v1/responses", {"model": CHAT, "input": "Write a short poem about the color blue"}, OK),
    ("openai: chat completions with vision", "POST", "/v1/chat/completions", {"model": CHAT, "max_tokens": 300, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What's in this image?"},
                                     {"type": "image_url", "image_url": "data:image/png;base64," + PNG}]}]},
     refused("does not support images")),
    ("openai: default model names (after ollama cp)", "POST", "/v1/chat/completions", {"model": "gpt-3.5-turbo", "messages": [
        {"role": "user", "content": "Hello!"}]}, OK),
]


def short(path: str, body: dict | None) -> dict | None:
    """The example with generation cut short (a schema-constrained one keeps room to close its JSON)."""
    if not body or not (body.get("prompt") or body.get("messages") or path == "/v1/responses"):
        return body
    n = 96 if body.get("format") else 6
    key = {"/v1/chat/completions": "max_tokens", "/v1/responses": "max_output_tokens"}.get(path)
    if key:
        return {**body, key: n}
    return {**body, "options": {**body.get("options", {}), "num_predict": n}}


@pytest.fixture(scope="module", params=["fake", pytest.param("engine", marks=[pytest.mark.full, pytest.mark.engine])])
def base(request, tmp_path_factory):
    """The server's URL: over the fake engine, or llama.cpp (the session's shared servers)."""
    srv = (shared_fake_server if request.param == "fake" else engine_server)(tmp_path_factory)
    with httpx.Client(base_url=srv.base_url, timeout=120) as http:
        http.post("/api/copy", json={"source": CHAT, "destination": "gpt-3.5-turbo"})   # the docs' `ollama cp`
    yield srv.base_url
    print(f"\ndocumented examples ({request.param}):", dict(TALLY))
    TALLY.clear()


def check_ok(path: str, body: dict | None, r: httpx.Response) -> None:
    assert r.status_code in (200, 201, 404 if path.startswith("/api/blobs") else 200), r.text
    if body is None or r.request.method == "HEAD" or path in ("/api/copy", "/api/delete"):
        return
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()] if "ndjson" in r.headers["content-type"] else [r.json()]
    last = lines[-1]
    assert last.get("error") is None, last
    if path in ("/api/generate", "/api/chat"):
        assert last["done"] is True and "created_at" in last
        if body.get("format") and last.get("done_reason") == "stop":
            json.loads(last.get("response") or last["message"]["content"])      # well-formed JSON
        if body.get("tools") and last["message"].get("tool_calls"):
            assert all(c["function"]["name"] == body["tools"][0]["function"]["name"] for c in last["message"]["tool_calls"])
    elif path == "/api/create":
        assert last["status"] == "success"


@pytest.mark.parametrize("name, method, path, body, expect", DOC_EXAMPLES, ids=[x[0] for x in DOC_EXAMPLES])
def test_documented_request_example(base, name, method, path, body, expect):
    with httpx.Client(base_url=base, timeout=120) as http:
        r = http.request(method, path, json=short(path, body)) if body is not None else http.request(method, path)
    if expect == OK:
        check_ok(path, body, r)
        TALLY["pass"] += 1
        return
    _, status, words = expect
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]
    message = message["message"] if isinstance(message, dict) else message
    assert all(w in message for w in words), message
    TALLY["refused clearly"] += 1


def test_documented_blob_push_and_create_from_gguf(base, smollm2_path):
    """docs/api.md "Push a Blob" (curl -T model.gguf) then "Create a model from GGUF" (files)."""
    data = smollm2_path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=base, timeout=120) as http:
        assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
        assert http.head(f"/api/blobs/{digest}").status_code == 200
        r = http.post("/api/create", json={"model": "my-gguf-model", "files": {"test.gguf": digest}, "stream": False})
        assert r.json() == {"status": "success"}
    TALLY["pass"] += 2


# ollama-python's examples/, as the requests they send (model names swapped); None: runs, else the refusal's words
def _chat(c, **kw):
    return c.chat(**{"model": CHAT, "messages": SKY, "options": {"num_predict": 6}, **kw})


def _tools_flow(c, stream: bool = False):
    def add_two_numbers(a: int, b: int) -> int:
        """Add two numbers

        Args:
          a (int): The first number
          b (int): The second number
        """
        return int(a) + int(b)
    messages = [{"role": "user", "content": "What is three plus one?"}]
    reply = c.chat(TOOLS, messages=messages, tools=[add_two_numbers], stream=stream, options={"num_predict": 24})
    parts = list(reply) if stream else [reply]
    for part in parts:
        for call in part.message.tool_calls or []:
            messages += [part.message, {"role": "tool", "content": str(add_two_numbers(**call.function.arguments)),
                                        "tool_name": call.function.name}]
    assert parts[-1].done and (any(p.message.content for p in parts) or len(messages) > 1)
    assert c.chat(TOOLS, messages=messages, options={"num_predict": 6}).done


def _structured(c):
    from pydantic import BaseModel

    class FriendInfo(BaseModel):
        name: str
        age: int
        is_available: bool

    class FriendList(BaseModel):
        friends: list[FriendInfo]
    r = c.chat(model=CHAT, format=FriendList.model_json_schema(), options={"temperature": 0, "num_predict": 160},
               messages=[{"role": "user", "content": FRIENDS}])
    if r.done_reason == "stop":
        FriendList.model_validate_json(r.message.content)


def _async(c, base):
    import ollama

    async def main():
        a = ollama.AsyncClient(host=base)
        r = await a.chat(CHAT, messages=SKY, options={"num_predict": 6})
        g = await a.generate(CHAT, "Why is the sky blue?", options={"num_predict": 6})
        return r, g
    r, g = asyncio.run(main())
    assert r["message"]["content"] and g["response"]


PYTHON_EXAMPLES = {
    "chat.py": lambda c, b: _chat(c),
    "chat-stream.py": lambda c, b: list(_chat(c, stream=True)),
    "chat-with-history.py": lambda c, b: _chat(c, messages=SKY + [{"role": "assistant", "content": "Scattering."},
                                                                  {"role": "user", "content": "What is the weather in Tokyo?"}]),
    "chat-logprobs.py": lambda c, b: _chat(c, messages=[{"role": "user", "content": "hi! be concise."}], logprobs=True, top_logprobs=3),
    "generate.py": lambda c, b: c.generate(CHAT, "Why is the sky blue?", options={"num_predict": 6}),
    "generate-stream.py": lambda c, b: list(c.generate(CHAT, "Why is the sky blue?", stream=True, options={"num_predict": 6})),
    "generate-logprobs.py": lambda c, b: c.generate(model=CHAT, prompt="hi! be concise.", logprobs=True, top_logprobs=3,
                                                    options={"num_predict": 6}),
    "async-chat.py + async-generate.py": _async,
    "structured-outputs.py + async-structured-outputs.py": lambda c, b: _structured(c),
    "tools.py + async-tools.py": lambda c, b: _tools_flow(c),
    "gpt-oss-tools-stream.py (tools, streamed)": lambda c, b: _tools_flow(c, stream=True),
    "list.py": lambda c, b: c.list(),
    "show.py": lambda c, b: c.show(CHAT),
    "ps.py": lambda c, b: c.ps(),
    "embed.py": lambda c, b: c.embed(model=EMBED, input="Hello, world!"),
    "create.py": lambda c, b: c.create(model="my-assistant", from_=CHAT, system="You are mario from Super Mario Bros.", stream=False),
    "fill-in-middle.py": (lambda c, b: c.generate(model=CHAT, prompt="def remove_non_ascii(s: str) -> str:\n    \"\"\" ",
                                                  suffix="\n    return result\n", options={"num_predict": 8}), "suffix"),
    "thinking.py": (lambda c, b: _chat(c, messages=[{"role": "user", "content": "What is 10 + 23?"}], think=True), "thinking"),
    "thinking-generate.py": (lambda c, b: c.generate(CHAT, "What is 10 + 23?", think=True), "thinking"),
    "thinking-levels.py": (lambda c, b: _chat(c, messages=[{"role": "user", "content": "What is 10 + 23?"}], think="low"), "thinking"),
    "multi-tool.py (think=True)": (lambda c, b: _chat(c, model=TOOLS, think=True, tools=[WEATHER]), "thinking"),
    "multimodal-chat.py": (lambda c, b: _chat(c, messages=[{"role": "user", "content": "Describe:", "images": [PNG]}]),
                           "images"),
    "multimodal-generate.py": (lambda c, b: c.generate(CHAT, "Describe this image:", images=[PNG]), "images"),
    "structured-outputs-image.py": (lambda c, b: _chat(c, format="json", messages=[
        {"role": "user", "content": "x", "images": [PNG]}]), "images"),
    "pull.py": (lambda c, b: list(c.pull("gemma3", stream=True)), "offline"),
    "generate-image.py (an image model)": (lambda c, b: list(c.generate(model="x/z-image-turbo", prompt="a sunset",
                                                                        stream=True)), "not found"),
}


@pytest.mark.parametrize("name", list(PYTHON_EXAMPLES))
def test_ollama_python_example(base, name):
    import ollama
    client = ollama.Client(host=base)
    example = PYTHON_EXAMPLES[name]
    if callable(example):
        example(client, base)
        TALLY["pass"] += 1
        return
    run, words = example
    with pytest.raises(ollama.ResponseError) as info:
        run(client, base)
    assert words in str(info.value.error), info.value.error
    TALLY["refused clearly"] += 1

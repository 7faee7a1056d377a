"""Tool calling against local engines: the grader, and what each engine does with ``tools=`` (chapter 09)."""
import json

import pytest

import labkit
from labkit import models, rag, toolcall
from labkit.toolcall import CASES, ToolCase, check_call


def call(name, **arguments):
    return [{"name": name, "arguments": json.dumps(arguments)}]


# --------------------------------------------------------------------------- the grader
def test_a_right_call_is_valid_and_each_failure_is_named():
    weather, add = CASES[0], CASES[1]
    assert check_call(weather, call("get_weather", city="Paris, France")).valid       # substring, any case
    assert check_call(add, call("add", a=25, b=17)).valid                             # a + b = b + a
    wrong_values = check_call(add, call("add", a=1, b=2))
    assert wrong_values.schema_ok and not wrong_values.valid and wrong_values.problems == ["wrong values"]
    wrong_tool = check_call(weather, call("add", a=1, b=2))
    assert wrong_tool.schema_ok and not wrong_tool.tool_ok and "wrong tool 'add'" in wrong_tool.problems
    bad_schema = check_call(add, call("add", a="17", b=25))                           # a string is not a number
    assert bad_schema.tool_ok and not bad_schema.schema_ok and "schema" in bad_schema.problems[0]
    not_json = check_call(weather, [{"name": "get_weather", "arguments": '{"city": "Par'}])
    assert not not_json.parsed and "not JSON" in not_json.problems[0]
    unknown = check_call(weather, call("get_time", city="Paris"))
    assert not unknown.valid and "not one of the tools offered" in unknown.problems[-1]
    text = check_call(weather, [], content="It is sunny in Paris.")
    assert not text.called and text.got == "It is sunny in Paris."


def test_cases_cover_every_tool_early_and_expect_schema_valid_calls():
    import jsonschema
    names = {t["function"]["name"] for t in toolcall.TOOLS}
    assert {c.tool for c in CASES[:3]} == names                 # the notebook's CI tier runs the first three
    for case in CASES:
        jsonschema.validate(case.arguments, toolcall._schema_for(case.tool, toolcall.TOOLS))
    summary = toolcall.summary([check_call(CASES[0], call("get_weather", city="Paris")),
                                check_call(CASES[1], [], content="42")])
    assert summary["valid"] == 0.5 and summary["called"] == 0.5 and summary["cases"] == 2


def test_template_check_and_the_chatml_tool_template():
    assert not toolcall.template_shows_tools(models.chat_template("smollm2"))   # SmolLM2's template has no tools
    assert not toolcall.template_shows_tools(None)
    path = toolcall.chatml_tool_template()
    assert path.read_text() == toolcall.CHATML_TOOL_TEMPLATE and "<tool_call>" in path.read_text()
    from jinja2 import Environment
    prompt = Environment().from_string(toolcall.CHATML_TOOL_TEMPLATE).render(
        messages=[{"role": "user", "content": "Hi"}], tools=toolcall.TOOLS, add_generation_prompt=True)
    assert '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------- real engines
@pytest.mark.full     # chapter 09 runs the tool-call cases on both engines in make test
def test_llama_cpp_python_with_chatml_function_calling():
    """llama-cpp-python's chatml-function-calling: grammar-picked tool names, replies turned into
    tool_calls; tool_choice="required" is not supported (HTTP 500, recorded, not raised)."""
    with labkit.serve("llama.cpp", "smollm2", chat_format="chatml-function-calling") as srv:
        rows = toolcall.measure(srv.openai(), srv.model, CASES[:3], max_tokens=40)
        required = toolcall.measure(srv.openai(), srv.model, CASES[:1], tool_choice="required", max_tokens=8)
    assert len(rows) == 3 and not any(r.error for r in rows)
    for r in rows:
        if r.called:           # the name comes from a grammar over the tools offered: never an unknown tool
            assert r.got.split("(")[0] in {t["function"]["name"] for t in toolcall.TOOLS}, r
    assert required[0].error.startswith("HTTP 500") and not required[0].called


@pytest.mark.full     # chapter 09 runs the tool-call cases on both engines in make test
def test_llama_server_needs_a_template_that_shows_the_tools():
    """llama-server renders the model's own template: SmolLM2's leaves the tools out of the prompt
    (same prompt length with and without them); a ChatML template with a tool section puts them in."""
    from labkit.notebook import _llama_server_need, _skip_reason
    reason = _skip_reason(*_llama_server_need())
    if reason:
        pytest.skip(reason)
    question = [{"role": "user", "content": CASES[0].prompt}]

    def prompt_tokens(srv, **extra):
        reply = srv.openai().chat.completions.create(model=srv.model, messages=question, max_tokens=1, **extra)
        return reply.usage.prompt_tokens

    with labkit.serve("llama-server", "smollm2", jinja=True) as own:
        assert prompt_tokens(own, tools=toolcall.TOOLS) == prompt_tokens(own)
    with labkit.serve("llama-server", "smollm2", jinja=True, chat_template_file=str(toolcall.chatml_tool_template())) as srv:
        assert prompt_tokens(srv, tools=toolcall.TOOLS) > prompt_tokens(srv) + 100
        rows = toolcall.measure(srv.openai(), srv.model, CASES[:2], max_tokens=40)
    assert len(rows) == 2 and not any(r.error for r in rows)
    assert all(r.parsed for r in rows if r.called)     # llama-server only returns tool_calls it could parse


def test_measure_records_what_the_engine_returned():
    """measure() on a fake client: the grading path from an OpenAI reply object to a row."""
    from types import SimpleNamespace as NS
    fn = NS(name="add", arguments='{"a": 17, "b": 25}')
    reply = NS(choices=[NS(message=NS(content=None, tool_calls=[NS(function=fn)]))])
    client = NS(chat=NS(completions=NS(create=lambda **kw: reply)))
    rows = toolcall.measure(client, "m", [ToolCase("What is 17 plus 25?", "add", {"a": 17, "b": 25})])
    assert rows[0].valid and rows[0].got == 'add({"a": 17, "b": 25})' and rows[0].seconds >= 0


def test_a_tool_result_turn_reaches_llama_cpp_python():
    """The second turn of an agent loop (assistant tool call with null content, then the tool's result), as LangChain's
    plain ChatOpenAI sends it: llama-cpp-python's server as upstream ships it answers HTTP 500; through labkit's OpenAI
    layer (labkit.llama_cpp_openai, the default of labkit.serve) it answers, and ChatOpenAI's max_tokens (sent as
    max_completion_tokens) caps the reply. If the first assertion starts failing, upstream fixed it."""
    import openai
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    history = [HumanMessage("What is 17 plus 25?"),
               AIMessage(content="", tool_calls=[{"name": "add", "args": {"a": 17, "b": 25}, "id": "call_1"}]),
               ToolMessage("42", tool_call_id="call_1")]

    def plain(srv):
        return ChatOpenAI(base_url=srv.base_url + "/v1", api_key="none", model=srv.model, max_retries=0, max_tokens=3)
    with labkit.serve("llama.cpp", "smollm2", chat_format="chatml-function-calling", openai_translation=False) as srv:
        with pytest.raises(openai.InternalServerError, match="valid string"):
            plain(srv).invoke(history)
    with labkit.serve("llama.cpp", "smollm2", chat_format="chatml-function-calling") as srv:
        reply = plain(srv).invoke(history)
        lab_reply = rag.chat_model(srv, max_tokens=8).invoke(history)
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.usage_metadata["output_tokens"] <= 3, reply.usage_metadata
    assert isinstance(lab_reply.content, str) and lab_reply.response_metadata["finish_reason"] in ("stop", "length")

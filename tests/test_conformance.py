"""labkit.conformance: the OpenAI requests real clients send, against the lab's two llama.cpp servers
and a stand-in that ignores every field (chapter 03)."""
import pytest

import labkit
from labkit import conformance
from labkit.fault_api import FaultAPI

# measured with the pinned llama-cpp-python and the llama.cpp it vendors (SmolLM2, its own chat format)
EXPECTED_LLAMA_CPP_PYTHON = {"max_completion_tokens": "ignored", "json_schema": "server error 5xx", "include_usage": "ignored",
                             "tool history": "server error 5xx", "tool_choice required": "ignored"}
# llama-server --jinja with the ChatML tool template: "required" answered with text (no grammar forced)
EXPECTED_LLAMA_SERVER = {"max_completion_tokens": "honoured", "json_schema": "honoured", "include_usage": "honoured",
                         "tool history": "honoured", "tool_choice required": "ignored"}


def outcomes(rows):
    return {r["probe"]: r["outcome"] for r in rows}


def test_a_server_that_ignores_every_field_is_reported_as_ignoring_it():
    with FaultAPI(None, name="canned", faults=["ok"] * 4 + ["503"]) as api:
        rows = conformance.probe(api)
    assert outcomes(rows) == {"max_completion_tokens": "ignored", "json_schema": "ignored", "include_usage": "ignored",
                              "tool history": "honoured", "tool_choice required": "server error 5xx"}, rows
    assert "4 completion tokens for a limit of 3" in rows[0]["detail"] and "injected 503" in rows[-1]["detail"]


def test_llama_cpp_python_server_as_measured_in_chapter_03():
    """If this starts failing, llama-cpp-python changed: update chapter 03's table text (and
    rag.chat_model's workarounds)."""
    with labkit.serve("llama.cpp", "smollm2") as srv:
        got = outcomes(conformance.probe(srv))
    assert got == EXPECTED_LLAMA_CPP_PYTHON, got


def test_llama_server_as_measured_in_chapter_03():
    from labkit import toolcall
    from labkit.notebook import _llama_server_need, _skip_reason
    reason = _skip_reason(*_llama_server_need())
    if reason:
        pytest.skip(reason)
    with labkit.serve("llama-server", "smollm2", jinja=True, chat_template_file=str(toolcall.chatml_tool_template())) as srv:
        got = outcomes(conformance.probe(srv))
    assert got == EXPECTED_LLAMA_SERVER, got


def test_json_schema_cut_by_max_tokens_counts_only_while_it_still_fits_the_schema():
    """A base model rambles inside the JSON string until max_tokens cuts it (Gemma 3 270M on llama-server):
    the grammar held. Text that is not JSON, or JSON of another shape, did not."""
    def reply(text, finish):
        return {"choices": [{"message": {"content": text}, "finish_reason": finish}]}
    assert conformance._json_schema(reply('{"colour": "blue"}', "stop"))[0]
    assert conformance._json_schema(reply('{\n    "colour": "1000000000', "length"))[0]
    assert not conformance._json_schema(reply('{\n    "colour": "1000000000', "stop"))[0]
    assert not conformance._json_schema(reply("Blue is a colour that", "length"))[0]
    assert not conformance._json_schema(reply('{"name": "blu', "length"))[0]


def test_a_model_that_stops_before_the_limit_leaves_max_completion_tokens_untested():
    def reply(used, finish):
        return {"usage": {"completion_tokens": used}, "choices": [{"finish_reason": finish}]}
    assert conformance._max_completion_tokens(reply(3, "length"))[0] is True
    assert conformance._max_completion_tokens(reply(9, "length"))[0] is False
    effect, detail = conformance._max_completion_tokens(reply(0, "stop"))      # Gemma 3 base, fallback chat format
    assert effect is None and conformance.classify(200, effect) == "inconclusive" and "stopped" in detail

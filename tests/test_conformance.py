"""labkit.conformance: the OpenAI requests real clients send, against the lab's two llama.cpp servers
and a stand-in that ignores every field (chapter 03)."""
import json
import urllib.error
import urllib.request

import pytest

import labkit
from labkit import conformance
from labkit.fault_api import FaultAPI

# measured with the pinned llama-cpp-python and the llama.cpp it vendors (SmolLM2, its own chat format): as upstream
# ships it (serve(..., openai_translation=False)), and through labkit's OpenAI layer (labkit.llama_cpp_openai, the default)
EXPECTED_LLAMA_CPP_PYTHON_UPSTREAM = {"max_completion_tokens": "ignored", "json_schema": "server error 5xx",
                                      "include_usage": "ignored", "tool history": "server error 5xx",
                                      "tool_choice required": "ignored"}
# through the layer: nothing fails and nothing is ignored silently (include_usage is named in X-Labkit-Ignored-Fields;
# "required" with one tool becomes that tool's name, which the function-calling handler forces)
EXPECTED_LLAMA_CPP_PYTHON = {"max_completion_tokens": "honoured", "json_schema": "honoured",
                             "include_usage": "ignored, said so", "tool history": "honoured",
                             "tool_choice required": "honoured"}
# llama-server --jinja with the ChatML tool template: "required" answered with text (no grammar forced)
EXPECTED_LLAMA_SERVER = {"max_completion_tokens": "honoured", "json_schema": "honoured", "include_usage": "honoured",
                         "tool history": "honoured", "tool_choice required": "ignored"}


def outcomes(rows):
    return {r["probe"]: r["outcome"] for r in rows}


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"     # 1×1 px


def image_chat(srv, stream: bool = False) -> tuple[int, dict]:
    """(status, JSON body) of a chat request with an image part, sent to a server of the text-only SmolLM2."""
    body = {"model": srv.model, "max_tokens": 4, "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}]}
    return post(srv, "/v1/chat/completions", body)


def post(srv, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(srv.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_a_server_that_ignores_every_field_is_reported_as_ignoring_it():
    with FaultAPI(None, name="canned", faults=["ok"] * 4 + ["503"]) as api:
        rows = conformance.probe(api)
    assert outcomes(rows) == {"max_completion_tokens": "ignored", "json_schema": "ignored", "include_usage": "ignored",
                              "tool history": "honoured", "tool_choice required": "server error 5xx"}, rows
    assert "4 completion tokens for a limit of 3" in rows[0]["detail"] and "injected 503" in rows[-1]["detail"]


@pytest.mark.full     # chapter 03 (10d) measures the same in make test
def test_llama_cpp_python_server_as_measured_in_chapter_03():
    """If this starts failing, llama-cpp-python changed: update chapter 03's table text (and
    labkit.llama_cpp_openai, which translates what the upstream server answers with a 500)."""
    with labkit.serve("llama.cpp", "smollm2", openai_translation=False) as srv:
        upstream = outcomes(conformance.probe(srv))
    with labkit.serve("llama.cpp", "smollm2") as srv:
        got = outcomes(conformance.probe(srv))
        images = [image_chat(srv, stream) for stream in (False, True)]
    assert upstream == EXPECTED_LLAMA_CPP_PYTHON_UPSTREAM, upstream
    assert got == EXPECTED_LLAMA_CPP_PYTHON, got
    # An image to the text-only model: llama-cpp-python itself answers 500 "can only concatenate str (not "list") to
    # str" (200 and an empty stream when streamed); labkit.vision.RefuseMedia, which labkit.repack puts in front of
    # its app, answers 400 naming what is missing and how to serve images.
    for status, body in images:
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
        assert body["error"]["message"].startswith("smollm2 does not support images: it is a text-only model"), body
        assert "--clip_model_path" in body["error"]["message"] and body["error"]["param"] == "messages[0].content[1]"


@pytest.mark.full     # chapter 03 (10d) measures the same in make test
def test_llama_server_as_measured_in_chapter_03():
    from labkit import toolcall
    from labkit.notebook import _llama_server_need, _skip_reason
    reason = _skip_reason(*_llama_server_need())
    if reason:
        pytest.skip(reason)
    with labkit.serve("llama-server", "smollm2", jinja=True, chat_template_file=str(toolcall.chatml_tool_template())) as srv:
        got = outcomes(conformance.probe(srv))
        chat_image = image_chat(srv)
        raw_image = post(srv, "/completion", {"prompt": {"prompt_string": "<__media__> What is this?",
                                                         "multimodal_data": [PNG]}, "n_predict": 4})
    assert got == EXPECTED_LLAMA_SERVER, got
    # An image to the text-only model, as the pinned llama-server answers it (no lab layer sits in front of the C++
    # server): a clear message, but a 500 on the OpenAI route; its native /completion route answers 400.
    assert chat_image[0] == 500 and chat_image[1]["error"]["message"].startswith("image input is not supported"), chat_image
    assert "mmproj" in chat_image[1]["error"]["message"]
    assert raw_image[0] == 400 and "does not support multimodal" in raw_image[1]["error"]["message"], raw_image


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

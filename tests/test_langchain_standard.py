"""LangChain's own standard integration tests (``langchain-tests``, written by LangChain's maintainers for
every chat-model and embeddings integration) run against the lab's servers, through the chat models the
chapters use (:func:`labkit.rag.chat_model`):

- ``ChatOllama`` on the Ollama-compatible server, with ``smollm2-tools:135m`` (the bundled SmolLM2 with a
  ChatML tool template) and ``OllamaEmbeddings`` with ``all-minilm``;
- ``ChatOpenAI`` on llama.cpp's ``llama-server`` (``--jinja`` and the same tool template);
- ``ChatOpenAI`` on llama-cpp-python's server with ``chatml-function-calling``, behind labkit's OpenAI layer
  (:mod:`labkit.llama_cpp_openai`, which ``labkit.serve`` puts in front of it).

Each test that fails is marked here with the reason, which is the 135M model's output (it answers too
little, or not in the shape asked for), never a server defect; ``xfail`` is not strict because a faster or
slower CPU can change a greedy answer. A server defect fails the test. About 4 minutes on 2 cores.
"""
import os

import pytest
from conftest import installed_or_skip

from labkit import llama_tools, rag, servers, toolcall
from labkit.notebook import llama_server_required

if os.environ.get("CI"):
    import langchain_tests  # noqa: F401  (CI installs requirements/dev.txt: the suite must run there)
else:
    pytest.importorskip("langchain_tests", reason="pip install -r requirements/dev.txt")
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests  # noqa: E402

pytestmark = [pytest.mark.langchain_standard, pytest.mark.full, pytest.mark.engine]   # make test-full

MAX_TOKENS = 64          # a tool call with its JSON arguments fits; a 135M model's story does not run on
SMALL_MODEL = "the 135M model"


# What the 135M model cannot do, named once; each class lists the tests that meet it.
NO_FREE_TOOL_CALL = "answers in prose instead of calling the tool when the call is not forced (no tool_choice)"
REPEATS_IN_JSON = "repeats itself inside the JSON until max_tokens, so the object is cut off or lacks a required field"
WRONG_ARGUMENT = "makes the forced call with the wrong argument (magic_function(input=10) for 'What is magic_function(3)?')"
TOOL_TESTS = ("test_tool_calling", "test_tool_calling_async", "test_bind_runnables_as_tools",
              "test_tool_calling_with_no_arguments", "test_agent_loop", "test_unicode_tool_call_integration")
JSON_TESTS = ("test_structured_output", "test_structured_output_async", "test_structured_output_pydantic_2_v1",
              "test_structured_output_optional_param", "test_json_mode")
# llama-cpp-python's own server (upstream, not labkit's): what it cannot do even behind labkit's OpenAI layer, as
# tests/test_conformance.py and tests/test_llama_cpp_openai.py pin. An XPASS here means upstream fixed it.
UPSTREAM_ONE_FORCED_TOOL = ("llama-cpp-python's server can force a call only to one named function: tool_choice "
                            "\"required\" (LangChain's \"any\") with several tools is answered 400 by labkit's layer")
UPSTREAM_NO_USAGE = "llama-cpp-python's server ignores stream_options.include_usage (labkit's layer names it in a header)"


@pytest.fixture(autouse=True)
def known_limits(request):
    """Marks the tests a class lists (by name, or name[parameter]) in ``model_limits`` (the 135M model's answers) or ``upstream_limits``
    (a third-party server's measured behaviour) as expected to fail, with the reason. For a model limit only
    an assertion about the answer, an unparsable answer or one cut off at max_tokens counts: an HTTP error
    from the server still fails the test."""
    import openai
    from langchain_core.exceptions import OutputParserException
    limits = {**getattr(request.cls, "model_limits", {}), **getattr(request.cls, "upstream_limits", {})}
    name = request.node.name if request.node.name in limits else request.node.originalname      # "test_x[param]" or "test_x"
    answer_errors = (AssertionError, OutputParserException, openai.LengthFinishReasonError)
    if why := getattr(request.cls, "model_limits", {}).get(name):
        request.node.add_marker(pytest.mark.xfail(reason=f"{SMALL_MODEL} {why} (a model limit, not the server's)",
                                                  raises=answer_errors, strict=False))
    elif why := getattr(request.cls, "upstream_limits", {}).get(name):
        request.node.add_marker(pytest.mark.xfail(reason=why, raises=(*answer_errors, openai.BadRequestError),
                                                  strict=False))


@pytest.fixture(scope="class", autouse=True)
def lab_server(request):
    """The class's server, started once per class and stopped after it (option values that are
    functions are called here, so that collecting the tests writes nothing)."""
    engine, model, options = request.cls.server_args
    if engine == "llama-server":
        installed_or_skip(lambda: llama_tools.program("llama-server"), llama_server_required(), "llama-server")
    options = {key: value() if callable(value) else value for key, value in options.items()}
    with servers.serve(engine, model, **options) as srv:
        request.cls.server = srv
        yield srv


class LabChatTests(ChatModelIntegrationTests):
    """What the chat classes share: class and arguments from :func:`labkit.rag.chat_model_spec`, the
    function behind the chapters' ``rag.chat_model``."""
    server_args: tuple = ()
    server = None
    served_model: str | None = None       # the name to ask for, where it is not the server's own

    @property
    def _spec(self):
        named = {"model": self.served_model} if self.served_model else {}
        return rag.chat_model_spec(self.server, max_tokens=MAX_TOKENS, timeout=120, **named)

    @property
    def chat_model_class(self):
        return self._spec[0]

    @property
    def chat_model_params(self) -> dict:
        return self._spec[1]

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False       # one model per server here

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatOllamaOnLabServer(LabChatTests):
    server_args = ("ollama", None, {})
    served_model = "smollm2-tools:135m"
    # JSON: only the pydantic schema fails (Ollama's "format" constrains the others to the schema's shape)
    model_limits = dict.fromkeys(TOOL_TESTS, NO_FREE_TOOL_CALL) | dict.fromkeys(
        ("test_structured_output[pydantic]", "test_structured_output_async[pydantic]", "test_structured_output_pydantic_2_v1",
         "test_json_mode"), REPEATS_IN_JSON)

    @property
    def has_tool_choice(self) -> bool:
        return False       # Ollama's API has no tool_choice (ChatOllama accepts the argument and drops it)


class TestChatOpenAIOnLlamaServer(LabChatTests):
    server_args = ("llama-server", None, {"jinja": True, "chat_template_file": toolcall.chatml_tool_template})
    model_limits = dict.fromkeys(TOOL_TESTS, NO_FREE_TOOL_CALL) | dict.fromkeys(JSON_TESTS, REPEATS_IN_JSON)

    @property
    def has_tool_choice(self) -> bool:
        # With a hand-written tool template llama-server answers tool_choice "required" with text
        # (tests/test_conformance.py): the tool tests then meet the model's free choice.
        return False


class TestChatOpenAIOnLlamaCppPython(LabChatTests):
    server_args = ("llama.cpp", None, {"chat_format": "chatml-function-calling"})
    model_limits = {"test_agent_loop": NO_FREE_TOOL_CALL, "test_json_mode": REPEATS_IN_JSON} | dict.fromkeys(
        ("test_structured_few_shot_examples", "test_structured_output", "test_structured_output_async",
         "test_structured_output_pydantic_2_v1", "test_structured_output_optional_param",
         "test_unicode_tool_call_integration"), REPEATS_IN_JSON) | dict.fromkeys(
        ("test_tool_calling", "test_tool_calling_async"), WRONG_ARGUMENT)
    upstream_limits = {"test_tool_choice": UPSTREAM_ONE_FORCED_TOOL, "test_usage_metadata_streaming": UPSTREAM_NO_USAGE}


class TestOllamaEmbeddingsOnLabServer(EmbeddingsIntegrationTests):
    server_args = ("ollama", "minilm", {})

    @property
    def embeddings_class(self):
        from langchain_ollama import OllamaEmbeddings
        return OllamaEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"base_url": self.server.base_url, "model": self.server.model}

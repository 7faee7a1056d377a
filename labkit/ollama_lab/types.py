"""The wire, typed: what the Ollama-compatible server sends, one shape per answer.

Field comments follow Ollama's ``docs/api.md`` (and ``api/types.go``); the ``/v1`` shapes follow
OpenAI's API reference as Ollama's ``docs/openai.md`` serves it. They are annotations (TypedDicts):
the handlers build plain dicts, and ``tests/test_ollama_contract.py`` parses every answer with the
clients' own types (ollama-python's pydantic models, the ``openai`` package's), and
``tests/test_ollama_service.py`` checks that these shapes name no field those clients lack.
"""
from __future__ import annotations

from typing import Any, Literal, TypedDict

# The two generation routes share one path through the server; this says which one a request took.
Kind = Literal["generate", "chat"]


class FinalStats(TypedDict, total=False):
    """The last object of a generate or chat answer adds these (``done: true``)."""

    done_reason: str            # why it stopped: "stop" (end of sequence or a stop string), "length" (num_predict),
                                # "load"/"unload" (an empty request that only loaded or unloaded the model)
    total_duration: int         # time spent generating the response, in nanoseconds
    load_duration: int          # time spent loading the model, in nanoseconds
    prompt_eval_count: int      # number of tokens in the prompt
    prompt_eval_duration: int   # time spent evaluating the prompt, in nanoseconds
    eval_count: int             # number of tokens in the response
    eval_duration: int          # time spent generating the response, in nanoseconds


class DoneStats(FinalStats, total=False):
    """What the generation loop hands the route shapers at the end (:class:`FinalStats`, plus generate's context)."""

    context: list[int]


class Logprob(TypedDict, total=False):
    token: str                  # the token's text
    logprob: float              # its log-probability
    bytes: list[int]            # its UTF-8 bytes (a token can be part of a character)
    top_logprobs: list[Logprob]  # the most likely alternatives, when top_logprobs was asked for


class GenerateResponse(FinalStats, total=False):
    """``POST /api/generate``: one object per piece when streaming, the final one with :class:`FinalStats`."""

    model: str                  # the model name
    created_at: str             # RFC 3339 time of this object
    response: str               # this piece of the answer ("" in the final object of a stream)
    done: bool                  # whether this is the last object
    context: list[int]          # final object, deprecated: the conversation's tokens, to send back as "context"
    logprobs: list[Logprob]     # when "logprobs": true was asked for


class ToolCall(TypedDict, total=False):
    function: dict[str, Any]    # {"name": ..., "arguments": {...}} — arguments as an object, not a string
    id: str


class Message(TypedDict, total=False):
    role: Literal["system", "user", "assistant", "tool"]
    content: str                # the message's text
    tool_calls: list[ToolCall]  # an assistant's calls to tools
    tool_name: str              # a tool result: the tool whose result this is
    thinking: str               # a thinking model's trace (refused: the lab's models do not think)


class ChatResponse(FinalStats, total=False):
    """``POST /api/chat``: as :class:`GenerateResponse`, with a message instead of a response string."""

    model: str
    created_at: str
    message: Message            # the assistant's message (this piece of it, when streaming)
    done: bool
    logprobs: list[Logprob]


class EmbedResponse(TypedDict, total=False):
    """``POST /api/embed``."""

    model: str
    embeddings: list[list[float]]   # one L2-normalised vector per input
    total_duration: int         # nanoseconds
    load_duration: int          # nanoseconds
    prompt_eval_count: int      # tokens embedded


class ModelDetails(TypedDict, total=False):
    parent_model: str           # the model this one was created FROM, when it was
    format: str                 # "gguf" (or "safetensors" for an imported folder)
    family: str                 # the architecture ("llama", "gemma3", "bert")
    families: list[str]
    parameter_size: str         # e.g. "134.52M"
    quantization_level: str     # e.g. "Q4_K_M"


class ListedModel(TypedDict, total=False):
    """One entry of ``GET /api/tags``."""

    name: str                   # Ollama's docs show both name and model (the same string)
    model: str
    modified_at: str            # RFC 3339
    size: int                   # bytes on disk
    digest: str                 # sha256 of the manifest
    details: ModelDetails


class RunningModel(TypedDict, total=False):
    """One entry of ``GET /api/ps``."""

    name: str
    model: str
    size: int                   # bytes it takes loaded: the weights and the KV cache of its slots
    digest: str
    details: ModelDetails
    expires_at: str             # RFC 3339: when keep_alive unloads it
    size_vram: int              # bytes in GPU memory (0 on a CPU)
    context_length: int         # the context it was loaded with


class ShowResponse(TypedDict, total=False):
    """``POST /api/show``."""

    modelfile: str              # a Modelfile that rebuilds the model
    parameters: str             # PARAMETER lines, one per line
    template: str               # the prompt template
    system: str                 # the SYSTEM message, when it has one
    license: str
    messages: list[Message]     # MESSAGE lines (a few-shot conversation)
    details: ModelDetails
    model_info: dict[str, Any]  # the GGUF's metadata (long arrays emptied unless "verbose": true)
    capabilities: list[str]     # "completion", "tools", "embedding"...
    modified_at: str


class Usage(TypedDict):
    """OpenAI's token counts (``/v1`` answers; streamed only with ``stream_options.include_usage``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionChunk(TypedDict, total=False):
    """One server-sent event of a streamed ``/v1/chat/completions`` (``object`` "chat.completion.chunk")."""

    id: str                     # the same for every chunk of one answer
    object: str
    created: int                # Unix seconds
    model: str
    system_fingerprint: str
    choices: list[dict[str, Any]]   # [{"index": 0, "delta": {...}, "finish_reason": None | "stop" | "length" | "tool_calls"}]
    usage: Usage                # only in the last chunk, when asked for (with an empty choices list)

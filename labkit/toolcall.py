"""Function (tool) calling against local engines, measured (chapter 09).

A client sends ``tools=[...]`` (JSON schemas) with a chat request; the *engine* must (1) show the
tools to the model through the chat template and (2) parse the model's reply back into
``message.tool_calls``. Both depend on the engine and the model:

* llama-cpp-python's server needs ``chat_format="chatml-function-calling"`` (``--chat_format``);
  with ``tool_choice="auto"`` a grammar first makes the model choose between ``functions.NAME:``
  and ``message:``, then constrains the arguments to the tool's JSON schema. It always renders a
  ChatML prompt, whatever template the model was trained with.
* llama.cpp's ``llama-server`` renders the model's own Jinja template (``--jinja``, on by default
  in current builds) and recognises the tool-call format that template teaches (Hermes
  ``<tool_call>``, Llama 3.x, ...). A template with no tool section never shows the tools to the
  model: :func:`template_shows_tools` tells, and :func:`chatml_tool_template` writes a ChatML
  template with a Hermes-style tool section to pass as ``chat_template_file=``.
* vLLM needs ``--enable-auto-tool-choice --tool-call-parser NAME`` (see the chapter's text).

:data:`CASES` is a small fixed set of prompts with the call each should produce; :func:`measure`
sends them through the OpenAI ``tools=`` API and :func:`check_call` grades each reply: a call was
made, its arguments parse as JSON, the tool name is right, the arguments match the tool's JSON
schema, and the values are right. :func:`summary` turns that into rates.

>>> case = CASES[0]
>>> check_call(case, [{"name": "get_weather", "arguments": '{"city": "paris"}'}]).valid
True
>>> check_call(case, [{"name": "get_weather", "arguments": '{"town": "Paris"}'}]).schema_ok
False
>>> check_call(case, [], content="It is sunny.").called
False
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .env import cache_dir

TOOLS: list[dict] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers and return their sum.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search the lab's documentation for a topic.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "What to look for"}},
                       "required": ["query"], "additionalProperties": False}}},
]


@dataclass(frozen=True)
class ToolCase:
    """A prompt and the call it should produce. Expected strings must appear (any case) in the
    model's value; numbers must be equal (``add`` is commutative: either order counts)."""

    prompt: str
    tool: str
    arguments: dict


# Interleaved so that any prefix (the notebook's CI tier runs the first few) covers all three tools.
CASES: tuple[ToolCase, ...] = (
    ToolCase("What is the weather in Paris right now?", "get_weather", {"city": "Paris"}),
    ToolCase("What is 17 plus 25?", "add", {"a": 17, "b": 25}),
    ToolCase("Search the docs for how to rotate an API key.", "search_docs", {"query": "API key"}),
    ToolCase("Is it raining in Tokyo today?", "get_weather", {"city": "Tokyo"}),
    ToolCase("Add 3.5 and 4.", "add", {"a": 3.5, "b": 4}),
    ToolCase("Look up the documentation about quantization.", "search_docs", {"query": "quantization"}),
    ToolCase("Compute the sum of 120 and 80.", "add", {"a": 120, "b": 80}),
    ToolCase("Tell me the weather forecast for Berlin.", "get_weather", {"city": "Berlin"}),
)


@dataclass
class CallCheck:
    """How one reply fared. ``valid`` needs every step; the others say which step failed first."""

    prompt: str
    expected: str
    called: bool = False          # the engine returned at least one tool call
    parsed: bool = False          # its arguments are a JSON object
    tool_ok: bool = False         # the right tool name
    schema_ok: bool = False       # arguments valid against that tool's JSON schema
    values_ok: bool = False       # and the values are the expected ones
    got: str = ""                 # what came back: "name(arguments)" or the text reply
    error: str = ""               # an engine error (HTTP status and message), if any
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.values_ok


def _schema_for(name: str, tools: list[dict]) -> dict | None:
    return next((t["function"]["parameters"] for t in tools if t["function"]["name"] == name), None)


def _values_match(expected: dict, actual: dict) -> bool:
    def same(want, have) -> bool:
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            return isinstance(have, (int, float)) and not isinstance(have, bool) and float(have) == float(want)
        return isinstance(have, str) and str(want).lower() in have.lower()

    if all(same(v, actual.get(k)) for k, v in expected.items()):
        return True
    # a + b: the other order is as right
    return set(expected) == {"a", "b"} and same(expected["a"], actual.get("b")) and same(expected["b"], actual.get("a"))


def check_call(case: ToolCase, calls: list[dict], content: str | None = None, tools: list[dict] = TOOLS) -> CallCheck:
    """Grade the first of ``calls`` (``{"name": ..., "arguments": "<json text>"}``) against ``case``."""
    import jsonschema
    row = CallCheck(case.prompt, f"{case.tool}({json.dumps(case.arguments)})")
    if not calls:
        row.got = (content or "").strip()[:160]
        row.problems.append("no tool call (answered in text)")
        return row
    name, raw = calls[0].get("name", ""), calls[0].get("arguments", "")
    row.called, row.got = True, f"{name}({raw})"
    try:
        arguments = json.loads(raw) if isinstance(raw, str) else raw
        row.parsed = isinstance(arguments, dict)
    except json.JSONDecodeError as exc:
        row.problems.append(f"arguments are not JSON: {exc.msg}")
        return row
    if not row.parsed:
        row.problems.append("arguments are not a JSON object")
        return row
    row.tool_ok = name == case.tool
    if not row.tool_ok:
        row.problems.append(f"wrong tool {name!r}")
    schema = _schema_for(name, tools)
    if schema is None:
        row.problems.append(f"{name!r} is not one of the tools offered")
        return row
    try:
        jsonschema.validate(arguments, schema)
        row.schema_ok = True
    except jsonschema.ValidationError as exc:
        row.problems.append(f"schema: {exc.message}")
    row.values_ok = row.tool_ok and row.schema_ok and _values_match(case.arguments, arguments)
    if row.tool_ok and row.schema_ok and not row.values_ok:
        row.problems.append("wrong values")
    return row


def measure(client, model: str, cases=CASES, tools: list[dict] = TOOLS, *, tool_choice="auto",
            max_tokens: int = 48, seed: int = 0) -> list[CallCheck]:
    """Send every case through ``client`` (an ``openai.OpenAI``) with ``tools=``; one :class:`CallCheck` each.

    Greedy decoding (``temperature=0``) and a fixed ``seed``: the rate is a property of the engine
    and model, not of a lucky sample. An engine error (e.g. HTTP 500 for a ``tool_choice`` it does
    not support) is recorded in the row, not raised, so one bad case cannot hide the others.
    """
    import openai
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        try:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": case.prompt}], tools=tools,
                tool_choice=tool_choice, max_tokens=max_tokens, temperature=0, seed=seed)
        except openai.APIStatusError as exc:
            row = CallCheck(case.prompt, f"{case.tool}({json.dumps(case.arguments)})",
                            error=f"HTTP {exc.status_code}: {str(exc.message)[:160]}")
            row.problems.append("engine error")
        else:
            message = reply.choices[0].message
            calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]
            row = check_call(case, calls, message.content, tools)
        row.seconds = time.perf_counter() - t0
        rows.append(row)
    return rows


def summary(rows: list[CallCheck]) -> dict:
    """Rates over ``rows``: share of replies that called a tool, parsed, named the right tool,
    matched the schema, and were fully valid (right values too)."""
    n = len(rows) or 1
    return {"cases": len(rows),
            "called": sum(r.called for r in rows) / n, "parsed": sum(r.parsed for r in rows) / n,
            "right tool": sum(r.tool_ok for r in rows) / n, "schema ok": sum(r.schema_ok for r in rows) / n,
            "valid": sum(r.valid for r in rows) / n, "engine errors": sum(bool(r.error) for r in rows),
            "seconds": sum(r.seconds for r in rows)}


def as_records(rows: list[CallCheck]) -> list[dict]:
    """Rows as plain dicts (for a DataFrame), with ``valid`` and the problems joined."""
    return [{**asdict(r), "valid": r.valid, "problems": "; ".join(r.problems)} for r in rows]


# --------------------------------------------------------------------------- templates
def template_shows_tools(template: str | None) -> bool:
    """True when a Jinja chat template renders the request's ``tools`` (it mentions the variable)."""
    return bool(template) and "tools" in template


# ChatML (<|im_start|>) with the Hermes tool section: llama-server recognises <tool_call> and parses it.
CHATML_TOOL_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for tool_call in message.tool_calls %}<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""


def chatml_tool_template() -> Path:
    """:data:`CHATML_TOOL_TEMPLATE` written under labkit's cache, for ``chat_template_file=``.

    Only right for models trained on ChatML (``<|im_start|>``): another model's turn markers differ.
    """
    path = cache_dir() / "templates" / "chatml-hermes-tools.jinja"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != CHATML_TOOL_TEMPLATE:
        path.write_text(CHATML_TOOL_TEMPLATE)
    return path

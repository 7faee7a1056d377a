"""Tool calling in the Ollama-compatible server (chapter 02; the Integration chapter calls tools through it).

Ollama decides whether a model can call tools from its template: a template that uses ``.Tools``
gets the ``tools`` capability, the request's tools are rendered into the prompt by that template,
and the model's reply is scanned for calls after the *tag* the template writes before a call
(``<tool_call>`` in ChatML-style templates; ``{`` when a template has no tag, i.e. any JSON object
may be a call). This module does the same: :func:`tool_tag` finds the tag, :class:`ToolCallParser`
splits a streamed reply into content and calls, :func:`normalize_tools` and
:func:`normalize_tool_calls` check what a request sends.

The bundled SmolLM2-135M-Instruct's own chat template has no tools section, so, like on a real
Ollama, ``smollm2:135m`` answers a ``tools`` request with 400. :data:`SMOLLM2_TOOLS_TEMPLATE` is
SmolLM2's ChatML with a tools section; its calls are bare JSON objects with no tag (the layout of
Ollama's Llama 3.2 template), so the tag is ``{``. The server registers it over the same weights as
``smollm2-tools:135m``. Left free, a 135M model almost never answers with a call (tests measure the
rate); with ``format`` set to the schema of a call, constrained decoding makes every reply a
well-formed call, which the parser then turns into ``message.tool_calls``.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .errors import APIError

SMOLLM2_TOOLS_TEMPLATE = """\
{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{ if .System }}{{ .System }}{{ else }}You are a helpful AI assistant named SmolLM, trained by Hugging Face{{ end }}
{{- if .Tools }}

You can call functions. The available functions, as JSON schemas:
{{- range .Tools }}
{{ .Function }}
{{- end }}

To call a function, answer with only a JSON object of the form
{"name": "<function name>", "arguments": {<argument name>: <value>, ...}}
and nothing else.
{{- end }}<|im_end|>
{{ else }}<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}{{ else if .ToolCalls }}
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}{{ end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

_IF_TOOLCALLS = re.compile(r"\{\{-?\s*(?:else\s+)?if\s+[^}]*\.ToolCalls\b[^}]*-?\}\}")


def tool_tag(template: str, jinja: bool = False) -> str:
    """The text a template writes before a tool call, which marks a call in the model's output.

    As Ollama's parser does: the first non-blank text after ``{{ if .ToolCalls }}``, cut before any
    ``{``; ``{`` when there is none (then any JSON object in the reply may be a call).

    >>> tool_tag("{{ if .ToolCalls }}<tool_call>{{ range .ToolCalls }}{{ end }}{{ end }}"), tool_tag(SMOLLM2_TOOLS_TEMPLATE)
    ('<tool_call>', '{')
    """
    if jinja:
        m = re.search(r"<(tool_call|function_call|tools?_calls?)>", template)
        return m.group(0) if m else "{"
    m = _IF_TOOLCALLS.search(template)
    if not m:
        return "{"
    for text in re.split(r"\{\{.*?\}\}", template[m.end():], flags=re.DOTALL):
        if text.strip():
            return text.split("{", 1)[0].strip() or "{"
    return "{"


def _json_objects(text: str) -> list[tuple[int, int, Any]]:
    """(start, end, value) of each complete top-level JSON value starting with ``{`` or ``[`` in ``text``."""
    out, i = [], 0
    decoder = json.JSONDecoder()
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            out.append((i, end, value))
            i = end
        else:
            i += 1
    return out


def _as_call(value: Any, names: set[str]) -> dict | None:
    if not isinstance(value, dict):
        return None
    fn = value.get("function") if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if name not in names or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": args}


class ToolCallParser:
    """Split a streamed reply into content and tool calls, the way Ollama's ``tools.Parser`` does.

    Text before the tag streams as content; from the tag on, text is held until it parses as calls
    to the request's tools. Held text that never parses is given back as content at :meth:`finish`,
    so nothing the model wrote disappears.

    >>> p = ToolCallParser("<tool_call>", ["add"])
    >>> p.add('Sure. <tool_ca'), p.add('ll>\\n{"name": "add", "arguments": {"a": 1}}\\n</tool_call>'), p.finish()
    (([], 'Sure. '), ([{'name': 'add', 'arguments': {'a': 1}}], ''), ([], ''))
    """

    def __init__(self, tag: str, names: list[str]):
        self.tag, self.names = tag, set(names)
        self.buffer, self.calling, self.done = "", False, False

    def add(self, text: str) -> tuple[list[dict], str]:
        if self.done:
            return [], text
        self.buffer += text
        content = ""
        if not self.calling:
            i = self.buffer.find(self.tag)
            if i < 0:
                keep = next((k for k in range(min(len(self.tag), len(self.buffer)), 0, -1)
                             if self.buffer.endswith(self.tag[:k])), 0)
                content, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                if self.tag in "{[" and content.strip():
                    self.done = True             # a reply that starts with text is not a call
                    content, self.buffer = content + self.buffer, ""
                return [], content
            content, self.buffer = self.buffer[:i], self.buffer[i:]
            if self.tag in "{[" and content.strip():
                self.done = True
                content, self.buffer = content + self.buffer, ""
                return [], content
            self.calling = True
        calls = []
        for start, end, value in _json_objects(self.buffer):
            items = value if isinstance(value, list) else [value]
            found = [c for c in (_as_call(v, self.names) for v in items) if c]
            if found:
                calls.extend(found)
                self.buffer = self.buffer[end:]
                return calls + self.add("")[0], content
        return calls, content

    def finish(self) -> tuple[list[dict], str]:
        """The calls still parseable at the end of the reply, and the held text that was not a call."""
        rest = self.buffer
        self.buffer = ""
        if not self.calling:
            return [], rest
        leftover = re.sub(r"</?\w*tool_calls?>|\s", "", rest)
        return [], ("" if not leftover else rest)


def call_objects(calls: list[dict], start: int = 0) -> list[dict]:
    """Parsed calls as Ollama's ``message.tool_calls`` entries."""
    return [{"id": "call_" + uuid.uuid4().hex[:8],
             "function": {"index": start + i, "name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(calls)]


def normalize_tools(tools: Any) -> list[dict]:
    """A request's ``tools`` as a list of ``{"type": "function", "function": {...}}``; 400 if malformed."""
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                "\"description\": ..., \"parameters\": {...}}}}")
        out.append({"type": tool.get("type") or "function", "function": fn})
    return out


def normalize_tool_calls(raw: Any, where: str) -> list[dict]:
    """An assistant message's ``tool_calls`` as ``[{"function": {"name", "arguments": {...}}}]``.
    Arguments may be an object or (OpenAI's spelling) a JSON string; 400 if malformed."""
    if not isinstance(raw, list):
        raise APIError(400, f"{where}.tool_calls must be a list")
    out = []
    for i, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"{where}.tool_calls[{i}] must be {{\"function\": {{\"name\": ..., \"arguments\": {{...}}}}}}")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise APIError(400, f"{where}.tool_calls[{i}]: invalid tool call arguments (not JSON)") from None
        if not isinstance(args, dict):
            raise APIError(400, f"{where}.tool_calls[{i}]: arguments must be a JSON object")
        entry = {"function": {"name": fn["name"], "arguments": args}}
        if call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out

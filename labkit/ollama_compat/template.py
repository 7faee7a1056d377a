"""The Go-template subset a Modelfile ``TEMPLATE`` may use with labkit's stand-in."""
from __future__ import annotations

import re

from .errors import APIError

_TAG_RE = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def _pieces(template: str) -> list[tuple[str, str]]:
    """``template`` as ("text", ...) and ("tag", ...) pieces, with ``{{-``/``-}}`` trimming applied."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    for m in _TAG_RE.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if pieces and pieces[-1][0] == "trim_next":
            pieces.pop()
            text = text.lstrip()
        pieces.append(("text", text))
        pieces.append(("tag", m.group(2)))
        if m.group(3):
            pieces.append(("trim_next", ""))
        pos = m.end()
    tail = template[pos:]
    if pieces and pieces[-1][0] == "trim_next":
        pieces.pop()
        tail = tail.lstrip()
    pieces.append(("text", tail))
    return pieces


def render_go_template(template: str, values: dict, *, stop_at_response: bool = True) -> str:
    """Render the Go-template basics Ollama's classic templates use: ``{{ .System }}``,
    ``{{ .Prompt }}``, ``{{ .Response }}``, ``{{ if .X }}…{{ else }}…{{ end }}`` and ``{{-``/``-}}``.
    Text after ``{{ .Response }}`` is dropped while generating, as Ollama does.

    >>> render_go_template("{{ if .System }}S:{{ .System }}\\n{{ end }}U:{{ .Prompt }}\\nA:{{ .Response }}</s>",
    ...                    {"System": "", "Prompt": "hi", "Response": ""})
    'U:hi\\nA:'
    """
    out: list[str] = []
    stack: list[tuple[bool, bool]] = []          # (parent active, this branch taken)
    active = True
    for kind, body in _pieces(template):
        if kind == "text":
            if active:
                out.append(body)
            continue
        var = re.fullmatch(r"\.(\w+)", body)
        cond = re.fullmatch(r"if\s+\.(\w+)", body)
        if var:
            if active:
                if var.group(1) == "Response" and stop_at_response:
                    out.append(str(values.get("Response") or ""))
                    return "".join(out)
                out.append(str(values.get(var.group(1)) or ""))
        elif cond:
            taken = bool(values.get(cond.group(1)))
            stack.append((active, taken))
            active = active and taken
        elif body == "else":
            if not stack:
                raise APIError(400, "template error: {{ else }} without {{ if }}")
            parent, taken = stack[-1]
            active = parent and not taken
        elif body == "end":
            if not stack:
                raise APIError(400, "template error: {{ end }} without {{ if }}")
            active = stack.pop()[0]
        elif body.startswith("/*"):
            continue
        else:
            raise APIError(400, f"template uses {{{{ {body} }}}}, which labkit's stand-in does not support "
                                "(it renders .System, .Prompt, .Response and if/else/end); a real Ollama "
                                "supports full Go templates")
    if stack:
        raise APIError(400, "template error: an {{ if }} has no {{ end }}")
    return "".join(out)

"""The Go-template language of Modelfile ``TEMPLATE``s, as much of it as Ollama's library templates use.

Two kinds of template exist (Ollama's ``docs/template.md``): *classic* ones render one turn from
``.System``, ``.Prompt`` and ``.Response``; *message* ones loop over ``.Messages`` (each with
``.Role``, ``.Content``, ``.ToolCalls``, ``.ToolName``) and may list ``.Tools`` — the templates of
tool-calling models. This module parses Go's ``text/template`` syntax (``{{ if }}``/``{{ else if }}``/
``{{ else }}``/``{{ end }}``, ``range`` with ``$i, $x :=``, ``with``, variables, ``$.Field``, pipes,
parentheses, ``{{-``/``-}}`` trimming, comments) and evaluates it with Go's built-in functions
(``eq ne lt le gt ge and or not len index slice print printf``) plus Ollama's ``json``. Structured
values print as compact JSON, as Ollama's tool types do. Anything else (``define``, ``template``,
``block``, ``break``) is a 400 naming the construct.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any

from .errors import APIError

_TAG_RE = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
_TOKEN_RE = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<punct>:=|[()|,=])
  | (?P<var>\$\w*(?:\.\w+)*)
  | (?P<field>(?:\.\w+)+|\.)
  | (?P<ident>[A-Za-z_]\w*)
)""", re.VERBOSE)
_UNSUPPORTED = ("define", "template", "block", "break", "continue")


class _Stop(Exception):
    """Raised at ``.Response`` while generating: the rest of the template is the model's to write."""


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


def _unsupported(body: str) -> APIError:
    return APIError(400, f"template uses {{{{ {body} }}}}, which labkit's stand-in does not support (it renders "
                         "if/else/range/with, variables, Go's built-in functions and json); a real Ollama "
                         "supports full Go templates")


def _tokens(body: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(body):
        m = _TOKEN_RE.match(body, pos)
        if not m or m.end() == pos:
            if body[pos:].strip() == "":
                break
            raise _unsupported(body)
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


# ------------------------------------------------------------------------------------------ parsing
def _parse(template: str) -> list:
    """The template as a tree: ("text", s), ("out", pipe), ("set", names, pipe, declare),
    ("if", [(pipe, body), ...], else_body), ("range"/"with", names, pipe, body, else_body)."""
    items = []
    for kind, body in _pieces(template):
        if kind == "text":
            if body:
                items.append(("text", body))
        elif not body.startswith("/*"):
            items.append(("tag", body))
    nodes, end = _parse_list(items, 0)
    if end < len(items):
        raise APIError(400, f"template error: {{{{ {items[end][1]} }}}} without {{{{ if }}}}")
    return nodes


def _parse_list(items: list, i: int) -> tuple[list, int]:
    """Nodes from ``items[i:]`` up to an ``end``/``else`` tag (its index is returned, not consumed)."""
    nodes: list = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(None, 1)[0] if body.split() else ""
        if word in ("end", "else"):
            return nodes, i
        if word in _UNSUPPORTED:
            raise _unsupported(body)
        if word in ("if", "range", "with"):
            node, i = _parse_block(items, i, word, body[len(word):].strip())
            nodes.append(node)
            continue
        nodes.append(_parse_action(body))
        i += 1
    return nodes, i


def _parse_block(items: list, i: int, word: str, rest: str) -> tuple[tuple, int]:
    branches, else_body = [], []
    names, pipe = _split_decl(rest) if word != "if" else ([], _tokens(rest))
    body, j = _parse_list(items, i + 1)
    branches.append((pipe, body))
    while True:
        if j >= len(items):
            raise APIError(400, f"template error: an {{{{ {word} }}}} has no {{{{ end }}}}")
        tag = items[j][1]
        if tag == "end":
            break
        after = tag[len("else"):].strip()
        if after.startswith("if ") and word == "if":
            body, j = _parse_list(items, j + 1)
            branches.append((_tokens(after[3:]), body))
            continue
        if after:
            raise _unsupported(tag)
        else_body, j = _parse_list(items, j + 1)
        if j >= len(items) or items[j][1] != "end":
            raise APIError(400, f"template error: an {{{{ {word} }}}} has no {{{{ end }}}}")
        break
    if word == "if":
        return ("if", branches, else_body), j + 1
    return (word, names, branches[0][0], branches[0][1], else_body), j + 1


def _split_decl(text: str) -> tuple[list[str], list]:
    """``$i, $x := pipe`` → (["$i", "$x"], tokens of pipe); no declaration → ([], tokens)."""
    toks = _tokens(text)
    if any(t == ("punct", ":=") for t in toks):
        k = toks.index(("punct", ":="))
        return [v for kind, v in toks[:k] if kind == "var"], toks[k + 1:]
    return [], toks


def _parse_action(body: str) -> tuple:
    toks = _tokens(body)
    for op in (":=", "="):
        if ("punct", op) in toks:
            k = toks.index(("punct", op))
            return ("set", [v for kind, v in toks[:k] if kind == "var"], toks[k + 1:], op == ":=")
    return ("out", toks)


# ------------------------------------------------------------------------------------------ values
def _truth(v: Any) -> bool:
    """Go's truth: false, 0, nil, and empty strings, lists and maps are false."""
    return bool(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v != 0


def _field(value: Any, name: str) -> Any:
    """``value.Name``: a map key, spelled as given or in snake case (Go field ``ToolCalls`` → JSON ``tool_calls``)."""
    if not isinstance(value, dict):
        return None
    if name in value:
        return value[name]
    return value.get(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower())


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    return str(v)


def _compare(op: str, a: Any, b: Any) -> bool:
    return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op]


def _call(name: str, args: list) -> Any:
    if name == "eq":
        return any(args[0] == x for x in args[1:])
    if name == "ne":
        return args[0] != args[1]
    if name in ("lt", "le", "gt", "ge"):
        return _compare(name, args[0], args[1])
    if name == "and":
        return next((a for a in args if not _truth(a)), args[-1])
    if name == "or":
        return next((a for a in args if _truth(a)), args[-1])
    if name == "not":
        return not _truth(args[0])
    if name == "len":
        return len(args[0] or [])
    if name == "index":
        v = args[0]
        for k in args[1:]:
            v = v[k] if isinstance(v, (list, str)) else _field(v, k)
        return v
    if name == "slice":
        return (args[0] or [])[args[1]:args[2] if len(args) > 2 else None] if len(args) > 1 else args[0]
    if name in ("print", "json"):
        return "".join(_text(a) for a in args)
    if name == "printf":
        return re.sub(r"%[vsd]", "{}", args[0]).format(*(_text(a) for a in args[1:]))
    if name == "currentDate":
        return _dt.date.today().isoformat()
    raise APIError(400, f"template uses the function {name!r}, which labkit's stand-in does not support")


class _Renderer:
    def __init__(self, root: dict, stop_at_response: bool):
        self.root, self.stop = root, stop_at_response
        self.out: list[str] = []

    def run(self, nodes: list, dot: Any, scope: dict) -> None:
        for node in nodes:
            kind = node[0]
            if kind == "text":
                self.out.append(node[1])
            elif kind == "out":
                self.out.append(_text(self.pipe(node[1], dot, scope)))
                if self.stop and node[1] == [("field", ".Response")] and dot is self.root:
                    raise _Stop
            elif kind == "set":
                value = self.pipe(node[2], dot, scope)
                scope[node[1][0]] = value
            elif kind == "if":
                for pipe, body in node[1]:
                    if _truth(self.pipe(pipe, dot, scope)):
                        self.run(body, dot, dict(scope))
                        break
                else:
                    self.run(node[2], dot, dict(scope))
            elif kind == "with":
                value = self.pipe(node[2], dot, scope)
                self.run(node[3] if _truth(value) else node[4], value if _truth(value) else dot, dict(scope))
            else:
                self.range(node, dot, scope)

    def range(self, node: tuple, dot: Any, scope: dict) -> None:
        _, names, pipe, body, else_body = node
        value = self.pipe(pipe, dot, scope)
        pairs = list(enumerate(value)) if isinstance(value, list) else sorted((value or {}).items())
        if not pairs:
            self.run(else_body, dot, dict(scope))
        for key, item in pairs:
            inner = dict(scope)
            if len(names) == 1:
                inner[names[0]] = item
            elif len(names) == 2:
                inner[names[0]], inner[names[1]] = key, item
            self.run(body, item, inner)

    def pipe(self, toks: list, dot: Any, scope: dict) -> Any:
        """A pipeline: commands separated by ``|``, each result passed as the next one's last argument."""
        commands, current, depth = [], [], 0
        for tok in toks:
            if tok == ("punct", "|") and depth == 0:
                commands.append(current)
                current = []
                continue
            depth += {"(": 1, ")": -1}.get(tok[1], 0) if tok[0] == "punct" else 0
            current.append(tok)
        commands.append(current)
        result, first = None, True
        for cmd in commands:
            result = self.command(cmd, dot, scope, None if first else [result])
            first = False
        return result

    def command(self, toks: list, dot: Any, scope: dict, piped: list | None) -> Any:
        args, i = [], 0
        while i < len(toks):
            kind, text = toks[i]
            if text == "(":
                depth, j = 1, i + 1
                while depth:
                    if j >= len(toks):
                        raise APIError(400, "template error: unbalanced parentheses")
                    depth += {"(": 1, ")": -1}.get(toks[j][1], 0) if toks[j][0] == "punct" else 0
                    j += 1
                args.append(("value", self.pipe(toks[i + 1:j - 1], dot, scope)))
                i = j
                continue
            args.append((kind, text))
            i += 1
        if not args:
            raise APIError(400, "template error: an empty action")
        values = [self.operand(a, dot, scope) for a in args[1:]] + (piped or [])
        head_kind, head = args[0]
        if head_kind == "ident" and head not in ("true", "false", "nil"):
            return _call(head, values)
        if values:
            raise _unsupported(" ".join(t for _, t in toks))
        return self.operand(args[0], dot, scope)

    def operand(self, arg: tuple, dot: Any, scope: dict) -> Any:
        kind, text = arg
        if kind == "value":
            return text
        if kind == "str":
            return text[1:-1] if text[0] == "`" else json.loads(text)
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "ident":
            return {"true": True, "false": False, "nil": None}.get(text, text)
        if kind == "field":
            if text == ".":
                return dot
            value = dot
            names = text.strip(".").split(".")
            for name in names:
                value = _field(value, name)
            return value
        name, *fields = text.split(".")
        if name == "$":
            value = self.root
        elif name in scope:
            value = scope[name]
        else:
            raise APIError(400, f"template error: undefined variable {name}")
        for f in fields:
            value = _field(value, f)
        return value


def render_go_template(template: str, values: dict, *, stop_at_response: bool = True) -> str:
    """Render ``template`` with ``values`` (``System``, ``Prompt``, ``Response``, ``Messages``, ``Tools``, ...).
    While generating (``stop_at_response``), output ends at ``{{ .Response }}``, as Ollama cuts it.

    >>> render_go_template("{{ if .System }}S:{{ .System }}\\n{{ end }}U:{{ .Prompt }}\\nA:{{ .Response }}</s>",
    ...                    {"System": "", "Prompt": "hi", "Response": ""})
    'U:hi\\nA:'
    >>> render_go_template('{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $i }}:{{ .Content }};'
    ...                    '{{ end }}{{ end }}', {"Messages": [{"role": "user", "content": "hi"}]})
    '0:hi;'
    """
    renderer = _Renderer(values, stop_at_response)
    try:
        renderer.run(_parse(template), values, {"$": values})
    except _Stop:
        pass
    except (TypeError, IndexError, KeyError, ValueError) as exc:
        raise APIError(400, f"template error: {exc}") from None
    return "".join(renderer.out)


def references(template: str, name: str) -> bool:
    """Whether a Go template uses the field ``.Name`` anywhere (Ollama decides capabilities this way)."""
    return any(kind == "tag" and re.search(rf"\.{name}\b", body) for kind, body in _pieces(template))

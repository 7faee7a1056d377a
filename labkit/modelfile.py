"""Ollama Modelfiles: parse, validate, and write them back (chapter 02).

A Modelfile is a list of instructions, one per line (format: Ollama's ``docs/modelfile.mdx``)::

    # a comment
    FROM smollm2:135m
    PARAMETER temperature 0.2
    PARAMETER stop "<|im_end|>"
    PARAMETER stop "User:"
    SYSTEM \"\"\"You are a pirate.
    Answer in one sentence.\"\"\"
    MESSAGE user Is Paris in France?
    MESSAGE assistant Arr, aye.

Instructions are case-insensitive; arguments may be bare text, a ``"quoted string"`` (with
``\\"`` escapes) or a ``\"\"\"triple-quoted\"\"\"`` block spanning lines. ``PARAMETER stop`` may
repeat and accumulates. Every problem raises :class:`ModelfileError` naming the line.

>>> mf = parse('from smollm2\\nparameter temperature 0.5\\nsystem "Be brief."')
>>> mf.from_, mf.parameters, mf.system
('smollm2', {'temperature': 0.5}, 'Be brief.')
>>> parse("FROM x\\nFORM y")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
labkit.modelfile.ModelfileError: line 2: unknown instruction 'FORM' (did you mean FROM?). Valid instructions: FROM, ...
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import LabkitError

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

# Ollama's Options (api/types.go): value types for PARAMETER and request "options".
PARAMETER_TYPES: dict[str, type] = {
    # sampling, read at every request
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "typical_p": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "stop": list,
    # runner options, applied when the model is loaded
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool,
    "num_thread": int, "draft_num_predict": int,
    # older releases still accept these; kept so that older Modelfiles parse
    "mirostat": int, "mirostat_eta": float, "mirostat_tau": float, "penalize_newline": bool,
    "tfs_z": float, "numa": bool, "low_vram": bool, "use_mlock": bool, "vocab_only": bool,
}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", list: "a string"}


class ModelfileError(LabkitError, ValueError):
    """A Modelfile that cannot be used; ``line`` is the 1-based line number (0: the whole file)."""

    def __init__(self, message: str, line: int = 0):
        self.line = line
        super().__init__(f"line {line}: {message}" if line else message)


@dataclass
class Modelfile:
    from_: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    adapters: list[str] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    requires: str | None = None
    from_line: int = 0

    def to_request(self) -> dict:
        """The documented JSON fields of ``POST /api/create`` (``from``, ``system``, ``parameters``…)."""
        out: dict[str, Any] = {}
        if self.from_ is not None:
            out["from"] = self.from_
        for key in ("template", "system"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        if self.messages:
            out["messages"] = [dict(m) for m in self.messages]
        if self.license:
            out["license"] = list(self.license)
        return out


def coerce_parameter(name: str, value: Any, line: int = 0) -> Any:
    """Check one PARAMETER/option value and return it with its proper type."""
    key = name.lower() if isinstance(name, str) else name
    if key not in PARAMETER_TYPES:
        hint = difflib.get_close_matches(str(key), PARAMETER_TYPES, n=1)
        raise ModelfileError(f"unknown parameter {name!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                             + ". Valid parameters are listed in Ollama's docs/modelfile.mdx.", line)
    kind = PARAMETER_TYPES[key]
    bad = ModelfileError(f"parameter {key} expects {_TYPE_WORDS[kind]}, got {value!r}", line)
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if isinstance(value, bool):
        raise bad
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise bad from None
    raise bad


def _unquote(text: str, line: int) -> str:
    """A bare argument, or one "quoted string" with backslash escapes."""
    text = text.strip()
    if not text.startswith('"'):
        return text
    out, i = [], 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
            continue
        if ch == '"':
            rest = text[i + 1:].strip()
            if rest:
                raise ModelfileError(f"unexpected text after the closing quote: {rest!r}", line)
            return "".join(out)
        out.append(ch)
        i += 1
    raise ModelfileError('unterminated quoted string (a closing " is missing)', line)


def _logical_lines(text: str):
    """(line number, instruction, argument) triples; triple-quoted blocks joined."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    i = 0
    while i < len(lines):
        number, raw = i + 1, lines[i]
        i += 1
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        if "\t" in word:
            word, _, more = word.partition("\t")
            rest = more + " " + rest
        rest = rest.strip()
        if '"""' in rest:
            head, _, after = rest.partition('"""')
            if '"""' in after:                       # opens and closes on this line
                body, _, tail = after.partition('"""')
                if tail.strip():
                    raise ModelfileError(f'unexpected text after the closing """: {tail.strip()!r}', number)
            else:
                parts = [after]
                while True:
                    if i >= len(lines):
                        raise ModelfileError('unterminated """ block (no closing """ before the end of the file)',
                                             number)
                    nxt = lines[i]
                    i += 1
                    if '"""' in nxt:
                        body_end, _, tail = nxt.partition('"""')
                        if tail.strip():
                            raise ModelfileError(f'unexpected text after the closing """: {tail.strip()!r}', i)
                        parts.append(body_end)
                        break
                    parts.append(nxt)
                body = "\n".join(parts)
                if body.startswith("\n"):            # """ on its own line: the text starts below it
                    body = body[1:]
            yield number, word, (head.strip(), body, True)
        else:
            yield number, word, (rest, None, False)


def parse(text: str) -> Modelfile:
    """Parse Modelfile text. Raises :class:`ModelfileError` with a line number on any problem."""
    if not isinstance(text, str):
        raise ModelfileError(f"a Modelfile is text, got {type(text).__name__}")
    mf = Modelfile()
    for number, word, (head, block, is_block) in _logical_lines(text):
        inst = word.upper()
        if inst not in INSTRUCTIONS:
            hint = difflib.get_close_matches(inst, INSTRUCTIONS, n=1)
            raise ModelfileError(f"unknown instruction {word!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                                 + f". Valid instructions: {', '.join(INSTRUCTIONS)}.", number)
        if inst in ("PARAMETER", "MESSAGE"):
            # the first word is the parameter name / role; the value may be a block
            if is_block:
                key, value = head, block
            else:
                key, _, value = head.partition(" ")
                value = _unquote(value, number)
            key = key.strip()
            if not key:
                raise ModelfileError(f"{inst} needs a {'name and a value' if inst == 'PARAMETER' else 'role and a message'}",
                                     number)
            if inst == "PARAMETER":
                if value == "":
                    raise ModelfileError(f"PARAMETER {key} has no value", number)
                coerced = coerce_parameter(key, value, number)
                if key.lower() == "stop":
                    mf.parameters.setdefault("stop", []).extend(coerced)
                else:
                    mf.parameters[key.lower()] = coerced
            else:
                role = key.lower()
                if role not in MESSAGE_ROLES:
                    raise ModelfileError(f"MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}, got {key!r}", number)
                mf.messages.append({"role": role, "content": value})
            continue
        if is_block:
            if head:
                raise ModelfileError(f'unexpected text before """: {head!r}', number)
            value = block
        else:
            value = _unquote(head, number)
        if inst == "FROM":
            if mf.from_ is not None:
                raise ModelfileError(f"a second FROM (the first is on line {mf.from_line}); a Modelfile has one base",
                                     number)
            if not value:
                raise ModelfileError("FROM needs a model name (name:tag) or a path to a .gguf file", number)
            mf.from_, mf.from_line = value, number
        elif inst == "TEMPLATE":
            mf.template = value
        elif inst == "SYSTEM":
            mf.system = value
        elif inst == "ADAPTER":
            if not value:
                raise ModelfileError("ADAPTER needs a path", number)
            mf.adapters.append(value)
        elif inst == "LICENSE":
            mf.license.append(value)
        elif inst == "REQUIRES":
            mf.requires = value
    if mf.from_ is None:
        raise ModelfileError("no FROM line: a Modelfile must name its base model (FROM name:tag or FROM ./file.gguf)")
    return mf


def _quote(value: str) -> str:
    if "\n" in value or '"' in value:
        return '"""' + value + '"""'
    return '"' + value + '"'


def format_parameters(parameters: dict) -> str:
    """Parameters as ``ollama show --parameters`` prints them (name padded, stop values quoted)."""
    rows = []
    for key in sorted(parameters):
        values = parameters[key] if isinstance(parameters[key], list) else [parameters[key]]
        for v in values:
            shown = json.dumps(v) if isinstance(v, str) else (str(v).lower() if isinstance(v, bool) else str(v))
            rows.append(f"{key:<30} {shown}")
    return "\n".join(rows)


def render(*, from_: str, system: str | None = None, template: str | None = None, parameters: dict | None = None,
           messages: list | None = None, license: list | None = None, adapters: list | None = None,
           header: str = "") -> str:
    """Modelfile text for a model's configuration (what ``ollama show --modelfile`` prints)."""
    out = [header.rstrip("\n")] if header else []
    out.append(f"FROM {from_}")
    out += [f"ADAPTER {a}" for a in adapters or []]
    if template is not None:
        out.append(f"TEMPLATE {_quote(template)}")
    if system is not None:
        out.append(f"SYSTEM {_quote(system)}")
    for key in sorted(parameters or {}):
        values = parameters[key] if isinstance(parameters[key], list) else [parameters[key]]
        for v in values:
            shown = _quote(v) if isinstance(v, str) else (str(v).lower() if isinstance(v, bool) else str(v))
            out.append(f"PARAMETER {key} {shown}")
    for m in messages or []:
        out.append(f"MESSAGE {m['role']} {_quote(m['content'])}")
    for text in license or []:
        out.append(f"LICENSE {_quote(text)}")
    return "\n".join(out) + "\n"

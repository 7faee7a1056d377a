"""How the Ollama API spells things: model names (``name:tag``) and times (RFC 3339, as Go prints them)."""
from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any

from .errors import APIError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*){0,2}(:[a-z0-9_][a-z0-9._-]{0,127})?$")


def normalize_name(name: Any, *, field_name: str = "model") -> str:
    """``name`` → ``name:tag`` (tag ``latest`` when missing), lower-case; 400 when malformed.

    >>> normalize_name("SmolLM2"), normalize_name("library/smollm2:135m"), normalize_name("me/x:v1")
    ('smollm2:latest', 'smollm2:135m', 'me/x:v1')
    """
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, f"{field_name} is required")
    n = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "library/"):
        n = n.removeprefix(prefix)
    if not _NAME_RE.match(n):
        raise APIError(400, f"invalid model name {name!r}: use name or name:tag (letters, digits, '.', '_', '-')")
    return n if ":" in n.rsplit("/", 1)[-1] else n + ":latest"


def now_rfc3339(ts_ns: int | None = None, *, utc: bool = True) -> str:
    """RFC 3339 with nanoseconds, as Go prints times (``...T08:52:19.385406455Z``)."""
    ts_ns = time.time_ns() if ts_ns is None else ts_ns
    secs, nanos = divmod(ts_ns, 1_000_000_000)
    if utc:
        base = _dt.datetime.fromtimestamp(secs, _dt.timezone.utc)
        return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
    base = _dt.datetime.fromtimestamp(secs).astimezone()
    off = base.strftime("%z")
    return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}{off[:3]}:{off[3:]}"

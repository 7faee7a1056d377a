"""The model store: one JSON manifest per ``name:tag``, and the blobs clients upload or the server generates."""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import APIError, not_found
from .names import normalize_name


@dataclass
class Manifest:
    name: str
    kind: str                       # "gguf" or "sentence-transformers"
    path: str                       # weights: a .gguf file or an HF folder
    parent: str = ""
    system: str | None = None
    template: str | None = None
    parameters: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    license: list = field(default_factory=list)
    modified_ns: int = 0
    builtin: bool = False
    adapters: list = field(default_factory=list)    # LoRA adapter GGUFs applied on top of the weights (ADAPTER)

    @property
    def runner_key(self) -> str:
        """What a loaded runner is shared by: the weights, plus any adapters (which change the weights)."""
        return "+".join([self.path, *self.adapters])

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @property
    def digest(self) -> str:
        body = {k: v for k, v in self.to_json().items() if k not in ("name", "modified_ns")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @property
    def size(self) -> int:
        p = Path(self.path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size if p.exists() else 0


class Store:
    """Manifests under ``<root>/labkit-manifests/<name>/<tag>.json``, blobs under ``<root>/blobs``."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        self.manifests = self.root / "labkit-manifests"
        self.blobs = self.root / "blobs"
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    def _file(self, name: str) -> Path:
        base, _, tag = name.rpartition(":")
        return self.manifests / base / f"{tag}.json"

    def get(self, name: str) -> Manifest | None:
        f = self._file(name)
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        return Manifest(**data)

    def require(self, raw_name: Any) -> Manifest:
        name = normalize_name(raw_name)
        m = self.get(name)
        if m is None:
            raise not_found(raw_name if isinstance(raw_name, str) else name)
        return m

    def put(self, m: Manifest) -> None:
        m.modified_ns = time.time_ns()
        f = self._file(m.name)
        f.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(m.to_json(), indent=1))
            os.replace(tmp, f)

    def delete(self, name: str) -> bool:
        with self._lock:
            f = self._file(name)
            if not f.exists():
                return False
            f.unlink()
            for parent in f.parents:
                if parent == self.manifests:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._prune_blobs()
            return True

    def all(self) -> list[Manifest]:
        out = []
        for f in self.manifests.rglob("*.json"):
            try:
                m = Manifest(**json.loads(f.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if not Path(m.path).exists():     # its weights moved or were deleted (e.g. a rebuilt environment)
                print(f"note: {m.name} is not listed: {m.path} no longer exists", flush=True)
                continue
            out.append(m)
        return sorted(out, key=lambda m: -m.modified_ns)

    def blob_path(self, digest: str) -> Path:
        m = re.fullmatch(r"sha256[:-]([0-9a-f]{64})", digest or "")
        if not m:
            raise APIError(400, f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
        return self.blobs / f"sha256-{m.group(1)}"

    def _prune_blobs(self) -> None:
        used = {Path(p).resolve() for m in self.all() for p in (m.path, *m.adapters)}
        for blob in self.blobs.glob("sha256-*"):
            # uploaded but never used blobs stay (a create may follow); generated ones go
            if (blob.resolve() not in used and not blob.name.endswith(".part")
                    and (self.blobs / (blob.name + ".generated")).exists()):
                blob.unlink(missing_ok=True)
                (self.blobs / (blob.name + ".generated")).unlink(missing_ok=True)

"""``POST /api/create``: plan a model from the request (checking everything first), then build it.

:func:`plan_create` reads the request (the documented JSON fields, or the legacy ``modelfile`` text
or ``path``), finds the base (an existing model, a local GGUF, or an uploaded blob) and puts the
layers (ADAPTER, SYSTEM, TEMPLATE, PARAMETERs, MESSAGEs, LICENSE) on top; every mistake is a 400 before
anything is written. :func:`execute_create` then quantizes if asked and writes the manifest,
yielding the status lines Ollama streams.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import gguf
from .. import modelfile as mf
from .errors import APIError, not_found
from .names import normalize_name
from .service import Service, ftype_names
from .store import Manifest
from .template import render_go_template

# Ollama's spelling (q4_K_M) of llama.cpp's quantize presets, F16 aside.
CREATE_QUANTIZE_PRESETS = tuple(sorted("q" + name[1:] for name in gguf.FTYPES if name.startswith("Q")))


@dataclass
class CreatePlan:
    """What :func:`execute_create` will write: the new manifest, and the preset to quantize to (if any)."""
    manifest: Manifest
    quantize: str | None = None     # a CREATE_QUANTIZE_PRESETS spelling, or None: keep the weights as they are


def plan_create(service: Service, body: dict) -> CreatePlan:
    """Check a ``/api/create`` request and plan it; raises :class:`APIError` (400/404) on bad input."""
    name = normalize_name(body.get("model") or body.get("name"))
    fields, base_dir = _request_fields(body)
    base = _base_manifest(service, name, fields, base_dir)
    base.adapters = base.adapters + _adapter_paths(service, base, fields["adapters"], base_dir)
    _apply_layers(base, fields)
    return CreatePlan(manifest=base, quantize=_quantize_preset(service, base, body.get("quantize")))


def _request_fields(body: dict) -> tuple[dict, Path]:
    """The create fields, with a Modelfile's (``modelfile`` text or ``path``) filling the gaps, and
    the folder relative ``FROM`` paths start from."""
    fields = {k: body.get(k) for k in ("from", "files", "adapters", "template", "system", "parameters",
                                        "messages", "license")}
    base_dir = Path.cwd()
    text = body.get("modelfile")
    if text is None and body.get("path"):
        p = Path(body["path"]).expanduser()
        try:
            text = p.read_text()
        except OSError as exc:
            raise APIError(400, f"cannot read Modelfile {p}: {exc}") from None
        base_dir = p.parent
    if text is not None:
        try:
            parsed = mf.parse(text)
        except mf.ModelfileError as exc:
            raise APIError(400, f"invalid Modelfile: {exc}") from None
        for k, v in parsed.to_request().items():
            if fields.get(k) is None:
                fields[k] = v
        if parsed.adapters:
            fields["adapters"] = parsed.adapters
    return fields, base_dir


def _base_manifest(service: Service, name: str, fields: dict, base_dir: Path) -> Manifest:
    """The base: an existing model, a local GGUF path, or uploaded blobs."""
    store = service.store
    base: Manifest | None = None
    source = fields["from"]
    if fields["files"]:
        files = fields["files"]
        if not isinstance(files, dict):
            raise APIError(400, "files must map file names to sha256 digests")
        ggufs = [(n, d) for n, d in files.items() if str(n).endswith(".gguf")]
        if len(ggufs) != 1 or len(files) != 1:
            raise APIError(400, "labkit's stand-in imports exactly one .gguf file; converting safetensors "
                                "folders needs a real Ollama")
        blob = store.blob_path(ggufs[0][1])
        if not blob.exists():
            raise APIError(400, f"blob {ggufs[0][1]} not found on the server: push the file first with "
                                "POST /api/blobs/<digest> (ollama.Client.create_blob does this)")
        base = Manifest(name=name, kind="gguf", path=str(blob))
        check_gguf(blob, ggufs[0][0])
    elif source:
        looks_like_path = any(c in str(source) for c in "/\\~") or str(source).lower().endswith(".gguf") \
            or str(source).startswith(".")
        existing = None
        if not looks_like_path or ":" in str(source).rsplit("/", 1)[-1]:
            try:
                existing = store.get(normalize_name(source, field_name="from"))
            except APIError:
                existing = None
        if existing is not None:
            base = Manifest(**{**existing.to_json(), "name": name, "builtin": False, "parent": existing.name})
        elif looks_like_path:
            p = Path(str(source)).expanduser()
            p = p if p.is_absolute() else (base_dir / p)
            if not p.exists():
                raise APIError(400, f"FROM {source}: no such file ({p} does not exist). Give the path to a .gguf "
                                    "file (absolute, or relative to the Modelfile) or a model name from /api/tags")
            if p.is_dir():
                raise APIError(400, f"FROM {source} is a folder: importing safetensors folders needs Ollama's "
                                    "converter; convert it to GGUF first (llama.cpp's convert_hf_to_gguf.py)")
            check_gguf(p, str(source))
            base = Manifest(name=name, kind="gguf", path=str(p.resolve()))
        else:
            raise not_found(str(source))
    else:
        raise APIError(400, "neither 'from' nor 'files' was specified: name a base model (FROM) to create from")
    return base


def _adapter_paths(service: Service, base: Manifest, adapters: Any, base_dir: Path) -> list[str]:
    """The LoRA adapter GGUFs of ``ADAPTER`` lines (paths, relative to the Modelfile) or of the API's
    ``adapters`` (file name -> digest of an uploaded blob), each checked against the base's weights."""
    if not adapters:
        return []
    if isinstance(adapters, dict):
        named = [(str(n), service.store.blob_path(str(d))) for n, d in adapters.items()]
        for label, blob in named:
            if not blob.exists():
                raise APIError(400, f"adapter {label}: blob not found on the server: push the file first with "
                                    "POST /api/blobs/<digest> (ollama.Client.create_blob does this)")
    elif isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
        named = [(a, p if (p := Path(a).expanduser()).is_absolute() else base_dir / p) for a in adapters]
    else:
        raise APIError(400, "adapters must map file names to sha256 digests")
    if len(named) + len(base.adapters) > 1:
        raise APIError(400, "labkit's stand-in applies one LoRA adapter per model (llama-cpp-python's lora_path); "
                            "merge adapters first, or use a real Ollama")
    if base.kind != "gguf":
        raise APIError(400, "LoRA adapters apply to GGUF models only")
    paths = []
    for label, path in named:
        if not path.exists():
            raise APIError(400, f"ADAPTER {label}: no such file ({path} does not exist)")
        if path.is_dir() or not label.endswith(".gguf") and path.suffix == ".safetensors":
            raise APIError(400, f"ADAPTER {label}: safetensors adapters need Ollama's converter; convert it to a "
                                "GGUF adapter first (llama.cpp's convert_lora_to_gguf.py ADAPTER_DIR --base BASE_HF_DIR)")
        try:
            gguf.check_lora_adapter(path, base.path)
        except ValueError as exc:          # AdapterMismatchError, CorruptModelError: the file and the mismatch
            raise APIError(400, f"ADAPTER {label}: {exc}") from None
        paths.append(str(path.resolve()))
    return paths


def _apply_layers(base: Manifest, fields: dict) -> None:
    """The layers on top of the base: SYSTEM, TEMPLATE, PARAMETERs, MESSAGEs, LICENSE."""
    if fields["system"] is not None:
        if not isinstance(fields["system"], str):
            raise APIError(400, "system must be a string")
        base.system = fields["system"]
    if fields["template"] is not None:
        if not isinstance(fields["template"], str):
            raise APIError(400, "template must be a string")
        render_go_template(fields["template"], {"System": "s", "Prompt": "p", "Response": ""})  # validates
        base.template = fields["template"]
    if fields["parameters"] is not None:
        if not isinstance(fields["parameters"], dict):
            raise APIError(400, "parameters must be a JSON object")
        params = dict(base.parameters)
        for k, v in fields["parameters"].items():
            try:
                params[k.lower()] = mf.coerce_parameter(k, v)
            except mf.ModelfileError as exc:
                raise APIError(400, f"invalid parameters: {exc}") from None
        base.parameters = params
    if fields["messages"] is not None:
        msgs = fields["messages"]
        if not isinstance(msgs, list) or not all(isinstance(x, dict) and x.get("role") in mf.MESSAGE_ROLES
                                                 and isinstance(x.get("content"), str) for x in msgs):
            raise APIError(400, "messages must be a list of {role: system|user|assistant, content: str}")
        base.messages = [{"role": x["role"], "content": x["content"]} for x in msgs]
    if fields["license"] is not None:
        lic = fields["license"]
        base.license = [lic] if isinstance(lic, str) else list(lic)


def _quantize_preset(service: Service, base: Manifest, quantize: Any) -> str | None:
    """``quantize`` in the spelling of :data:`CREATE_QUANTIZE_PRESETS` (None when not asked), once the base is
    known to be an F16/F32 GGUF."""
    if not quantize:
        return None
    match = {q.lower(): q for q in CREATE_QUANTIZE_PRESETS}.get(str(quantize).lower())
    if match is None:
        raise APIError(400, f"unsupported quantization type {quantize}: use one of {', '.join(CREATE_QUANTIZE_PRESETS)}")
    if base.kind != "gguf":
        raise APIError(400, "quantization is only supported for GGUF models")
    ftype = service.header(base.path).metadata.get("general.file_type")
    if ftype not in (0, 1, 32):          # ALL_F32, MOSTLY_F16, MOSTLY_BF16
        level = ftype_names().get(ftype, str(ftype))
        raise APIError(400, f"quantization is only supported for F16 and F32 models (this one is {level})")
    return match


def check_gguf(path: Path, label: str) -> None:
    try:
        gguf.read_header(path)
    except Exception as exc:  # noqa: BLE001  (whatever is wrong with the file, the answer is this 400)
        raise APIError(400, f"FROM {label}: not a usable GGUF file: {exc}") from None


def execute_create(service: Service, plan: CreatePlan) -> Iterator[dict]:
    """Carry out ``plan``, yielding Ollama's status lines; the manifest is written last."""
    store = service.store
    m = plan.manifest
    if plan.quantize:
        src = m.path
        level = ftype_names().get(service.header(src).metadata.get("general.file_type"), "F16")
        yield {"status": f"quantizing {level} model to {plan.quantize.upper()}"}
        tmp = store.blobs / f"quantize-{uuid.uuid4().hex}.part"
        try:
            _quantize(src, tmp, plan.quantize)
            digest = hashlib.sha256()
            with open(tmp, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            dst = store.blobs / f"sha256-{digest.hexdigest()}"
            os.replace(tmp, dst)
            (store.blobs / (dst.name + ".generated")).touch()
        finally:
            tmp.unlink(missing_ok=True)
        yield {"status": "verifying conversion"}
        m.path = str(dst)
        m.parent = m.parent or ""
        yield {"status": f"creating new layer sha256:{digest.hexdigest()}"}
    else:
        yield {"status": "parsing GGUF" if m.kind == "gguf" else "reading model metadata"}
        yield {"status": f"using existing layer sha256:{hashlib.sha256(m.path.encode()).hexdigest()}"}
    for _ in m.adapters:
        yield {"status": "creating adapter layer"}
    for layer in ("system", "template"):
        if getattr(m, layer) is not None:
            yield {"status": f"creating {layer} layer"}
    if m.parameters:
        yield {"status": "creating parameters layer"}
    yield {"status": "writing manifest"}
    store.put(m)
    yield {"status": "success"}


def _quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str) -> None:
    """llama.cpp's own quantizer (:func:`labkit.gguf.quantize`) from F16/F32 to ``qtype``; failures are a 500.

    ``allow_requantize=False`` is llama.cpp's default, which this server always used (the plan
    lets only F32, F16 and BF16 sources through anyway). What gguf.quantize adds: it checks that
    the source and the result read as GGUF, writes through ``<dst>.part``, and captures
    llama.cpp's per-tensor log instead of printing it to the server's log (the tail of it is in
    the error when quantizing fails). That capture redirects the process's stderr (fd 2) while
    quantizing, so anything else printed there meanwhile lands in it too.
    """
    try:
        gguf.quantize(src, dst, qtype, allow_requantize=False)
    except (ValueError, RuntimeError) as exc:      # a file that is not GGUF (CorruptModelError), llama.cpp failing
        raise APIError(500, str(exc)) from exc

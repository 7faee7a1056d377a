"""labkit.gguf against the real bundled file and the gguf package's own reader/writer."""
import io
import struct

import numpy as np
import pytest

from labkit.errors import CorruptModelError
from labkit.gguf import read_header


def test_real_file_header_matches_gguf_package(smollm2_path):
    from gguf import GGUFReader
    ours = read_header(smollm2_path)
    theirs = GGUFReader(smollm2_path)
    assert ours.version == 3
    assert ours.architecture == "llama"
    assert len(ours.tensors) == len(theirs.tensors)
    by_name = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        ref = by_name[t.name]
        assert t.type_name == ref.tensor_type.name
        assert t.shape == tuple(int(x) for x in ref.shape)
        assert t.n_bytes == int(ref.n_bytes)
        assert ours.data_offset + t.offset == int(ref.data_offset)
    # SmolLM2-135M: 30 layers, 9 query heads sharing 3 KV heads (GQA), 576 wide
    assert ours.arch_value("block_count") == 30
    assert ours.arch_value("attention.head_count") == 9
    assert ours.arch_value("attention.head_count_kv") == 3
    assert ours.arch_value("embedding_length") == 576
    assert "tokenizer.chat_template" in ours.metadata
    assert 130e6 < ours.n_parameters < 140e6


def test_roundtrip_with_gguf_writer(tmp_path):
    from gguf import GGUFWriter
    path = tmp_path / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_string("custom.text", "héllo")
    w.add_array("custom.ints", [1, 2, 3])
    w.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.ones(32, dtype=np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    h = read_header(path)
    assert h.metadata["general.architecture"] == "llama"
    assert h.metadata["llama.block_count"] == 2
    assert h.metadata["custom.text"] == "héllo"
    assert h.metadata["custom.ints"] == [1, 2, 3]
    shapes = {t.name: (t.shape, t.type_name, t.n_bytes) for t in h.tensors}
    assert shapes == {"w": ((32, 2), "F32", 256), "b": ((32,), "F16", 64)}


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"<html>404 Not Found</html>" + bytes(100))
    with pytest.raises(CorruptModelError, match="not a GGUF file"):
        read_header(p)


def test_missing_file(tmp_path):
    with pytest.raises(CorruptModelError, match="does not exist"):
        read_header(tmp_path / "nope.gguf")


def test_version_1_rejected():
    with pytest.raises(CorruptModelError, match="version 1"):
        read_header(io.BytesIO(b"GGUF" + struct.pack("<IQQ", 1, 0, 0)))


@pytest.mark.parametrize("keep", [10, 1000, 2_000_000])
def test_truncated_header_or_data(smollm2_path, tmp_path, keep):
    p = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(keep))
    with pytest.raises(CorruptModelError, match="truncated"):
        read_header(p)


def test_truncated_by_one_byte(smollm2_path, tmp_path):
    data = smollm2_path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:-1])
    with pytest.raises(CorruptModelError, match=r"truncated: tensor .*\(1 bytes missing\)"):
        read_header(p)


def test_absurd_counts():
    with pytest.raises(CorruptModelError, match="claims"):
        read_header(io.BytesIO(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(64)))

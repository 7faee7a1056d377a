"""labkit.gguf against the real bundled file and the gguf package's own reader/writer."""
import io
import struct

import numpy as np
import pytest

from labkit import gguf
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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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


# --- chapter 01: inspect / to_float / quantize ---------------------------------------------------

def test_inspect_bundled_file(smollm2_path):
    from labkit.gguf import inspect
    info = inspect(smollm2_path)
    s = info.summary()
    assert (s["layers"], s["attention_heads"], s["kv_heads"], s["head_dim"]) == (30, 9, 3, 64)
    assert s["context_length"] == 8192 and s["tokenizer_n_tokens"] == 49152 and s["chat_template"] == "yes"
    table = info.table()
    assert len(table) == len(info.tensors) and table["bytes"].sum() == info.header.tensor_bytes
    by_type = info.by_type()
    assert set(by_type.index) == {"Q4_1", "Q8_0", "F32"}
    assert by_type.loc["Q4_1", "bpw"] == 5.0 and by_type.loc["Q8_0", "bpw"] == 8.5
    assert 5.0 < info.bits_per_weight < 8.5


def test_inspect_rejects_non_gguf(tmp_path):
    from labkit.gguf import inspect
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(CorruptModelError, match="not a GGUF"):
        inspect(p)


@pytest.fixture(scope="module")
def f16_file(smollm2_path, tmp_path_factory):
    from labkit.gguf import to_float
    return to_float(smollm2_path, tmp_path_factory.mktemp("f16") / "smol-f16.gguf", "f16")


@pytest.mark.full      # chapter 01 checks the same F16, tensor for tensor, against llama.cpp's converter
def test_to_float_keeps_metadata_and_values(smollm2_path, f16_file):
    from gguf import GGUFReader

    from labkit import quant
    src, out = read_header(smollm2_path), read_header(f16_file)
    for key, value in src.metadata.items():
        if key not in ("general.file_type", "general.quantization_version"):   # describe the quantized source
            assert out.metadata[key] == value, key
    assert out.metadata["general.file_type"] == 1
    types = {t.name: t.type_name for t in out.tensors}
    assert all(types[t.name] == ("F32" if len(t.shape) == 1 else "F16") for t in src.tensors)
    # one real matrix: F16 of the exact dequantized values
    name = "blk.0.attn_q.weight"
    a = {t.name: t for t in GGUFReader(smollm2_path).tensors}[name]
    b = {t.name: t for t in GGUFReader(f16_file).tensors}[name]
    shape = tuple(int(s) for s in reversed(a.shape))
    expected = quant.llamacpp_dequantize(np.asarray(a.data).tobytes(), "Q4_1", shape).astype(np.float16)
    assert np.array_equal(np.asarray(b.data).reshape(shape), expected)


def test_to_float_bad_dtype(smollm2_path, tmp_path):
    from labkit.gguf import to_float
    with pytest.raises(ValueError, match="f16"):
        to_float(smollm2_path, tmp_path / "x.gguf", "int8")


def test_quantize_with_llamacpp_and_fallback(f16_file, tmp_path):
    from labkit.gguf import inspect, quantize
    out = quantize(f16_file, tmp_path / "q4km.gguf", "Q4_K_M")
    info = inspect(out)
    types = {t.name: t.type_name for t in info.tensors}
    # 576-wide rows cannot hold 256-weight K-quant super-blocks: legacy fallback
    assert types["blk.0.attn_q.weight"] in {"Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1"}
    # 1536-wide rows (ffn_down) keep real K-quants
    assert types["blk.0.ffn_down.weight"] in {"Q4_K", "Q6_K"}
    assert abs(info.header.file_size - out.stat().st_size) == 0
    with pytest.raises(ValueError, match="preset"):
        quantize(f16_file, tmp_path / "x.gguf", "Q9_Z")


def test_file_type_name_knows_every_preset_of_the_installed_llama_cpp():
    from types import SimpleNamespace

    import llama_cpp

    from labkit.gguf import file_type_name
    for const, name in [("LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS"), ("LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K_S"),
                        ("LLAMA_FTYPE_MOSTLY_Q2_K_S", "Q2_K_S"), ("LLAMA_FTYPE_MOSTLY_BF16", "BF16"),
                        ("LLAMA_FTYPE_ALL_F32", "F32")]:
        assert file_type_name(SimpleNamespace(metadata={"general.file_type": getattr(llama_cpp, const)})) == name
    assert file_type_name(SimpleNamespace(metadata={})) is None
    assert file_type_name(SimpleNamespace(metadata={"general.file_type": 9999})) is None


def test_file_type_name_is_the_nominal_preset(smollm2_path):
    from labkit import models
    from labkit.gguf import file_type_name
    assert file_type_name(smollm2_path) == "Q4_1"                  # SmolLM2 ships as Q4_1 ...
    header = read_header(smollm2_path)
    assert file_type_name(header) == "Q4_1"
    assert {t.type_name for t in header.tensors} > {"Q4_1"}       # ... yet keeps other types inside
    try:
        gemma = models.get("gemma3", verify=False)
    except models.ModelNotFoundError:
        return
    assert file_type_name(gemma) == "Q4_K_M"


def test_check_lora_adapter_reads_rank_and_targets(lora_adapter_gguf, smollm2_path):
    info = gguf.check_lora_adapter(lora_adapter_gguf, smollm2_path)
    n_layers = gguf.read_header(smollm2_path).arch_value("block_count")
    assert info == {"alpha": 8.0, "rank": 4, "n_matrices": 2 * n_layers, "targets": ["attn_q", "attn_v"]}

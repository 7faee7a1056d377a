"""labkit.quant: bit-exact with ggml (llama.cpp's C code) and the gguf package, on random, edge and real tensors."""
import time

import numpy as np
import pytest

from labkit import quant

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q4_K", "Q6_K"]
ALL = LEGACY + KQUANTS


def _gguf_type(name):
    from gguf.constants import GGMLQuantizationType
    return GGMLQuantizationType[name]


def _edge_cases():
    rng = np.random.default_rng(7)
    n = 512
    return {
        "normal": (rng.standard_normal((8, n)) * 0.02).astype(np.float32),
        "zeros": np.zeros((2, n), np.float32),
        "constant_positive": np.full((2, n), 0.3, np.float32),
        "constant_negative": np.full((2, n), -0.7, np.float32),
        "huge": (rng.standard_normal((2, n)) * 1e4).astype(np.float32),
        "small": (rng.standard_normal((2, n)) * 1e-6).astype(np.float32),
        "half_zero": np.concatenate([np.zeros((2, 256)), rng.standard_normal((2, 256))], axis=1).astype(np.float32),
        "integers": rng.integers(-8, 8, (2, n)).astype(np.float32),       # exact ties when scaled
        "outliers": np.where(rng.random((2, n)) < 0.01, 5.0, rng.standard_normal((2, n)) * 0.01).astype(np.float32),
        "plus_minus_same_max": np.tile(np.r_[np.float32(-1), np.linspace(-0.5, 0.5, 30, dtype=np.float32), np.float32(1)], (2, n // 32)),
    }


@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("case", list(_edge_cases()))
def test_quantize_matches_llamacpp_bit_for_bit(qtype, case):
    x = _edge_cases()[case]
    ours = quant.quantize(x, qtype)
    assert ours == quant.llamacpp_quantize(x, qtype)
    assert len(ours) == quant.n_bytes(x.shape, qtype)


@pytest.mark.parametrize("qtype", LEGACY)
def test_quantize_matches_gguf_package(qtype):
    import gguf.quants
    for x in _edge_cases().values():
        assert quant.quantize(x, qtype) == gguf.quants.quantize(x, _gguf_type(qtype)).tobytes()


@pytest.mark.parametrize("qtype", ALL + ["Q5_K", "Q2_K"])
def test_dequantize_matches_llamacpp_and_gguf(qtype):
    rng = np.random.default_rng(3)
    shape = (4, 512)
    if qtype in ALL:
        data = quant.llamacpp_quantize(rng.standard_normal(shape).astype(np.float32), qtype)
    else:   # random bytes with sane float16 scales: every bit pattern must decode the same way
        raw = rng.integers(0, 256, quant.n_bytes(shape, qtype), dtype=np.uint8).reshape(-1, quant.layout(qtype).type_size)
        scales = np.float16(rng.random((raw.shape[0], 2)) * 0.01).view(np.uint8)
        at = {"Q5_K": 0, "Q2_K": 80}[qtype]
        raw[:, at:at + 4] = scales
        data = raw.tobytes()
    ours = quant.dequantize(data, qtype, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(ours.view(np.uint32), quant.llamacpp_dequantize(data, qtype, shape).view(np.uint32))
    import gguf.quants
    theirs = gguf.quants.dequantize(np.frombuffer(data, np.uint8).reshape(shape[0], -1), _gguf_type(qtype))
    assert np.array_equal(ours, theirs)


@pytest.mark.full     # chapter 01 checks bit-exactness on the bundled file in make test
def test_real_tensors_from_bundled_file(smollm2_path):
    """Every quantized tensor type in the packaged model decodes exactly as llama.cpp decodes it."""
    from gguf import GGUFReader
    reader = GGUFReader(smollm2_path)
    seen = set()
    for t in reader.tensors:
        name = t.tensor_type.name
        if name in seen or name not in quant.DEQUANTIZE_TYPES or len(t.shape) < 2:
            continue
        seen.add(name)
        shape = tuple(int(s) for s in reversed(t.shape))          # numpy order: rows last
        data = np.asarray(t.data).tobytes()
        ours = quant.dequantize(data, name, shape)
        assert np.array_equal(ours.view(np.uint32), quant.llamacpp_dequantize(data, name, shape).view(np.uint32)), t.name
        # and re-quantizing real weights is bit-exact too, for every format we implement
        flat = ours.reshape(-1, 256)[:512]
        for qtype in ALL:
            assert quant.quantize(flat, qtype) == quant.llamacpp_quantize(flat, qtype), (t.name, qtype)
    assert {"Q4_1", "Q8_0"} <= seen, seen


def test_q8_0_round_half_away_from_zero():
    # 63.5 / 127 scaled: with absmax 127 the scale is exactly 1, so 0.5 and 2.5 are ties
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127, 0.5, 2.5, -2.5]
    q = np.frombuffer(quant.quantize(x, "Q8_0"), np.uint8)[2:6].view(np.int8)
    assert q.tolist() == [127, 1, 3, -3]          # np.rint would give 0, 2, -2


def test_bits_per_weight_from_layout():
    expected = {"Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K": 4.5,
                "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K": 3.4375, "Q2_K": 2.625, "F16": 16, "F32": 32}
    for name, bpw in expected.items():
        assert quant.bits_per_weight(name) == bpw
    from gguf.constants import GGML_QUANT_SIZES
    for name, b in quant.LAYOUTS.items():
        assert (b.block_size, b.type_size) == GGML_QUANT_SIZES[_gguf_type(name)]
        assert int(_gguf_type(name)) == b.ggml_type


@pytest.mark.parametrize("qtype", ALL)
def test_roundtrip_error_shrinks_with_bits(qtype):
    x = (np.random.default_rng(0).standard_normal((16, 256)) * 0.02).astype(np.float32)
    stats = quant.error_stats(x, quant.roundtrip(x, qtype))
    bound = {"Q8_0": 0.01, "Q6_K": 0.02, "Q5_0": 0.05, "Q5_1": 0.05, "Q4_0": 0.1, "Q4_1": 0.1, "Q4_K": 0.1}[qtype]
    assert stats["rmse"] / x.std() < bound
    assert stats["snr_db"] > 15


def test_float_types():
    x = np.array([[1.0, -2.5, 3.14159, 1e-3]], np.float32)
    assert np.array_equal(quant.roundtrip(x, "F32"), x)
    assert np.array_equal(quant.roundtrip(x, "F16"), x.astype(np.float16).astype(np.float32))
    bf = quant.roundtrip(x, "BF16")
    assert np.allclose(bf, x, rtol=2 ** -8) and bf[0, 0] == 1.0
    with pytest.raises(ValueError, match="overflow float16"):
        quant.quantize(np.array([[1e6]], np.float32), "F16")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", ALL)
def test_nan_and_inf_are_rejected(bad, qtype):
    x = np.zeros((2, 256), np.float32)
    x[1, 7] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        quant.quantize(x, qtype)


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match="blocks of 256 weights.*576"):
        quant.quantize(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="blocks of 32"):
        quant.quantize(np.zeros(33, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="non-empty"):
        quant.quantize(np.zeros((0, 32), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="non-empty"):
        quant.quantize(np.float32(1.0), "Q8_0")
    with pytest.raises(TypeError, match="numeric"):
        quant.quantize(np.array([["a"] * 32]), "Q8_0")
    with pytest.raises(ValueError, match="Unknown ggml type"):
        quant.quantize(np.zeros(32, np.float32), "Q7_X")
    with pytest.raises(ValueError, match="cannot quantize to Q2_K"):
        quant.quantize(np.zeros(256, np.float32), "Q2_K")
    data = quant.quantize(np.zeros((2, 64), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="must be 136 bytes, got 135"):
        quant.dequantize(data[:-1], "Q8_0", (2, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        quant.dequantize(data, "Q8_0", (4, 34))
    with pytest.raises(ValueError, match="positive"):
        quant.dequantize(data, "Q8_0", (0, 64))


def test_teaching_quantizers():
    x = np.array([-1.0, -0.5, 0.0, 0.25, 2.0])
    sym = quant.absmax_quantize(x, bits=8)
    assert sym[2] == 0.0 and abs(sym[-1] - 2.0) < 1e-12                 # zero and the max are exact
    asym = quant.zeropoint_quantize(x, bits=4)
    assert np.abs(asym - x).max() <= (3.0 / 15) / 2 + 1e-12             # within half a step
    # per-block scales help when magnitudes differ between blocks
    y = np.r_[np.full(32, 0.01), np.full(32, 10.0)] * np.tile(np.linspace(-1, 1, 32), 2)
    assert quant.error_stats(y, quant.absmax_quantize(y, 4, block_size=32))["rmse"] < \
        quant.error_stats(y, quant.absmax_quantize(y, 4))["rmse"]
    with pytest.raises(ValueError, match="NaN"):
        quant.absmax_quantize([1.0, np.nan])


def test_error_stats():
    s = quant.error_stats([1.0, -1.0], [1.0, -1.0])
    assert s == {"rmse": 0.0, "max_abs_error": 0.0, "snr_db": float("inf")}
    s = quant.error_stats([1.0, 1.0], [1.1, 0.9])
    assert s["rmse"] == pytest.approx(0.1) and s["snr_db"] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="shapes differ"):
        quant.error_stats([1.0], [1.0, 2.0])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_not_slower_than_gguf_package(qtype):
    """Vectorised: on a 1024×4096 tensor, no slower than gguf's numpy code (generous margin for a shared CPU)."""
    import gguf.quants
    x = (np.random.default_rng(0).standard_normal((1024, 4096)) * 0.02).astype(np.float32)

    def best(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ours = best(lambda: quant.quantize(x, qtype))
    theirs = best(lambda: gguf.quants.quantize(x, _gguf_type(qtype)))
    assert ours < 1.5 * theirs, f"labkit {ours:.3f}s vs gguf {theirs:.3f}s"


# --- calibrated weight-only quantization (GPTQ- and AWQ-style) ---------------------------------

def _correlated_activations(rng, n=2048, d=256, outlier_channels=(3, 77)):
    """Activations with correlated channels and a few large ones, like a real layer's inputs.

    The correlation structure is fixed (seed 99); ``rng`` draws the samples, so two calls give a
    calibration set and a held-out set from the same distribution.
    """
    mix = np.random.default_rng(99).standard_normal((d, d)) / np.sqrt(d)
    X = rng.standard_normal((n, d)) @ (np.eye(d) + 2 * mix)
    X[:, list(outlier_channels)] *= 20
    return X


def test_valid_group_size():
    assert quant.valid_group_size(1536) == 128
    assert quant.valid_group_size(576) == 144           # divisors 96 and 144: 144 is nearer 128
    assert quant.valid_group_size(100, 128) == 100
    assert quant.valid_group_size(7, 5) == 7 and quant.valid_group_size(7, 4) == 1   # a tie goes to the smaller
    with pytest.raises(ValueError):
        quant.valid_group_size(0)


def test_rtn_uses_at_most_2_to_the_bits_levels_per_group_and_half_a_step_of_error():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 256))
    W_hat = quant.rtn_quantize(W, bits=4, group_size=64)
    for row, row_hat in zip(W.reshape(-1, 64), W_hat.reshape(-1, 64)):
        assert len(np.unique(np.round(row_hat, 12))) <= 16
        step = (max(row.max(), 0) - min(row.min(), 0)) / 15
        assert np.abs(row - row_hat).max() <= step / 2 + 1e-12
    assert np.array_equal(quant.rtn_quantize(np.zeros((2, 64)), 4, 64), np.zeros((2, 64)))
    const = np.full((1, 64), 0.3)
    assert np.allclose(quant.rtn_quantize(const, 4, 64), const)        # 0 is in range: 0.3 = 15 steps


def test_gptq_equals_rtn_when_inputs_are_uncorrelated():
    # XᵀX/n = I exactly: nothing to compensate, so GPTQ must reduce to round-to-nearest.
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    X = Q * np.sqrt(128)
    W = rng.standard_normal((16, 128))
    np.testing.assert_allclose(quant.gptq_quantize(W, X, 4, 32, damp=0.0), quant.rtn_quantize(W, 4, 32), atol=1e-12)


def test_gptq_and_awq_lower_the_output_error_that_rtn_leaves():
    rng = np.random.default_rng(2)
    X = _correlated_activations(rng)
    W = rng.standard_normal((64, 256)) * 0.05
    held_out = _correlated_activations(np.random.default_rng(3))
    rtn = quant.rtn_quantize(W, 4, 64)
    gptq = quant.gptq_quantize(W, X, 4, 64)
    awq, info = quant.awq_quantize(W, X, 4, 64)
    e = {name: quant.output_error(W, w_hat, X) for name, w_hat in [("rtn", rtn), ("gptq", gptq), ("awq", awq)]}
    assert e["gptq"] < 0.7 * e["rtn"] and e["awq"] < e["rtn"], e
    assert info["alpha"] > 0 and info["errors"][0.0] == pytest.approx(np.sum(((X @ (W - rtn).T) ** 2)) / len(X))
    # ... and the gain carries over to activations the calibration never saw
    assert quant.output_error(W, gptq, held_out) < quant.output_error(W, rtn, held_out)
    assert quant.output_error(W, awq, held_out) < quant.output_error(W, rtn, held_out)
    # the weights themselves move *further* from the originals: it is the output that improves
    assert np.abs(W - gptq).mean() > np.abs(W - rtn).mean()


def test_gptq_blocks_do_not_change_the_result_and_dead_inputs_are_zeroed():
    rng = np.random.default_rng(4)
    X = _correlated_activations(rng, d=192)
    X[:, 5] = 0.0
    W = rng.standard_normal((32, 192))
    a = quant.gptq_quantize(W, X, 4, 64, block_size=128)
    b = quant.gptq_quantize(W, X, 4, 64, block_size=64)
    np.testing.assert_allclose(a, b, atol=1e-9)
    assert np.all(a[:, 5] == 0)


def test_calibrated_quantizers_reject_bad_input():
    W, X = np.ones((4, 128)), np.ones((10, 128))
    with pytest.raises(ValueError, match="does not divide in_features=128"):
        quant.gptq_quantize(W, X, group_size=96)
    with pytest.raises(ValueError, match=r"tokens × in_features = \(n, 128\)"):
        quant.awq_quantize(W, np.ones((10, 64)))
    with pytest.raises(ValueError, match="NaN"):
        quant.rtn_quantize(np.full((1, 128), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        quant.rtn_quantize(np.ones(128))
    with pytest.raises(ValueError, match="non-empty, finite"):
        quant.gptq_quantize(W, np.full((3, 128), np.inf))


@pytest.mark.full     # chapter 01 records the activations in make test
def test_activation_recorder_captures_the_real_layer_inputs():
    from gguf import GGUFReader

    from labkit import models

    folder = models.hf_folder(models.get("smollm2"), dtype="float32")
    with pytest.raises(ValueError, match="no module named.*named like"):
        quant.ActivationRecorder(folder, ["model.layers.99.mlp.down_proj"])
    rec = quant.ActivationRecorder(folder, ["model.layers.2.mlp.down_proj"], window=8)
    got = rec.record(["The quick brown fox jumps over the lazy dog. " * 3, "Hello"])
    n_tokens = sum(len(rec.tokenizer(t)["input_ids"]) for t in ["The quick brown fox jumps over the lazy dog. " * 3, "Hello"])
    X = got["model.layers.2.mlp.down_proj"]
    assert X.shape == (n_tokens, 1536) and np.isfinite(X).all() and np.abs(X).max() > 0
    # the weight in transformers is the GGUF tensor, dequantized bit for bit
    tensor = next(t for t in GGUFReader(str(models.get())).tensors if t.name == "blk.2.ffn_down.weight")
    ours = quant.dequantize(np.asarray(tensor.data).tobytes(), tensor.tensor_type.name, (576, 1536))
    assert np.array_equal(rec.weights["model.layers.2.mlp.down_proj"], ours)
    with pytest.raises(ValueError, match="no text"):
        rec.record([])
    rec.close()
    assert rec.weights["model.layers.2.mlp.down_proj"].shape == (576, 1536)
    with pytest.raises(ValueError, match="closed"):
        rec.record("more")

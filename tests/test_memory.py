"""The memory formulas, checked against figures in ../shared/facts.md (with their sources)."""
import pytest

from labkit import memory


def test_kv_cache_counts_kv_heads():
    llama31_8b = next(a for a in memory.REFERENCE_MODELS if a.name == "Llama-3.1-8B")
    assert llama31_8b.kv_cache_bytes(1) == 128 * 1024                 # 128 KiB per token at f16
    assert llama31_8b.kv_cache_bytes(8192) == 2**30                   # 1 GiB at 8k context
    wrong = memory.kv_cache_bytes(32, 32, 128, 8192)                  # attention heads instead of KV heads
    assert wrong == 4 * llama31_8b.kv_cache_bytes(8192)


@pytest.mark.parametrize("name, kib", [("Qwen2.5-7B", 56), ("Qwen2.5-14B", 192), ("Qwen2.5-32B", 256)])
def test_kv_per_token(name, kib):
    arch = next(a for a in memory.REFERENCE_MODELS if a.name == name)
    assert arch.kv_cache_bytes(1) == kib * 1024


def test_quantized_kv_and_sequences():
    f16 = memory.kv_cache_bytes(32, 8, 128, 4096)
    assert memory.kv_cache_bytes(32, 8, 128, 4096, "q8_0") == pytest.approx(f16 * 1.0625 / 2)
    assert memory.kv_cache_bytes(32, 8, 128, 4096, n_seq=4) == 4 * f16


def test_weights_check_value():
    assert memory.weights_bytes(7.62e9, "Q4_K_M") / 1e9 == pytest.approx(4.66, abs=0.01)   # file: 4.68 GB
    assert memory.weights_bytes(14e9, "F16") > 24e9                   # 14B FP16 does not fit a 24 GB card
    assert memory.bits_per_weight("q8_0") == 8.5 and memory.bits_per_weight("Q6_K") == 6.56


def test_bad_input():
    with pytest.raises(ValueError, match="Unknown quantization"):
        memory.bits_per_weight("Q7_X")
    with pytest.raises(ValueError, match="positive"):
        memory.kv_cache_bytes(0, 8, 128, 4096)


def test_from_gguf_matches_header(smollm2_path):
    arch = memory.from_gguf(smollm2_path)
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert arch.kv_cache_bytes(2048) == 2 * 30 * 3 * 64 * 2048 * 2


# --- chapter 01: estimate() -------------------------------------------------------------------

def test_estimate_preset_uses_kv_heads_and_padding():
    e = memory.estimate("Llama-3.1-8B", "Q4_K_M", n_ctx=8192)
    assert e.kv_bytes == 2**30                                      # 128 KiB/token × 8192
    assert e.weights_bytes == pytest.approx(8.03e9 * 4.89 / 8)
    assert e.total_bytes == e.weights_bytes + e.kv_bytes + e.overhead_bytes
    assert memory.estimate("Llama-3.1-8B", n_ctx=8000).n_ctx_cells == 8192   # llama.cpp pads to 256
    assert memory.estimate("Qwen2.5-7B", "Q8_0", n_ctx=4096, kv_type="q8_0").kv_bytes == pytest.approx(28 * 4 * 128 * 2 * 4096 * 34 / 32)
    assert memory.estimate("Qwen2.5-7B", n_ctx=4096, n_seq=4).kv_bytes == 4 * memory.estimate("Qwen2.5-7B", n_ctx=4096).kv_bytes
    # the "what could this machine run" table is the larger presets, same numbers
    assert memory.REFERENCE_MODELS and all(memory.PRESETS[a.name] is a and a.n_params >= 4e8 for a in memory.REFERENCE_MODELS)


def test_estimate_fits():
    small = memory.estimate("Qwen2.5-0.5B", "Q4_K_M", n_ctx=4096)
    big = memory.estimate("Qwen2.5-72B", "F16", n_ctx=4096)
    assert small.fits(8e9) and not big.fits(80e9)                   # 72B FP16 ≈ 145 GB: not one 80 GB card


def test_estimate_bad_input(tmp_path):
    with pytest.raises(ValueError, match="neither a GGUF file nor a preset"):
        memory.estimate("GPT-9")
    with pytest.raises(ValueError, match="KV cache type"):
        memory.estimate("Qwen2.5-7B", kv_type="q3")
    with pytest.raises(ValueError, match="n_ctx"):
        memory.estimate("Qwen2.5-7B", n_ctx=0)
    with pytest.raises(ValueError, match="Unknown quantization"):
        memory.estimate("Qwen2.5-7B", "Q7_X")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    from labkit.errors import CorruptModelError
    with pytest.raises(CorruptModelError):
        memory.estimate(bad)


def test_estimate_from_gguf_reads_real_sizes(smollm2_path):
    from labkit.gguf import read_header
    e = memory.estimate(smollm2_path, n_ctx=2048)
    assert e.weights_bytes == read_header(smollm2_path).tensor_bytes
    assert e.kv_bytes == 2 * 30 * 3 * 64 * 2048 * 2
    assert memory.estimate(smollm2_path, "Q8_0", n_ctx=2048).weights_bytes == pytest.approx(134_515_008 * 8.5 / 8)


@pytest.mark.parametrize("n_ctx, kv_type", [(512, "f16"), (1000, "f16"), (2048, "q8_0"), (4096, "f16")])
def test_kv_bytes_equal_llamacpp_allocation(smollm2_path, n_ctx, kv_type):
    e = memory.estimate(smollm2_path, n_ctx=n_ctx, kv_type=kv_type)
    got = memory.llamacpp_allocation(smollm2_path, n_ctx, kv_type)
    assert got["cells"] == e.n_ctx_cells
    assert abs(got["kv_mib"] - e.kv_bytes / 2**20) <= 0.005          # llama.cpp prints MiB to 2 decimals
    assert abs(got["model_mib"] - e.weights_bytes / 2**20) <= 0.005



@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_sliding_window_model_has_two_caches_and_the_formula_holds(kv_type):
    """Gemma 3 keeps one KV cache for its global layers and one for its sliding-window layers;
    llama-cpp-python allocates both full-size, so their sum is the every-layer formula."""
    from labkit import models
    try:
        path = models.get("gemma3", verify=False)
    except models.ModelNotFoundError:
        pytest.skip("gemma3 is not installed (make test-models installs it)")
    got = memory.llamacpp_allocation(path, 1024, kv_type)
    cfg = memory.from_gguf(path)
    assert got["caches"] == 2 and got["cells"] == 1024
    assert cfg.head_dim == 256 and cfg.n_kv_heads == 1          # key_length, not n_embd / n_heads (= 160)
    assert abs(got["kv_mib"] - cfg.kv_cache_bytes(1024, kv_type) / 2**20) <= 0.01    # two values rounded to 0.01 MiB
    assert abs(got["k_mib"] + got["v_mib"] - got["kv_mib"]) <= 0.02

def test_total_within_15_percent_of_rss(smollm2_path):
    e = memory.estimate(smollm2_path, n_ctx=2048)
    rss = memory.measure_rss(smollm2_path, 2048, n_threads=1)["rss_delta"]
    assert abs(e.total_bytes / rss - 1) < 0.15


def test_grouped_bits_per_weight_counts_scales_and_zero_points():
    # 4-bit weights, one f16 scale and one 4-bit zero per 128 weights: 4 + 20/128
    assert memory.grouped_bits_per_weight(4, 128) == 4 + 20 / 128
    assert memory.bits_per_weight("AWQ") == memory.bits_per_weight("GPTQ-INT4") == 4.15625
    assert memory.grouped_bits_per_weight(8, 64) == 8 + 24 / 64
    with pytest.raises(ValueError):
        memory.grouped_bits_per_weight(4, 0)


def test_gpu_layers_plan_by_hand():
    # 10 layers, vocab × width = 1000 × 100 = 1e5 params per embedding/output matrix, 1.2e6 params in all,
    # F16 (2 bytes/param): matrix 2e5 bytes, each layer (1.2e6 - 2e5) * 2 / 10 = 2e5 bytes of weights.
    cfg = memory.ModelConfig("toy", 1.2e6, 10, 4, 1, 16, 100, 400, 1000, "by hand")
    est = memory.estimate(cfg, "F16", n_ctx=256)
    compute = memory.device_compute_bytes(cfg, 256)
    assert compute == 512 * (4 * (2 * 400 + 4 * 100) + 2 * 256)
    per_layer = 2e5 + est.kv_bytes / 10
    # llama.cpp offloads the output layer first, then layers from the last one: room for it and 4 layers -> -ngl 5
    room_for_4 = 2e5 + 4 * per_layer + compute + 1
    plan = memory.gpu_layers(cfg, room_for_4, "F16", n_ctx=256, reserve_bytes=0)
    assert (plan.layers_on_gpu, plan.ngl, plan.fully_offloaded) == (4, 5, False)
    assert plan.per_layer_bytes == pytest.approx(per_layer) and plan.output_bytes == pytest.approx(2e5)
    assert plan.gpu_bytes == pytest.approx(2e5 + 4 * per_layer + compute)
    everything = memory.gpu_layers(cfg, 1e12, "F16", n_ctx=256, reserve_bytes=0)
    assert (everything.ngl, everything.fully_offloaded, everything.cpu_bytes) == (11, True, pytest.approx(2e5))  # embeddings stay
    # room for the compute buffer and the output layer only: -ngl 1, no repeating layer
    assert memory.gpu_layers(cfg, compute + 2e5 + 1, "F16", n_ctx=256, reserve_bytes=0).ngl == 1
    assert memory.gpu_layers(cfg, compute + 1e5, "F16", n_ctx=256, reserve_bytes=0).ngl == 0


def test_offload_order_is_llamas_output_first_then_from_the_back():
    assert memory.offload_order(3) == ["output", 2, 1, 0]


def test_layer_weights_of_a_real_file_are_its_tensors(smollm2_path):
    from labkit.gguf import read_header
    cfg = memory.config_from_gguf(smollm2_path)[0]
    per_layer, output = memory.layer_weights(smollm2_path, cfg, 0.0)
    tensors = {t.name: t.n_bytes for t in read_header(smollm2_path).tensors}
    assert len(per_layer) == cfg.n_layers
    assert per_layer[0] == sum(n for name, n in tensors.items() if name.startswith("blk.0."))
    # SmolLM2 ties its output to the token embeddings: llama.cpp offloads a copy of them (plus the final norm)
    assert "output.weight" not in tensors
    assert output == tensors["token_embd.weight"] + tensors["output_norm.weight"]
    assert sum(per_layer) + output == sum(tensors.values())


def test_gpu_layers_conserves_bytes_and_grows_with_vram():
    total = memory.estimate("Qwen2.5-14B", "Q4_K_M", 8192)
    previous = -1
    for gb in (4, 8, 12, 16, 24):
        plan = memory.gpu_layers("Qwen2.5-14B", gb * 1e9, "Q4_K_M", n_ctx=8192)
        assert plan.gpu_bytes + plan.cpu_bytes == pytest.approx(total.weights_bytes + total.kv_bytes
                                                                 + (plan.compute_bytes if plan.ngl else 0))
        assert plan.gpu_bytes <= gb * 1e9 - memory.FIT_TARGET_BYTES
        assert plan.ngl >= previous
        previous = plan.ngl
    assert memory.gpu_layers("Qwen2.5-14B", 48e9, "Q4_K_M", n_ctx=32768).fully_offloaded


def test_every_published_preset_is_above_its_base_block_type():
    # llama.cpp's published averages (Llama-3.1-8B) for the presets learners download, and the base type each names
    for preset in ("Q4_K_S", "Q5_K_S", "Q3_K_S", "Q3_K_L", "Q4_K_M", "IQ4_XS", "IQ3_M", "IQ2_M", "IQ1_S", "Q2_K_S"):
        base = memory.preset_base_type(preset)
        assert memory.bits_per_weight(preset) > memory.block_type_bits(base), (preset, base)
    assert [memory.preset_base_type(p) for p in ("Q4_K_M", "IQ3_XS", "IQ2_S", "Q4_1", "f16", None)] == \
        ["Q4_K", "IQ3_S", "IQ2_XS", "Q4_1", "F16", None]
    assert memory.block_type_bits("Q6_K") == 6.5625 and memory.block_type_bits("IQ2_XXS") == 2.0625
    with pytest.raises(ValueError, match="not a ggml block type"):
        memory.block_type_bits("Q4_K_M")                 # a preset, not a block type
    with pytest.raises(ValueError, match="Unknown quantization"):
        memory.bits_per_weight("MXFP4_MOE")              # no published average: chapter 00 says so


def test_memlock_limited_holds_the_command_to_the_limit_even_as_root():
    """mlock of 16 MiB under an 8 MiB ``ulimit -l`` fails in the child, whoever runs the test (root is
    exempt unless the capability is dropped, which memlock_limited does)."""
    import subprocess
    import sys

    from labkit.env import memlock_limited
    probe = ("import ctypes, ctypes.util, mmap, resource\n"
             "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
             "buf = mmap.mmap(-1, 16 << 20)\n"
             "addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))\n"
             "print(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0], libc.mlock(ctypes.c_void_p(addr), 16 << 20))\n")
    argv, limit = memlock_limited([sys.executable, "-c", probe], 8 << 20)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, preexec_fn=limit, check=True)
    soft, result = out.stdout.split()
    assert int(soft) == 8 << 20 and int(result) == -1, out.stdout       # the limit is set, and it bites


@pytest.mark.full
@pytest.mark.engine
def test_mmap_keeps_weights_in_file_pages_and_a_failed_mlock_only_warns(smollm2_path):
    size = smollm2_path.stat().st_size
    mapped = memory.measure_rss(smollm2_path, 256, n_prompt=16, n_threads=1)
    copied = memory.measure_rss(smollm2_path, 256, n_prompt=16, n_threads=1, use_mmap=False)
    limited = memory.measure_rss(smollm2_path, 256, n_prompt=16, n_threads=1, use_mlock=True, memlock_bytes=8 << 20)
    if mapped["rss_file"] is None:
        pytest.skip("no /proc/self/status here (not Linux)")
    assert mapped["rss_file"] > 0.8 * size and copied["rss_anon"] - mapped["rss_anon"] > 0.8 * size
    assert limited["locked"] <= 8 << 20 and any("failed to mlock" in w for w in limited["warnings"]), limited


def _mixed_gguf(path, alignment=64, file_type=15):
    """A tiny Q4_K_M-labelled GGUF the way llama.cpp lays one out: a Q4_K matrix whose rows divide into 256,
    a 576-wide one stored as Q5_0 (the fallback), a Q8_0 embedding and an F32 norm; raw (zero) block bytes."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    w = GGUFWriter(str(path), "llama")
    if file_type is not None:
        w.add_file_type(file_type)                     # 15: LLAMA_FTYPE_MOSTLY_Q4_K_M
    w.add_custom_alignment(alignment)
    for name, (rows, cols), qtype, block_bytes, block in [
            ("token_embd.weight", (8, 576), T.Q8_0, 34, 32), ("blk.0.ffn_down.weight", (4, 512), T.Q4_K, 144, 256),
            ("blk.0.attn_q.weight", (3, 576), T.Q5_0, 22, 32)]:
        raw = np.zeros((rows, cols // block * block_bytes), dtype=np.uint8)
        w.add_tensor(name, raw, raw_dtype=qtype)       # byte shape: gguf derives (rows, cols)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(576, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_type_mix_is_the_files_average_and_its_layout_on_disk(tmp_path):
    from labkit import gguf
    path = _mixed_gguf(tmp_path / "mix.gguf")
    header, spans = gguf.read_header(path), gguf.tensor_spans(path)
    for t in header.tensors:                           # each tensor's block bytes, padded to the alignment
        assert t.n_bytes <= spans[t.name] < t.n_bytes + 64, (t.name, t.n_bytes, spans[t.name])
    mix = memory.type_mix(path)
    assert list(mix.index) == ["Q8_0", "Q4_K", "Q5_0", "F32"]          # most parameters first
    assert mix.loc["Q5_0", "type_bits"] == 5.5 and mix.loc["Q4_K", "type_bits"] == 4.5
    assert mix["contribution"].sum() == pytest.approx(8 * header.tensor_bytes / header.n_parameters)
    assert (mix["disk_bits"] >= mix["type_bits"]).all()
    assert mix["bytes_on_disk"].sum() == sum(spans.values())


def test_fallback_tensors_are_the_rows_that_do_not_divide_into_the_preset_blocks(tmp_path, smollm2_path):
    path = _mixed_gguf(tmp_path / "mix.gguf")
    fell = memory.fallback_tensors(path)               # the file's own preset: Q4_K_M, blocks of 256
    assert list(fell["name"]) == ["token_embd.weight", "blk.0.attn_q.weight"]
    assert set(fell["row_length"]) == {576} and list(fell["type"]) == ["Q8_0", "Q5_0"]
    assert memory.fallback_tensors(path, "Q8_0").empty                  # 576 = 18 blocks of 32
    assert memory.fallback_tensors(smollm2_path).empty                  # Q4_1: blocks of 32
    # as Q4_K_S: 6 of the 7 matrices of each of 30 layers (ffn_down's rows are 1536 = 6 × 256) and the embedding
    assert len(memory.fallback_tensors(smollm2_path, "Q4_K_S")) == 30 * 6 + 1
    unlabelled = _mixed_gguf(tmp_path / "unlabelled.gguf", file_type=None)
    with pytest.raises(ValueError, match="records no preset.*preset="):
        memory.fallback_tensors(unlabelled)


def test_preset_average_is_published_figure_block_layout_or_unknown():
    assert memory.preset_average("q5_k_s") == (5.57, memory.preset_average("Q5_K_S")[1])
    assert "README" in memory.preset_average("Q3_K_L")[1] and memory.preset_average("Q3_K_L")[0] == 4.30
    assert memory.preset_average("Q8_0") == (8.5, "its block layout (a pure type)")
    assert memory.preset_average("MXFP4_MOE") is None and memory.preset_average(None) is None

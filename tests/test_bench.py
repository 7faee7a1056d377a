"""labkit.bench: statistics on known data, harness overhead, the harness against llama.cpp's own counters."""
import math
import time

import numpy as np
import pytest

from labkit import bench


def test_percentiles_on_known_data():
    data = list(range(1, 101))                     # 1..100
    s = bench.summarize(data)
    assert s["p50"] == 50.5 and s["min"] == 1 and s["max"] == 100 and s["n"] == 100
    assert s["p95"] == pytest.approx(95.05) and s["p99"] == pytest.approx(99.01)
    assert s["mean"] == 50.5 and s["stdev"] == pytest.approx(np.std(data, ddof=1))
    with pytest.raises(ValueError):
        bench.summarize([])


def test_request_timing_decode_rate():
    t = bench.RequestTiming(ttft=0.5, e2e=1.5, prompt_tokens=10, output_tokens=11, token_times=[0.5, 0.6, 1.5])
    assert t.decode_tps == pytest.approx(10.0)          # 10 tokens after the first in 1.0 s
    assert t.itl == pytest.approx([0.1, 0.9])
    assert math.isnan(bench.RequestTiming(0.5, 0.5, 1, 1).decode_tps)


def test_harness_overhead_is_small():
    assert abs(bench.harness_overhead(n_tokens=200, per_token_s=0.002)) < 0.02


def test_decode_bound_and_cost():
    assert bench.decode_bound(100e9, 4e9) == pytest.approx(25.0)
    assert bench.decode_bound(100e9, 4e9, kv_bytes=1e9, batch=4) == pytest.approx(4 * 100 / 8)
    # 100 tok/s for 1e6 tokens = 10,000 s = 2.78 h at 0.3 kW and 0.30/kWh
    assert bench.cost_per_million_tokens(100, 300, 0.30) == pytest.approx(1e4 / 3600 * 0.09)
    assert bench.break_even_tokens_per_month(50, 1.0, 6.0) == pytest.approx(10e6)
    assert bench.break_even_tokens_per_month(50, 6.0, 1.0) == float("inf")
    with pytest.raises(ValueError):
        bench.decode_bound(0, 1)


def test_memory_bandwidth_is_plausible():
    bw = bench.memory_bandwidth(n_bytes=32 * 2**20, repeats=3)
    assert 1e9 < bw < 2e12


def test_coordinate_tuner_matches_brute_force_on_separable_function():
    grid = {"threads": [1, 2, 4, 8], "batch": [32, 128, 512], "fa": [False, True]}
    calls = []

    def measure(threads, batch, fa):
        calls.append(1)
        return -abs(threads - 4) * 10 - abs(batch - 128) / 10 + (5 if fa else 0)
    best_bf, score_bf, rows = bench.brute_force(measure, grid)
    n_bf = len(calls)
    calls.clear()
    best_ct, score_ct, n_ct = bench.coordinate_tune(measure, grid)
    assert best_ct == best_bf == {"threads": 4, "batch": 128, "fa": True}
    assert n_ct == len(calls) < n_bf == 24


def test_save_and_load_results(tmp_path):
    path = bench.save_results([{"engine": "x", "tps": 1.0}], tmp_path / "run1")
    assert path.exists() and (tmp_path / "run1.csv").exists()
    df = bench.load_results([path, path])
    assert len(df) == 2 and "machine" in df.columns


def test_harness_agrees_with_llama_cpp_counters():
    from llama_cpp import Llama
    from labkit import models
    llm = Llama(model_path=str(models.get("smollm2")), n_ctx=1024, n_threads=2, verbose=False)
    timings = bench.run_llama(llm, "Write a long story about a lighthouse keeper.", max_tokens=48, runs=3)
    for t in timings:
        engine_tps = t.engine["decode_tokens"] / t.engine["decode_ms"] * 1000
        assert t.output_tokens == t.engine["decode_tokens"] + 1
        assert t.decode_tps == pytest.approx(engine_tps, rel=0.10)
        assert t.ttft >= t.engine["prompt_ms"] / 1000 * 0.9


def test_harness_agrees_with_ollama_nanosecond_counters():
    import labkit
    with labkit.serve("ollama") as srv:
        timings = bench.run_ollama(srv, max_tokens=32, runs=3)
    for t in timings:
        assert t.output_tokens == t.engine["decode_tokens"] > 1
        engine_tps = t.engine["decode_tokens"] / t.engine["decode_ms"] * 1000
        # Ollama's eval_duration covers every generated token; the harness counts the ones after the first
        assert t.decode_tps == pytest.approx(engine_tps, rel=0.05)
        assert t.ttft > 0 and t.e2e > t.ttft

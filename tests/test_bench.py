"""labkit.bench: statistics on known data, harness overhead, the harness against llama.cpp's own counters."""

import pytest

from labkit import bench


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


@pytest.mark.full      # chapter 06 checks the same agreement with Ollama's counters in make test
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


def test_combined_throughput_adds_phase_times_not_rates():
    # 256 tokens at 1000/s (0.256 s) then 32 at 100/s (0.32 s): 288 tokens in 0.576 s.
    assert bench.combined_throughput(1000, 100, 256, 32) == pytest.approx(500.0)
    # Not the mean of the rates (550), nor their token-weighted mean (~900).
    assert bench.combined_throughput(1000, 100, 256, 32) < 550
    with pytest.raises(ValueError):
        bench.combined_throughput(0, 100, 256, 32)


def test_llama_bench_scores_pairs_prefill_and_decode_rows():
    rows = [{"n_threads": 2, "n_batch": 256, "flash_attn": 1, "n_prompt": 256, "n_gen": 0, "avg_ts": 1000.0},
            {"n_threads": 2, "n_batch": 256, "flash_attn": 1, "n_prompt": 0, "n_gen": 32, "avg_ts": 100.0},
            {"n_threads": 1, "n_batch": 256, "flash_attn": 0, "n_prompt": 256, "n_gen": 0, "avg_ts": 500.0},
            {"n_threads": 1, "n_batch": 256, "flash_attn": 0, "n_prompt": 0, "n_gen": 32, "avg_ts": 50.0}]
    scores = bench.llama_bench_scores(rows, 256, 32)
    assert scores == {(2, 256, True): pytest.approx(500.0), (1, 256, False): pytest.approx(250.0)}
    with pytest.raises(ValueError, match="prefill or a decode"):
        bench.llama_bench_scores(rows[:3], 256, 32)


def test_run_openai_retries_a_connection_dropped_before_any_token_once():
    """A server that hangs up on the first request without answering: one retry, with a warning; two hang-ups fail."""
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        hangups = 1

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if Handler.hangups > 0:
                Handler.hangups -= 1
                self.close_connection = True          # no status line: the client sees a dropped connection
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for chunk in ({"choices": [{"index": 0, "text": "hi", "finish_reason": None}]},
                          {"choices": [{"index": 0, "text": "!", "finish_reason": "length"}]},
                          {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}):
                event = {"id": "x", "object": "text_completion", "created": 0, "model": "m", **chunk}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        with pytest.warns(UserWarning, match="retried once"):
            timings, _ = bench.run_openai(url, model="m", max_tokens=2, requests=1, warmup=0)
        assert timings[0].output_tokens == 2
        Handler.hangups = 2
        from openai import APIConnectionError
        with pytest.raises(APIConnectionError), pytest.warns(UserWarning):
            bench.run_openai(url, model="m", max_tokens=2, requests=1, warmup=0)
    finally:
        srv.shutdown()

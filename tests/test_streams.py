"""labkit.streams: the stream primitives (SSE payloads, chunk text, timing, percentiles) on fixed input and a fake clock."""
import math
from types import SimpleNamespace as NS

import numpy as np
import pytest

from labkit import streams


def test_percentiles_on_known_data():
    data = list(range(1, 101))                     # 1..100
    s = streams.summarize(data)
    assert s["p50"] == 50.5 and s["min"] == 1 and s["max"] == 100 and s["n"] == 100
    assert s["p95"] == pytest.approx(95.05) and s["p99"] == pytest.approx(99.01)
    assert s["mean"] == 50.5 and s["stdev"] == pytest.approx(np.std(data, ddof=1))
    with pytest.raises(ValueError):
        streams.summarize([])


def test_request_timing_decode_rate():
    t = streams.RequestTiming(ttft=0.5, e2e=1.5, prompt_tokens=10, output_tokens=11, token_times=[0.5, 0.6, 1.5])
    assert t.decode_tps == pytest.approx(10.0)          # 10 tokens after the first in 1.0 s
    assert t.itl == pytest.approx([0.1, 0.9])
    assert math.isnan(streams.RequestTiming(0.5, 0.5, 1, 1).decode_tps)


def test_piece_of_handles_both_chunk_shapes():
    assert streams.piece_of({"choices": [{"delta": {"role": "assistant"}}]}) is None
    assert streams.piece_of({"choices": [{"delta": {"content": "Hi"}}]}) == "Hi"
    assert streams.piece_of({"choices": [{"text": " there", "finish_reason": None}]}) == " there"
    assert streams.piece_of({"choices": []}) is None
    assert streams.piece_of(NS(choices=[NS(delta=NS(content="x"))])) == "x"
    assert streams.piece_of(NS(choices=[NS(delta=NS(content=None))])) is None
    assert streams.piece_of(NS(choices=[], usage=NS(completion_tokens=3))) is None
    assert streams.piece_of(NS(choices=[NS(text="y")])) == "y"


def test_timed_stream_with_a_fake_clock():
    clock = iter([0.2, 0.3, 0.4, 0.5, 0.6])
    chunks = [{"choices": [{"delta": {"role": "assistant"}}]}] + [{"choices": [{"delta": {"content": c}}]} for c in "abcd"]
    text, t = streams.timed_stream(chunks, t0=0.0, now=lambda: next(clock))
    assert text == "abcd" and t.output_tokens == 4
    assert t.ttft == pytest.approx(0.2) and t.e2e == pytest.approx(0.6)
    assert t.decode_tps == pytest.approx(3 / 0.4)
    assert len(t.itl) == 3


def test_timed_stream_refuses_an_empty_stream():
    with pytest.raises(RuntimeError, match="no text"):
        streams.timed_stream([{"choices": [{"delta": {"role": "assistant"}}]}])


def test_sse_payloads_skip_comments_and_blank_lines():
    lines = ['data: {"a": 1}', "", ": keep-alive", "event: x", 'data:{"b": 2}', "data: [DONE]"]
    assert list(streams.sse_payloads(lines)) == ['{"a": 1}', '{"b": 2}', "[DONE]"]


def test_the_old_homes_still_answer():
    from labkit import bench, llamacpp_lab
    assert bench.timed_stream is streams.timed_stream is llamacpp_lab.timed_stream
    assert bench.RequestTiming is streams.RequestTiming and bench.percentile is streams.percentile

"""The PagedAttention and batching simulators of chapter 04."""
import numpy as np
import pytest

from labkit.paging import OutOfBlocks, PagedKVCache, Request, compare_reservation, poisson_trace, sample_lengths, simulate_batching


def test_allocator_takes_blocks_only_when_full():
    cache = PagedKVCache(num_blocks=10, block_size=16)
    cache.append("a", 16)
    assert cache.blocks_of("a") == 1 and cache.wasted_slots() == 0
    cache.append("a", 1)
    assert cache.blocks_of("a") == 2 and cache.wasted_slots() == 15
    cache.append("b", 100)
    assert cache.blocks_of("b") == 7 and cache.free_blocks == 1
    assert not cache.can_append("b", 29) and cache.can_append("b", 28)   # 112 slots held, 1 block free
    with pytest.raises(OutOfBlocks, match="needs 2 more blocks"):
        cache.append("b", 29)
    assert cache.blocks_of("b") == 7            # a failed append changes nothing
    cache.free("a")
    assert cache.free_blocks == 3


def test_waste_never_exceeds_one_block_per_sequence():
    rng = np.random.default_rng(1)
    cache = PagedKVCache(num_blocks=10_000, block_size=16)
    for seq in range(200):
        cache.append(seq, int(rng.integers(1, 500)))
    assert cache.wasted_slots() < 200 * 16


def test_reservation_comparison_known_case():
    r = compare_reservation([10, 20, 100], max_len=100, block_size=16, capacity_slots=200)
    assert r.tokens_needed == 130 and r.contiguous_slots == 300 and r.paged_slots == 16 + 32 + 112
    assert r.fit_contiguous == 2 and r.fit_paged == 3
    assert r.waste_paged < r.waste_contiguous


def test_paging_wastes_less_on_realistic_lengths():
    lengths = sample_lengths(500, max_len=2048, seed=0)
    assert lengths.min() >= 8 and lengths.max() <= 2048 and np.median(lengths) < 400
    r = compare_reservation(lengths, 2048, 16, capacity_slots=46_592)
    assert r.waste_contiguous > 0.8 and r.waste_paged < 0.1
    assert r.fit_paged > 5 * r.fit_contiguous


def test_bad_lengths():
    with pytest.raises(ValueError):
        compare_reservation([0, 5], 10, 4, 100)
    with pytest.raises(ValueError):
        compare_reservation([11], 10, 4, 100)


def test_static_batch_waits_for_its_longest_member():
    reqs = [Request(0, 0, 10), Request(1, 0, 1), Request(2, 0, 5)]
    static = simulate_batching(reqs, max_batch=2, policy="static")
    cont = simulate_batching(reqs, max_batch=2, policy="continuous")
    # static: {0,1} run 10 steps, then 2 runs 5 steps → request 2 finishes at 15
    assert static.latencies == {0: 10, 1: 1, 2: 15} and static.steps == 15
    # continuous: request 2 takes request 1's slot at step 1 → finishes at 6
    assert cont.latencies == {0: 10, 1: 1, 2: 6} and cont.steps == 10
    assert cont.utilisation > static.utilisation
    assert (static.timeline[1:10, 1] == -1).all()        # the idle slot, visible


def test_continuous_batching_beats_static_on_a_trace():
    trace = poisson_trace(200, rate_per_step=0.5, max_len=512, seed=3)
    s = simulate_batching(trace, 8, "static")
    c = simulate_batching(trace, 8, "continuous")
    assert len(s.latencies) == len(c.latencies) == 200
    assert c.mean_latency < s.mean_latency and c.utilisation > s.utilisation
    # both decode the same number of tokens
    assert (s.timeline >= 0).sum() == (c.timeline >= 0).sum() == sum(r.output_len for r in trace)


def test_bad_policy():
    with pytest.raises(ValueError):
        simulate_batching([], 4, "greedy")

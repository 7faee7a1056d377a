"""PagedAttention and continuous batching, made visible with small simulators (chapter 04).

Two ideas make vLLM fast, and both are about *not reserving what you do not use*:

* **Paged KV cache.** A naive server reserves room for ``max_len`` tokens per sequence up front
  (a contiguous slab). vLLM splits the KV cache into fixed-size blocks and hands a sequence a new
  block only when its last one is full, so at most ``block_size - 1`` slots per sequence sit idle.
  :class:`PagedKVCache` is that allocator; :func:`compare_reservation` measures the waste of both
  strategies for a set of sequence lengths.
* **Continuous batching.** A static batch runs until its *longest* member finishes while finished
  slots idle; continuous batching refills a slot the step it frees up.
  :func:`simulate_batching` replays a request trace under both policies (one decode token per
  running sequence per step) and reports utilisation and latency.

>>> cache = PagedKVCache(num_blocks=4, block_size=16)
>>> cache.append("a", 17); cache.blocks_of("a")
2
>>> cache.append("b", 40)
Traceback (most recent call last):
...
labkit.paging.OutOfBlocks: sequence 'b' needs 3 more blocks but only 2 of 4 are free
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class OutOfBlocks(RuntimeError):
    """The KV cache has no free block for a sequence that needs one (vLLM would preempt)."""


class PagedKVCache:
    """A block allocator for a KV cache of ``num_blocks`` blocks of ``block_size`` token slots."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._tokens: dict[object, int] = {}
        self._blocks: dict[object, int] = {}

    @property
    def used_blocks(self) -> int:
        return sum(self._blocks.values())

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks

    def blocks_of(self, seq) -> int:
        return self._blocks.get(seq, 0)

    def can_append(self, seq, n_tokens: int = 1) -> bool:
        need = math.ceil((self._tokens.get(seq, 0) + n_tokens) / self.block_size) - self._blocks.get(seq, 0)
        return need <= self.free_blocks

    def append(self, seq, n_tokens: int = 1) -> None:
        """Store ``n_tokens`` more tokens of ``seq``, taking new blocks only when needed."""
        tokens = self._tokens.get(seq, 0) + n_tokens
        need = math.ceil(tokens / self.block_size) - self._blocks.get(seq, 0)
        if need > self.free_blocks:
            raise OutOfBlocks(f"sequence {seq!r} needs {need} more blocks but only "
                              f"{self.free_blocks} of {self.num_blocks} are free")
        self._tokens[seq] = tokens
        self._blocks[seq] = self._blocks.get(seq, 0) + need

    def free(self, seq) -> None:
        self._tokens.pop(seq, None)
        self._blocks.pop(seq, None)

    def wasted_slots(self) -> int:
        """Reserved-but-empty token slots (only in each sequence's last block)."""
        return self.used_blocks * self.block_size - sum(self._tokens.values())


@dataclass
class ReservationComparison:
    n_sequences: int
    tokens_needed: int
    contiguous_slots: int      # every sequence reserves max_len
    paged_slots: int           # every sequence holds ceil(len / block) blocks
    capacity_slots: int
    fit_contiguous: int        # how many of these sequences fit at once in the capacity
    fit_paged: int

    @property
    def waste_contiguous(self) -> float:
        return 1 - self.tokens_needed / self.contiguous_slots

    @property
    def waste_paged(self) -> float:
        return 1 - self.tokens_needed / self.paged_slots


def compare_reservation(lengths, max_len: int, block_size: int, capacity_slots: int) -> ReservationComparison:
    """Memory needed by contiguous max-length reservation vs paging, for these final lengths."""
    lengths = [int(x) for x in lengths]
    if not lengths or min(lengths) <= 0 or max(lengths) > max_len:
        raise ValueError("lengths must be non-empty, positive and at most max_len")
    paged_each = [math.ceil(n / block_size) * block_size for n in lengths]
    fit_paged, used = 0, 0
    for slots in paged_each:          # admit in order until the cache is full
        if used + slots > capacity_slots:
            break
        used += slots
        fit_paged += 1
    return ReservationComparison(len(lengths), sum(lengths), len(lengths) * max_len, sum(paged_each),
                                 capacity_slots, min(len(lengths), capacity_slots // max_len), fit_paged)


def sample_lengths(n: int, max_len: int, median: int = 200, sigma: float = 0.8, seed: int = 0) -> np.ndarray:
    """Sequence lengths (prompt + output) from a log-normal distribution clipped to [8, max_len].

    Chat traffic is right-skewed — most exchanges are short, a few are long — which is exactly
    what makes max-length reservation wasteful.
    """
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(math.log(median), sigma, n).astype(int), 8, max_len)


@dataclass
class Request:
    id: int
    arrival: int         # step at which it arrives
    output_len: int      # decode steps it needs


@dataclass
class BatchingResult:
    policy: str
    steps: int
    utilisation: float                 # busy slot-steps / (max_batch × steps)
    latencies: dict[int, int]          # request id → finish step − arrival step
    timeline: np.ndarray = field(repr=False)   # [step, slot] → request id, −1 when idle

    @property
    def mean_latency(self) -> float:
        return float(np.mean(list(self.latencies.values())))

    @property
    def p95_latency(self) -> float:
        return float(np.percentile(list(self.latencies.values()), 95))

    @property
    def throughput(self) -> float:
        """Tokens per step."""
        return float((self.timeline >= 0).sum() / self.steps)


def simulate_batching(requests: list[Request], max_batch: int, policy: str = "continuous",
                      max_steps: int = 1_000_000) -> BatchingResult:
    """Replay ``requests`` through a ``max_batch``-slot decoder under a batching policy.

    ``"static"``: a batch is formed from waiting requests only when the previous batch has
    completely finished. ``"continuous"``: each step, free slots are refilled from the queue.
    """
    if policy not in ("static", "continuous"):
        raise ValueError("policy must be 'static' or 'continuous'")
    if max_batch <= 0:
        raise ValueError("max_batch must be positive")
    pending = sorted(requests, key=lambda r: (r.arrival, r.id))
    slots: list[list | None] = [None] * max_batch           # [request, tokens left]
    rows, latencies, step, i = [], {}, 0, 0
    while (i < len(pending) or any(slots)) and step < max_steps:
        batch_empty = not any(slots)
        if policy == "continuous" or batch_empty:
            for s in range(max_batch):
                if slots[s] is None and i < len(pending) and pending[i].arrival <= step:
                    slots[s] = [pending[i], pending[i].output_len]
                    i += 1
        rows.append([slot[0].id if slot else -1 for slot in slots])
        for s, slot in enumerate(slots):
            if slot:
                slot[1] -= 1
                if slot[1] == 0:
                    latencies[slot[0].id] = step + 1 - slot[0].arrival
                    slots[s] = None
        step += 1
    timeline = np.array(rows, dtype=int).reshape(-1, max_batch)
    busy_steps = int((timeline >= 0).any(axis=1).sum()) or 1
    return BatchingResult(policy, step, float((timeline >= 0).sum() / (max_batch * busy_steps)), latencies, timeline)


def poisson_trace(n: int, rate_per_step: float, max_len: int, median: int = 60, seed: int = 0) -> list[Request]:
    """``n`` requests with Poisson arrivals and log-normal output lengths."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate_per_step, n)).astype(int)
    lengths = sample_lengths(n, max_len, median=median, seed=seed + 1)
    return [Request(k, int(a), int(length)) for k, (a, length) in enumerate(zip(arrivals, lengths))]

"""The generated simultaneous transduction task of ``leapformer-stream`` (``--data stream``).

A source stream of ``S`` symbols (ids ``1 .. STREAM_SYMBOLS``, uniform) and a target stream of
``T = S / rate`` symbols: ``rate`` source tokens per target token, as speech frames per word.
Target token ``t`` is the source token at ``p_t = min(rate * t + d_t, S - 1)`` with the delay
``d_t = t mod (max_delay + 1)``: a local reordering whose reach into the future cycles over
``0 .. max_delay`` source tokens past the target's own position ``rate * t`` on the source
time axis. A policy that has read ``R(t)`` source tokens when it writes token ``t`` can get it
right for sure only if ``p_t < R(t)``; otherwise it guesses among ``STREAM_SYMBOLS`` symbols.
So waiting longer helps a growing share of the targets, and a wait-k policy trades latency
for accuracy (``policy_ceiling`` is the best accuracy a policy's reads allow).

Reads: wait-k (``lk.wait_k``) lets target ``t`` read ``g(t) = min(k + floor(rate * t), S)``
source tokens; with a block-causal encoder of block ``W`` an encoder position needs its whole
block, so the reads actually made are ``R(t) = min(ceil(g(t) / W) * W, S)`` (``block_reads``).
Average lagging (Ma et al. 2019, STACL) over those reads::

    AL = 1/tau * sum_{t < tau} (R(t) - t * S / T),   tau = 1 + the first t with R(t) = S (else T)

Deterministic for a seed (``numpy.random.default_rng``); the labels are built by vectorised
indexing and ``stream_solve`` (a direct loop) is the check the tests run against them.
"""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

STREAM_SYMBOLS = 16        # source and target symbols: ids 1 .. 16
BOS = 0                    # the decoder's start token (never a label)
STREAM_VOCAB = STREAM_SYMBOLS + 1


def stream_check(src_len: int, rate: int, max_delay: int) -> None:
    for name, v, lo in (("src_len", src_len, 1), ("rate", rate, 1), ("max_delay", max_delay, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"stream: {name} must be an int >= {lo}, got {v!r}")
    if src_len % rate:
        raise ValueError(f"stream: src_len {src_len} must be a multiple of rate {rate} (T = src_len / rate "
                         "target tokens)")


def stream_delays(num_targets: int, max_delay: int) -> np.ndarray:
    """d_t = t mod (max_delay + 1), t = 0 .. num_targets - 1."""
    return np.arange(num_targets) % (max_delay + 1)


def stream_positions(src_len: int, rate: int, max_delay: int) -> np.ndarray:
    """p_t: the source position target t copies, [T]."""
    T = src_len // rate
    return np.minimum(rate * np.arange(T) + stream_delays(T, max_delay), src_len - 1)


def stream_example(rng: np.random.Generator, src_len: int, rate: int, max_delay: int) -> Tuple[list, list]:
    """One example -> (source [S] ids in 1 .. STREAM_SYMBOLS, target [S / rate] ids)."""
    x = rng.integers(1, STREAM_SYMBOLS + 1, src_len)
    return x.tolist(), x[stream_positions(src_len, rate, max_delay)].tolist()


def stream_solve(x: Sequence[int], rate: int, max_delay: int) -> List[int]:
    """Direct solver: walk the target positions and copy the source token each one points at."""
    x = list(x)
    out = []
    for t in range(len(x) // rate):
        p = rate * t + t % (max_delay + 1)
        out.append(x[min(p, len(x) - 1)])
    return out


def stream_batch(data, batch_size: int, src_len: int, rate: int, max_delay: int, generator: torch.Generator):
    """A batch of the task from ``data`` (a ``TaskData`` of task "stream") -> (source [B, S] long,
    target [B, S / rate] long), seeded by one number drawn from ``generator`` and the split."""
    stream_check(src_len, rate, max_delay)
    rng = np.random.default_rng(data._rng_seed(generator))
    ex = [stream_example(rng, src_len, rate, max_delay) for _ in range(batch_size)]
    return torch.tensor([e[0] for e in ex]), torch.tensor([e[1] for e in ex])


# --------------------------------------------------------------------------- policy and latency
def block_reads(num_targets: int, src_len: int, lag: Optional[int], rate: float, block: int) -> List[int]:
    """R(t): source tokens read before writing target t under wait-k (``lag`` = k; None = the
    whole source first), rounded up to whole encoder blocks of ``block`` tokens."""
    if lag is None:
        return [src_len] * num_targets
    g = [min(lag + math.floor(rate * t), src_len) for t in range(num_targets)]
    return [min(-(-n // block) * block, src_len) for n in g]


def average_lagging(reads: Sequence[int], src_len: int, num_targets: Optional[int] = None) -> float:
    """Average lagging (Ma et al. 2019) in source tokens of the reads ``R(t)`` (non-decreasing):
    ``1/tau sum_{t < tau} (R(t) - t * S / T)`` with ``tau`` = 1 + the first t whose read is the whole
    source (T when none is)."""
    reads = list(reads)
    T = len(reads) if num_targets is None else num_targets
    tau = next((t + 1 for t, r in enumerate(reads) if r >= src_len), len(reads))
    return sum(reads[t] - t * src_len / T for t in range(tau)) / tau


def policy_ceiling(src_len: int, rate: int, max_delay: int, reads: Sequence[int]) -> float:
    """The best expected accuracy a policy with reads ``R(t)`` allows: target t is known when
    its source token has been read (p_t < R(t)), else a uniform guess among the symbols."""
    p = stream_positions(src_len, rate, max_delay)
    seen = np.asarray(reads) > p
    return float(np.mean(np.where(seen, 1.0, 1.0 / STREAM_SYMBOLS)))

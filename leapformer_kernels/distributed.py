"""Context-parallel LeaP attention: a sequence split across ranks, states exchanged, not keys.

    import torch.distributed as dist
    import leapformer_kernels as lk

    o_local = lk.distributed.leap_attention_cp(q, k, v, pq, pk, group=dist.group.WORLD)

Each rank of ``group`` holds one contiguous slice of the sequence (slices in rank order, lengths
may differ) and gets the output of its own queries, equal to ``lk.leap_attention`` on the whole
sequence, forward and backward. What crosses ranks is the linear-attention state of each slice
(``S [B, Hkv, 2Dk, Dv]`` and ``z [B, Hkv, 2Dk]``, float32 or float64), whose size does not depend on
the sequence length (LASP-2, arXiv 2502.07563), never keys or values.

Algorithm (every step is the package's public op ``lk.leap_attention``, so every backend works):

1. Each rank computes the total state of its slice with one op call whose only query is a dummy
   zero query (``causal=False``, ``output_final_state=True``, with ``Hkv`` heads, so grouped-query
   attention sends ``Hkv`` heads, not ``H``). That is one pass over the slice's keys and values, as
   cheap as the inter-chunk part of the attention itself, and no feature tensor is ever written
   to memory. (Running the causal op twice, once from a zero state for the total and once from
   the prefix, would cost a whole second attention pass; finishing one zero-state pass with a
   correction term ``q~ . P`` would need the unnormalised numerator and denominator separately,
   which half-precision outputs cannot carry accurately.)
2. The states are all-gathered (one collective: its latency does not grow with the ring length,
   and each rank needs only sums that it forms locally); each rank sums those of the lower ranks
   (the exclusive prefix, in rank order).
3. The local attention runs from the prefix state (``initial_state=``).

Block-causal (``block_size=W``; blocks count from the start of the whole sequence): a query sees
the prefix before its block and its whole block, and a block may straddle slices. Each rank
therefore also sends the state of its *leading partial block* (its keys before the first block
boundary at or after its slice start; empty when the slice starts on a boundary, and not sent at
all when every slice does). A rank whose last block runs on into higher ranks adds the leading
partial blocks of the ranks that start inside that block. Locally the slice splits into the head
(the rest of a block that began on a lower rank: prefix + the rank's own leading partial block),
the middle (whole blocks, the block-causal op from that state; its first position is a block
boundary) and the tail (a last block that continues on higher ranks: everything before the block's
end). Head and tail see a fixed state, so they are op calls with that state and one padded key.

Non-causal (``causal=False``): the slice states are all-reduced and every query reads the total.

Backward: the exchange is a ``torch.autograd.Function`` whose backward all-gathers the gradients
of the states each rank received (the same number of bytes as the forward) and sums the ones that
flow to each rank's own states; the all-reduce's backward is an all-reduce. The op is
differentiable with respect to ``initial_state``, so gradients reach q, k, v, pq and pk exactly.

Bytes sent per rank per call, forward (the backward sends the same again), with
``s = B * Hkv * 2Dk * (Dv + 1) * 4`` (8 for float64 inputs) the size of one state:
causal ``(P - 1) * s`` received, ``s`` contributed (all-gather); block-causal twice that when a
slice boundary falls inside a block; non-causal one all-reduce of ``s``. All-gathering keys and
values instead would bring each rank ``(T - T_r) * B * Hkv * (Dk + Dv + 1)`` elements: the states are
smaller once the whole sequence is longer than about ``(P - 1) * 2Dk * Dv * 4 / ((Dk + Dv) * itemsize)``
tokens (``128 * (P - 1)`` for Dk = Dv = 64 in bf16), and they do not grow with it. Without
``slice_lengths`` every call first all-gathers a small metadata vector (lengths, shapes and
options, 17 int64 per rank), which checks the ranks agree; ``track_communication`` counts both.
"""
from __future__ import annotations

import contextlib
import struct
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["leap_attention_cp", "track_communication"]

_NAME = "leap_attention_cp"

# -- communication accounting ------------------------------------------------------------------

_STATS: List[dict] = []


@contextlib.contextmanager
def track_communication():
    """Count what this rank puts into collectives inside the ``with`` block.

    Yields a dict with ``sent`` (bytes this rank contributes to collectives: its input tensors),
    ``received`` (bytes of other ranks' data this rank gets back) and ``collectives`` (how many), for
    the forward and the backward alike (run the backward inside the block to count it)."""
    stats = {"sent": 0, "received": 0, "collectives": 0}
    _STATS.append(stats)
    try:
        yield stats
    finally:
        _STATS.remove(stats)


def _count(sent: int, received: int) -> None:
    for s in _STATS:
        s["sent"] += sent
        s["received"] += received
        s["collectives"] += 1


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[P, *t.shape]: every rank's ``t``, in rank order."""
    P = dist.get_world_size(group)
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(P)]
    dist.all_gather(out, t, group=group)
    nbytes = t.numel() * t.element_size()
    _count(nbytes, (P - 1) * nbytes)
    return torch.stack(out)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    nbytes = t.numel() * t.element_size()
    _count(nbytes, nbytes)
    return t


# -- the exchanges (autograd) -------------------------------------------------------------------

def _select_sum(G: torch.Tensor, pairs, like: torch.Tensor) -> torch.Tensor:
    """sum of ``G[j, i]`` over ``pairs`` in their (rank) order; zeros for none."""
    if not pairs:
        return torch.zeros_like(like)
    out = G[pairs[0][0], pairs[0][1]].clone()
    for j, i in pairs[1:]:
        out += G[j, i]
    return out


class _GatherSums(torch.autograd.Function):
    """``local [m, ...]`` -> ``[n_out, ...]``: output ``o`` of rank ``r`` is the sum of the
    ``(j, i)`` entries ``plan[r][o]`` of every rank's ``local`` (all-gather, then local sums). The
    plan is the same list on every rank. Backward: all-gather the output gradients of every rank,
    then each rank sums those of the outputs its own entries went into."""

    @staticmethod
    def forward(ctx, local, group, plan, rank):
        ctx.group, ctx.plan, ctx.rank, ctx.m = group, plan, rank, local.shape[0]
        G = _all_gather(local, group)
        return torch.stack([_select_sum(G, pairs, local[0]) for pairs in plan[rank]])

    @staticmethod
    def backward(ctx, d_out):
        D = _all_gather(d_out, ctx.group)  # [P, n_out, ...]
        pairs: List[List[Tuple[int, int]]] = [[] for _ in range(ctx.m)]
        for r, outs in enumerate(ctx.plan):
            for o, entries in enumerate(outs):
                for j, i in entries:
                    if j == ctx.rank:
                        pairs[i].append((r, o))
        return torch.stack([_select_sum(D, p, d_out[0]) for p in pairs]), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        return _all_reduce(local, group)

    @staticmethod
    def backward(ctx, d_out):
        return _all_reduce(d_out, ctx.group), None


# -- validation ---------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# metadata fields gathered from every rank (one int64 each); names for the mismatch messages
_FIELDS = ("error", "q length", "k length", "batch", "q heads", "k heads", "q head dim", "v head dim",
           "dtype", "causal", "block_size", "key_padding_mask", "normalize", "eps", "requires_grad", "backend", "spare")


def _check_group(group) -> Tuple[int, int]:
    if group is None:
        raise TypeError(f"{_NAME}: group is required (a torch.distributed ProcessGroup such as dist.group.WORLD, "
                        "or the context-parallel subgroup), got None")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{_NAME}: group needs torch.distributed to be initialized "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{_NAME}: group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{_NAME}: group does not contain this process (global rank {dist.get_rank()})")
    return rank, dist.get_world_size(group)


def _check_lengths(slice_lengths, P: int, rank: int, n_local: int) -> List[int]:
    if isinstance(slice_lengths, torch.Tensor):
        slice_lengths = slice_lengths.tolist()
    try:
        lens = list(slice_lengths)
    except TypeError:
        raise TypeError(f"slice_lengths must be a sequence of {P} ints, got {type(slice_lengths).__name__}") from None
    if len(lens) != P:
        raise ValueError(f"slice_lengths has {len(lens)} entries but the group has {P} ranks")
    for i, n in enumerate(lens):
        if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
            raise TypeError(f"slice_lengths[{i}] must be an int, got {type(n).__name__}")
        if int(n) < 1:
            raise ValueError(f"slice_lengths[{i}] is {int(n)}: every rank needs a slice of at least 1 token")
    lens = [int(n) for n in lens]
    if lens[rank] != n_local:
        raise ValueError(f"slice_lengths[{rank}] is {lens[rank]} but rank {rank} passes {n_local} tokens "
                         "(k.shape[1])")
    return lens


def _metadata(q, k, v, pk, key_padding_mask, causal, block_size, eps, normalize, backend) -> List[int]:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, pk))  # the backward exchanges
    return [0, q.shape[1], k.shape[1], q.shape[0], q.shape[2], k.shape[2], q.shape[3], v.shape[3],
            _DTYPES.index(q.dtype), int(causal), min(int(block_size or 0), 2 ** 63 - 1),
            int(key_padding_mask is not None), int(normalize), struct.unpack("<q", struct.pack("<d", eps))[0],
            int(grad), (None, "torch", "cpu", "triton").index(backend), 0]


def _describe(field: str, value: int) -> str:
    if field == "dtype":
        return str(_DTYPES[value])
    if field == "eps":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if field == "backend":
        return repr((None, "torch", "cpu", "triton")[value])
    if field in ("causal", "normalize", "key_padding_mask", "requires_grad"):
        return str(bool(value))
    return str(value)


_ARG = {"q length": "q", "k length": "k", "batch": "q", "q heads": "q", "k heads": "k", "q head dim": "q",
        "v head dim": "v", "dtype": "q", "causal": "causal", "block_size": "block_size",
        "key_padding_mask": "key_padding_mask", "normalize": "normalize", "eps": "eps",
        "requires_grad": "k, v, pk", "backend": "backend"}


def _gather_metadata(local_error: Optional[BaseException], meta: List[int], group, device, rank, P) -> List[List[int]]:
    """All-gather every rank's metadata; every rank raises the same error if any rank failed its own
    checks or the ranks disagree."""
    m = torch.tensor(meta if local_error is None else [1] + [0] * (len(_FIELDS) - 1), dtype=torch.int64,
                     device=device)
    rows = _all_gather(m, group).cpu().tolist()
    failed = [r for r in range(P) if rows[r][0]]
    if failed:
        # every rank knows who failed: one more (object) collective carries the messages
        msgs = [None] * P
        dist.all_gather_object(msgs, None if local_error is None else (type(local_error).__name__, str(local_error)),
                               group=group)
        if local_error is not None:
            raise local_error
        kind, msg = msgs[failed[0]]
        raise (TypeError if kind == "TypeError" else ValueError)(f"{_NAME}: rank {failed[0]}: {msg}")
    for f, field in enumerate(_FIELDS):
        if field in ("error", "q length", "k length", "spare"):
            continue
        vals = [row[f] for row in rows]
        if len(set(vals)) > 1:
            other = next(r for r in range(P) if vals[r] != vals[0])
            raise ValueError(f"{_NAME}: {_ARG[field]} differs between ranks: {field} {_describe(field, vals[0])} "
                             f"on rank 0 but {_describe(field, vals[other])} on rank {other}")
    return rows


# -- the op -------------------------------------------------------------------------------------

def _state_of(k, v, pk, mask, *, eps, backend):
    """(S [B, Hkv, 2Dk, Dv], z [B, Hkv, 2Dk]) of the keys k, v, pk (mask: True = padded): one op
    call with a single zero query and Hkv query heads."""
    from .ops import leap_attention

    B, _, Hkv, Dk = k.shape
    q0 = k.new_zeros(B, 1, Hkv, Dk)
    pq0 = pk.new_zeros(B, 1, Hkv)
    _, (S, z) = leap_attention(q0, k, v, pq0, pk, causal=False, key_padding_mask=mask, output_final_state=True,
                               eps=eps, backend=backend)
    return S, z


def _read_state(q, pq, k, v, pk, state, *, eps, normalize, backend):
    """Queries q against a fixed state (S, z) and no keys of their own (one padded dummy key)."""
    from .ops import leap_attention

    B, _, Hkv, Dk = k.shape
    k0 = k.new_zeros(B, 1, Hkv, Dk)
    v0 = v.new_zeros(B, 1, Hkv, v.shape[3])
    pk0 = pk.new_zeros(B, 1, Hkv)
    pad = torch.ones(B, 1, dtype=torch.bool, device=k.device)
    return leap_attention(q, k0, v0, pq, pk0, causal=False, key_padding_mask=pad, initial_state=state, eps=eps,
                          normalize=normalize, backend=backend)


def _pack(S, z):
    return torch.cat([S, z.unsqueeze(-1)], dim=-1)  # [B, Hkv, 2Dk, Dv + 1]


def _unpack(X, heads: int):
    """[B, Hkv, 2Dk, Dv + 1] -> (S, z) with the query heads (head h reads kv head h // (H // Hkv))."""
    g = heads // X.shape[1]
    if g > 1:
        X = X.repeat_interleave(g, dim=1)
    return X[..., :-1], X[..., -1]


def leap_attention_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, *,
                      group, causal: bool = True, block_size: Optional[int] = None,
                      key_padding_mask: Optional[torch.Tensor] = None, slice_lengths: Optional[Sequence[int]] = None,
                      eps: float = 1e-6, normalize: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Context-parallel ``lk.leap_attention``: this rank's slice of the sequence in, its output out.

    Args:
        q [B, T_r, H, Dk], k [B, T_r, Hkv, Dk], v [B, T_r, Hkv, Dv], pq [B, T_r, H], pk [B, T_r, Hkv]:
            this rank's contiguous slice of the sequence; slices in rank order of ``group``, any
            lengths >= 1 (they may differ). With ``causal=False`` q's slice may differ in length from
            k's (sharded cross-attention): every query attends to every key of every rank.
        group: the process group over which the sequence is split (required: under data x context
            parallelism the whole world is the wrong default). Every rank of it calls this
            function with the same options, B, heads and head dims, and runs the backward.
        causal, block_size, eps, normalize, backend: as ``lk.leap_attention``; block positions count
            from the start of the whole sequence, so a block may straddle ranks (handled exactly).
        key_padding_mask: [B, T_r] bool, this rank's slice of the mask (True = padded key).
        slice_lengths: the key-slice length of every rank (``k.shape[1]`` of each), if known. Without
            it the call all-gathers a small metadata vector first (the lengths, and the shapes and
            options, so that a rank whose input disagrees makes every rank raise the same error
            instead of leaving the others waiting in a collective). With it there is no such
            exchange and no host synchronisation; it is checked locally (one entry per rank, each
            >= 1, this rank's entry equal to its k length), and every rank must pass the same list.

    Returns:
        o [B, T_r, H, Dv]: this rank's rows of ``lk.leap_attention`` on the whole sequence.

    Differentiable (first order) with respect to q, k, v, pq, pk: the backward exchanges the
    gradients of the states (see the module docstring for the algorithm and the bytes sent).
    Errors: a ``TypeError`` / ``ValueError`` naming the argument, raised on every rank when the
    metadata is gathered (without ``slice_lengths``).
    """
    from .ops import leap_attention
    from . import backends
    from ._validate import check_attention

    rank, P = _check_group(group)
    local_error = None
    try:
        check_attention(q, k, v, pq, pk, causal=causal, block_size=block_size, key_padding_mask=key_padding_mask,
                        cu_seqlens=None, initial_state=None, output_final_state=False, eps=eps,
                        normalize=normalize, backend=backend)
        backends.choose("leap_attention", backend, q.device, q.dtype)
        meta = _metadata(q, k, v, pk, key_padding_mask, causal, block_size, float(eps), normalize, backend)
    except (TypeError, ValueError) as e:
        if slice_lengths is not None:
            raise
        local_error, meta = e, None
    if slice_lengths is not None:
        lens = _check_lengths(slice_lengths, P, rank, k.shape[1])
    else:
        name = str(dist.get_backend(group))
        device = q.device if (isinstance(q, torch.Tensor) and q.device.type != "cpu" and "gloo" not in name) \
            else torch.device("cpu")
        rows = _gather_metadata(local_error, meta, group, device, rank, P)
        lens = [row[2] for row in rows]

    B, n, H = q.shape[0], k.shape[1], q.shape[2]
    cp = dict(eps=eps, backend=backend)

    if not causal:
        X = _AllReduceSum.apply(_pack(*_state_of(k, v, pk, key_padding_mask, **cp)), group)
        return _read_state(q, pq, k, v, pk, _unpack(X, H), normalize=normalize, **cp)

    a = sum(lens[:rank])
    starts = [sum(lens[:j]) for j in range(P)]
    N = sum(lens)
    W = None if block_size is None or block_size >= N else int(block_size)

    def mask_of(lo, hi):
        return None if key_padding_mask is None else key_padding_mask[:, lo:hi]

    if W is None and block_size is not None:  # one block over the whole sequence: non-causal
        X = _AllReduceSum.apply(_pack(*_state_of(k, v, pk, key_padding_mask, **cp)), group)
        return _read_state(q, pq, k, v, pk, _unpack(X, H), normalize=normalize, **cp)

    if W is None:  # causal: exclusive prefix of the slice totals
        T_r = _pack(*_state_of(k, v, pk, key_padding_mask, **cp))
        plan = [[[(j, 0) for j in range(r)]] for r in range(P)]
        (prefix,) = _GatherSums.apply(T_r[None], group, plan, rank)
        return leap_attention(q, k, v, pq, pk, causal=True, key_padding_mask=key_padding_mask,
                              initial_state=_unpack(prefix, H), normalize=normalize, **cp)

    # block-causal: positions a .. a + n - 1 of N; blocks [iW, (i + 1)W)
    def lead(j):  # length of rank j's leading partial block (keys before its first block boundary)
        return min(-(-starts[j] // W) * W - starts[j], lens[j])

    def tail_end(j):  # end of rank j's last block if it straddles into higher ranks, else None
        b = starts[j] + lens[j]
        e = min(((b - 1) // W + 1) * W, N)
        return e if e > b else None

    f = lead(rank)
    send_lead = any(lead(j) > 0 for j in range(P))
    parts = []
    if f > 0:
        parts.append(_pack(*_state_of(k[:, :f], v[:, :f], pk[:, :f], mask_of(0, f), **cp)))
    if f < n:
        parts.append(_pack(*_state_of(k[:, f:], v[:, f:], pk[:, f:], mask_of(f, n), **cp)))
    T_r = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    if send_lead:
        L_r = parts[0] if f > 0 else torch.zeros_like(T_r)
        local = torch.stack([T_r, L_r])
    else:
        local = T_r[None]

    plan = []
    for r in range(P):
        prefix = [(j, 0) for j in range(r)]
        e = tail_end(r)
        follow = [(j, 1) for j in range(r + 1, P) if e is not None and starts[j] < e]
        plan.append([prefix, follow] if send_lead else [prefix])
    outs = _GatherSums.apply(local, group, plan, rank)
    Pst = outs[0]
    Fst = outs[1] if send_lead else None

    e = tail_end(rank)
    m = max((a + n - 1) // W * W - a, 0) if e is not None else n  # tail: queries [m, n)
    pieces = []
    h = min(f, m)
    if h > 0:  # head: the rest of a block begun on a lower rank, whose end lies inside this slice
        pieces.append(_read_state(q[:, :h], pq[:, :h], k, v, pk, _unpack(Pst + parts[0], H), normalize=normalize,
                                  **cp))
    if m > f:  # middle: whole blocks from a block boundary
        init = Pst + parts[0] if f > 0 else Pst
        pieces.append(leap_attention(q[:, f:m], k[:, f:m], v[:, f:m], pq[:, f:m], pk[:, f:m], causal=True,
                                     block_size=W, key_padding_mask=mask_of(f, m), initial_state=_unpack(init, H),
                                     normalize=normalize, **cp))
    if m < n:  # tail: a last block that continues on higher ranks
        full = Pst + T_r + Fst
        pieces.append(_read_state(q[:, m:], pq[:, m:], k, v, pk, _unpack(full, H), normalize=normalize, **cp))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

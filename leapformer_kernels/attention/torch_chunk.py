"""Chunked O(T)-memory LeaP attention in PyTorch: the ``torch`` backend that users run.

All chunks are processed at once: per-chunk key states ``k~_c^T v_c`` are summed by a
prefix (cumsum) over chunks, so the state is carried between chunks without a Python loop,
and each chunk adds its masked intra-chunk scores. Chunk length 64 (causal); for
block-causal attention with block ``W`` the chunk is a multiple of ``W`` (``W <= 64``) or
``W`` itself (``W > 64``, where a whole block is visible to all its queries, so the
inclusive chunk state serves without intra-chunk scores). Any ``W >= T`` is one block: the
chunk is then T rows (never ``W`` rows). Memory is O(T * (Dk + Dv) + T/C * Dk * Dv); no
T x T buffer. Autograd provides the backward.

Monotone cross-attention (``num_visible_keys``) pairs each query chunk with the key chunks its
limits cut (``monotone_core``): O(C (T + S)), no T x S buffer.

Padded keys are selected to 0 (``torch.where``, not a 0/1 multiply) in k, pk and v, so NaN / Inf
there reach nothing and their gradients are exactly 0. ``cu_seqlens`` is checked here too
(its values are not checked under torch.compile): a bad one raises ``ValueError``.
"""
from typing import Optional

import torch

from .._validate import state_dtype
from .features import expand_kv_heads, reweight


def unavailable(device, dtype):
    """The torch backend runs anywhere: None."""
    return None

CHUNK = 64


def _chunk_plan(T: int, block_size: Optional[int]):
    """(chunk length, intra-chunk mask kind) with kind in {"causal", "block", None}.
    Short causal calls (a decode step of a few tokens) use one chunk of their own length."""
    if block_size is None:
        return min(CHUNK, T), "causal"
    if block_size >= T:  # one block: every query sees the whole (T-row) chunk
        return T, None
    if block_size <= CHUNK:
        return block_size * (CHUNK // block_size), "block"
    return block_size, None


def chunked_core(qf, kf, v, S0, z0, causal: bool, block_size: Optional[int]):
    """qf [B, H, T, F], kf [B, H, S, F] (padded keys already zeroed), v [B, H, S, Dv],
    S0 [B, H, F, Dv], z0 [B, H, F] -> num [B, H, T, Dv], den [B, H, T], S [B, H, F, Dv], z [B, H, F]."""
    if not causal:
        S_fin = S0 + kf.transpose(-1, -2) @ v
        z_fin = z0 + kf.sum(-2)
        return qf @ S_fin, (qf * z_fin[:, :, None, :]).sum(-1), S_fin, z_fin
    B, H, T, F = qf.shape
    Dv = v.shape[-1]
    if block_size is not None:
        block_size = min(block_size, T)  # any block_size >= T is one block
    C, kind = _chunk_plan(T, block_size)
    N = (T + C - 1) // C
    pad = N * C - T
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    qc, kc, vc = qf.view(B, H, N, C, F), kf.view(B, H, N, C, F), v.view(B, H, N, C, Dv)
    kv = kc.transpose(-1, -2) @ vc  # [B, H, N, F, Dv]
    zc = kc.sum(-2)  # [B, H, N, F]
    if N == 1:  # one chunk (a decode step): no prefix to take
        incl, zincl = S0[:, :, None] + kv, z0[:, :, None] + zc
    else:
        incl = torch.cumsum(kv, dim=2) + S0[:, :, None]
        zincl = torch.cumsum(zc, dim=2) + z0[:, :, None]
    S_fin, z_fin = incl[:, :, -1], zincl[:, :, -1]
    if kind is None:  # whole-block chunks: every query sees its chunk entirely
        num = qc @ incl
        den = (qc * zincl[:, :, :, None, :]).sum(-1)
    else:
        if N == 1:
            excl, zexcl = S0[:, :, None], z0[:, :, None]
        else:
            excl = torch.cat([S0[:, :, None], incl[:, :, :-1]], dim=2)
            zexcl = torch.cat([z0[:, :, None], zincl[:, :, :-1]], dim=2)
        i = torch.arange(C, device=qf.device)
        if kind == "causal":
            mask = i[None, :] <= i[:, None]
        else:
            mask = (i[None, :] // block_size) <= (i[:, None] // block_size)
        A = (qc @ kc.transpose(-1, -2)) * mask.to(qc.dtype)  # [B, H, N, C, C]
        num = qc @ excl + A @ vc
        den = (qc * zexcl[:, :, :, None, :]).sum(-1) + A.sum(-1)
    num = num.reshape(B, H, N * C, Dv)[:, :, :T]
    den = den.reshape(B, H, N * C)[:, :, :T]
    return num, den, S_fin, z_fin


def monotone_core(qf, kf, v, S0, z0, n):
    """Monotone cross-attention (``num_visible_keys``): query t sees keys ``0 .. n[b, t]-1``.

    qf [B, H, T, F], kf [B, H, S, F] (padded keys zeroed), v [B, H, S, Dv], S0 [B, H, F, Dv],
    z0 [B, H, F], n int64 [B, T] in [0, S], non-decreasing along t
    -> num [B, H, T, Dv], den [B, H, T], S [B, H, F, Dv], z [B, H, F] (the state of all S keys).

    Keys in chunks of C: the exclusive prefix states over key chunks (``S0`` first) give each query
    chunk the state of the whole key chunks below its first limit, ``j0 = n[t0] // C``; the key
    chunks ``j0 .. ceil(n[t_last] / C) - 1`` add masked scores, one (query chunk, key chunk) pair
    each. With n monotone the pairs form a staircase: at most ``ceil(T/C) + ceil(S/C)`` per row, so
    the work is O(C (T + S)) whatever the rate (lower and upper limits are the min and max over the
    chunk, so any n gives the right answer; only the pair count relies on monotonicity).
    """
    B, H, T, F = qf.shape
    S, Dv = kf.shape[2], v.shape[-1]
    C = CHUNK
    NQ, NK = (T + C - 1) // C, (S + C - 1) // C
    pad_t, pad_s = NQ * C - T, NK * C - S
    if pad_t:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad_t))
        n = torch.cat([n, n[:, -1:].expand(B, pad_t)], dim=1)  # padded queries repeat the last limit
    if pad_s:
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad_s))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad_s))
    qc = qf.view(B, H, NQ, C, F).transpose(1, 2)  # [B, NQ, H, C, F]
    kc = kf.view(B, H, NK, C, F).transpose(1, 2)  # [B, NK, H, C, F]
    vc = v.view(B, H, NK, C, Dv).transpose(1, 2)
    kv = kc.transpose(-1, -2) @ vc  # [B, NK, H, F, Dv]
    zk = kc.sum(-2)  # [B, NK, H, F]
    excl = torch.cat([S0[:, None], S0[:, None] + torch.cumsum(kv, dim=1)], dim=1)  # [B, NK + 1, H, F, Dv]
    zexcl = torch.cat([z0[:, None], z0[:, None] + torch.cumsum(zk, dim=1)], dim=1)
    nc = n.view(B, NQ, C)
    lo, hi = nc.amin(-1), nc.amax(-1)  # [B, NQ]
    j0 = lo // C  # whole key chunks below every limit of the query chunk (<= NK)
    count = ((hi + C - 1) // C - j0).clamp_min(0)  # key chunks with masked scores
    rows = torch.arange(B, device=qf.device)[:, None]
    base, zbase = excl[rows, j0], zexcl[rows, j0]  # [B, NQ, H, F, Dv], [B, NQ, H, F]
    num = qc @ base  # [B, NQ, H, C, Dv]
    den = (qc * zbase[:, :, :, None, :]).sum(-1)  # [B, NQ, H, C]
    count = count.flatten()
    pair = torch.repeat_interleave(torch.arange(B * NQ, device=qf.device), count)  # (b, query chunk) per pair
    if pair.numel():
        first = torch.cumsum(count, 0) - count
        kchunk = j0.flatten()[pair] + torch.arange(pair.numel(), device=qf.device) - first[pair]
        kidx = (pair // NQ) * NK + kchunk  # (b, key chunk) per pair
        qp = qc.reshape(B * NQ, H, C, F)[pair]
        kp = kc.reshape(B * NK, H, C, F)[kidx]
        vp = vc.reshape(B * NK, H, C, Dv)[kidx]
        keys = kchunk[:, None] * C + torch.arange(C, device=qf.device)  # [P, C] absolute key index
        seen = keys[:, None, :] < nc.reshape(B * NQ, C)[pair][:, :, None]  # [P, C (query), C (key)]
        # selected, not multiplied: a key a query does not see reaches nothing (NaN included)
        A = torch.where(seen[:, None], qp @ kp.transpose(-1, -2), 0.)  # [P, H, C, C]
        num = num.reshape(B * NQ, H, C, Dv).index_add(0, pair, A @ vp).view(B, NQ, H, C, Dv)
        den = den.reshape(B * NQ, H, C).index_add(0, pair, A.sum(-1)).view(B, NQ, H, C)
    num = num.permute(0, 2, 1, 3, 4).reshape(B, H, NQ * C, Dv)[:, :, :T]
    den = den.permute(0, 2, 1, 3).reshape(B, H, NQ * C)[:, :, :T]
    return num, den, excl[:, -1], zexcl[:, -1]


def _check_cu_seqlens(cu_seqlens, B: int, T: int, S: int):
    """The offsets as a list, after the checks that keep every slice inside the tensors (the
    eager validation is skipped under torch.compile): starts at 0, non-decreasing, ends at T."""
    bounds = cu_seqlens.tolist()
    if B != 1 or S != T:
        raise ValueError(f"cu_seqlens needs packed q, k, v (batch size 1, S == T), got B={B}, T={T}, S={S}")
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}, got {bounds}")
    return bounds


def chunk_leap_attention(q, k, v, pq, pk, *, causal=True, block_size=None, key_padding_mask=None,
                         cu_seqlens=None, initial_state=None, output_final_state=False,
                         eps=1e-6, normalize=True, num_visible_keys=None):
    """The torch backend of ``lk.leap_attention`` (arguments already validated).
    Computes in float32 (float64 for float64 inputs); returns o in q's dtype."""
    acc = state_dtype(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    qf = reweight(q.to(acc), pq.to(acc)).transpose(1, 2)  # [B, H, T, 2Dk]
    if key_padding_mask is not None:
        # selected where loaded, not multiplied: NaN / Inf in a padded key reach nothing (not even
        # the gradients, which a product with NaN features would poison)
        pad = key_padding_mask[:, :, None]
        k = torch.where(pad[..., None], 0., k)
        v = torch.where(pad[..., None], 0., v)
        pk = torch.where(pad, 0., pk)
    kf = reweight(expand_kv_heads(k, H).to(acc), expand_kv_heads(pk, H).to(acc)).transpose(1, 2)
    vh = expand_kv_heads(v, H).to(acc).transpose(1, 2)  # [B, H, S, Dv]
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        S0 = q.new_zeros(n, H, 2 * Dk, Dv, dtype=acc)
        z0 = q.new_zeros(n, H, 2 * Dk, dtype=acc)
    else:
        S0, z0 = initial_state[0].to(acc), initial_state[1].to(acc)
    if num_visible_keys is not None:
        n = num_visible_keys.to(device=q.device, dtype=torch.int64).expand(B, T)
        num, den, S_fin, z_fin = monotone_core(qf, kf, vh, S0, z0, n)
    elif cu_seqlens is None:
        num, den, S_fin, z_fin = chunked_core(qf, kf, vh, S0, z0, causal, block_size)
    else:
        bounds = _check_cu_seqlens(cu_seqlens, B, T, kf.shape[2])
        parts = [chunked_core(qf[:, :, a:b], kf[:, :, a:b], vh[:, :, a:b], S0[i:i + 1], z0[i:i + 1],
                              causal, block_size) if b > a else
                 (qf.new_zeros(1, H, 0, Dv), qf.new_zeros(1, H, 0), S0[i:i + 1], z0[i:i + 1])
                 for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        num = torch.cat([p[0] for p in parts], dim=2)
        den = torch.cat([p[1] for p in parts], dim=2)
        S_fin = torch.cat([p[2] for p in parts], dim=0)
        z_fin = torch.cat([p[3] for p in parts], dim=0)
    o = num / torch.clamp(den, min=eps)[..., None] if normalize else num
    o = o.transpose(1, 2).to(q.dtype)
    if output_final_state:
        return o, (S_fin, z_fin)
    return o


# ---------------------------------------------------------------------------------------------
# The kernel interface (see attention/op.py) for the torch backend: the forward runs the
# chunked form without autograd; the backward recomputes it and differentiates (nothing but
# the inputs is kept between the two).
def _call(q, k, v, pq, pk, S0, z0, kpm, cu_seqlens, nvk, causal, block_size, eps, normalize):
    return chunk_leap_attention(q, k, v, pq, pk, causal=causal, block_size=block_size or None,
                                key_padding_mask=kpm, cu_seqlens=cu_seqlens, num_visible_keys=nvk,
                                initial_state=None if S0 is None else (S0, z0), output_final_state=True,
                                eps=eps, normalize=normalize)


def fwd(q, k, v, pq, pk, S0, z0, kpm, cu_seqlens, nvk, causal, block_size, eps, normalize, output_final_state):
    with torch.no_grad():
        o, (S, z) = _call(q, k, v, pq, pk, S0, z0, kpm, cu_seqlens, nvk, causal, block_size, eps, normalize)
    return (o, S, z) if output_final_state else (o, None, None)


def bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, kpm, cu_seqlens, nvk, causal, block_size, eps, normalize):
    # torch.func.vjp, not torch.autograd: this runs inside a custom op, below the autograd key
    has_state = S0 is not None

    def f(q, k, v, pq, pk, *st):
        S0_, z0_ = st if has_state else (None, None)
        o, (S, z) = _call(q, k, v, pq, pk, S0_, z0_, kpm, cu_seqlens, nvk, causal, block_size, eps, normalize)
        return o, S, z

    primals = (q, k, v, pq, pk) + ((S0, z0) if has_state else ())
    (o, S, z), vjp = torch.func.vjp(f, *primals)
    cot = (do, torch.zeros_like(S) if dS is None else dS, torch.zeros_like(z) if dz is None else dz)
    # an identity VJP returns the cotangent object itself (z = z0 + ... with causal=False and
    # normalize=False gives dz0 = dz): return fresh tensors, never an input
    grads = [g.clone() if any(g is c for c in cot + primals) else g for g in vjp(cot)]
    dS0, dz0 = (grads[5], grads[6]) if has_state else (None, None)
    return (*grads[:5], dS0, dz0)


def step(q, k, v, pq, pk, S0, z0, eps, normalize):
    with torch.no_grad():
        o, (S, z) = _call(q, k, v, pq, pk, S0, z0, None, None, None, True, 0, eps, normalize)
    return o, S, z

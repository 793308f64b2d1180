"""Monotone cross-attention (``num_visible_keys``) on the triton backend: kernels and launchers
(``fwd``, ``bwd``, called by ``triton_chunk.fwd`` / ``bwd``). Query t sees keys ``0 .. n[b, t]-1``
(plus the initial state), n non-decreasing along t, in [0, S].

Keys and queries in chunks of ``BT`` rows. Query chunk c (rows ``t0 .. t_last``) has limits
``lo = n[t0]``, ``hi = n[t_last]`` (n is non-decreasing: the smallest and largest of the chunk);
it reads the state of the whole key chunks below ``j0 = lo // BT`` (``S0`` plus keys
``[0, j0 BT)``) and adds masked scores ``(q~ k~^T) * [s < n[t]]`` over the key tiles
``j0 .. j1 - 1``, ``j1 = ceil(hi / BT)`` (several tiles when the rate is high). ``j0`` and ``j1``
are non-decreasing in c, so the (query chunk, key tile) pairs form a staircase: at most
``ceil(T/BT) + ceil(S/BT)`` of them, and the work is O(BT (T + S)) (no T x S buffer).

- ``leap_fwd_kernel_monotone``: one program per (batch x query head, axis-1 block) sweeps the
  query chunks in order, folding whole key chunks into the fp32 state carried in registers
  (``2 x [BK, BV]`` and ``2 x [BK]``) up to each chunk's ``j0`` (a loop-carried fold position).
  ``STAGE`` 0 (axis 1: value tile): o and ``den`` (and, with ``STORE_STATE``, the final state:
  the remaining keys folded after the last chunk). ``STAGE`` 2 (axis 1: a block of ``BK`` key
  columns, one tile holding every value column, as the sweep's ``SPLIT_K``): complete ``dq`` rows
  for its key columns (``dq~ = g S^T + r z^T + (where(M, g v^T + r, 0)) k~`` over the masked
  tiles), a ``dpq`` partial per key block, and (``STORE_DS0``) its rows of ``dS0`` / ``dz0``:
  every query sees the initial state, so ``dS0 = dS + sum_t q~_t^T g_t``, ``dz0 = dz + sum_t q~_t
  r_t`` over all rows of the head (no scan, no buffer).
- ``leap_bwd_kernel_monotone_dkv``: one program per (batch x key/value head, key block or value
  tile) sweeps the key chunks in reverse, carrying the state gradient summed over the query heads
  of its GQA group, ``dH = sum_h (dS_h + sum q~_{h,c}^T g_{h,c})`` and ``dZ = sum_h (dz_h + sum
  q~_{h,c} r_{h,c})`` over the query chunks whose base state holds the key chunk (``j0(c) > j``: a
  suffix of the query chunks that grows as j falls), plus, per key chunk, the masked-pair terms of
  the query chunks ``j0(c) <= j < j1(c)`` (a contiguous range) of every head of the group. Both
  ranges come from ``leap_bwd_kernel_monotone_tables`` (on the device: no host sync). Blocking as
  ``triton_bwd.leap_bwd_kernel_dkv`` (``triton_chunk._bwd_tiles``): dk and dv in one program
  (Dk, Dv <= 64), else a dk launch over key blocks (every value column: ``v dH^T``, ``g v^T``) and
  a dv launch over value tiles (every key column: ``q~ k~^T``). Each writes complete rows of ``dk``
  / ``dv`` with Hkv heads in the input dtype.

``g = do / max(den, eps)``, ``r = -(do . num) / max(den, eps)^2`` (0 where the clamp is active)
as in ``triton_bwd``, from the forward's ``den`` and ``dden`` (``triton_bwd.leap_bwd_kernel_dden``):
no pass recomputes them. Scratch (``triton_chunk._scratch(monotone=True)``, summed by
``workspace_bytes``): ``dden``, the int32 chunk tables, and at Dk > 64 one fp32 per row and key
block for ``dpq`` / ``dpk`` (summed on the host in a fixed order): no fp32 gradient partials, no
per-query-head buffers. Deterministic, no atomics. Row offsets are int64; padded and out-of-range
keys are not loaded (0), and a padded key's dk, dv, dpk are selected to exactly 0.
"""
import torch
import triton
import triton.language as tl

from .._guard import on_device
from . import triton_chunk as tc
from .triton_bwd import _fold_query_grads, _key_program
from .triton_fwd import (HALF_PI, _cvt, _dot, _dq_from_state, _dq_tile, _fold_keys, _grad_rows, _grad_rows_of,
                         _key_rows, _key_valid, _load_feat, _load_state, _query_rows_of, _store_o, _store_state)


@triton.jit(do_not_specialize=['T', 'NQ', 'NK'])
def leap_bwd_kernel_monotone_tables(nvk, tab, T, NQ, NK, BT: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr):
    """int32 ``tab [B, 2, NK + 1]`` (NK = ceil(S / BT), NQ = ceil(T / BT)) for the reverse sweep: row
    0 = ``cB[j]``, the number of query chunks with ``j0 <= j`` (the chunks from ``cB[j]`` on have key
    chunk j in their base state; ``cB[NK] = NQ``); row 1 = ``cA[j]``, the number with ``j1 <= j``
    (chunks ``cA[j] .. cB[j] - 1`` take masked scores against key chunk j). ``j0 = n[c BT] // BT``,
    ``j1 = ceil(n[min(c BT + BT, T) - 1] / BT)``, as the sweeps compute them. One program per
    (batch row, ``BJ`` entries), counting over the query chunks ``BC`` at a time (integer sums)."""
    i_n, i_j = tl.program_id(0), tl.program_id(1)
    nvk += i_n.to(tl.int64) * T
    tab += i_n.to(tl.int64) * (2 * (NK + 1))
    o_j = i_j * BJ + tl.arange(0, BJ)
    m_j = o_j <= NK
    b_cb = tl.zeros([BJ], dtype=tl.int32)
    b_ca = tl.zeros([BJ], dtype=tl.int32)
    for c0 in range(0, NQ, BC):
        o_c = c0 + tl.arange(0, BC)
        m_c = o_c < NQ
        o_first = o_c.to(tl.int64) * BT
        o_last = tl.minimum(o_first + BT, T) - 1
        b_j0 = (tl.load(nvk + o_first, mask=m_c, other=0) // BT).to(tl.int32)
        b_j1 = ((tl.load(nvk + o_last, mask=m_c, other=0) + BT - 1) // BT).to(tl.int32)
        b_cb += tl.sum(tl.where(m_c[:, None] & (b_j0[:, None] <= o_j[None, :]), 1, 0), 0)
        b_ca += tl.sum(tl.where(m_c[:, None] & (b_j1[:, None] <= o_j[None, :]), 1, 0), 0)
    tl.store(tab + o_j, b_cb, mask=m_j)
    tl.store(tab + (NK + 1) + o_j, b_ca, mask=m_j)


@triton.jit
def _q_feats(q, pq, o_t, m_t, o_k, m_k, H: tl.constexpr, K: tl.constexpr, DOT_MODE: tl.constexpr,
             DT: tl.constexpr):
    b_a, b_sin, b_cos = _load_feat(q, pq, o_t, m_t, H * K, H, o_k, m_k)
    return b_a, b_sin, b_cos, _cvt(b_a * b_sin[:, None], DOT_MODE, DT), _cvt(b_a * b_cos[:, None], DOT_MODE, DT)


@triton.jit
def _k_tile(k, pk, v, kpm, o_s, Lk, o_k, m_k, o_v, m_v, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            HAS_KPM: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Key rows o_s: validity (in range, not padded), relu(k), sin, cos, k~ halves, v (invalid: 0)."""
    b_kv = _key_valid(kpm, o_s, o_s < Lk, HAS_KPM)
    b_ak, b_sk, b_ck = _load_feat(k, pk, o_s, b_kv, HKV * K, HKV, o_k, m_k)
    b_ks = _cvt(b_ak * b_sk[:, None], DOT_MODE, DT)
    b_kc = _cvt(b_ak * b_ck[:, None], DOT_MODE, DT)
    b_v = tl.load(v + o_s.to(tl.int64)[:, None] * (HKV * V) + o_v[None, :], mask=b_kv[:, None] & m_v[None, :],
                  other=0.)
    return b_kv, b_ak, b_sk, b_ck, b_ks, b_kc, b_v


@triton.jit
def _mono_query_chunk(q, pq, k, pk, v, kpm, nvk, o, do, den, dden, dq, dpq, t0, Lq, Lk, s_lo, s_hi,
                      o_i, o_k, m_k, o_v, m_v, b_hs, b_hc, b_zs, b_zc, b_d0s, b_d0c, b_d0zs, b_d0zc, i_v, eps,
                      H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      STAGE: tl.constexpr, HAS_KPM: tl.constexpr, NORMALIZE: tl.constexpr, STORE_DS0: tl.constexpr,
                      DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Query rows [t0, t0 + BT) against the base state (b_hs, b_hc, b_zs, b_zc) plus the masked
    key tiles [s_lo, s_hi) (query t sees key s where s < n[t]). STAGE 2 with ``STORE_DS0`` adds
    ``q~^T g`` and ``q~^T r`` to the initial state's gradient (b_d0*), which it returns."""
    o_t = t0 + o_i
    m_t = o_t < Lq
    o_t64 = o_t.to(tl.int64)
    b_n = tl.load(nvk + o_t64, mask=m_t, other=0).to(tl.int32)  # masked rows see no key
    b_a, b_sin, b_cos, b_qs, b_qc = _q_feats(q, pq, o_t, m_t, o_k, m_k, H, K, DOT_MODE, DT)
    if STAGE == 0:
        b_num = _dot(b_qs, b_hs, DOT_MODE, DT) + _dot(b_qc, b_hc, DOT_MODE, DT)
        b_den = tl.sum(b_qs * b_zs[None, :], 1) + tl.sum(b_qc * b_zc[None, :], 1)
        for s0 in range(s_lo, s_hi, BT):
            o_s = s0 + o_i
            b_kv, b_ak, b_sk, b_ck, b_ks, b_kc, b_v = _k_tile(k, pk, v, kpm, o_s, Lk, o_k, m_k, o_v, m_v,
                                                              HKV, K, V, HAS_KPM, DOT_MODE, DT)
            if DOT_MODE == 1:
                b_lqs, b_lqc = b_qs, b_qc
            else:  # fp32 operands: reload q per tile, not hoisted (see leap_bwd_kernel_monotone_dkv)
                _x0, _x1, _x2, b_lqs, b_lqc = _q_feats(q, pq, o_t, m_t & (s0 >= 0), o_k, m_k, H, K, DOT_MODE, DT)
            b_A = _dot(b_lqs, tl.trans(b_ks), DOT_MODE, DT) + _dot(b_lqc, tl.trans(b_kc), DOT_MODE, DT)
            # selected, not multiplied: a key a query does not see reaches nothing
            b_A = tl.where(o_s[None, :] < b_n[:, None], b_A, 0.)
            b_num += _dot(b_A, b_v, DOT_MODE, DT)
            b_den += tl.sum(b_A, 1)
        _store_o(o, den, b_num, b_den, o_t64, m_t, o_v, m_v, i_v, eps, H, V, NORMALIZE)
    else:
        # dq~ = g S^T + r z^T + where(M, g v^T + r, 0) k~ over the masked tiles (every value column
        # is here: g v^T is whole; k~, S, z only for this program's key columns)
        b_g, b_r, b_dqs, b_dqc = _dq_from_state(do, den, dden, o_t, m_t, o_v, m_v, b_hs, b_hc, b_zs, b_zc, i_v, eps,
                                                H, V, NORMALIZE, DOT_MODE, DT)
        for s0 in range(s_lo, s_hi, BT):
            o_s = s0 + o_i
            b_kv, b_ak, b_sk, b_ck, b_ks, b_kc, b_v = _k_tile(k, pk, v, kpm, o_s, Lk, o_k, m_k, o_v, m_v,
                                                              HKV, K, V, HAS_KPM, DOT_MODE, DT)
            b_dA = tl.where(o_s[None, :] < b_n[:, None], _dot(b_g, tl.trans(b_v), DOT_MODE, DT) + b_r[:, None], 0.)
            b_dqs += _dot(b_dA, b_ks, DOT_MODE, DT)
            b_dqc += _dot(b_dA, b_kc, DOT_MODE, DT)
        # complete dq rows for the key columns o_k; dpq: this key block's partial (dpq points at it)
        _dq_tile(dq, dpq, b_a, b_sin, b_cos, b_dqs, b_dqc, o_t64, m_t, o_k, m_k, H, K)
        if STORE_DS0:
            b_d0s += _dot(tl.trans(b_qs), b_g, DOT_MODE, DT)
            b_d0c += _dot(tl.trans(b_qc), b_g, DOT_MODE, DT)
            b_d0zs += tl.sum(b_qs.to(tl.float32) * b_r[:, None], 0)
            b_d0zc += tl.sum(b_qc.to(tl.float32) * b_r[:, None], 0)
    return b_d0s, b_d0c, b_d0zs, b_d0zc


@triton.jit(do_not_specialize=['T', 'S', 'NTH', 'eps'])
def leap_fwd_kernel_monotone(
    q, k, v, pq, pk, kpm, nvk, S0, z0,
    o, Sf, zf,
    do, den, dden, dq, dpq, dS, dz, dS0, dz0,
    T, S, NTH, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STAGE: tl.constexpr, HAS_KPM: tl.constexpr, USE_S0: tl.constexpr, STORE_STATE: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
    USE_DS: tl.constexpr = False, STORE_DS0: tl.constexpr = False,
):
    """``USE_DS`` (STAGE 2 with ``STORE_DS0`` only): dS, dz given, added to dS0, dz0."""
    # B*H on axis 0 (CUDA: axes 1, 2 <= 65535); axis 1: value tile (STAGE 0) or key block (STAGE 2)
    i_nh, i_b = tl.program_id(0), tl.program_id(1)
    if STAGE == 2:
        i_k = i_b
        i_v = i_b * 0
    else:
        i_k = i_b * 0
        i_v = i_b
    i_n, i_h = i_nh // H, i_nh % H
    HKV: tl.constexpr = H // G
    bos, kbos = i_n.to(tl.int64) * T, i_n.to(tl.int64) * S
    q, pq = _query_rows_of(q, pq, bos, i_h, H, K)
    nvk += bos
    k, pk, v, kpm = _key_rows(k, pk, v, kpm, kbos, i_h // G, HKV, K, V)
    o += (bos * H + i_h) * V
    do, den, dden = _grad_rows_of(do, den, dden, bos, i_h, H, V)
    dq += (bos * H + i_h) * K
    dpq += i_k.to(tl.int64) * NTH + bos * H + i_h

    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    b_hs, b_hc, b_zs, b_zc = _load_state(S0, z0, i_nh.to(tl.int64), o_k, m_k, o_v, m_v, BK, BV, K, V, USE_S0, True)
    # the initial state's gradient (STORE_DS0): dS, dz of this head, then every query's q~^T g, q~^T r
    b_d0s, b_d0c, b_d0zs, b_d0zc = _load_state(dS, dz, i_nh.to(tl.int64), o_k, m_k, o_v, m_v, BK, BV, K, V,
                                               USE_DS, True)

    f0 = i_nh * 0  # keys [0, f0) are in the state (a whole number of key chunks)
    for t0 in range(0, T, BT):
        lo = tl.load(nvk + t0).to(tl.int32)
        hi = tl.load(nvk + tl.minimum(t0 + BT, T) - 1).to(tl.int32)
        f1 = tl.maximum((lo // BT) * BT, f0)
        b_hs, b_hc, b_zs, b_zc = _fold_keys(k, pk, v, kpm, f0, f1, o_i, o_k, m_k, o_v, m_v,
                                            b_hs, b_hc, b_zs, b_zc, HKV, K, V, BT, HAS_KPM, DOT_MODE, DT)
        f0 = f1
        b_d0s, b_d0c, b_d0zs, b_d0zc = _mono_query_chunk(
            q, pq, k, pk, v, kpm, nvk, o, do, den, dden, dq, dpq, t0, T, S, f1, hi,
            o_i, o_k, m_k, o_v, m_v, b_hs, b_hc, b_zs, b_zc, b_d0s, b_d0c, b_d0zs, b_d0zc, i_v, eps,
            H, HKV, K, V, BT, STAGE, HAS_KPM, NORMALIZE, STORE_DS0, DOT_MODE, DT)
    if STORE_STATE:  # the final state holds every key
        b_hs, b_hc, b_zs, b_zc = _fold_keys(k, pk, v, kpm, f0, S, o_i, o_k, m_k, o_v, m_v,
                                            b_hs, b_hc, b_zs, b_zc, HKV, K, V, BT, HAS_KPM, DOT_MODE, DT)
        _store_state(Sf, zf, i_nh.to(tl.int64), b_hs, b_hc, b_zs, b_zc, o_k, m_k, o_v, m_v, i_v, K, V)
    if STORE_DS0:  # this key block's rows of dS0 [B, H, 2K, V] (every value column) and dz0
        _store_state(dS0, dz0, i_nh.to(tl.int64), b_d0s, b_d0c, b_d0zs, b_d0zc, o_k, m_k, o_v, m_v, i_v, K, V)


@triton.jit(do_not_specialize=['T', 'S', 'NSK', 'eps'])
def leap_bwd_kernel_monotone_dkv(
    q, k, v, pq, pk, kpm, nvk, tab, dS, dz,
    do, den, dden,
    dk, dv, dpk,
    T, S, NSK, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_KPM: tl.constexpr, USE_DS: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    # B*Hkv on axis 0; axis 1: key block (DO_DK only), value tile (DO_DV only) or 0 (both)
    HKV: tl.constexpr = H // G
    i_n, i_hk, i_k, i_v = _key_program(tl.program_id(0), tl.program_id(1), HKV, DO_DV)
    NK = tl.cdiv(S, BT)
    bos, kbos = i_n.to(tl.int64) * T, i_n.to(tl.int64) * S
    h0 = i_hk * G  # the group's first query head
    q, pq = _query_rows_of(q, pq, bos, h0, H, K)
    nvk += bos
    do, den, dden = _grad_rows_of(do, den, dden, bos, h0, H, V)
    k, pk, v, kpm = _key_rows(k, pk, v, kpm, kbos, i_hk, HKV, K, V)
    dk += (kbos * HKV + i_hk) * K
    dpk += i_k.to(tl.int64) * NSK + kbos * HKV + i_hk
    dv += (kbos * HKV + i_hk) * V
    tab_b = tab + i_n.to(tl.int64) * (2 * (NK + 1))  # cB[j]
    tab_a = tab_b + (NK + 1)  # cA[j]

    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    # the final state's gradient summed over the group's query heads, in order (dz: dk only)
    b_dhs, b_dhc, b_dzs, b_dzc = _load_state(dS, dz, 0, o_k, m_k, o_v, m_v, BK, BV, K, V, False, False)
    if USE_DS:
        for jh in range(0, G):
            a_s, a_c, a_zs, a_zc = _load_state(dS, dz, (i_n * H + h0 + jh).to(tl.int64), o_k, m_k, o_v, m_v,
                                               BK, BV, K, V, True, DO_DK)
            b_dhs += a_s
            b_dhc += a_c
            b_dzs += a_zs
            b_dzc += a_zc

    for jr in range(0, NK):
        j = NK - 1 - jr
        c_b = tl.load(tab_b + j)
        c_b1 = tl.load(tab_b + j + 1)
        # the query chunks whose base state first holds key chunk j, of every head of the group
        for jh in range(0, G):
            for c in range(c_b, c_b1):
                o_t = c * BT + o_i
                b_dhs, b_dhc, b_dzs, b_dzc = _fold_query_grads(
                    q + jh * K, pq + jh, do + jh * V, den + jh, dden + jh, o_t, o_t < T, o_k, m_k, o_v, m_v,
                    b_dhs, b_dhc, b_dzs, b_dzc, eps, H, K, V, DO_DK, NORMALIZE, DOT_MODE, DT)
        o_s = j * BT + o_i
        m_s = o_s < S
        b_kv, b_ak, b_sk, b_ck, b_ks, b_kc, b_v = _k_tile(k, pk, v, kpm, o_s, S, o_k, m_k, o_v, m_v,
                                                          HKV, K, V, HAS_KPM, DOT_MODE, DT)
        # dv = k~ dH ; dk~ = v dH^T + dZ
        if DO_DV:
            b_dv = _dot(b_ks, b_dhs, DOT_MODE, DT) + _dot(b_kc, b_dhc, DOT_MODE, DT)
        if DO_DK:
            b_dks = _dot(b_v, tl.trans(b_dhs), DOT_MODE, DT) + b_dzs[None, :]
            b_dkc = _dot(b_v, tl.trans(b_dhc), DOT_MODE, DT) + b_dzc[None, :]
        # masked pairs: query chunks [cA[j], cB[j]) see part of key chunk j
        for c in range(tl.load(tab_a + j), c_b):
            o_t = c * BT + o_i
            m_t = o_t < T
            b_n = tl.load(nvk + o_t.to(tl.int64), mask=m_t, other=0).to(tl.int32)
            b_M = o_s[None, :] < b_n[:, None]  # rows t (queries), columns s (keys)
            if DOT_MODE == 1:
                b_pks, b_pkc, b_pv = b_ks, b_kc, b_v
            else:
                # fp32 operands (tf32x3 splits each into two shared-memory buffers): the loop-invariant
                # key tile's staged operands were hoisted out of the loop and stayed allocated through
                # it (240 KB of shared memory at Dk = 128, fp16, past the 227 KB of sm_90). Reload the
                # tile per pair under a bound that reads c (always S: c >= 0), so the compiler neither
                # merges it with the tile above nor hoists it
                _x0, _x1, _x2, _x3, b_pks, b_pkc, b_pv = _k_tile(k, pk, v, kpm, o_s, tl.where(c >= 0, S, 0), o_k, m_k,
                                                                 o_v, m_v, HKV, K, V, HAS_KPM, DOT_MODE, DT)
            for jh in range(0, G):  # the group's query heads, in order
                b_aq, b_sq, b_cq, b_qs, b_qc = _q_feats(q + jh * K, pq + jh, o_t, m_t, o_k, m_k, H, K, DOT_MODE, DT)
                b_g, b_r = _grad_rows(do + jh * V, den + jh, dden + jh, o_t, m_t, o_v, m_v, H * V, H, 0, eps,
                                      NORMALIZE)
                if DO_DV:  # A = q~ k~^T needs every key column (BK >= K here)
                    b_A = tl.where(b_M, _dot(b_qs, tl.trans(b_pks), DOT_MODE, DT)
                                   + _dot(b_qc, tl.trans(b_pkc), DOT_MODE, DT), 0.)
                    b_dv += _dot(tl.trans(b_A), b_g, DOT_MODE, DT)
                if DO_DK:  # g v^T needs every value column (BV >= V here)
                    b_dA = tl.where(b_M, _dot(b_g, tl.trans(b_pv), DOT_MODE, DT) + b_r[:, None], 0.)
                    b_dks += _dot(tl.trans(b_dA), b_qs, DOT_MODE, DT)
                    b_dkc += _dot(tl.trans(b_dA), b_qc, DOT_MODE, DT)
        # selected, not multiplied: a padded key's gradients are exactly 0 even if dH holds NaN
        o_s64 = o_s.to(tl.int64)
        if DO_DK:
            b_dk = tl.where(b_kv[:, None] & (b_ak > 0), b_dks * b_sk[:, None] + b_dkc * b_ck[:, None], 0.)
            b_dp = tl.where(b_kv, HALF_PI * tl.sum(b_ak * (b_dks * b_ck[:, None] - b_dkc * b_sk[:, None]), 1), 0.)
            tl.store(dk + o_s64[:, None] * (HKV * K) + o_k[None, :], b_dk.to(dk.dtype.element_ty),
                     mask=m_s[:, None] & m_k[None, :])
            tl.store(dpk + o_s64 * HKV, b_dp, mask=m_s)
        if DO_DV:
            b_dv = tl.where(b_kv[:, None], b_dv, 0.)
            tl.store(dv + o_s64[:, None] * (HKV * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                     mask=m_s[:, None] & m_v[None, :])


def _launch(BK: int, BV: int):
    """Launch options of the monotone kernels (no autotuning): 8 warps once the two fp32 states
    are [128, 32] or larger."""
    return dict(num_warps=8 if BK * BV > 64 * 64 // 2 else 4, num_stages=1, **tc.LAUNCH)


def _tables(nvk, tab, T, S, BT):
    """``leap_bwd_kernel_monotone_tables`` into ``tab [B, 2, ceil(S / BT) + 1]`` int32."""
    NK = triton.cdiv(S, BT)
    BJ = min(64, triton.next_power_of_2(NK + 1))
    leap_bwd_kernel_monotone_tables[(nvk.shape[0], triton.cdiv(NK + 1, BJ))](
        nvk, tab, T, triton.cdiv(T, BT), NK, BT=BT, BJ=BJ, BC=64, num_warps=4, **tc.LAUNCH)


def fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, nvk, eps, normalize, output_final_state):
    """Monotone cross-attention (``num_visible_keys``): one program per (batch x query head, value
    tile) sweeps the query chunks, carrying the key state. Returns (o, S, z, den) as
    ``triton_chunk.fwd``; allocates nothing besides them."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    c = tc._c
    pq, pk, S0, z0 = c(pq, torch.float32), c(pk, torch.float32), c(S0, torch.float32), c(z0, torch.float32)
    key_padding_mask, nvk = c(key_padding_mask), nvk.to(torch.int64).contiguous()
    B, T, H, K = q.shape
    S, Hkv, V = k.shape[1], k.shape[2], v.shape[3]
    BT, BK, BV, NV = tc._tiles(K, V)
    f32 = dict(dtype=torch.float32, device=q.device)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    den = None
    if normalize:  # [2, B, T, H] as triton_chunk.fwd's; its den[1] (d den / d(pi/2 pq)) is not formed here: zeros
        den = torch.empty(2, B, T, H, **f32)
        den[1].zero_()
    Sf = torch.empty(B, H, 2 * K, V, **f32) if output_final_state else None
    zf = torch.empty(B, H, 2 * K, **f32) if output_final_state else None
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    dummy = pq
    with on_device(q):
        leap_fwd_kernel_monotone[tc.sweep_grid(B, H, NV)](
            q, k, v, pq, pk, kpm if kpm is not None else dummy, nvk,
            S0 if S0 is not None else dummy, z0 if z0 is not None else dummy,
            o, Sf if Sf is not None else dummy, zf if zf is not None else dummy,
            dummy, den if den is not None else dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy,
            T, S, B * T * H, eps,
            H=H, G=H // Hkv, K=K, V=V, BT=BT, BK=BK, BV=BV, STAGE=0, HAS_KPM=kpm is not None,
            USE_S0=S0 is not None, STORE_STATE=output_final_state, NORMALIZE=normalize,
            DOT_MODE=tc._dot_mode(q.dtype), DT=tc._DT[q.dtype], **_launch(BK, BV))
    return o, Sf, zf, den


def bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, nvk, eps, normalize, o, den):
    """Backward of ``fwd`` (``o``, ``den``: its results): ``dden`` (normalised) and the chunk tables,
    then ``dq`` / ``dpq`` (and ``dS0`` / ``dz0``) by the forward sweep over key blocks, then ``dk`` /
    ``dv`` / ``dpk`` by the reverse key sweep per key/value head. Allocates exactly
    ``triton_chunk._scratch(True, ..., monotone=True)`` besides its results."""
    pq_dtype, pk_dtype = pq.dtype, pk.dtype
    c = tc._c
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    pq, pk, S0, z0 = c(pq, torch.float32), c(pk, torch.float32), c(S0, torch.float32), c(z0, torch.float32)
    dS, dz = c(dS, torch.float32), c(dz, torch.float32)
    key_padding_mask, nvk = c(key_padding_mask), nvk.to(torch.int64).contiguous()
    B, T, H, K = q.shape
    S, Hkv, V = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    BT, BK, BV, NV = tc._tiles(K, V)
    BKq, NKB, BVf, merged = tc._bwd_tiles(K, V)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    NTH, NSK = B * T * H, B * S * Hkv
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    dummy = pq
    sc = tc._scratch(True, B, T, S, H, Hkv, K, V, B, None, normalize=normalize, dS_given=dS is not None,
                     dz_given=dz is not None, monotone=True)
    ws = tc._alloc({n: s for n, s in sc.items() if n not in ("dS_zero", "dz_zero")}, dev)
    if dS is None and dz is not None:
        dS = torch.zeros(sc["dS_zero"][0], **f32)
    if dz is None and dS is not None:
        dz = torch.zeros(sc["dz_zero"][0], **f32)
    common = dict(H=H, G=G, K=K, V=V, BT=BT, HAS_KPM=kpm is not None, NORMALIZE=normalize,
                  DOT_MODE=tc._dot_mode(q.dtype), DT=tc._DT[q.dtype])
    kp = kpm if kpm is not None else dummy
    o, den, dden, dq, dpq, dk, dv, dpk, dS0, dz0 = tc.grad_buffers(q, k, v, S0 is not None, B, NKB, ws, normalize,
                                                                   o, den, dummy)
    ds_ = (dS, dz) if dS is not None else (dummy, dummy)
    with on_device(q):
        tab = ws["tab"]
        _tables(nvk, tab, T, S, BT)
        if normalize:
            tc._dden(o, do, den, dden, eps)
        # dq, dpq (and dS0, dz0): key blocks of BKq columns, every value column in one tile
        leap_fwd_kernel_monotone[(B * H, NKB)](
            q, k, v, pq, pk, kp, nvk, S0 if S0 is not None else dummy, z0 if z0 is not None else dummy,
            dummy, dummy, dummy, do, den, dden, dq, dpq, *ds_,
            dS0 if dS0 is not None else dummy, dz0 if dz0 is not None else dummy,
            T, S, NTH, eps, BK=BKq, BV=BVf, STAGE=2, USE_S0=S0 is not None, STORE_STATE=False,
            USE_DS=S0 is not None and dS is not None, STORE_DS0=S0 is not None, **common, **_launch(BKq, BVf))
        kargs = (q, k, v, pq, pk, kp, nvk, tab, *ds_, do, den, dden, dk, dv, dpk, T, S, NSK, eps)
        kflags = dict(USE_DS=dS is not None, **common)
        if merged:  # one program holds every key and value column: dk and dv together
            leap_bwd_kernel_monotone_dkv[(B * Hkv, 1)](*kargs, BK=BK, BV=BVf, DO_DK=True, DO_DV=True, **kflags,
                                                       **_launch(BK, BVf))
        else:  # dk over key blocks (all value columns), dv over value tiles (all key columns)
            leap_bwd_kernel_monotone_dkv[(B * Hkv, NKB)](*kargs, BK=BKq, BV=BVf, DO_DK=True, DO_DV=False,
                                                         **kflags, **_launch(BKq, BVf))
            leap_bwd_kernel_monotone_dkv[(B * Hkv, NV)](*kargs, BK=BK, BV=BV, DO_DK=False, DO_DV=True, **kflags,
                                                        **_launch(BK, BV))
    if NKB > 1:
        dpq, dpk = dpq.sum(0), dpk.sum(0)
    return dq, dk, dv, dpq.to(pq_dtype), dpk.to(pk_dtype), dS0, dz0

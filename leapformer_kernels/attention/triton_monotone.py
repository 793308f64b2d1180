"""Triton kernels of monotone cross-attention (``num_visible_keys``): query t sees keys
``0 .. n[b, t]-1`` (plus the initial state), n non-decreasing along t, in [0, S].

Keys and queries in chunks of ``BT`` rows. Query chunk c (rows ``t0 .. t_last``) has limits
``lo = n[t0]``, ``hi = n[t_last]`` (n is non-decreasing: the smallest and largest of the chunk);
it reads the state of the whole key chunks below ``j0 = lo // BT`` (``S0`` plus keys
``[0, j0 BT)``) and adds masked scores ``(q~ k~^T) * [s < n[t]]`` over the key tiles
``j0 .. j1 - 1``, ``j1 = ceil(hi / BT)`` (several tiles when the rate is high). ``j0`` and ``j1``
are non-decreasing in c, so the (query chunk, key tile) pairs form a staircase: at most
``ceil(T/BT) + ceil(S/BT)`` of them, and the work is O(BT (T + S)) (no T x S buffer).

- ``leap_fwd_kernel_monotone``: one program per (batch x query head, value tile) sweeps the query
  chunks in order, folding whole key chunks into the fp32 state carried in registers
  (``2 x [BK, BV]`` and ``2 x [BK]``) up to each chunk's ``j0`` (a loop-carried fold position).
  ``STAGE`` 0: o and ``den`` (and, with ``STORE_STATE``, the final state: the remaining keys
  folded after the last chunk); 2: ``dq``, ``dpq`` (``dq~ = g S^T + r z^T + (where(M, g v^T + r,
  0)) k~`` over the masked tiles).
- ``leap_bwd_kernel_monotone_dkv``: one program per (batch x query head, value tile) sweeps the key
  chunks in reverse, carrying ``dH = dS + sum q~_c^T g_c`` and ``dZ = dz + sum q~_c r_c`` over
  the query chunks whose base state holds the key chunk (``j0(c) > j``: a suffix of the query
  chunks that grows as j falls), plus, per key chunk, the masked-pair terms of the query chunks
  ``j0(c) <= j < j1(c)`` (a contiguous range). Both ranges come from ``monotone_tables``
  (``torch.searchsorted`` on the chunk limits, on the device: no host sync). After key chunk 0
  the remaining query chunks (all see the initial state) complete ``dS0`` / ``dz0``.

``g = do / max(den, eps)``, ``r = -(do . num) / max(den, eps)^2`` (0 where the clamp is active;
counted on value tile 0 only) as in ``triton_bwd``, from the forward's ``den`` and ``dden``
(``triton_bwd.leap_bwd_kernel_dden``): no pass recomputes them. Grid: ``(B*H, NV)`` for both kernels
(``triton_chunk.sweep_grid``). dq / dk / dpk partials over value tiles and per-query-head dk, dv,
dpk (GQA) go to fp32 buffers the host sums in a fixed order: deterministic, no atomics. Row
offsets are int64; padded and out-of-range keys are not loaded (0), and a padded key's dk, dv,
dpk are selected to exactly 0.
"""
import torch
import triton
import triton.language as tl

from .triton_fwd import (HALF_PI, _cvt, _dot, _dq_from_state, _dq_tile, _fold_keys, _grad_rows, _grad_rows_of, _key_rows, _key_valid,
                         _load_feat, _load_state, _query_rows_of, _store_o, _store_state)


def monotone_tables(n: torch.Tensor, T: int, S: int, BT: int) -> torch.Tensor:
    """int32 ``[B, 2, NK + 1]`` (NK = ceil(S / BT)) for the reverse sweep: row 0 = ``cB[j]``, the
    number of query chunks with ``j0 <= j`` (the chunks from ``cB[j]`` on have key chunk j in their
    base state; ``cB[NK] = NQ``); row 1 = ``cA[j]``, the number with ``j1 <= j`` (chunks
    ``cA[j] .. cB[j] - 1`` take masked scores against key chunk j). ``j0 = n[c BT] // BT``,
    ``j1 = ceil(n[min(c BT + BT, T) - 1] / BT)``, as the kernels compute them."""
    B = n.shape[0]
    NQ, NK = triton.cdiv(T, BT), triton.cdiv(S, BT)
    dev = n.device
    first = torch.arange(NQ, device=dev) * BT
    last = torch.clamp(first + BT - 1, max=max(T - 1, 0))
    j0 = (n[:, first] // BT).contiguous()
    j1 = ((n[:, last] + BT - 1) // BT).contiguous()
    jj = torch.arange(NK + 1, device=dev, dtype=n.dtype).expand(B, NK + 1).contiguous()
    cB = torch.searchsorted(j0, jj, right=True)
    cA = torch.searchsorted(j1, jj, right=True)
    return torch.stack([cB, cA], 1).to(torch.int32).contiguous()


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
def _mono_program(T, S, H: tl.constexpr, G: tl.constexpr):
    """This program's (batch x query head, value tile, batch row, query head, key/value head,
    first query row, first key row) (rows int64)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    return i_nh, i_v, i_n, i_h, i_h // G, i_n.to(tl.int64) * T, i_n.to(tl.int64) * S


@triton.jit
def _mono_query_chunk(q, pq, k, pk, v, kpm, nvk, o, do, den, dden, dq, dpq, t0, Lq, Lk, s_lo, s_hi,
                      o_i, o_k, m_k, o_v, m_v, b_hs, b_hc, b_zs, b_zc, i_v, eps, NTH,
                      H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      STAGE: tl.constexpr, HAS_KPM: tl.constexpr, NORMALIZE: tl.constexpr,
                      DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Query rows [t0, t0 + BT) against the base state (b_hs, b_hc, b_zs, b_zc) plus the masked
    key tiles [s_lo, s_hi) (query t sees key s where s < n[t])."""
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
        # dq~ = g S^T + r z^T + where(M, g v^T + r, 0) k~ over the masked tiles
        b_g, b_r, b_dqs, b_dqc = _dq_from_state(do, den, dden, o_t, m_t, o_v, m_v, b_hs, b_hc, b_zs, b_zc, i_v, eps,
                                                H, V, NORMALIZE, DOT_MODE, DT)
        for s0 in range(s_lo, s_hi, BT):
            o_s = s0 + o_i
            b_kv, b_ak, b_sk, b_ck, b_ks, b_kc, b_v = _k_tile(k, pk, v, kpm, o_s, Lk, o_k, m_k, o_v, m_v,
                                                              HKV, K, V, HAS_KPM, DOT_MODE, DT)
            b_dA = tl.where(o_s[None, :] < b_n[:, None], _dot(b_g, tl.trans(b_v), DOT_MODE, DT) + b_r[:, None], 0.)
            b_dqs += _dot(b_dA, b_ks, DOT_MODE, DT)
            b_dqc += _dot(b_dA, b_kc, DOT_MODE, DT)
        # per value tile i_v: fp32 partials, summed on the host
        _dq_tile(dq + i_v.to(tl.int64) * NTH * K, dpq + i_v.to(tl.int64) * NTH, b_a, b_sin, b_cos, b_dqs, b_dqc,
                 o_t64, m_t, o_k, m_k, H, K)


@triton.jit(do_not_specialize=['T', 'S', 'NTH', 'eps'])
def leap_fwd_kernel_monotone(
    q, k, v, pq, pk, kpm, nvk, S0, z0,
    o, Sf, zf,
    do, den, dden, dq, dpq,
    T, S, NTH, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STAGE: tl.constexpr, HAS_KPM: tl.constexpr, USE_S0: tl.constexpr, STORE_STATE: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    i_nh, i_v, i_n, i_h, i_hk, bos, kbos = _mono_program(T, S, H, G)
    HKV: tl.constexpr = H // G
    q, pq = _query_rows_of(q, pq, bos, i_h, H, K)
    nvk += bos
    k, pk, v, kpm = _key_rows(k, pk, v, kpm, kbos, i_hk, HKV, K, V)
    o += (bos * H + i_h) * V
    do, den, dden = _grad_rows_of(do, den, dden, bos, i_h, H, V)
    dq += (bos * H + i_h) * K
    dpq += bos * H + i_h

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    b_hs, b_hc, b_zs, b_zc = _load_state(S0, z0, i_nh.to(tl.int64), o_k, m_k, o_v, m_v, BK, BV, K, V, USE_S0, True)

    f0 = i_nh * 0  # keys [0, f0) are in the state (a whole number of key chunks)
    for t0 in range(0, T, BT):
        lo = tl.load(nvk + t0).to(tl.int32)
        hi = tl.load(nvk + tl.minimum(t0 + BT, T) - 1).to(tl.int32)
        f1 = tl.maximum((lo // BT) * BT, f0)
        b_hs, b_hc, b_zs, b_zc = _fold_keys(k, pk, v, kpm, f0, f1, o_i, o_k, m_k, o_v, m_v,
                                            b_hs, b_hc, b_zs, b_zc, HKV, K, V, BT, HAS_KPM, DOT_MODE, DT)
        f0 = f1
        _mono_query_chunk(q, pq, k, pk, v, kpm, nvk, o, do, den, dden, dq, dpq, t0, T, S, f1, hi,
                          o_i, o_k, m_k, o_v, m_v, b_hs, b_hc, b_zs, b_zc, i_v, eps, NTH,
                          H, HKV, K, V, BT, STAGE, HAS_KPM, NORMALIZE, DOT_MODE, DT)
    if STORE_STATE:  # the final state holds every key
        b_hs, b_hc, b_zs, b_zc = _fold_keys(k, pk, v, kpm, f0, S, o_i, o_k, m_k, o_v, m_v,
                                            b_hs, b_hc, b_zs, b_zc, HKV, K, V, BT, HAS_KPM, DOT_MODE, DT)
        _store_state(Sf, zf, i_nh.to(tl.int64), b_hs, b_hc, b_zs, b_zc, o_k, m_k, o_v, m_v, i_v, K, V)


@triton.jit
def _fold_queries(q, pq, do, den, dden, c0, c1, Lq, o_i, o_k, m_k, o_v, m_v, b_dhs, b_dhc, b_dzs, b_dzc,
                  i_v, eps, NTH, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Add the query chunks [c0, c1) to the state gradient: ``dH += q~^T g``, ``dZ += q~^T r``."""
    for c in range(c0, c1):
        o_t = c * BT + o_i
        m_t = o_t < Lq
        b_a, b_sin, b_cos, b_qs, b_qc = _q_feats(q, pq, o_t, m_t, o_k, m_k, H, K, DOT_MODE, DT)
        b_g, b_r = _grad_rows(do, den, dden, o_t, m_t, o_v, m_v, H * V, H, i_v, eps, NORMALIZE)
        b_dhs += _dot(tl.trans(b_qs), b_g, DOT_MODE, DT)
        b_dhc += _dot(tl.trans(b_qc), b_g, DOT_MODE, DT)
        b_dzs += tl.sum(b_qs * b_r[:, None], 0)
        b_dzc += tl.sum(b_qc * b_r[:, None], 0)
    return b_dhs, b_dhc, b_dzs, b_dzc


@triton.jit(do_not_specialize=['T', 'S', 'NTH', 'NSH', 'eps'])
def leap_bwd_kernel_monotone_dkv(
    q, k, v, pq, pk, kpm, nvk, tab, dS, dz,
    do, den, dden,
    dk, dv, dpk, dS0, dz0,
    T, S, NTH, NSH, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_KPM: tl.constexpr, USE_DS: tl.constexpr, STORE_DS0: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    i_nh, i_v, i_n, i_h, i_hk, bos, kbos = _mono_program(T, S, H, G)
    HKV: tl.constexpr = H // G
    NK = tl.cdiv(S, BT)
    q, pq = _query_rows_of(q, pq, bos, i_h, H, K)
    nvk += bos
    do, den, dden = _grad_rows_of(do, den, dden, bos, i_h, H, V)
    k, pk, v, kpm = _key_rows(k, pk, v, kpm, kbos, i_hk, HKV, K, V)
    dk += (kbos * H + i_h) * K
    dpk += kbos * H + i_h
    dv += (kbos * H + i_h) * V
    tab_b = tab + i_n.to(tl.int64) * (2 * (NK + 1))  # cB[j]
    tab_a = tab_b + (NK + 1)  # cA[j]

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    # the state gradient of the final state; dz on value tile 0 only (its r terms are counted there)
    b_dhs, b_dhc, b_dzs, b_dzc = _load_state(dS, dz, i_nh.to(tl.int64), o_k, m_k, o_v, m_v, BK, BV, K, V, USE_DS,
                                             i_v == 0)

    for jr in range(0, NK):
        j = NK - 1 - jr
        c_b = tl.load(tab_b + j)
        # the query chunks whose base state first holds key chunk j
        b_dhs, b_dhc, b_dzs, b_dzc = _fold_queries(q, pq, do, den, dden, c_b, tl.load(tab_b + j + 1), T,
                                                   o_i, o_k, m_k, o_v, m_v, b_dhs, b_dhc, b_dzs, b_dzc,
                                                   i_v, eps, NTH, H, K, V, BT, NORMALIZE, DOT_MODE, DT)
        o_s = j * BT + o_i
        m_s = o_s < S
        b_kv, b_ak, b_sk, b_ck, b_ks, b_kc, b_v = _k_tile(k, pk, v, kpm, o_s, S, o_k, m_k, o_v, m_v,
                                                          HKV, K, V, HAS_KPM, DOT_MODE, DT)
        # dv = k~ dH ; dk~ = v dH^T + dZ
        b_dv = _dot(b_ks, b_dhs, DOT_MODE, DT) + _dot(b_kc, b_dhc, DOT_MODE, DT)
        b_dks = _dot(b_v, tl.trans(b_dhs), DOT_MODE, DT) + b_dzs[None, :]
        b_dkc = _dot(b_v, tl.trans(b_dhc), DOT_MODE, DT) + b_dzc[None, :]
        # masked pairs: query chunks [cA[j], cB[j]) see part of key chunk j
        for c in range(tl.load(tab_a + j), c_b):
            o_t = c * BT + o_i
            m_t = o_t < T
            b_n = tl.load(nvk + o_t.to(tl.int64), mask=m_t, other=0).to(tl.int32)
            b_M = o_s[None, :] < b_n[:, None]  # rows t (queries), columns s (keys)
            b_aq, b_sq, b_cq, b_qs, b_qc = _q_feats(q, pq, o_t, m_t, o_k, m_k, H, K, DOT_MODE, DT)
            b_g, b_r = _grad_rows(do, den, dden, o_t, m_t, o_v, m_v, H * V, H, i_v, eps, NORMALIZE)
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
            b_A = tl.where(b_M, _dot(b_qs, tl.trans(b_pks), DOT_MODE, DT) + _dot(b_qc, tl.trans(b_pkc), DOT_MODE, DT),
                           0.)
            b_dv += _dot(tl.trans(b_A), b_g, DOT_MODE, DT)
            b_dA = tl.where(b_M, _dot(b_g, tl.trans(b_pv), DOT_MODE, DT) + b_r[:, None], 0.)
            b_dks += _dot(tl.trans(b_dA), b_qs, DOT_MODE, DT)
            b_dkc += _dot(tl.trans(b_dA), b_qc, DOT_MODE, DT)
        # selected, not multiplied: a padded key's gradients are exactly 0 even if dH holds NaN
        b_dk = tl.where(b_kv[:, None] & (b_ak > 0), b_dks * b_sk[:, None] + b_dkc * b_ck[:, None], 0.)
        b_dp = tl.where(b_kv, HALF_PI * tl.sum(b_ak * (b_dks * b_ck[:, None] - b_dkc * b_sk[:, None]), 1), 0.)
        b_dv = tl.where(b_kv[:, None], b_dv, 0.)
        o_s64 = o_s.to(tl.int64)
        p_dk = dk + i_v.to(tl.int64) * NSH * K + o_s64[:, None] * (H * K) + o_k[None, :]
        tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_s[:, None] & m_k[None, :])
        tl.store(dpk + i_v.to(tl.int64) * NSH + o_s64 * H, b_dp, mask=m_s)
        tl.store(dv + o_s64[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_s[:, None] & m_v[None, :])
    if STORE_DS0:  # every query sees the initial state: the chunks not folded yet complete dS0
        b_dhs, b_dhc, b_dzs, b_dzc = _fold_queries(q, pq, do, den, dden, 0, tl.load(tab_b), T,
                                                   o_i, o_k, m_k, o_v, m_v, b_dhs, b_dhc, b_dzs, b_dzc,
                                                   i_v, eps, NTH, H, K, V, BT, NORMALIZE, DOT_MODE, DT)
        _store_state(dS0, dz0, i_nh.to(tl.int64), b_dhs, b_dhc, b_dzs, b_dzc, o_k, m_k, o_v, m_v, i_v, K, V)

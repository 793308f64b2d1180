"""Triton reverse sweep of chunkwise LeaP attention: gradients to k, v, pk and the initial state.

With ``g = dL/dnum = do / max(den, eps)`` and ``r = dL/dden = -(do . num) / max(den, eps)^2``
(zero where the clamp is active; ``g = do``, ``r = 0`` without normalisation), the op is
linear attention on ``[v, 1]`` with output gradient ``[g, r]``. One program per (sequence x
query head, value tile) walks its sequence from the end, carrying in registers

    dH = dS + sum_{t later} q~_t^T g_t    (2 x [BK, BV])     dZ = dz + sum_{t later} q~_t r_t   (2 x [BK])

and for each key chunk computes ``dk~ = dH v + dZ (+ intra)``, ``dv = k~ dH (+ intra)``, then
reduces ``dk~ (2Dk) -> dk (Dk)`` and ``-> dpk`` in registers. Padded keys are not loaded (0)
and their dk, dv, dpk are selected to exactly 0 (even where NaN reaches the state gradient).
At the start of the sequence ``dH``, ``dZ`` are ``dS0``, ``dz0``. ``r`` terms are counted on
value tile 0 only; per-value-tile partials of dk / dpk and per-query-head dk / dv / dpk (GQA)
are summed on the host in a fixed order (deterministic, no atomics).
"""
import triton
import triton.language as tl

from .triton_fwd import (HALF_PI, _cvt, _dot, _grad_rows, _key_valid, _load_feat, _seq_bounds, _store_state,
                         autotune_configs)


@triton.jit
def _key_tile(k, pk, v, kpm, dk, dpk, dv, o_s, m_s, o_k, m_k, o_v, m_v,
              b_dhs, b_dhc, b_dzs, b_dzc, b_qs, b_qc, b_g, b_r, b_M, i_v, NSH,
              H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              HAS_A: tl.constexpr, HAS_KPM: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Gradients of one key tile from the state gradient of later positions (+ intra chunk)."""
    b_kv = _key_valid(kpm, o_s, m_s, HAS_KPM)  # padded keys are not loaded: 0
    b_ak, b_sk, b_ck = _load_feat(k, pk, o_s, b_kv, HKV * K, HKV, o_k, m_k)
    b_ks = _cvt(b_ak * b_sk[:, None], DOT_MODE, DT)
    b_kc = _cvt(b_ak * b_ck[:, None], DOT_MODE, DT)
    o_s64 = o_s.to(tl.int64)
    b_v = tl.load(v + o_s64[:, None] * (HKV * V) + o_v[None, :], mask=b_kv[:, None] & m_v[None, :], other=0.)
    # dv = k~ dH ; dk~ = v dH^T + dZ
    b_dv = _dot(b_ks, b_dhs, DOT_MODE, DT) + _dot(b_kc, b_dhc, DOT_MODE, DT)
    b_dks = _dot(b_v, tl.trans(b_dhs), DOT_MODE, DT) + b_dzs[None, :]
    b_dkc = _dot(b_v, tl.trans(b_dhc), DOT_MODE, DT) + b_dzc[None, :]
    if HAS_A:
        # rows t (queries), columns s (keys) of the chunk
        b_A = _dot(b_qs, tl.trans(b_ks), DOT_MODE, DT) + _dot(b_qc, tl.trans(b_kc), DOT_MODE, DT)
        b_A = tl.where(b_M, b_A, 0.)
        b_dA = tl.where(b_M, _dot(b_g, tl.trans(b_v), DOT_MODE, DT) + b_r[:, None], 0.)
        b_dv += _dot(tl.trans(b_A), b_g, DOT_MODE, DT)
        b_dks += _dot(tl.trans(b_dA), b_qs, DOT_MODE, DT)
        b_dkc += _dot(tl.trans(b_dA), b_qc, DOT_MODE, DT)
    # selected, not multiplied: a padded key's gradients are exactly 0 even if dH holds NaN
    b_dk = tl.where(b_kv[:, None] & (b_ak > 0), b_dks * b_sk[:, None] + b_dkc * b_ck[:, None], 0.)
    b_dp = tl.where(b_kv, HALF_PI * tl.sum(b_ak * (b_dks * b_ck[:, None] - b_dkc * b_sk[:, None]), 1), 0.)
    b_dv = tl.where(b_kv[:, None], b_dv, 0.)
    # per query head outputs: row s, head h (the host sums a GQA group)
    tl.store(dk + i_v * NSH * K + o_s64[:, None] * (H * K) + o_k[None, :], b_dk.to(dk.dtype.element_ty),
             mask=m_s[:, None] & m_k[None, :])
    tl.store(dpk + i_v * NSH + o_s64 * H, b_dp, mask=m_s)
    tl.store(dv + o_s64[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_s[:, None] & m_v[None, :])


@triton.autotune(configs=autotune_configs(),
                 key=['H', 'G', 'K', 'V', 'BT', 'BK', 'BV', 'INTRA', 'IS_VARLEN', 'HAS_KPM',
                      'USE_DS', 'STORE_DS0', 'NORMALIZE', 'SEGMENTED', 'DOT_MODE'])
@triton.jit(do_not_specialize=['T', 'S', 'W', 'CL', 'L', 'NTH', 'NSH', 'NV', 'eps'])
def leap_bwd_kernel_dkv(
    q, k, v, pq, pk, kpm, cu_seqlens, dS, dz,
    do, den, delta,
    dk, dv, dpk, dS0, dz0,
    T, S, W, CL, L, NTH, NSH, NV, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    INTRA: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    USE_DS: tl.constexpr, STORE_DS0: tl.constexpr, NORMALIZE: tl.constexpr,
    SEGMENTED: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    i_nh, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # B*H on axis 0 (CUDA: axes 1, 2 <= 65535)
    i_n, i_h = i_nh // H, i_nh % H
    HKV: tl.constexpr = H // G
    i_hk = i_h // G
    bos, kbos, Lq, Lk = _seq_bounds(cu_seqlens, i_n, T, S, IS_VARLEN)
    q += (bos * H + i_h) * K
    pq += bos * H + i_h
    do += (bos * H + i_h) * V
    den += bos * H + i_h
    delta += bos * H + i_h
    k += (kbos * HKV + i_hk) * K
    pk += kbos * HKV + i_hk
    v += (kbos * HKV + i_hk) * V
    kpm += kbos
    dk += (kbos * H + i_h) * K
    dpk += kbos * H + i_h
    dv += (kbos * H + i_h) * V

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dhs = tl.zeros([BK, BV], dtype=tl.float32)
    b_dhc = tl.zeros([BK, BV], dtype=tl.float32)
    b_dzs = tl.zeros([BK], dtype=tl.float32)
    b_dzc = tl.zeros([BK], dtype=tl.float32)
    # the state gradient this program starts from: dS row i_nh, or (SEGMENTED 1) that of the
    # queries after segment i_s (the reverse exclusive scan), row i_nh * (segments) + i_s, or
    # (SEGMENTED 2) the whole state gradient
    st_row = i_nh.to(tl.int64)
    if SEGMENTED == 1:
        st_row = st_row * tl.num_programs(2) + i_s
    if USE_DS:
        p_st = dS + st_row * (2 * K * V) + o_k[:, None] * V + o_v[None, :]
        m_st = m_k[:, None] & m_v[None, :]
        b_dhs += tl.load(p_st, mask=m_st, other=0.)
        b_dhc += tl.load(p_st + K * V, mask=m_st, other=0.)
        if i_v == 0:
            p_z = dz + st_row * (2 * K) + o_k
            b_dzs += tl.load(p_z, mask=m_k, other=0.)
            b_dzc += tl.load(p_z + K, mask=m_k, other=0.)

    o_i = tl.arange(0, BT)
    r0 = i_s * L  # this program's rows: [r0, r1) (one segment; L >= T unsegmented)
    if INTRA:
        r1 = tl.minimum(r0 + L, Lq)
        b_M = (o_i[:, None] // W) >= (o_i[None, :] // W)
        nc = tl.cdiv(r1 - r0, CL)
        for j in range(0, nc):
            c0 = r0 + (nc - 1 - j) * CL
            o_t = c0 + o_i
            m_t = (o_i < CL) & (o_t < r1)
            b_aq, b_sq, b_cq = _load_feat(q, pq, o_t, m_t, H * K, H, o_k, m_k)
            b_qs = _cvt(b_aq * b_sq[:, None], DOT_MODE, DT)
            b_qc = _cvt(b_aq * b_cq[:, None], DOT_MODE, DT)
            b_g, b_r = _grad_rows(do, den, delta, o_t, m_t, o_v, m_v, H * V, H, NTH, NV, i_v, eps, NORMALIZE)
            _key_tile(k, pk, v, kpm, dk, dpk, dv, o_t, m_t, o_k, m_k, o_v, m_v,
                      b_dhs, b_dhc, b_dzs, b_dzc, b_qs, b_qc, b_g, b_r, b_M, i_v, NSH,
                      H, HKV, K, V, True, HAS_KPM, DOT_MODE, DT)
            b_dhs += _dot(tl.trans(b_qs), b_g, DOT_MODE, DT)
            b_dhc += _dot(tl.trans(b_qc), b_g, DOT_MODE, DT)
            b_dzs += tl.sum(b_qs * b_r[:, None], 0)
            b_dzc += tl.sum(b_qc * b_r[:, None], 0)
    elif SEGMENTED == 2:  # one block holds every query: dS is the whole state gradient; keys [r0, r1)
        b_M = o_i[:, None] >= 0  # unused
        r1 = tl.minimum(r0 + L, Lk)
        for s0 in range(r0, r1, BT):
            o_s = s0 + o_i
            _key_tile(k, pk, v, kpm, dk, dpk, dv, o_s, o_s < r1, o_k, m_k, o_v, m_v,
                      b_dhs, b_dhc, b_dzs, b_dzc, b_dhs, b_dhs, b_dhs, b_dzs, b_M, i_v, NSH,
                      H, HKV, K, V, False, HAS_KPM, DOT_MODE, DT)
    else:
        b_M = o_i[:, None] >= 0  # unused
        # whole blocks from the segment's end back to r0 (a multiple of W when segmented)
        nb = tl.cdiv(tl.minimum(r0 + L, tl.maximum(Lq, Lk)) - r0, W)
        for j in range(0, nb):
            b0 = r0 + (nb - 1 - j) * W
            qe = tl.minimum(b0 + W, Lq)
            for t0 in range(b0, qe, BT):
                o_t = t0 + o_i
                m_t = o_t < qe
                b_aq, b_sq, b_cq = _load_feat(q, pq, o_t, m_t, H * K, H, o_k, m_k)
                b_qs = _cvt(b_aq * b_sq[:, None], DOT_MODE, DT)
                b_qc = _cvt(b_aq * b_cq[:, None], DOT_MODE, DT)
                b_g, b_r = _grad_rows(do, den, delta, o_t, m_t, o_v, m_v, H * V, H, NTH, NV, i_v, eps,
                                      NORMALIZE)
                b_dhs += _dot(tl.trans(b_qs), b_g, DOT_MODE, DT)
                b_dhc += _dot(tl.trans(b_qc), b_g, DOT_MODE, DT)
                b_dzs += tl.sum(b_qs * b_r[:, None], 0)
                b_dzc += tl.sum(b_qc * b_r[:, None], 0)
            ke = tl.minimum(b0 + W, Lk)
            for s0 in range(b0, ke, BT):
                o_s = s0 + o_i
                m_s = o_s < ke
                _key_tile(k, pk, v, kpm, dk, dpk, dv, o_s, m_s, o_k, m_k, o_v, m_v,
                          b_dhs, b_dhc, b_dzs, b_dzc, b_dhs, b_dhs, b_dhs, b_dzs, b_M, i_v, NSH,
                          H, HKV, K, V, False, HAS_KPM, DOT_MODE, DT)
    if STORE_DS0:
        _store_state(dS0, dz0, i_nh.to(tl.int64), b_dhs, b_dhc, b_dzs, b_dzc, o_k, m_k, o_v, m_v, i_v, K, V)

"""Segment sums of the key side, the first pass of the segment-parallel (v2) forward.

Each sequence's keys are split into segments of ``L`` rows (``L`` a multiple of the sweep's
chunk). One program per (sequence x query head ``i_nh``, value tile ``i_v``, segment ``i_s``)
sums its segment's ``k~^T v`` (``[2Dk, BV]``) and ``k~`` (``[2Dk]``, value tile 0) in fp32 and
writes them to row ``i_nh * NSEG + i_s`` of ``Sseg`` ``[N*H*NSEG, 2Dk, Dv]`` and ``zseg``
``[N*H*NSEG, 2Dk]``. A segment past its sequence's end (varlen: the grid is sized for the
longest possible sequence, no host sync) writes zeros. ``triton_chunk`` then scans the segment
sums in PyTorch (exclusive prefix per segment, the final state) and the sweep kernel runs every
segment in parallel from its prefix state. The re-weighted features live in registers only.
"""
import triton
import triton.language as tl

from .triton_fwd import _cvt, _dot, _grad_rows, _key_valid, _load_feat, _seq_bounds, autotune_configs


@triton.autotune(configs=autotune_configs(),
                 key=['H', 'G', 'K', 'V', 'BT', 'BK', 'BV', 'IS_VARLEN', 'HAS_KPM', 'DOT_MODE'])
@triton.jit(do_not_specialize=['T', 'S', 'L'])
def leap_segment_sums_kernel(
    k, pk, v, kpm, cu_seqlens, Sseg, zseg,
    T, S, L,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    i_nh, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    HKV: tl.constexpr = H // G
    i_hk = i_h // G
    bos, kbos, Lq, Lk = _seq_bounds(cu_seqlens, i_n, T, S, IS_VARLEN)
    k += (kbos * HKV + i_hk) * K
    pk += kbos * HKV + i_hk
    v += (kbos * HKV + i_hk) * V
    kpm += kbos

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    b_hs = tl.zeros([BK, BV], dtype=tl.float32)
    b_hc = tl.zeros([BK, BV], dtype=tl.float32)
    b_zs = tl.zeros([BK], dtype=tl.float32)
    b_zc = tl.zeros([BK], dtype=tl.float32)
    s1 = tl.minimum(i_s * L + L, Lk)
    for s0 in range(i_s * L, s1, BT):
        o_s = s0 + o_i
        b_kv = _key_valid(kpm, o_s, o_s < s1, HAS_KPM)  # padded keys are not loaded: 0
        b_ak, b_sk, b_ck = _load_feat(k, pk, o_s, b_kv, HKV * K, HKV, o_k, m_k)
        b_ks = _cvt(b_ak * b_sk[:, None], DOT_MODE, DT)
        b_kc = _cvt(b_ak * b_ck[:, None], DOT_MODE, DT)
        b_v = tl.load(v + o_s.to(tl.int64)[:, None] * (HKV * V) + o_v[None, :],
                      mask=b_kv[:, None] & m_v[None, :], other=0.)
        b_hs += _dot(tl.trans(b_ks), b_v, DOT_MODE, DT)
        b_hc += _dot(tl.trans(b_kc), b_v, DOT_MODE, DT)
        b_zs += tl.sum(b_ks.to(tl.float32), 0)
        b_zc += tl.sum(b_kc.to(tl.float32), 0)
    row = i_nh.to(tl.int64) * tl.num_programs(2) + i_s
    p_st = Sseg + row * (2 * K * V) + o_k[:, None] * V + o_v[None, :]
    m_st = m_k[:, None] & m_v[None, :]
    tl.store(p_st, b_hs, mask=m_st)
    tl.store(p_st + K * V, b_hc, mask=m_st)
    if i_v == 0:
        p_z = zseg + row * (2 * K) + o_k
        tl.store(p_z, b_zs, mask=m_k)
        tl.store(p_z + K, b_zc, mask=m_k)


@triton.autotune(configs=autotune_configs(),
                 key=['H', 'K', 'V', 'BT', 'BK', 'BV', 'IS_VARLEN', 'NORMALIZE', 'DOT_MODE'])
@triton.jit(do_not_specialize=['T', 'S', 'L', 'NTH', 'NV', 'eps'])
def leap_segment_grad_sums_kernel(
    q, pq, do, den, delta, cu_seqlens, dHseg, dzseg,
    T, S, L, NTH, NV, eps,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    """The backward's mirror of ``leap_segment_sums_kernel``: per query segment, ``q~^T g``
    (``[2Dk, BV]``) and ``q~ r`` (``[2Dk]``, value tile 0; ``g = dL/dnum``, ``r = dL/dden`` as
    in ``triton_bwd``), the pieces of the state gradient that the reverse scan assembles."""
    i_nh, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, kbos, Lq, Lk = _seq_bounds(cu_seqlens, i_n, T, S, IS_VARLEN)
    q += (bos * H + i_h) * K
    pq += bos * H + i_h
    do += (bos * H + i_h) * V
    den += bos * H + i_h
    delta += bos * H + i_h

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    b_dhs = tl.zeros([BK, BV], dtype=tl.float32)
    b_dhc = tl.zeros([BK, BV], dtype=tl.float32)
    b_dzs = tl.zeros([BK], dtype=tl.float32)
    b_dzc = tl.zeros([BK], dtype=tl.float32)
    t1 = tl.minimum(i_s * L + L, Lq)
    for t0 in range(i_s * L, t1, BT):
        o_t = t0 + o_i
        m_t = o_t < t1
        b_aq, b_sq, b_cq = _load_feat(q, pq, o_t, m_t, H * K, H, o_k, m_k)
        b_qs = _cvt(b_aq * b_sq[:, None], DOT_MODE, DT)
        b_qc = _cvt(b_aq * b_cq[:, None], DOT_MODE, DT)
        b_g, b_r = _grad_rows(do, den, delta, o_t, m_t, o_v, m_v, H * V, H, NTH, NV, i_v, eps, NORMALIZE)
        b_dhs += _dot(tl.trans(b_qs), b_g, DOT_MODE, DT)
        b_dhc += _dot(tl.trans(b_qc), b_g, DOT_MODE, DT)
        b_dzs += tl.sum(b_qs * b_r[:, None], 0)
        b_dzc += tl.sum(b_qc * b_r[:, None], 0)
    row = i_nh.to(tl.int64) * tl.num_programs(2) + i_s
    p_st = dHseg + row * (2 * K * V) + o_k[:, None] * V + o_v[None, :]
    m_st = m_k[:, None] & m_v[None, :]
    tl.store(p_st, b_dhs, mask=m_st)
    tl.store(p_st + K * V, b_dhc, mask=m_st)
    if i_v == 0:
        p_z = dzseg + row * (2 * K) + o_k
        tl.store(p_z, b_dzs, mask=m_k)
        tl.store(p_z + K, b_dzc, mask=m_k)

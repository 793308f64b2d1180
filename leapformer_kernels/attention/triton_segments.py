"""Segment sums of the key side, the first pass of the segment-parallel (v2) forward.

Each sequence's keys are split into segments of ``L`` rows (``L`` a multiple of the sweep's
chunk). One program per (sequence x query head ``i_nh``, value tile ``i_v``, segment ``i_s``)
sums its segment's ``k~^T v`` (``[2Dk, BV]``) and ``k~`` (``[2Dk]``, value tile 0) in fp32 and
writes them to row ``i_nh * NSEG + i_s`` of ``Sseg`` ``[N*H*NSEG, 2Dk, Dv]`` and ``zseg``
``[N*H*NSEG, 2Dk]``. A segment past its sequence's end (varlen: the grid is sized for the
longest possible sequence, no host sync) writes zeros. ``triton_chunk`` then scans the segment
sums (``leap_fwd_kernel_segment_scan``, in place: exclusive prefix per segment, the final state) and
the sweep kernel runs every segment in parallel from its prefix state. The re-weighted features live in registers only.
"""
import triton
import triton.language as tl

from .triton_fwd import (_cvt, _dot, _fold_keys, _grad_rows, _grad_rows_of, _key_rows, _load_feat, _load_state,
                         _query_rows_of, _seq_bounds, _store_state, autotune_configs)


@triton.autotune(configs=autotune_configs(),
                 key=['H', 'G', 'K', 'V', 'BT', 'BK', 'BV', 'IS_VARLEN', 'HAS_KPM', 'DOT_MODE'])
@triton.jit(do_not_specialize=['T', 'S', 'L'])
def leap_fwd_kernel_segment_sums(
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
    k, pk, v, kpm = _key_rows(k, pk, v, kpm, kbos, i_hk, HKV, K, V)

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_hs, b_hc, b_zs, b_zc = _load_state(Sseg, zseg, 0, o_k, m_k, o_v, m_v, BK, BV, K, V, False, False)
    b_hs, b_hc, b_zs, b_zc = _fold_keys(k, pk, v, kpm, i_s * L, tl.minimum(i_s * L + L, Lk), tl.arange(0, BT),
                                        o_k, m_k, o_v, m_v, b_hs, b_hc, b_zs, b_zc, HKV, K, V, BT, HAS_KPM,
                                        DOT_MODE, DT)
    _store_state(Sseg, zseg, i_nh.to(tl.int64) * tl.num_programs(2) + i_s, b_hs, b_hc, b_zs, b_zc,
                 o_k, m_k, o_v, m_v, i_v, K, V)


@triton.autotune(configs=autotune_configs(),
                 key=['H', 'K', 'V', 'BT', 'BK', 'BV', 'IS_VARLEN', 'NORMALIZE', 'DOT_MODE'])
@triton.jit(do_not_specialize=['T', 'S', 'L', 'eps'])
def leap_bwd_kernel_segment_sums(
    q, pq, do, den, dden, cu_seqlens, dHseg, dzseg,
    T, S, L, eps,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    """The backward's mirror of ``leap_fwd_kernel_segment_sums``: per query segment, ``q~^T g``
    (``[2Dk, BV]``) and ``q~ r`` (``[2Dk]``, value tile 0; ``g = dL/dnum``, ``r = dL/dden`` as
    in ``triton_bwd``), the pieces of the state gradient that the reverse scan assembles."""
    i_nh, i_v, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, kbos, Lq, Lk = _seq_bounds(cu_seqlens, i_n, T, S, IS_VARLEN)
    q, pq = _query_rows_of(q, pq, bos, i_h, H, K)
    do, den, dden = _grad_rows_of(do, den, dden, bos, i_h, H, V)

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BT)
    b_dhs, b_dhc, b_dzs, b_dzc = _load_state(dHseg, dzseg, 0, o_k, m_k, o_v, m_v, BK, BV, K, V, False, False)
    t1 = tl.minimum(i_s * L + L, Lq)
    for t0 in range(i_s * L, t1, BT):
        o_t = t0 + o_i
        m_t = o_t < t1
        b_aq, b_sq, b_cq = _load_feat(q, pq, o_t, m_t, H * K, H, o_k, m_k)
        b_qs = _cvt(b_aq * b_sq[:, None], DOT_MODE, DT)
        b_qc = _cvt(b_aq * b_cq[:, None], DOT_MODE, DT)
        b_g, b_r = _grad_rows(do, den, dden, o_t, m_t, o_v, m_v, H * V, H, i_v, eps, NORMALIZE)
        b_dhs += _dot(tl.trans(b_qs), b_g, DOT_MODE, DT)
        b_dhc += _dot(tl.trans(b_qc), b_g, DOT_MODE, DT)
        b_dzs += tl.sum(b_qs * b_r[:, None], 0)
        b_dzc += tl.sum(b_qc * b_r[:, None], 0)
    _store_state(dHseg, dzseg, i_nh.to(tl.int64) * tl.num_programs(2) + i_s, b_dhs, b_dhc, b_dzs, b_dzc,
                 o_k, m_k, o_v, m_v, i_v, K, V)


@triton.jit
def _scan_rows(seg, init, start, fin, i_nh, NSEG, offs, m, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
               WHOLE: tl.constexpr, STORE_FIN: tl.constexpr, N_EL: tl.constexpr):
    """One column block of the scan over the NSEG segment rows of sequence x head i_nh."""
    if HAS_INIT:
        acc = tl.load(init + i_nh.to(tl.int64) * N_EL + offs, mask=m, other=0.)
    else:
        acc = tl.zeros(offs.shape, dtype=tl.float32)
    base = i_nh.to(tl.int64) * NSEG
    for j in range(0, NSEG):
        if REVERSE:
            jj = NSEG - 1 - j
        else:
            jj = j
        # loaded before the store: ``start`` may be ``seg`` itself (the scan runs in place)
        x = tl.load(seg + (base + jj) * N_EL + offs, mask=m, other=0.)
        if not WHOLE:  # the state before segment jj (after it, in reverse)
            tl.store(start + (base + jj) * N_EL + offs, acc, mask=m)
        acc += x
    if WHOLE:
        tl.store(start + i_nh.to(tl.int64) * N_EL + offs, acc, mask=m)
    if STORE_FIN:
        tl.store(fin + i_nh.to(tl.int64) * N_EL + offs, acc, mask=m)


@triton.jit(do_not_specialize=['NSEG'])
def leap_fwd_kernel_segment_scan(
    Sseg, zseg, S_init, z_init, S_start, z_start, S_fin, z_fin, NSEG,
    SK: tl.constexpr, ZK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_Z: tl.constexpr,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, WHOLE: tl.constexpr, STORE_FIN: tl.constexpr = True,
):
    """The scan over segments, one launch: for each sequence x head (axis 0) and block of the
    ``SK = 2Dk*Dv`` state elements (axis 1; block 0 also does the ``ZK = 2Dk`` normaliser), in a
    fixed order (deterministic), starting from ``S_init``/``z_init`` (the initial state, or the
    final-state gradient when ``REVERSE``) or zero:

    - ``WHOLE=False``: ``S_start[nh * NSEG + j]`` = init + the segments before j (after j when
      ``REVERSE``); ``S_fin[nh]`` = init + every segment (the final state, or dS0). ``S_start``
      may be ``Sseg`` itself (in place: each element is read before it is overwritten, by the
      same program);
    - ``WHOLE=True``: ``S_start[nh]`` = ``S_fin[nh]`` = init + every segment.

    ``STORE_FIN=False``: no ``S_fin`` (the caller needs no final state / ``dS0``).
    """
    i_nh, i_b = tl.program_id(0), tl.program_id(1)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    _scan_rows(Sseg, S_init, S_start, S_fin, i_nh, NSEG, offs, offs < SK, HAS_INIT, REVERSE, WHOLE, STORE_FIN, SK)
    if i_b == 0:
        offz = tl.arange(0, BLOCK_Z)
        _scan_rows(zseg, z_init, z_start, z_fin, i_nh, NSEG, offz, offz < ZK, HAS_INIT, REVERSE, WHOLE, STORE_FIN,
                   ZK)

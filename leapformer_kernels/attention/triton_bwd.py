"""Triton reverse sweep of chunkwise LeaP attention: gradients to k, v and pk.

With ``g = dL/dnum = do / max(den, eps)`` and ``r = dL/dden = -(do . num) / max(den, eps)^2``
(zero where the clamp is active; ``g = do``, ``r = 0`` without normalisation; ``r`` is read from
``dden``, which ``leap_bwd_kernel_dden`` forms first from the forward's ``o`` and ``den``), the op is
linear attention on ``[v, 1]`` with output gradient ``[g, r]``. One program per (sequence x
key/value head, key or value block, segment) walks its rows from the end, carrying in registers

    dH = sum_{h in group} (dS_h + sum_{t later} q~_{h,t}^T g_{h,t})   (2 x [BK, BV])
    dZ = sum_{h in group} (dz_h + sum_{t later} q~_{h,t} r_{h,t})     (2 x [BK])

the state gradient summed over the query heads that share this key/value head (GQA: k~ and v
are shared, so their gradients see the group's sum), and for each key chunk computes

    dk~ = v dH^T + dZ + sum_h dA_h^T q~_h    dA_h = (g_h v^T + r_h) * mask    (DO_DK)
    dv  = k~ dH + sum_h A_h^T g_h              A_h = (q~_h k~^T) * mask        (DO_DV)

looping over the group's query heads for the intra-chunk terms, then reduces ``dk~ (2Dk) -> dk
(Dk)`` and ``-> dpk`` in registers. Every program writes complete rows of ``dk`` (for its ``BK``
key columns) and ``dv`` (its ``BV`` value columns) in the input dtype, with Hkv heads: no fp32
partials, no per-query-head buffers. Blocking (``triton_chunk._bwd_tiles``):

- ``DO_DK`` and ``DO_DV`` (Dk, Dv <= 64): one program holds every key and value column;
- ``DO_DK`` only (Dk = 128): axis 1 is a block of ``BK`` key columns, one tile holds all ``V``
  (``dk`` needs every value column for ``v dH^T`` and ``g v^T``, not every key column);
  ``dpk`` sums over key columns: one fp32 partial per key block, summed on the host;
- ``DO_DV`` only (Dk = 128): axis 1 is a value tile, one tile holds all ``K`` (``A`` needs every
  key column) and ``r`` is not needed.

Padded keys are not loaded (0) and their dk, dv, dpk are selected to exactly 0 (even where NaN
reaches the state gradient). The starting state gradients (``dS`` / the reverse scan's per
segment rows, per query head) are summed over the group in a fixed order; ``dS0``, ``dz0`` come
from the reverse scan (``triton_chunk.query_grad_states``). Deterministic: no atomics.
"""
import triton
import triton.language as tl

from .triton_fwd import (HALF_PI, _clamp_den, _cvt, _dot, _grad_rows, _grad_rows_of, _key_rows, _key_valid,
                         _load_feat, _load_state, _query_rows_of, _seq_bounds, autotune_configs)


@triton.jit
def _key_program(i_nhk, i_b, HKV: tl.constexpr, DO_DV: tl.constexpr):
    """(sequence, key/value head, key block, value tile) of a key-side program: axis 0 is
    sequence x key/value head; axis 1 a value tile (dv kernel) or a key block (dk, or 0 for both)."""
    if DO_DV:
        i_k = i_b * 0
        i_v = i_b
    else:
        i_k = i_b
        i_v = i_b * 0
    return i_nhk // HKV, i_nhk % HKV, i_k, i_v


@triton.jit
def _q_feats(q, pq, o_t, m_t, o_k, m_k, H: tl.constexpr, K: tl.constexpr, DOT_MODE: tl.constexpr,
             DT: tl.constexpr):
    b_aq, b_sq, b_cq = _load_feat(q, pq, o_t, m_t, H * K, H, o_k, m_k)
    return _cvt(b_aq * b_sq[:, None], DOT_MODE, DT), _cvt(b_aq * b_cq[:, None], DOT_MODE, DT)


@triton.jit
def _fold_query_grads(q, pq, do, den, dden, o_t, m_t, o_k, m_k, o_v, m_v,
                      b_dhs, b_dhc, b_dzs, b_dzc, eps,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, DO_DK: tl.constexpr,
                      NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """dH += q~^T g (and dZ += q~^T r for dk) over one query tile of one head."""
    b_qs, b_qc = _q_feats(q, pq, o_t, m_t, o_k, m_k, H, K, DOT_MODE, DT)
    b_g, b_r = _grad_rows(do, den, dden, o_t, m_t, o_v, m_v, H * V, H, 0, eps, NORMALIZE)
    b_dhs += _dot(tl.trans(b_qs), b_g, DOT_MODE, DT)
    b_dhc += _dot(tl.trans(b_qc), b_g, DOT_MODE, DT)
    if DO_DK:
        b_dzs += tl.sum(b_qs.to(tl.float32) * b_r[:, None], 0)
        b_dzc += tl.sum(b_qc.to(tl.float32) * b_r[:, None], 0)
    return b_dhs, b_dhc, b_dzs, b_dzc


@triton.jit
def _key_tile(q, pq, do, den, dden, k, pk, v, kpm, dk, dpk, dv, o_s, m_s, o_k, m_k, o_v, m_v,
              b_dhs, b_dhc, b_dzs, b_dzc, b_M, i_k, NSK, eps,
              H: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
              HAS_A: tl.constexpr, HAS_KPM: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
              NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Gradients of one key tile (rows o_s) from the state gradient of later positions; with
    ``HAS_A`` (causal chunks: the query rows are o_s too) also the intra-chunk terms of every
    query head of the group, folding each head's queries into dH, dZ afterwards. Returns the
    updated dH, dZ."""
    b_kv = _key_valid(kpm, o_s, m_s, HAS_KPM)  # padded keys are not loaded: 0
    b_ak, b_sk, b_ck = _load_feat(k, pk, o_s, b_kv, HKV * K, HKV, o_k, m_k)
    b_akc = _cvt(b_ak, DOT_MODE, DT)
    o_s64 = o_s.to(tl.int64)
    b_v = tl.load(v + o_s64[:, None] * (HKV * V) + o_v[None, :], mask=b_kv[:, None] & m_v[None, :], other=0.)
    # The gradients are sums of independent dot products (no dot accumulates into another's result, so
    # each keeps the compact [4, 2]-warp accumulator instead of the chained [8, 1] one that 8 warps
    # hold twice at 64 rows), with the features factored: k~ = diag(sin_k) relu(k), q~ alike.
    # From the later positions' state gradient (before this chunk's queries are folded in):
    if DO_DV:  # dv = k~ dH = sin_k (relu(k) dH_s) + cos_k (relu(k) dH_c)
        b_dv = b_sk[:, None] * _dot(b_akc, b_dhs, DOT_MODE, DT) + b_ck[:, None] * _dot(b_akc, b_dhc, DOT_MODE, DT)
    if DO_DK:  # dk~ = v dH^T + dZ (sin and cos halves)
        b_es = _dot(b_v, tl.trans(b_dhs), DOT_MODE, DT) + b_dzs[None, :]
        b_ec = _dot(b_v, tl.trans(b_dhc), DOT_MODE, DT) + b_dzc[None, :]
    if HAS_A:
        b_dvi = tl.zeros(b_v.shape, dtype=tl.float32)
        b_dsi = tl.zeros(b_ak.shape, dtype=tl.float32)
        b_dci = tl.zeros(b_ak.shape, dtype=tl.float32)
        for j in range(0, G):  # the group's query heads, in order; rows t = o_s of head j
            b_aq, b_sq, b_cq = _load_feat(q + j * K, pq + j, o_s, m_s, H * K, H, o_k, m_k)
            b_aqc = _cvt(b_aq, DOT_MODE, DT)
            b_g, b_r = _grad_rows(do + j * V, den + j, dden + j, o_s, m_s, o_v, m_v, H * V, H, 0, eps, NORMALIZE)
            if not DO_DV:  # the dk kernel (Dk = 128) makes the scaled g tiles of the dH update here, early
                # (sm_90 bf16: 112 B of spills at worst against 308 B; the dk + dv kernel spilled more so)
                b_gs = _cvt(b_g * b_sq[:, None], DOT_MODE, DT)
                b_gc = _cvt(b_g * b_cq[:, None], DOT_MODE, DT)
            if DO_DV:  # scores (relu(q) relu(k)^T) * (sin_q sin_k^T + cos_q cos_k^T), one dot
                b_C = b_sq[:, None] * b_sk[None, :] + b_cq[:, None] * b_ck[None, :]
                b_A = tl.where(b_M, _dot(b_aqc, tl.trans(b_akc), DOT_MODE, DT) * b_C, 0.)
                b_dvi += _dot(tl.trans(b_A), b_g, DOT_MODE, DT)
            if DO_DK:  # dk~_s += dA^T q~_s = (dA diag(sin_q))^T relu(q)
                b_dA = tl.where(b_M, _dot(b_g, tl.trans(b_v), DOT_MODE, DT) + b_r[:, None], 0.)
                b_dsi += _dot(tl.trans(_cvt(b_dA * b_sq[:, None], DOT_MODE, DT)), b_aqc, DOT_MODE, DT)
                b_dci += _dot(tl.trans(_cvt(b_dA * b_cq[:, None], DOT_MODE, DT)), b_aqc, DOT_MODE, DT)
                b_dzs += tl.sum(b_aq * (b_sq * b_r)[:, None], 0)
                b_dzc += tl.sum(b_aq * (b_cq * b_r)[:, None], 0)
            # dH += q~^T g = relu(q)^T (sin_q g) (cos alike)
            b_aqt = tl.trans(b_aqc)
            if DO_DV:
                b_dhs += _dot(b_aqt, _cvt(b_g * b_sq[:, None], DOT_MODE, DT), DOT_MODE, DT)
                b_dhc += _dot(b_aqt, _cvt(b_g * b_cq[:, None], DOT_MODE, DT), DOT_MODE, DT)
            else:
                b_dhs += _dot(b_aqt, b_gs, DOT_MODE, DT)
                b_dhc += _dot(b_aqt, b_gc, DOT_MODE, DT)
    # selected, not multiplied: a padded key's gradients are exactly 0 even if dH holds NaN
    if DO_DK:
        # dk = relu'(k) (sin_k dk~_s + cos_k dk~_c), dpk = pi/2 relu(k) . (cos_k dk~_s - sin_k dk~_c):
        # every term a scaled dot (none added to another dot's result)
        b_u = b_sk[:, None] * b_es + b_ck[:, None] * b_ec
        b_w = b_ck[:, None] * b_es - b_sk[:, None] * b_ec
        if HAS_A:
            b_u += b_sk[:, None] * b_dsi + b_ck[:, None] * b_dci
            b_w += b_ck[:, None] * b_dsi - b_sk[:, None] * b_dci
        b_dk = tl.where(b_kv[:, None] & (b_ak > 0), b_u, 0.)
        b_dp = tl.where(b_kv, HALF_PI * tl.sum(b_ak * b_w, 1), 0.)
        tl.store(dk + o_s64[:, None] * (HKV * K) + o_k[None, :], b_dk.to(dk.dtype.element_ty),
                 mask=m_s[:, None] & m_k[None, :])
        tl.store(dpk + i_k * NSK + o_s64 * HKV, b_dp, mask=m_s)
    if DO_DV:
        b_dv = tl.where(b_kv[:, None], b_dv, 0.)
        if HAS_A:
            b_dv += tl.where(b_kv[:, None], b_dvi, 0.)
        tl.store(dv + o_s64[:, None] * (HKV * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_s[:, None] & m_v[None, :])
    return b_dhs, b_dhc, b_dzs, b_dzc


@triton.jit
def _key_range(q, pq, do, den, dden, k, pk, v, kpm, dk, dpk, dv, s_lo, s_hi, o_i, o_k, m_k, o_v, m_v,
               b_dhs, b_dhc, b_dzs, b_dzc, i_k, NSK, eps,
               H: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, HAS_KPM: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
               NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Gradients of the keys [s_lo, s_hi), in tiles of BT, from one (inclusive) state gradient: no
    intra-chunk terms, so dH, dZ are not changed."""
    b_M = o_i[:, None] >= 0  # unused without intra-chunk terms
    for s0 in range(s_lo, s_hi, BT):
        o_s = s0 + o_i
        _key_tile(q, pq, do, den, dden, k, pk, v, kpm, dk, dpk, dv, o_s, o_s < s_hi, o_k, m_k, o_v, m_v,
                  b_dhs, b_dhc, b_dzs, b_dzc, b_M, i_k, NSK, eps,
                  H, G, HKV, K, V, False, HAS_KPM, DO_DK, DO_DV, NORMALIZE, DOT_MODE, DT)


def dkv_configs(configs, named_args, **kwargs):
    """The dk / dv sweep's configs by what it computes (``early_config_prune``): the stage counts
    that did not spill at sm_90 bf16 (``triton_report_3.9.0_v4_sm90_bf16.md``): the dk kernel 1 stage at
    Dk <= 64 (2, 3 stages: 88, 152 B), 2 or 3 stages at Dk = 128 (1 stage: 112 B); the dv kernel (none
    spills) and the one-program dk + dv form keep every config. Never empty."""
    if kwargs.get("DO_DK") and not kwargs.get("DO_DV"):
        keep = (1,) if kwargs.get("K", 64) <= 64 else (2, 3)
        kept = [c for c in configs if c.num_stages in keep]
        return kept or configs
    return configs


@triton.autotune(configs=autotune_configs(),
                 key=['H', 'G', 'K', 'V', 'BT', 'BK', 'BV', 'INTRA', 'IS_VARLEN', 'HAS_KPM',
                      'USE_DS', 'DO_DK', 'DO_DV', 'NORMALIZE', 'SEGMENTED', 'DOT_MODE'],
                 prune_configs_by={"early_config_prune": dkv_configs})
@triton.jit(do_not_specialize=['T', 'S', 'W', 'CL', 'L', 'NSK', 'eps'])
def leap_bwd_kernel_dkv(
    q, k, v, pq, pk, kpm, cu_seqlens, dS, dz,
    do, den, dden,
    dk, dv, dpk,
    T, S, W, CL, L, NSK, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    INTRA: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    USE_DS: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, NORMALIZE: tl.constexpr,
    SEGMENTED: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr,
):
    # B*Hkv on axis 0 (CUDA: axes 1, 2 <= 65535); axis 1: key block (DO_DK only), value tile
    # (DO_DV only) or 0 (both)
    i_nhk, i_s = tl.program_id(0), tl.program_id(2)
    HKV: tl.constexpr = H // G
    i_n, i_hk, i_k, i_v = _key_program(i_nhk, tl.program_id(1), HKV, DO_DV)
    bos, kbos, Lq, Lk = _seq_bounds(cu_seqlens, i_n, T, S, IS_VARLEN)
    h0 = i_hk * G  # the group's first query head
    q, pq = _query_rows_of(q, pq, bos, h0, H, K)
    do, den, dden = _grad_rows_of(do, den, dden, bos, h0, H, V)
    k, pk, v, kpm = _key_rows(k, pk, v, kpm, kbos, i_hk, HKV, K, V)
    dk += (kbos * HKV + i_hk) * K
    dpk += kbos * HKV + i_hk
    dv += (kbos * HKV + i_hk) * V

    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dhs, b_dhc, b_dzs, b_dzc = _load_state(dS, dz, 0, o_k, m_k, o_v, m_v, BK, BV, K, V, False, False)
    # the state gradient this program starts from, summed over the group's query heads h: dS row
    # (i_n, h), or (SEGMENTED 1) that of the queries after segment i_s (the reverse exclusive
    # scan), row (i_n, h) * (segments) + i_s, or (SEGMENTED 2) the whole state gradient
    if USE_DS:
        for j in range(0, G):
            st_row = (i_n * H + h0 + j).to(tl.int64)
            if SEGMENTED == 1:
                st_row = st_row * tl.num_programs(2) + i_s
            a_s, a_c, a_zs, a_zc = _load_state(dS, dz, st_row, o_k, m_k, o_v, m_v, BK, BV, K, V, True, DO_DK)
            b_dhs += a_s
            b_dhc += a_c
            b_dzs += a_zs
            b_dzc += a_zc

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
            b_dhs, b_dhc, b_dzs, b_dzc = _key_tile(
                q, pq, do, den, dden, k, pk, v, kpm, dk, dpk, dv, o_t, m_t, o_k, m_k, o_v, m_v,
                b_dhs, b_dhc, b_dzs, b_dzc, b_M, i_k, NSK, eps,
                H, G, HKV, K, V, True, HAS_KPM, DO_DK, DO_DV, NORMALIZE, DOT_MODE, DT)
    elif SEGMENTED == 2:  # one block holds every query: dS is the whole state gradient; keys [r0, r1)
        _key_range(q, pq, do, den, dden, k, pk, v, kpm, dk, dpk, dv, r0, tl.minimum(r0 + L, Lk), o_i, o_k, m_k, o_v,
                   m_v, b_dhs, b_dhc, b_dzs, b_dzc, i_k, NSK, eps, H, G, HKV, K, V, BT, HAS_KPM, DO_DK, DO_DV,
                   NORMALIZE, DOT_MODE, DT)
    else:
        # whole blocks from the segment's end back to r0 (a multiple of W when segmented)
        nb = tl.cdiv(tl.minimum(r0 + L, tl.maximum(Lq, Lk)) - r0, W)
        for jb in range(0, nb):
            b0 = r0 + (nb - 1 - jb) * W
            qe = tl.minimum(b0 + W, Lq)
            for j in range(0, G):  # every query of the block, of every head of the group
                for t0 in range(b0, qe, BT):
                    o_t = t0 + o_i
                    b_dhs, b_dhc, b_dzs, b_dzc = _fold_query_grads(
                        q + j * K, pq + j, do + j * V, den + j, dden + j, o_t, o_t < qe, o_k, m_k, o_v, m_v,
                         b_dhs, b_dhc, b_dzs, b_dzc, eps, H, K, V, DO_DK, NORMALIZE,
                        DOT_MODE, DT)
            _key_range(q, pq, do, den, dden, k, pk, v, kpm, dk, dpk, dv, b0, tl.minimum(b0 + W, Lk), o_i, o_k, m_k,
                       o_v, m_v, b_dhs, b_dhc, b_dzs, b_dzc, i_k, NSK, eps, H, G, HKV, K, V, BT, HAS_KPM, DO_DK,
                       DO_DV, NORMALIZE, DOT_MODE, DT)


@triton.jit(do_not_specialize=['R', 'eps'])
def leap_bwd_kernel_dden(o, do, den, dden, R, eps, V: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr):
    """``dden = dL/dden = -(do . num) / den^2 = -(do . o) / den`` per query row and head, from the
    forward's ``o`` and ``den`` (``o = num / den`` where ``den >= eps``; 0 where the clamp is active,
    also for a NaN ``den``), as flash-attention's backward first forms ``rowsum(do * o)``: the
    backward's only pass over ``o``. ``o``, ``do``: ``[R, V]`` rows (R = B*T*H); ``den``, ``dden``:
    ``[R]`` fp32. One program per ``BR`` rows, ``BV >= V``."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_v = tl.arange(0, BV)
    m = m_r[:, None] & (o_v < V)[None, :]
    b_o = tl.load(o + o_r[:, None] * V + o_v[None, :], mask=m, other=0.).to(tl.float32)
    b_do = tl.load(do + o_r[:, None] * V + o_v[None, :], mask=m, other=0.).to(tl.float32)
    b_den = tl.load(den + o_r, mask=m_r, other=1.)
    b_r = tl.where(b_den >= eps, -tl.sum(b_do * b_o, 1) / _clamp_den(b_den, eps), 0.)
    tl.store(dden + o_r, b_r, mask=m_r)

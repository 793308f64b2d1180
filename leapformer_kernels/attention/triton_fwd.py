"""Triton forward-order sweep of chunkwise LeaP attention (forward and two backward stages).

One program per (sequence x query head ``i_nh``, value tile ``i_v``) walks its sequence
from the start, carrying the running state ``[S_sin; S_cos]`` (``2 x [BK, BV]``) and
``[z_sin; z_cos]`` (``2 x [BK]``) in registers, fp32. The re-weighted features
``[relu(x) sin(pi/2 p), relu(x) cos(pi/2 p)]`` are built in registers from each loaded
tile, never written to memory. Nothing per chunk is stored: the state is carried.

Two sweep shapes (constexpr ``INTRA``):

- ``INTRA=True`` (causal; block-causal with block ``W <= BT``): chunks of ``CL`` rows
  (``CL = BT`` causal, a multiple of ``W`` block-causal, so no block spans chunks); each
  chunk adds masked intra-chunk scores ``(q~ k~^T) * [s//W <= t//W]`` to ``q~ @ state``.
- ``INTRA=False`` (non-causal / cross-attention with one block of length ``W >= max(T, S)``;
  block-causal with ``W > BT``): for each block, first fold all its keys into the state,
  then every query of the block reads the inclusive state (a query sees its whole block).

``STAGE`` picks what a query tile produces:
  0: forward, ``o = num / max(den, eps)`` (or ``num``), the final state, and (normalised) ``den``
     per row with its derivative ``Y = d den / d(pi/2 pq)`` (``den`` is ``[2, B, T, H]``), saved for
     the backward as flash-attention saves ``lse``;
  2: backward ``dq``/``dpq``, launched with ``SPLIT_K``: grid axis 1 is then a block of ``BK``
     key columns and one tile holds every value column (``BV >= V``), so each program writes
     complete ``dq`` rows for its columns (no fp32 partials; Dk = 128 runs 4 blocks of 32) and
     a ``dpq`` partial per key block (one fp32 per row, summed on the host). It reads the
     forward's ``den`` and ``dden = dL/dden`` per row (``triton_bwd.leap_bwd_kernel_dden``, from the
     rounded ``o``), and takes the r error's share out of dpq with the forward's ``Y``
     (``_dq_store``): dpq is the difference of two nearly equal terms, and with r from the bf16
     ``o`` alone its error reached 4.6x the plain bf16 form's at T = 1 (0.40x corrected).
(No stage recomputes ``den`` or ``do . num``: the forward's ``o`` and ``den`` are saved.)

Register budget (``benchmarks/results/triton_report_3.9.0_v6_sm90_bf16.md``: no spills at Dk = 64,
at most 170 B per thread at Dk = 128 (dq), at sm_90 bf16):

- Factored features: ``k~_s = diag(sin_k) relu(k)``, so the state update ``S_s += k~_s^T v`` is
  ``relu(k)^T (sin_k v)``: one register operand, relu(k), for both halves, the scaled values in
  shared memory. The forward's query tile likewise: ``q~_s S_s + q~_c S_c = sin_q (relu(q) S_s) +
  cos_q (relu(q) S_c)``, and the scores are one dot, ``(relu(q) relu(k)^T) * (sin_q sin_k^T + cos_q
  cos_k^T)`` (the two halves share ``relu(q) . relu(k)``): the dots run on the exact relu'd inputs.
- Sums of scaled dots, never a dot accumulating into another dot's result: Triton gives a dot whose
  result feeds another dot the ``[num_warps, 1]`` warp layout, which at 64 rows and 8 warps holds (and
  computes) each accumulator twice; independent dots get ``[4, 2]``.
- Each chunk's key-feature column sums are taken before the query tile, so the feature tiles die early.

The reverse sweep (``dk``, ``dv``, ``dpk``, ``dS0``, ``dz0``) is in ``triton_bwd.py``.

Grid: ``(sequences x query heads, value tiles)`` (``triton_chunk.sweep_grid``): B*H on axis 0,
whose CUDA limit is 2**31 - 1 (axes 1 and 2 stop at 65535).

Non-finite values: relu is ``where(x < 0, 0, x)`` (``tl.maximum`` would turn NaN into 0) and
the ``den`` clamp is a ``where`` too, so a non-finite q_t, or k, v or pk of a visible key, makes
o_t non-finite as on the other backends. A padded or out-of-range key is never loaded (masked
loads with ``other=0``: a selection, so NaN / Inf there reach no output and no state).
"""
import triton
import triton.language as tl

from .._triton_support import interpreting

HALF_PI = tl.constexpr(1.5707963267948966)


def autotune_configs():
    """num_warps / num_stages candidates; a single config under the interpreter (the
    autotuner cannot benchmark without a GPU driver). No num_warps=2: it spilled 5-34 KB per
    thread at sm_90 (``benchmarks/results/triton_report_3.9.0.md``) and ran no wgmma. No num_warps=4:
    at sm_90 bf16 it spilled more than 8 warps (2-4x, or where 8 warps spilled nothing) in every kernel
    and head size that spills (forward, backward, segment sums; ``triton_report_3.9.0_v2_sm90_bf16*.md``). No 16 warps:
    capped at 128 registers, it spilled more (fwd D=64: 0.9 KB, bwd.dkv: 2.3 KB)."""
    configs = [triton.Config({}, num_warps=8, num_stages=s) for s in (2, 1, 3)]
    return configs[:1] if interpreting() else configs


def sweep_configs():
    """The forward-order sweep's one config: 8 warps, 1 stage. At sm_90 bf16 it spilled least of
    the three stage counts in every head size and stage (forward D=64: 0 B against 86-96 B for 2-3
    stages; dq D=64: 68 against 132-148 B; ``triton_report_3.9.0_v4_sm90_bf16.md``): its loads feed
    register math (features), so deeper pipelining only holds more tiles live. One config also means
    no autotuning at the first call."""
    return [triton.Config({}, num_warps=8, num_stages=1)]


@triton.jit
def _relu(x):
    """relu that keeps NaN (``tl.maximum(x, 0.)`` returns 0 for NaN)."""
    return tl.where(x < 0., 0., x)


@triton.jit
def _clamp_den(den, eps):
    """max(den, eps) that keeps NaN."""
    return tl.where(den < eps, eps, den)


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, S, IS_VARLEN: tl.constexpr):
    """(first query row, first key row, query length, key length) of sequence i_n (int64 rows).
    Varlen offsets are clamped so that ``0 <= bos <= eos <= T`` whatever ``cu_seqlens`` holds
    (it is unchecked under torch.compile): no row outside the tensors is ever touched."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        bos = tl.minimum(tl.maximum(bos, 0), T)
        eos = tl.minimum(tl.maximum(eos, bos), T)
        Lq = (eos - bos).to(tl.int32)
        Lk = Lq
        kbos = bos
    else:
        bos = i_n.to(tl.int64) * T
        kbos = i_n.to(tl.int64) * S
        Lq = T
        Lk = S
    return bos, kbos, Lq, Lk


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """fp32-accumulating dot. DOT_MODE 0: fp32 operands at full precision (fp32 inputs, and
    bf16 under the interpreter, whose bf16 dot is wrong); 1: operands in the input dtype
    (bf16: fp32's range, so scores, states and do/den round but never overflow);
    2: fp32 operands as tf32x3 (fp16 inputs: scores, states and do/den can exceed the fp16 range,
    so they stay fp32; a single tf32 pass drops the low 13 bits of each operand and measured 2x the
    plain fp16 form's error on an H200, the 3-pass split keeps ~fp32 operands)."""
    if DOT_MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _cvt(x, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Feature tiles kept in the dot operand type: DT (half the registers) when dots run in DT."""
    if DOT_MODE == 1:
        return x.to(DT)
    else:
        return x


@triton.jit
def _load_feat(x, p, o_r, m_r, stride_x, stride_p, o_d, m_d):
    """Rows ``o_r`` (masked ``m_r``) of x (columns ``o_d``) and p -> relu(x), sin(pi/2 p),
    cos(pi/2 p) (fp32). Masked rows are not loaded: their features are exactly 0."""
    o_r64 = o_r.to(tl.int64)
    b_x = tl.load(x + o_r64[:, None] * stride_x + o_d[None, :], mask=m_r[:, None] & m_d[None, :],
                  other=0.).to(tl.float32)
    b_p = tl.load(p + o_r64 * stride_p, mask=m_r, other=0.).to(tl.float32)
    b_a = _relu(b_x)
    # cosine half as sin(pi/2 (1 - p)): exact 0 at p = 1 (fp32 cos(pi/2) is -4.4e-8)
    return b_a, tl.sin(b_p * HALF_PI), tl.sin((1. - b_p) * HALF_PI)


@triton.jit
def _key_rows(k, pk, v, kpm, kbos, i_hk, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """k, pk, v, kpm from the first key row ``kbos`` (int64) of a sequence, key/value head ``i_hk``:
    rows are then plain offsets from the sequence start."""
    return k + (kbos * HKV + i_hk) * K, pk + kbos * HKV + i_hk, v + (kbos * HKV + i_hk) * V, kpm + kbos


@triton.jit
def _query_rows_of(q, pq, bos, i_h, H: tl.constexpr, K: tl.constexpr):
    """q, pq from the first query row ``bos`` (int64) of a sequence, query head ``i_h``."""
    return q + (bos * H + i_h) * K, pq + bos * H + i_h


@triton.jit
def _grad_rows_of(do, den, dden, bos, i_h, H: tl.constexpr, V: tl.constexpr):
    """do, den, dden from the first query row ``bos`` (int64) of a sequence, query head ``i_h``."""
    return do + (bos * H + i_h) * V, den + bos * H + i_h, dden + bos * H + i_h


@triton.jit
def _key_valid(kpm, o_r, m_r, HAS_KPM: tl.constexpr):
    """In-range and not padded."""
    if HAS_KPM:
        b_pad = tl.load(kpm + o_r.to(tl.int64), mask=m_r, other=1)
        return m_r & (b_pad == 0)
    else:
        return m_r


@triton.jit
def _load_state(S, z, row, o_k, m_k, o_v, m_v, BK: tl.constexpr, BV: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, USE: tl.constexpr, load_z):
    """The fp32 state a program starts from: row ``row`` (int64) of ``S [rows, 2K, V]`` (this
    program's value tile of its sin and cos halves) and of ``z [rows, 2K]`` (where ``load_z``),
    or zeros (``USE`` False)."""
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    b_c = tl.zeros([BK, BV], dtype=tl.float32)
    b_zs = tl.zeros([BK], dtype=tl.float32)
    b_zc = tl.zeros([BK], dtype=tl.float32)
    if USE:
        p_st = S + row * (2 * K * V) + o_k[:, None] * V + o_v[None, :]
        m_st = m_k[:, None] & m_v[None, :]
        b_s += tl.load(p_st, mask=m_st, other=0.)
        b_c += tl.load(p_st + K * V, mask=m_st, other=0.)
        if load_z:
            p_z = z + row * (2 * K) + o_k
            b_zs += tl.load(p_z, mask=m_k, other=0.)
            b_zc += tl.load(p_z + K, mask=m_k, other=0.)
    return b_s, b_c, b_zs, b_zc


@triton.jit
def _store_o(o, den, b_num, b_den, o_t64, m_t, o_v, m_v, i_v, eps, H: tl.constexpr, V: tl.constexpr,
             NORMALIZE: tl.constexpr):
    """Store o rows ``o_t64`` = num / max(den, eps) (or num) and, on value tile 0, den (its first
    plane: ``den`` is ``[2, B, T, H]``)."""
    if NORMALIZE:
        b_num = b_num / _clamp_den(b_den, eps)[:, None]
        if i_v == 0:
            tl.store(den + o_t64 * H, b_den, mask=m_t)
    tl.store(o + o_t64[:, None] * (H * V) + o_v[None, :], b_num.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _dq_store(dq, dpq, den, b_a, b_u, b_w, o_t64, m_t, o_k, m_k, NTH, eps, H: tl.constexpr, K: tl.constexpr,
              FIX_R: tl.constexpr):
    """dq rows ``o_t64`` (columns o_k) = relu'(q) u and their dpq = pi/2 relu(q) . w (one fp32 per
    row), from ``u = sin dq~_s + cos dq~_c`` and ``w = cos dq~_s - sin dq~_c``.

    FIX_R (normalised): dpq as the exact ``r = dL/dden`` gives it. ``r`` comes from the forward's
    rounded ``o`` (``triton_bwd.leap_bwd_kernel_dden``), off by some ``e``; dpq, the difference of two
    nearly equal terms (through num and through den), would keep ``e``'s share ``pi/2 e Y`` with
    ``Y = d den / d(pi/2 pq)`` (saved by the forward as ``den[1]``). That share is measured here:
    the exact r makes ``q~ . dq~ = g . num + r den`` vanish, so ``q~ . dq~ = relu(q) . u = e den``,
    and ``w - (Y / den) u`` drops it (linear in u, so per key block too). Rows with the clamp
    active (``den < eps``, NaN) have r = 0: no correction."""
    if FIX_R:
        b_den = tl.load(den + o_t64 * H, mask=m_t, other=1.)
        b_y = tl.load(den + NTH + o_t64 * H, mask=m_t, other=0.)
        b_y = tl.where(b_den >= eps, b_y / _clamp_den(b_den, eps), 0.)
        b_w -= b_y[:, None] * b_u
    b_dq = tl.where(b_a > 0, b_u, 0.)
    b_dp = HALF_PI * tl.sum(b_a * b_w, 1)
    tl.store(dq + o_t64[:, None] * (H * K) + o_k[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_t[:, None] & m_k[None, :])
    tl.store(dpq + o_t64 * H, b_dp, mask=m_t)


@triton.jit
def _dq_tile(dq, dpq, b_a, b_sin, b_cos, b_dqs, b_dqc, o_t64, m_t, o_k, m_k, H: tl.constexpr, K: tl.constexpr):
    """dq~ (sin and cos halves) -> dq rows ``o_t64`` (columns o_k) and their dpq (``_dq_store``)."""
    _dq_store(dq, dpq, dpq, b_a, b_dqs * b_sin[:, None] + b_dqc * b_cos[:, None],
              b_dqs * b_cos[:, None] - b_dqc * b_sin[:, None], o_t64, m_t, o_k, m_k, 0, 0., H, K, False)


@triton.jit
def _store_state(S, z, row, b_s, b_c, b_zs, b_zc, o_k, m_k, o_v, m_v, i_v, K: tl.constexpr, V: tl.constexpr):
    """Row ``row`` (int64) of a state ``S [rows, 2K, V]`` (this program's value tile of its sin and
    cos halves) and, on value tile 0, of ``z [rows, 2K]``."""
    p_st = S + row * (2 * K * V) + o_k[:, None] * V + o_v[None, :]
    m_st = m_k[:, None] & m_v[None, :]
    tl.store(p_st, b_s, mask=m_st)
    tl.store(p_st + K * V, b_c, mask=m_st)
    if i_v == 0:
        p_z = z + row * (2 * K) + o_k
        tl.store(p_z, b_zs, mask=m_k)
        tl.store(p_z + K, b_zc, mask=m_k)


@triton.jit
def _fold_keys(k, pk, v, kpm, s0, s1, o_i, o_k, m_k, o_v, m_v, b_hs, b_hc, b_zs, b_zc,
               HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, HAS_KPM: tl.constexpr,
               DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Add the keys [s0, s1) to the state: ``S += k~^T v``, ``z += k~`` (tiles of BT rows; padded
    keys are not loaded: 0)."""
    for r0 in range(s0, s1, BT):
        o_s = r0 + o_i
        b_kv = _key_valid(kpm, o_s, o_s < s1, HAS_KPM)
        b_ak, b_sk, b_ck = _load_feat(k, pk, o_s, b_kv, HKV * K, HKV, o_k, m_k)
        b_ks = _cvt(b_ak * b_sk[:, None], DOT_MODE, DT)
        b_kc = _cvt(b_ak * b_ck[:, None], DOT_MODE, DT)
        b_v = tl.load(v + o_s.to(tl.int64)[:, None] * (HKV * V) + o_v[None, :],
                      mask=b_kv[:, None] & m_v[None, :], other=0.)
        b_hs += _dot(tl.trans(b_ks), b_v, DOT_MODE, DT)
        b_hc += _dot(tl.trans(b_kc), b_v, DOT_MODE, DT)
        b_zs += tl.sum(b_ks.to(tl.float32), 0)
        b_zc += tl.sum(b_kc.to(tl.float32), 0)
    return b_hs, b_hc, b_zs, b_zc


@triton.jit
def _grad_rows_scaled(do, den, dden, o_r, m_r, o_v, m_v, stride_do, stride_h, i_v, eps, NORMALIZE: tl.constexpr):
    """``g = dL/dnum = do / max(den, eps)`` kept factored: do (rows x value tile) as loaded, in its
    own dtype (an exact dot operand, no fp32 tile of g), and ``1 / max(den, eps)`` per row (1
    unnormalised); with r = dL/dden (rows, read from ``dden``, see
    ``triton_bwd.leap_bwd_kernel_dden``), r counted on value tile 0 only."""
    o_r64 = o_r.to(tl.int64)
    b_do = tl.load(do + o_r64[:, None] * stride_do + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.)
    if NORMALIZE:
        b_den = tl.load(den + o_r64 * stride_h, mask=m_r, other=1.)
        b_inv = 1. / _clamp_den(b_den, eps)
        b_r = tl.load(dden + o_r64 * stride_h, mask=m_r, other=0.)
        b_r = tl.where(m_r & (i_v == 0), b_r, 0.)
    else:
        b_inv = tl.full([b_do.shape[0]], 1., dtype=tl.float32)
        b_r = tl.zeros([b_do.shape[0]], dtype=tl.float32)
    return b_do, b_inv, b_r


@triton.jit
def _grad_rows(do, den, dden, o_r, m_r, o_v, m_v, stride_do, stride_h, i_v, eps, NORMALIZE: tl.constexpr):
    """g = dL/dnum = do / max(den, eps) (rows x value tile, fp32) and r = dL/dden (``_grad_rows_scaled``)."""
    b_do, b_inv, b_r = _grad_rows_scaled(do, den, dden, o_r, m_r, o_v, m_v, stride_do, stride_h, i_v, eps,
                                         NORMALIZE)
    return b_do.to(tl.float32) * b_inv[:, None], b_r


@triton.jit
def _dq_state(b_x, b_scale, b_r, b_hs, b_hc, b_zs, b_zc, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """dq~ through the state, ``g S^T + r z^T`` (sin and cos halves), with ``g = b_x * b_scale``: the
    factored g (``_grad_rows_scaled``: do and ``1 / den`` per row as a column ``[rows, 1]``), or g
    itself and the scale 1."""
    b_dqs = _dot(b_x, tl.trans(b_hs), DOT_MODE, DT) * b_scale + b_r[:, None] * b_zs[None, :]
    b_dqc = _dot(b_x, tl.trans(b_hc), DOT_MODE, DT) * b_scale + b_r[:, None] * b_zc[None, :]
    return b_dqs, b_dqc


@triton.jit
def _dq_from_state(do, den, dden, o_t, m_t, o_v, m_v, b_hs, b_hc, b_zs, b_zc, i_v, eps, H: tl.constexpr,
                   V: tl.constexpr, NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """g (fp32), r of query rows o_t (``_grad_rows``) and their dq~ through the state: ``g S^T + r z^T``
    (sin and cos halves)."""
    b_g, b_r = _grad_rows(do, den, dden, o_t, m_t, o_v, m_v, H * V, H, i_v, eps, NORMALIZE)
    b_dqs, b_dqc = _dq_state(b_g, 1., b_r, b_hs, b_hc, b_zs, b_zc, DOT_MODE, DT)
    return b_g, b_r, b_dqs, b_dqc


@triton.jit
def _query_tile(q, pq, o, do, den, dden, dq, dpq, o_t, m_t, o_k, m_k, o_v, m_v,
                b_hs, b_hc, b_zs, b_zc, b_M, b_v, b_ps, b_pc, b_akt, b_sk, b_ck, i_k, i_v, eps, NTH,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                STAGE: tl.constexpr, HAS_A: tl.constexpr, NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr,
                DT: tl.constexpr):
    """One query tile of the forward-order sweep against the exclusive state, plus (HAS_A) the
    masked intra-chunk terms against the chunk's own keys under mask b_M: relu(k)^T ``b_akt``, their
    sin / cos ``b_sk``, ``b_ck``, values ``b_v`` and a pair ``b_ps``, ``b_pc``: ``sin_k v``, ``cos_k v``
    (forward) or the key features ``k~_s``, ``k~_c`` (dq stage)."""
    b_a, b_sin, b_cos = _load_feat(q, pq, o_t, m_t, H * K, H, o_k, m_k)
    o_t64 = o_t.to(tl.int64)
    if STAGE == 0:
        # one relu(q) dot operand, the per-query sin / cos applied to the results:
        # q~_s S_s + q~_c S_c = sin_q (relu(q) S_s) + cos_q (relu(q) S_c), and the scores as one dot,
        # (relu(q) relu(k)^T) * (sin_q sin_k^T + cos_q cos_k^T), whose value term
        # ((.) * M) v = sin_q (R (sin_k v)) + cos_q (R (cos_k v)) with R = (relu(q) relu(k)^T) * M
        # (b_ps, b_pc: sin_k v, cos_k v); each term a scaled dot (none accumulates into another's result)
        b_ds = tl.sum(b_a * b_zs[None, :], 1)
        b_dc = tl.sum(b_a * b_zc[None, :], 1)
        b_aq = _cvt(b_a, DOT_MODE, DT)
        if HAS_A:
            b_R = tl.where(b_M, _dot(b_aq, b_akt, DOT_MODE, DT), 0.)
            b_ds += tl.sum(b_R * b_sk[None, :], 1)
            b_dc += tl.sum(b_R * b_ck[None, :], 1)
        b_den = b_sin * b_ds + b_cos * b_dc
        # den's derivative Y = d den / d(pi/2 pq) for the backward's r correction (_dq_store), in
        # den's second plane, stored before the value dots so that b_ds, b_dc die here (sm_90 bf16
        # D=64: 0 B of spills, 228 registers; 32 B when Y was stored with o)
        if NORMALIZE and i_v == 0:
            tl.store(den + NTH + o_t64 * H, b_cos * b_ds - b_sin * b_dc, mask=m_t)
        b_num = b_sin[:, None] * _dot(b_aq, b_hs, DOT_MODE, DT) + b_cos[:, None] * _dot(b_aq, b_hc, DOT_MODE, DT)
        if HAS_A:
            b_Rc = _cvt(b_R, DOT_MODE, DT)
            b_num += b_sin[:, None] * _dot(b_Rc, b_ps, DOT_MODE, DT) + b_cos[:, None] * _dot(b_Rc, b_pc, DOT_MODE, DT)
        _store_o(o, den, b_num, b_den, o_t64, m_t, o_v, m_v, i_v, eps, H, V, NORMALIZE)
    else:
        # dq~ = g S^T + r z^T (+ ((g v^T + r) * M) k~ within the chunk). With more value columns
        # than key columns (Dk = 128: key blocks of 32, all 128 value columns) g = do / den stays
        # factored: do is the dot operand, 1 / den scales the (narrower) results' rows, and no fp32
        # g tile is held (sm_90 bf16, dq D=128: 84 B of spills against 216 B; at D=64 the plain g: 0 B
        # against 40 B)
        if BV > BK:
            b_do, b_inv, b_r = _grad_rows_scaled(do, den, dden, o_t, m_t, o_v, m_v, H * V, H, i_v, eps,
                                                 NORMALIZE)
            b_dqs, b_dqc = _dq_state(b_do, b_inv[:, None], b_r, b_hs, b_hc, b_zs, b_zc, DOT_MODE, DT)
            if HAS_A:
                b_dA = tl.where(b_M, _dot(b_do, tl.trans(b_v), DOT_MODE, DT) * b_inv[:, None] + b_r[:, None], 0.)
        else:
            b_g, b_r, b_dqs, b_dqc = _dq_from_state(do, den, dden, o_t, m_t, o_v, m_v, b_hs, b_hc, b_zs, b_zc,
                                                    i_v, eps, H, V, NORMALIZE, DOT_MODE, DT)
            if HAS_A:
                b_dA = tl.where(b_M, _dot(b_g, tl.trans(b_v), DOT_MODE, DT) + b_r[:, None], 0.)
        # u = sin dq~_s + cos dq~_c, w = cos dq~_s - sin dq~_c, each term a scaled dot (none
        # accumulates into another dot's result: no chained [8,1]-warp accumulators)
        b_u = b_sin[:, None] * b_dqs + b_cos[:, None] * b_dqc
        b_w = b_cos[:, None] * b_dqs - b_sin[:, None] * b_dqc
        if HAS_A:
            b_is = _dot(b_dA, b_ps, DOT_MODE, DT)
            b_ic = _dot(b_dA, b_pc, DOT_MODE, DT)
            b_u += b_sin[:, None] * b_is + b_cos[:, None] * b_ic
            b_w += b_cos[:, None] * b_is - b_sin[:, None] * b_ic
        # complete dq rows for this program's key columns o_k (all value columns are here);
        # dpq sums over every key column: one partial per key block (i_k), summed on the host
        _dq_store(dq, dpq + i_k * NTH, den, b_a, b_u, b_w, o_t64, m_t, o_k, m_k, NTH, eps, H, K, NORMALIZE)


@triton.jit
def _query_rows(q, pq, o, do, den, dden, dq, dpq, t0, t1, o_i, o_k, m_k, o_v, m_v,
                b_hs, b_hc, b_zs, b_zc, i_k, i_v, eps, NTH,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, STAGE: tl.constexpr,
                NORMALIZE: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr):
    """Query rows [t0, t1) in tiles of BT, all reading the same (inclusive) state: no intra-chunk
    scores."""
    b_M = o_i[:, None] >= 0  # unused without intra-chunk scores
    for r0 in range(t0, t1, BT):
        o_t = r0 + o_i
        _query_tile(q, pq, o, do, den, dden, dq, dpq, o_t, o_t < t1, o_k, m_k, o_v, m_v,
                    b_hs, b_hc, b_zs, b_zc, b_M, b_hs, b_hs, b_hs, b_hs, b_zs, b_zs, i_k, i_v, eps, NTH,
                    H, K, V, BK, BV, STAGE, False, NORMALIZE, DOT_MODE, DT)


@triton.autotune(configs=sweep_configs(),
                 key=['H', 'G', 'K', 'V', 'BT', 'BK', 'BV', 'STAGE', 'INTRA', 'IS_VARLEN', 'HAS_KPM',
                      'USE_S0', 'STORE_STATE', 'NORMALIZE', 'SEGMENTED', 'SPLIT_K', 'DOT_MODE'])
@triton.jit(do_not_specialize=['T', 'S', 'W', 'CL', 'L', 'NTH', 'eps'])
def leap_fwd_kernel_sweep(
    q, k, v, pq, pk, kpm, cu_seqlens, S0, z0,
    o, Sf, zf,
    do, den, dden, dq, dpq,
    T, S, W, CL, L, NTH, eps,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    STAGE: tl.constexpr, INTRA: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    USE_S0: tl.constexpr, STORE_STATE: tl.constexpr, NORMALIZE: tl.constexpr,
    SEGMENTED: tl.constexpr, DOT_MODE: tl.constexpr, DT: tl.constexpr, SPLIT_K: tl.constexpr = False,
):
    i_nh, i_b, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if SPLIT_K:  # axis 1 = key block (BK of the K columns, all V in one tile: STAGE 2's dq)
        i_k = i_b
        i_v = i_b * 0
    else:  # axis 1 = value tile (BK covers every key column)
        i_k = i_b * 0
        i_v = i_b
    i_n, i_h = i_nh // H, i_nh % H
    HKV: tl.constexpr = H // G
    i_hk = i_h // G
    bos, kbos, Lq, Lk = _seq_bounds(cu_seqlens, i_n, T, S, IS_VARLEN)
    # per-(sequence, head) base pointers; rows are then plain offsets from the sequence start
    q, pq = _query_rows_of(q, pq, bos, i_h, H, K)
    k, pk, v, kpm = _key_rows(k, pk, v, kpm, kbos, i_hk, HKV, K, V)
    o += (bos * H + i_h) * V
    do, den, dden = _grad_rows_of(do, den, dden, bos, i_h, H, V)
    dq += (bos * H + i_h) * K
    dpq += bos * H + i_h

    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # the state this program starts from: S0 row i_nh, or (SEGMENTED 1) the exclusive prefix state
    # of segment i_s, row i_nh * (number of segments) + i_s, or (SEGMENTED 2) the whole state
    st_row = i_nh.to(tl.int64)
    if SEGMENTED == 1:
        st_row = st_row * tl.num_programs(2) + i_s
    b_hs, b_hc, b_zs, b_zc = _load_state(S0, z0, st_row, o_k, m_k, o_v, m_v, BK, BV, K, V, USE_S0, True)

    o_i = tl.arange(0, BT)
    q0 = i_s * L  # this program's query rows: [q0, q1) (one segment; L >= T unsegmented)
    q1 = tl.minimum(q0 + L, Lq)
    if INTRA:
        b_M = (o_i[:, None] // W) >= (o_i[None, :] // W)
        for c0 in range(q0, q1, CL):
            o_t = c0 + o_i
            m_t = (o_i < CL) & (o_t < q1)
            b_kv = _key_valid(kpm, o_t, m_t, HAS_KPM)  # padded keys are not loaded: 0
            b_ak, b_sk, b_ck = _load_feat(k, pk, o_t, b_kv, HKV * K, HKV, o_k, m_k)
            # this chunk's keys as the state update reads them: relu(k)^T, sin_k v, cos_k v, and the
            # feature column sums, taken now so that the feature tiles die here (sin_k v, cos_k v:
            # the forward's before the query tile, which reads them at Dk = 128; the dq stage's after
            # it, where they spilled less)
            if STAGE == 0:  # the forward's query tile reads relu(k), sin_k v, cos_k v
                b_dzs = tl.sum(b_ak * b_sk[:, None], 0)
                b_dzc = tl.sum(b_ak * b_ck[:, None], 0)
            else:  # the dq stage's: the key features k~_s, k~_c
                b_ps = _cvt(b_ak * b_sk[:, None], DOT_MODE, DT)
                b_pc = _cvt(b_ak * b_ck[:, None], DOT_MODE, DT)
                b_dzs = tl.sum(b_ps.to(tl.float32), 0)
                b_dzc = tl.sum(b_pc.to(tl.float32), 0)
            b_akt = tl.trans(_cvt(b_ak, DOT_MODE, DT))
            o_t64 = o_t.to(tl.int64)
            b_v = tl.load(v + o_t64[:, None] * (HKV * V) + o_v[None, :], mask=b_kv[:, None] & m_v[None, :],
                          other=0.)
            if STAGE == 0:
                b_vf = b_v.to(tl.float32)
                b_vs = _cvt(b_vf * b_sk[:, None], DOT_MODE, DT)
                b_vc = _cvt(b_vf * b_ck[:, None], DOT_MODE, DT)
                b_ps = b_vs
                b_pc = b_vc
            _query_tile(q, pq, o, do, den, dden, dq, dpq, o_t, m_t, o_k, m_k, o_v, m_v,
                        b_hs, b_hc, b_zs, b_zc, b_M, b_v, b_ps, b_pc, b_akt, b_sk, b_ck, i_k, i_v, eps, NTH,
                        H, K, V, BK, BV, STAGE, True, NORMALIZE, DOT_MODE, DT)
            if STAGE == 0:
                b_hs += _dot(b_akt, b_vs, DOT_MODE, DT)
                b_hc += _dot(b_akt, b_vc, DOT_MODE, DT)
            else:  # each scaled value tile made just before its dot (fewer live tiles: 68 B against 124 B)
                b_vf = b_v.to(tl.float32)
                b_hs += _dot(b_akt, _cvt(b_vf * b_sk[:, None], DOT_MODE, DT), DOT_MODE, DT)
                b_hc += _dot(b_akt, _cvt(b_vf * b_ck[:, None], DOT_MODE, DT), DOT_MODE, DT)
            b_zs += b_dzs
            b_zc += b_dzc
    elif SEGMENTED == 2:  # one block holds every key: S0 is the whole state; queries [q0, q1) read it
        _query_rows(q, pq, o, do, den, dden, dq, dpq, q0, q1, o_i, o_k, m_k, o_v, m_v,
                    b_hs, b_hc, b_zs, b_zc, i_k, i_v, eps, NTH, H, K, V, BT, BK, BV, STAGE, NORMALIZE, DOT_MODE, DT)
    else:
        # whole blocks [b0, b0 + W) from q0 (a multiple of W when segmented) to the segment's end
        b_end = tl.minimum(q0 + L, tl.maximum(Lq, Lk))
        for b0 in range(q0, b_end, W):
            b_hs, b_hc, b_zs, b_zc = _fold_keys(k, pk, v, kpm, b0, tl.minimum(b0 + W, Lk), o_i, o_k, m_k, o_v, m_v,
                                                b_hs, b_hc, b_zs, b_zc, HKV, K, V, BT, HAS_KPM, DOT_MODE, DT)
            _query_rows(q, pq, o, do, den, dden, dq, dpq, b0, tl.minimum(b0 + W, Lq), o_i, o_k, m_k, o_v, m_v,
                        b_hs, b_hc, b_zs, b_zc, i_k, i_v, eps, NTH, H, K, V, BT, BK, BV, STAGE, NORMALIZE, DOT_MODE, DT)
    if STORE_STATE:
        _store_state(Sf, zf, i_nh.to(tl.int64), b_hs, b_hc, b_zs, b_zc, o_k, m_k, o_v, m_v, i_v, K, V)

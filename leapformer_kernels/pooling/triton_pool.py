"""Window-pooling kernels of the ``triton`` backend (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Implements the kernel interface of ``pooling/op.py``:

    pool_fwd(x, windows, reduce, need_argmax) -> (pooled [B, T, W, D], valid [B, T, W] bool, argmax or None)
    pool_bwd(grad [B, T, W, D], T, windows, reduce, argmax) -> dx [B, T, D]
    argmax_dtype(windows) -> torch.int16 or torch.int32

sum / mean: ``_prefix_kernel`` reads x once (one program per (b, D-block), T-blocks in sequence
with the prefix carried across them) and writes a blocked two-level prefix: Q, the float32
inclusive prefix inside each block of ``PBT`` rows, and Cr, the float64 carry of every block. A
window sum is then ``(Cr[h] - Cr[l]) + (Q[h] - Q[l])``, combined in float64 and rounded once
(then / count for mean): the error of a float32 sum of one block at any T, O(T * D) per window
whatever its length. Overflow: a float32 in-block prefix of x = 1e37 reached inf after 34 rows
(NaN even for the window (0, 0)), so a block whose largest |value| exceeds ``BIG`` = 2^120 is
summed scaled by 2^-8 (exact: a power of two), with the factor kept per (block, column) in S:
no in-block partial sum can then exceed 2^127, and blocks of ordinary data are summed exactly
as before. ``_sum_out_kernel`` tiles (T-block, D-block) and writes every window. The backward
is the same operation on the gradient over the reversed windows (-b, -a), summed over windows
(``_sum_bwd_kernel``; mean scales the gradient by 1 / count in the prefix pass).
max: a sparse table over the extended axis p in [-T, T): level j holds the first maximum of x
over [p, p + 2^j) clipped to [0, T) with its index, built level by level by an elementwise
kernel (``_st_level_kernel``, O(T * D) per level, log2 of the longest window levels, shared
by every window); ``_max_out_kernel`` answers window (a, b) of length L at level
floor(log2 L) as the first maximum of two overlapping halves, O(T * D) per window, and stores
the argmax as an offset from the window's clipped start (int16 where the longest window fits,
else int32; -1 for a wholly-outside window). The backward is deterministic and atomic-free:
for one (w, d) column the argmax of consecutive t is non-decreasing, so the t that send their
gradient to a row s form one run [st, en]; ``_max_runs_kernel`` records each run at its row
(every row written at most once) and ``_max_bwd_kernel`` gathers the run sums from the blocked
prefix of the gradient. (No ``tl.associative_scan`` with a custom combine: the interpreter runs
those element by element.) The order of the max puts NaN above every number: a window holding
NaN gives NaN, as ``torch.amax``, and its argmax (which takes the gradient) is its first NaN.

Launch grids (``pool_grid``): every kernel runs one program per (b, row-block, column-block)
tile, all on grid axis 0 (2^31 - 1 programs), decoded by ``_tile_ids``: CUDA limits axes 1 and 2
to 65535, which B, T-blocks or D-blocks (W * D columns in the backward) can exceed.
"""
import os

import torch
import triton
import triton.language as tl

from .naive import clamp_windows

PBT = 128  # rows per prefix block (the precision unit of the two-level prefix)
SEQ_BD = 64  # columns per program of the prefix kernel (T-blocks in sequence)
OUT_BD = 64  # columns per program of the tiled kernels
# rows per program of the tiled kernels: the interpreter pays per program and per op, not per
# element, so it gets bigger tiles (still several per sequence at T = 1000: multi-tile paths run)
OUT_BT = 256 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 64

# In-block overflow guard of the sum prefix: blocks whose largest |value| exceeds BIG are summed
# times SCALE (a power of two: exact), so every partial sum of a block stays below
# PBT * max(BIG, FLT_MAX * SCALE) = 2^127 < FLT_MAX (with a 2x margin for rounding).
assert PBT <= 128
BIG = tl.constexpr(2.0 ** 120)
SCALE = tl.constexpr(2.0 ** -8)

AXIS0_MAX = 2 ** 31 - 1  # CUDA grid limits: x, and y / z
AXIS12_MAX = 65535


def pool_grid(B, rows, cols, block_rows, block_cols):
    """The launch grid of a pooling kernel: one program per (b, row-block, column-block) tile,
    all on axis 0 (``_tile_ids`` decodes them; column blocks vary fastest), axes 1 and 2 = 1."""
    n = B * triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols)
    if n > AXIS0_MAX:
        raise ValueError(f"window_pool: {n} tiles of {block_rows} x {block_cols} for B={B}, {rows} rows, "
                         f"{cols} columns exceed the {AXIS0_MAX} programs of a CUDA grid")
    return (n, 1, 1)


@triton.jit
def _tile_ids(ROWS, COLS, BR: tl.constexpr, BC: tl.constexpr):
    """(b as int64, row-block, column-block) of this program in a ``pool_grid`` launch."""
    pid = tl.program_id(0)
    nc = tl.cdiv(COLS, BC)
    nr = tl.cdiv(ROWS, BR)
    rest = pid // nc
    return (rest // nr).to(tl.int64), rest % nr, pid % nc


def argmax_dtype(windows):
    """int16 offsets within the window where the longest window fits, else int32."""
    return torch.int16 if max(int(b) - int(a) for a, b in windows) <= 32767 else torch.int32


def _win_tensor(wins, device):
    return torch.tensor([v for w in wins for v in w], dtype=torch.int32, device=device)


def _valid(wins, B, T, device):
    t = torch.arange(T, device=device)[:, None]
    a = torch.tensor([w[0] for w in wins], device=device)[None, :]
    b = torch.tensor([w[1] for w in wins], device=device)[None, :]
    v = (t + a >= 0) & (t + b < T)
    return v[None].expand(B, T, len(wins)).contiguous()


# ----------------------------------------------------------------------------- sum / mean
@triton.jit
def _prefix_kernel(y_ptr, q_ptr, c_ptr, s_ptr, win_ptr, T, NCOL, D, stride_yb, stride_yt, NBLK,
                   MEAN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Q[b, t, c] = sum y[b, blk*BT .. t, c] / S[b, blk, c] (float32), Cr[b, k, c] = sum y[b, 0 .. k*BT-1, c]
    (float64), S[b, k, c] = 1 / SCALE where block k of column c holds a |value| above BIG, else 1.

    With MEAN, column c belongs to window c // D and row t is scaled by 1 / count(t, window).
    """
    pid_b, _, pid_c = _tile_ids(1, NCOL, 1, BD)
    cols = pid_c * BD + tl.arange(0, BD)
    cmask = cols < NCOL
    rows0 = tl.arange(0, BT)
    if MEAN:
        w = cols // D
        wa = tl.load(win_ptr + 2 * w, mask=cmask, other=0)
        wb = tl.load(win_ptr + 2 * w + 1, mask=cmask, other=0)
    carry = tl.zeros([BD], dtype=tl.float64)
    y_base = y_ptr + pid_b * stride_yb
    q_base = q_ptr + pid_b * T * NCOL
    c_base = c_ptr + pid_b * NBLK * NCOL
    s_base = s_ptr + pid_b * NBLK * NCOL
    for k in range(NBLK):
        rows = k * BT + rows0
        m = (rows < T)[:, None] & cmask[None, :]
        v = tl.load(y_base + rows[:, None] * stride_yt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if MEAN:
            lo = tl.minimum(tl.maximum(rows[:, None] + wa[None, :], 0), T)
            hi = tl.minimum(tl.maximum(rows[:, None] + wb[None, :] + 1, 0), T)
            cnt = tl.maximum(hi - lo, 1)
            v = v / cnt.to(tl.float32)
        sc = tl.where(tl.max(tl.abs(v), axis=0) > BIG, SCALE, 1.0)  # [BD]: overflow guard
        v = v * sc[None, :]
        cs = tl.cumsum(v, axis=0)
        tl.store(q_base + rows[:, None] * NCOL + cols[None, :], cs, mask=m)
        tl.store(c_base + k * NCOL + cols, carry, mask=cmask)
        tl.store(s_base + k * NCOL + cols, 1.0 / sc, mask=cmask)
        carry += tl.sum(v, axis=0).to(tl.float64) / sc.to(tl.float64)


@triton.jit
def _prefix_at(q_base, c_base, s_base, i, cols, m, NCOL, BT: tl.constexpr):
    """sum y[0 .. i-1] split as (carry, in-block part), both float64; 0 for i == 0.
    i: row indices [BT, 1] or [BT, BD]; cols: [1, BD] column indices; m: mask."""
    has = (i > 0) & m
    r = tl.maximum(i - 1, 0)
    q = tl.load(q_base + r * NCOL + cols, mask=has, other=0.0)
    c = tl.load(c_base + (r // BT) * NCOL + cols, mask=has, other=0.0)
    s = tl.load(s_base + (r // BT) * NCOL + cols, mask=has, other=1.0)
    return c, q.to(tl.float64) * s.to(tl.float64)


@triton.jit
def _range_sum(q_base, c_base, s_base, lo, hi, cols, m, NCOL, BT: tl.constexpr):
    """sum y[lo .. hi-1] per element (float64: no overflow for any float32 data), from the blocked prefix."""
    ch, qh = _prefix_at(q_base, c_base, s_base, hi, cols, m, NCOL, BT)
    cl, ql = _prefix_at(q_base, c_base, s_base, lo, cols, m, NCOL, BT)
    return (ch - cl) + (qh - ql)


@triton.jit
def _sum_out_kernel(q_ptr, c_ptr, s_ptr, win_ptr, out_ptr, T, D, W, NBLK,
                    MEAN: tl.constexpr, PB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid_b, pid_t, pid_d = _tile_ids(T, D, BT, BD)
    t = pid_t * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    tmask = t < T
    cmask = cols < D
    q_base = q_ptr + pid_b * T * D
    c_base = c_ptr + pid_b * NBLK * D
    s_base = s_ptr + pid_b * NBLK * D
    o_base = out_ptr + pid_b * T * W * D
    for w in range(W):
        a = tl.load(win_ptr + 2 * w)
        b = tl.load(win_ptr + 2 * w + 1)
        lo = tl.minimum(tl.maximum(t + a, 0), T)
        hi = tl.maximum(tl.minimum(tl.maximum(t + b + 1, 0), T), lo)
        val = _range_sum(q_base, c_base, s_base, lo[:, None], hi[:, None], cols[None, :],
                         tmask[:, None] & cmask[None, :], D, PB)
        if MEAN:
            val = val / tl.maximum(hi - lo, 1).to(tl.float64)[:, None]
        tl.store(o_base + (t[:, None] * W + w) * D + cols[None, :], val.to(tl.float32).to(out_ptr.dtype.element_ty),
                 mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _sum_bwd_kernel(q_ptr, c_ptr, s_ptr, win_ptr, dx_ptr, T, D, W, NBLK,
                    PB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dx[s] = sum_w sum_{t in [s-b, s-a]} g'[t, w] from the prefix of g' [B, T, W*D]."""
    pid_b, pid_t, pid_d = _tile_ids(T, D, BT, BD)
    s = pid_t * BT + tl.arange(0, BT)
    d = pid_d * BD + tl.arange(0, BD)
    smask = s < T
    dmask = d < D
    NCOL = W * D
    q_base = q_ptr + pid_b * T * NCOL
    c_base = c_ptr + pid_b * NBLK * NCOL
    s_base = s_ptr + pid_b * NBLK * NCOL
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for w in range(W):
        a = tl.load(win_ptr + 2 * w)
        b = tl.load(win_ptr + 2 * w + 1)
        lo = tl.minimum(tl.maximum(s - b, 0), T)
        hi = tl.maximum(tl.minimum(tl.maximum(s - a + 1, 0), T), lo)
        acc += _range_sum(q_base, c_base, s_base, lo[:, None], hi[:, None], (w * D + d)[None, :],
                          smask[:, None] & dmask[None, :], NCOL, PB).to(tl.float32)
    tl.store(dx_ptr + pid_b * T * D + s[:, None] * D + d[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=smask[:, None] & dmask[None, :])


def _prefix(y3, ncol, T, wins_t, D, mean):
    """Blocked prefix of y3 (a [B, T, ncol] view with unit column stride): Q, Cr, S, NBLK."""
    B = y3.shape[0]
    nblk = triton.cdiv(T, PBT)
    q = torch.empty((B, T, ncol), dtype=torch.float32, device=y3.device)
    c = torch.empty((B, nblk, ncol), dtype=torch.float64, device=y3.device)
    s = torch.empty((B, nblk, ncol), dtype=torch.float32, device=y3.device)
    _prefix_kernel[pool_grid(B, 1, ncol, 1, SEQ_BD)](y3, q, c, s, wins_t, T, ncol, D, y3.stride(0), y3.stride(1),
                                                     nblk, MEAN=mean, BT=PBT, BD=SEQ_BD)
    return q, c, s, nblk


# ----------------------------------------------------------------------------- max
# Sparse table over the extended axis p in [-T, T) (row r = p + T): M_j[p] = first max of
# x over [p, p + 2^j) clipped to [0, T), with its index (-1 when that range is empty).
@triton.jit
def _st_init_kernel(x_ptr, mv_ptr, mi_ptr, T, D, BT: tl.constexpr, BD: tl.constexpr):
    pid_b, pid_r, pid_d = _tile_ids(2 * T, D, BT, BD)
    r = pid_r * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    p = r - T
    cmask = cols < D
    inside = (p >= 0) & (r < 2 * T)
    v = tl.load(x_ptr + pid_b * T * D + tl.maximum(p, 0)[:, None] * D + cols[None, :],
                mask=inside[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
    idx = tl.where(inside, p, -1)[:, None] + tl.zeros([BT, BD], dtype=tl.int32)
    m = (r < 2 * T)[:, None] & cmask[None, :]
    o = pid_b * 2 * T * D + r[:, None] * D + cols[None, :]
    tl.store(mv_ptr + o, v, mask=m)
    tl.store(mi_ptr + o, idx, mask=m)


@triton.jit
def _st_level_kernel(sv_ptr, si_ptr, dv_ptr, di_ptr, T, D, H, BT: tl.constexpr, BD: tl.constexpr):
    """M_j[p] = first max of (M_{j-1}[p], M_{j-1}[p + H]), H = 2^(j-1); NaN ranks above every number;
    ties (NaN with NaN included) keep the left (lower) index."""
    pid_b, pid_r, pid_d = _tile_ids(2 * T, D, BT, BD)
    r = pid_r * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    cmask = cols < D
    m = (r < 2 * T)[:, None] & cmask[None, :]
    mr = (r + H < 2 * T)[:, None] & cmask[None, :]
    base = pid_b * 2 * T * D
    o = base + r[:, None] * D + cols[None, :]
    vl = tl.load(sv_ptr + o, mask=m, other=float("-inf"))
    il = tl.load(si_ptr + o, mask=m, other=-1)
    vr = tl.load(sv_ptr + o + H * D, mask=mr, other=float("-inf"))
    ir = tl.load(si_ptr + o + H * D, mask=mr, other=-1)
    take_r = (ir >= 0) & ((il < 0) | (vr > vl) | ((vr != vr) & (vl == vl)))
    tl.store(dv_ptr + o, tl.where(take_r, vr, vl), mask=m)
    tl.store(di_ptr + o, tl.where(take_r, ir, il), mask=m)


@triton.jit
def _max_out_kernel(mv_ptr, mi_ptr, out_ptr, arg_ptr, T, D, W, w, a, b, H,
                    BT: tl.constexpr, BD: tl.constexpr, STORE_ARG: tl.constexpr):
    """Window (a, b) of length L, H = 2^floor(log2 L): max over [t+a, t+b] = first max of
    M[t+a] and M[t+b-H+1] (NaN above every number, ties to the lower index); the argmax is stored
    as an offset from the clipped start."""
    pid_b, pid_t, pid_d = _tile_ids(T, D, BT, BD)
    t = pid_t * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    tmask = t < T
    cmask = cols < D
    m = tmask[:, None] & cmask[None, :]
    p1 = t + a
    p2 = t + b - H + 1
    base = pid_b * 2 * T * D
    m1 = m & (p1 < T)[:, None]
    m2 = m & (p2 < T)[:, None]
    o1 = base + (tl.minimum(p1, T - 1) + T)[:, None] * D + cols[None, :]
    o2 = base + (tl.minimum(p2, T - 1) + T)[:, None] * D + cols[None, :]
    v1 = tl.load(mv_ptr + o1, mask=m1, other=float("-inf"))
    i1 = tl.load(mi_ptr + o1, mask=m1, other=-1)
    v2 = tl.load(mv_ptr + o2, mask=m2, other=float("-inf"))
    i2 = tl.load(mi_ptr + o2, mask=m2, other=-1)
    nan1 = v1 != v1
    nan2 = v2 != v2
    gt = (v2 > v1) | (nan2 & (v1 == v1))
    eq = (v2 == v1) | (nan1 & nan2)
    take2 = (i2 >= 0) & ((i1 < 0) | gt | (eq & (i2 < i1)))
    val = tl.where(take2, v2, v1)
    idx = tl.where(take2, i2, i1)
    empty = idx < 0
    off = tl.where(empty, -1, idx - tl.maximum(p1, 0)[:, None])
    val = tl.where(empty, 0.0, val)
    o = (pid_b * T * W + t[:, None] * W + w) * D + cols[None, :]
    tl.store(out_ptr + o, val.to(out_ptr.dtype.element_ty), mask=m)
    if STORE_ARG:
        tl.store(arg_ptr + o, off.to(arg_ptr.dtype.element_ty), mask=m)


@triton.jit
def _argkey(arg_ptr, o, t, a, T, m):
    """Absolute argmax index of window (a, .) at rows t (-1: wholly outside or masked)."""
    off = tl.load(arg_ptr + o, mask=m, other=-1).to(tl.int32)
    return tl.where(off >= 0, tl.minimum(tl.maximum(t + a, 0), T)[:, None] + off, -1)


@triton.jit
def _max_runs_kernel(arg_ptr, win_ptr, st_ptr, en_ptr, T, D, W, BT: tl.constexpr, BD: tl.constexpr):
    """For one (w, d) column the argmax of consecutive t is non-decreasing, so the t sending their
    gradient to a row s form one run [st, en]: record it at row s (each row is written once)."""
    pid_b, pid_t, pid_d = _tile_ids(T, D, BT, BD)
    t = pid_t * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    cmask = cols < D
    m = (t < T)[:, None] & cmask[None, :]
    mp = m & (t >= 1)[:, None]
    mn = m & (t + 1 < T)[:, None]
    base = pid_b * T * W * D
    tt = t[:, None] + tl.zeros([BT, BD], dtype=tl.int32)
    for w in range(W):
        a = tl.load(win_ptr + 2 * w)
        o = base + (t[:, None] * W + w) * D + cols[None, :]
        key = _argkey(arg_ptr, o, t, a, T, m)
        key_p = _argkey(arg_ptr, o - W * D, t - 1, a, T, mp)
        key_n = _argkey(arg_ptr, o + W * D, t + 1, a, T, mn)
        dst = base + (tl.maximum(key, 0) * W + w) * D + cols[None, :]
        has = m & (key >= 0)
        tl.store(st_ptr + dst, tt, mask=has & (key != key_p))
        tl.store(en_ptr + dst, tt, mask=has & (key != key_n))


@triton.jit
def _max_bwd_kernel(q_ptr, c_ptr, s_ptr, st_ptr, en_ptr, dx_ptr, T, D, W, NBLK,
                    PB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dx[s] = sum_w (sum of grad[t, w] over the run [st, en] recorded at s), from the prefix of grad."""
    pid_b, pid_t, pid_d = _tile_ids(T, D, BT, BD)
    s = pid_t * BT + tl.arange(0, BT)
    d = pid_d * BD + tl.arange(0, BD)
    m = (s < T)[:, None] & (d < D)[None, :]
    NCOL = W * D
    q_base = q_ptr + pid_b * T * NCOL
    c_base = c_ptr + pid_b * NBLK * NCOL
    s_base = s_ptr + pid_b * NBLK * NCOL
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for w in range(W):
        o = pid_b * T * NCOL + (s[:, None] * W + w) * D + d[None, :]
        st = tl.load(st_ptr + o, mask=m, other=-1)
        en = tl.load(en_ptr + o, mask=m, other=-1)
        has = m & (st >= 0)
        lo = tl.maximum(st, 0)
        hi = tl.maximum(en + 1, lo)
        v = _range_sum(q_base, c_base, s_base, lo, hi, (w * D + d)[None, :], has, NCOL, PB).to(tl.float32)
        acc += tl.where(has, v, 0.0)
    tl.store(dx_ptr + pid_b * T * D + s[:, None] * D + d[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- interface
def pool_fwd(x, windows, reduce, need_argmax=True):
    x = x.contiguous()
    B, T, D = x.shape
    wins = clamp_windows(windows, T)
    W = len(wins)
    wins_t = _win_tensor(wins, x.device)
    valid = _valid(wins, B, T, x.device)
    out = torch.empty((B, T, W, D), dtype=x.dtype, device=x.device)
    grid_out = pool_grid(B, T, D, OUT_BT, OUT_BD)
    if reduce in ("sum", "mean"):
        q, c, s, nblk = _prefix(x, D, T, wins_t, D, False)
        _sum_out_kernel[grid_out](q, c, s, wins_t, out, T, D, W, nblk, MEAN=reduce == "mean", PB=PBT,
                                  BT=OUT_BT, BD=OUT_BD)
        return out, valid, None
    arg = torch.empty((B, T, W, D) if need_argmax else (0,), dtype=argmax_dtype(windows), device=x.device)
    # windows by sparse-table level floor(log2 L) (L <= 2T + 1 after clamping)
    levels = [(b - a + 1).bit_length() - 1 for a, b in wins]
    grid_st = pool_grid(B, 2 * T, D, OUT_BT, OUT_BD)
    bufs = [(torch.empty((B, 2 * T, D), dtype=torch.float32, device=x.device),
             torch.empty((B, 2 * T, D), dtype=torch.int32, device=x.device)) for _ in range(2 if max(levels) else 1)]
    _st_init_kernel[grid_st](x, bufs[0][0], bufs[0][1], T, D, BT=OUT_BT, BD=OUT_BD)
    for j in range(max(levels) + 1):
        cur = bufs[j % 2]
        if j > 0:
            prev = bufs[(j - 1) % 2]
            _st_level_kernel[grid_st](prev[0], prev[1], cur[0], cur[1], T, D, 1 << (j - 1), BT=OUT_BT, BD=OUT_BD)
        for w, (a, b) in enumerate(wins):
            if levels[w] == j:
                _max_out_kernel[grid_out](cur[0], cur[1], out, arg, T, D, W, w, a, b, 1 << j, BT=OUT_BT, BD=OUT_BD,
                                          STORE_ARG=need_argmax)
    return out, valid, (arg if need_argmax else None)


def pool_bwd(grad, T, windows, reduce, argmax):
    grad = grad.contiguous()
    B, _, W, D = grad.shape
    wins = clamp_windows(windows, T)
    wins_t = _win_tensor(wins, grad.device)
    if reduce in ("sum", "mean"):
        g3 = grad.view(B, T, W * D)
        q, c, s, nblk = _prefix(g3, W * D, T, wins_t, D, reduce == "mean")
        dx = torch.empty((B, T, D), dtype=grad.dtype, device=grad.device)
        grid = pool_grid(B, T, D, OUT_BT, OUT_BD)
        _sum_bwd_kernel[grid](q, c, s, wins_t, dx, T, D, W, nblk, PB=PBT, BT=OUT_BT, BD=OUT_BD)
        return dx
    if argmax is None:
        raise ValueError("argmax is required for the max backward")
    argmax = argmax.contiguous()
    st = torch.full((B, T, W, D), -1, dtype=torch.int32, device=grad.device)
    en = torch.full((B, T, W, D), -1, dtype=torch.int32, device=grad.device)
    grid = pool_grid(B, T, D, OUT_BT, OUT_BD)
    _max_runs_kernel[grid](argmax, wins_t, st, en, T, D, W, BT=OUT_BT, BD=OUT_BD)
    q, c, s, nblk = _prefix(grad.view(B, T, W * D), W * D, T, wins_t, D, False)
    dx = torch.empty((B, T, D), dtype=grad.dtype, device=grad.device)
    _max_bwd_kernel[grid](q, c, s, st, en, dx, T, D, W, nblk, PB=PBT, BT=OUT_BT, BD=OUT_BD)
    return dx

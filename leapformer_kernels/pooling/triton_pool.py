"""Window-pooling kernels of the ``triton`` backend (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Implements the kernel interface of ``pooling/op.py``:

    fwd(x, windows, reduce, with_argmax) -> (pooled [B, T, NW, D], valid [B, T, NW] bool, argmax or None)
    bwd(grad [B, T, NW, D], T, windows, reduce, argmax) -> dx [B, T, D]
    argmax_dtype(windows) -> torch.int16 or torch.int32

sum / mean: a blocked two-level prefix in two launches. ``pool_fwd_kernel_block_prefix`` runs one program
per (b, block of ``PBT`` rows, ``PRE_BD`` columns) tile, all in parallel: it reads its tile of x
once and writes Q, the float32 inclusive prefix inside the block, and the block's float64 sum;
``pool_fwd_kernel_carry_scan`` (one program per (b, column block), ``SCAN_BK`` blocks per step) turns the
block sums into Cr, the float64 exclusive prefix over blocks (the carry of every block: the sum
of the blocks before it, never its own, so a non-finite block cannot reach the carries before
it). A window sum is then ``(Cr[h] - Cr[l]) + (Q[h] - Q[l])``, combined in float64 and rounded
once (then / count for mean): the error of a float32 sum of one block at any T, O(T * D) per
window whatever its length. Overflow: a float32 in-block prefix of x = 1e37 reached inf after
34 rows (NaN even for the window (0, 0)), so a block whose largest |value| exceeds ``BIG`` =
2^120 is summed scaled by 2^-8 (exact: a power of two), with the factor kept per (block,
column) in S: no in-block partial sum can then exceed 2^127, and blocks of ordinary data are
summed exactly as before. ``pool_fwd_kernel_sum_out`` tiles (T-block, D-block) and writes every window.
The backward is the same operation on the gradient over the reversed windows (-b, -a), summed
over windows (``pool_bwd_kernel_sum``; mean scales the gradient by 1 / count in the prefix pass),
in chunks (see "Backward chunks" below).
max: a sparse table over the extended axis p in [-R, T), R = min(T, 2^jmax) with jmax =
floor(log2) of the longest (clamped) window: level j holds the first maximum of x over
[p, p + 2^j) clipped to [0, T) with its index (rows p <= -2^j are empty at level j, so rows
below -R are never stored), built level by level by an elementwise kernel
(``pool_fwd_kernel_st_level``, O(T * D) per level, jmax levels, shared by every window);
``pool_fwd_kernel_max_out`` answers window (a, b) of length L at level floor(log2 L) as the first
maximum of two overlapping halves, O(T * D) per window, and stores the argmax as an offset from
the window's clipped start (int16 where the longest window fits, else int32; -1 for a
wholly-outside window). The table is built for one chunk of (sequences, columns) at a time
(``st_plan``), in buffers allocated once per call: its scratch is ``nbuf * 8 * BC * (T + R) *
DC`` bytes (nbuf = 2 ping-pong levels, 1 when every window has length 1; float32 value + int32
index), at most ``max(ST_SCRATCH, nbuf * 8 * (T + R) * min(D, OUT_BD))``, i.e. ``ST_SCRATCH``
(128 MiB) unless one sequence's table for 64 columns alone is larger (T + R > 2^17).
The backward is deterministic and atomic-free:
for one (w, d) column the argmax of consecutive t is non-decreasing, so the t that send their
gradient to a row s form one run [st, en]; ``pool_bwd_kernel_max_runs`` records each run at its row
(every row written at most once) and ``pool_bwd_kernel_max`` gathers the run sums from the blocked
prefix of the gradient. (No ``tl.associative_scan`` with a custom combine: the interpreter runs
those element by element.) The order of the max puts NaN above every number: a window holding
NaN gives NaN, as ``torch.amax``, and its argmax (which takes the gradient) is its first NaN.

Backward chunks (``bwd_plan``): the prefix of the gradient (float32 per row, float64 carries per
block) and, for max, the int32 run ends st, en are per (sequence, window, column): [B, T, NW, D]
each in one piece, about 3 GiB at B=4, T=8192, D=1024, NW=8. So the backward runs over chunks of
BC sequences x WC windows x DC columns (windows split first, so each launch still covers every
sequence and column; then columns, in multiples of OUT_BD, with WC = 1; then sequences), with
buffers allocated once per call within ``BWD_SCRATCH`` (128 MiB): every chunk runs the same
launches as one piece (max_runs, block_prefix, carry_scan, then max or sum) on its slice of the
gradient. dx of a (sequence, column) chunk is summed over its window groups in order in a float32
buffer [BC, T, DC] (the first group starts from 0, the last one adds and writes dx in its dtype):
the same float32 sum over windows, in the same order, as in one piece, so any chunking gives the
same bits, with no atomics. ``scratch_bytes`` states what a call allocates beyond its inputs and
outputs (``tests/test_triton_pool_scratch.py`` records an interpreted run against it).

Addresses: every offset into a [B, T, ...] buffer is computed in int64 (row indices are widened
before they are multiplied by a stride), so B * T * NW * D >= 2^31 elements address correctly;
window offsets are clamped to [-T, T] on the host (``clamp_windows``) and row indices t + a stay
int32 (|t + a| < 2T). Every launch pins ``enable_fp_fusion`` (``LAUNCH``), as the attention
kernels do.

Launch grids (``pool_grid``): every kernel runs one program per (b, row-block, column-block)
tile, all on grid axis 0 (2^31 - 1 programs), decoded by ``_tile_ids``: CUDA limits axes 1 and 2
to 65535, which B, T-blocks or D-blocks (NW * D columns in the backward) can exceed.
"""

import torch
import triton
import triton.language as tl

from .._triton_support import interpreting, unavailable  # noqa: F401  (unavailable: the backend table's probe)
from .naive import clamp_windows
from .naive import offset_argmax_dtype as argmax_dtype  # noqa: F401  (the interface of pooling/op.py)

PBT = 128  # rows per prefix block (the precision unit of the two-level prefix)
PRE_BD = 32  # columns per program of the block-prefix kernel (one [PBT, PRE_BD] tile each)
SCAN_BK = 32  # prefix blocks per step of the carry scan
SCAN_BD = 64  # columns per program of the carry scan
OUT_BD = 64  # columns per program of the tiled kernels
# rows per program of the tiled kernels: the interpreter pays per program and per op, not per
# element, so it gets bigger tiles (still several per sequence at T = 1000: multi-tile paths run)
OUT_BT = 256 if interpreting() else 64
# caps (bytes) of the max forward's sparse-table scratch (``st_plan``) and of the backward's
# chunk buffers (``bwd_plan``); ``scratch_bytes`` states what a call allocates
ST_SCRATCH = 128 << 20
BWD_SCRATCH = 128 << 20

# compile options of every launch (as ``attention/triton_chunk.LAUNCH``): floating-point
# contraction pinned on (triton 3.10 turns the default off). Numerically moot here: the only
# products feeding a sum are by powers of two (the overflow guard's scale), exact either way.
LAUNCH = dict(enable_fp_fusion=True)
# the tiled kernels that hold several [OUT_BT, OUT_BD] float64 / int64 tiles per window (sum_out,
# sum_bwd, max_runs, max_bwd) run 8 warps: at 4 they used 255 registers and spilled
HEAVY = dict(LAUNCH, num_warps=8)

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
def _prefix_bases(q_ptr, c_ptr, s_ptr, pid_b, T, NW, D, NBLK):
    """(columns NCOL = NW*D (windows x columns of a chunk), and batch row pid_b's bases of the
    prefix ``q [B, T, NCOL]``, the block carries ``c [B, NBLK, NCOL]`` and block scales
    ``s [B, NBLK, NCOL]``), int64."""
    NCOL = tl.cast(NW, tl.int64) * D
    return NCOL, q_ptr + pid_b * T * NCOL, c_ptr + pid_b * NBLK * NCOL, s_ptr + pid_b * NBLK * NCOL


@triton.jit
def _tile_ids(ROWS, COLS, BR: tl.constexpr, BC: tl.constexpr):
    """(b as int64, row-block, column-block) of this program in a ``pool_grid`` launch."""
    pid = tl.program_id(0)
    nc = tl.cdiv(COLS, BC)
    nr = tl.cdiv(ROWS, BR)
    rest = pid // nc
    return (rest // nr).to(tl.int64), rest % nr, pid % nc


def _win_tensor(wins, device):
    return torch.tensor([v for w in wins for v in w], dtype=torch.int32, device=device)


def _valid(wins, B, T, device):
    """valid [B, T, NW]: t + a >= 0 and t + b < T, i.e. t in [-a, T - b) (offsets clamped to
    [-T, T]); filled in place, so the output is the only allocation."""
    v = torch.zeros((B, T, len(wins)), dtype=torch.bool, device=device)
    for w, (a, b) in enumerate(wins):
        lo, hi = max(0, -a), min(T, T - b)
        if lo < hi:
            v[:, lo:hi, w].fill_(True)
    return v


# ----------------------------------------------------------------------------- sum / mean
@triton.jit
def pool_fwd_kernel_block_prefix(y_ptr, q_ptr, bs_ptr, s_ptr, win_ptr, T, NCOL, D, stride_yb, stride_yt, NBLK,
                         MEAN: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """One (b, block k, column block) tile: Q[b, t, c] = sum y[b, k*BT .. t, c] / S[b, k, c]
    (float32), Bs[b, k, c] = sum y[b, k*BT .. k*BT+BT-1, c] (float64), S[b, k, c] = 1 / SCALE where
    the block holds a |value| above BIG, else 1.

    With MEAN, column c belongs to window c // D and row t is scaled by 1 / count(t, window).
    """
    pid_b, k, pid_c = _tile_ids(T, NCOL, BT, BD)
    cols = pid_c * BD + tl.arange(0, BD)
    cmask = cols < NCOL
    rows = k * BT + tl.arange(0, BT)
    r64 = rows.to(tl.int64)
    m = (rows < T)[:, None] & cmask[None, :]
    v = tl.load(y_ptr + pid_b * stride_yb + r64[:, None] * stride_yt + cols[None, :], mask=m,
                other=0.0).to(tl.float32)
    if MEAN:
        w2 = (cols // D).to(tl.int64) * 2
        wa = tl.load(win_ptr + w2, mask=cmask, other=0)
        wb = tl.load(win_ptr + w2 + 1, mask=cmask, other=0)
        lo = tl.minimum(tl.maximum(rows[:, None] + wa[None, :], 0), T)
        hi = tl.minimum(tl.maximum(rows[:, None] + wb[None, :] + 1, 0), T)
        cnt = tl.maximum(hi - lo, 1)
        v = v / cnt.to(tl.float32)
    sc = tl.where(tl.max(tl.abs(v), axis=0) > BIG, SCALE, 1.0)  # [BD]: overflow guard
    v = v * sc[None, :]
    cs = tl.cumsum(v, axis=0)
    tl.store(q_ptr + pid_b * T * NCOL + r64[:, None] * NCOL + cols[None, :], cs, mask=m)
    blk = (pid_b * NBLK + k) * NCOL + cols
    tl.store(bs_ptr + blk, tl.sum(v, axis=0).to(tl.float64) / sc.to(tl.float64), mask=cmask)
    tl.store(s_ptr + blk, 1.0 / sc, mask=cmask)


@triton.jit
def pool_fwd_kernel_carry_scan(bs_ptr, c_ptr, NCOL, NBLK, BK: tl.constexpr, BD: tl.constexpr):
    """Cr[b, k, c] = sum of Bs[b, 0 .. k-1, c] (float64, exclusive: 0 at k = 0), BK blocks per step:
    each step scans the block sums shifted down by one (so a block's own sum never enters its carry)."""
    pid_b, _, pid_c = _tile_ids(1, NCOL, 1, BD)
    cols = pid_c * BD + tl.arange(0, BD)
    cmask = cols < NCOL
    base = pid_b * NBLK * NCOL
    carry = tl.zeros([BD], dtype=tl.float64)
    for k0 in range(0, NBLK, BK):
        k = k0 + tl.arange(0, BK)
        k64 = k.to(tl.int64)
        prev = tl.load(bs_ptr + base + (k64[:, None] - 1) * NCOL + cols[None, :],
                       mask=((k >= 1) & (k < NBLK))[:, None] & cmask[None, :], other=0.0)
        cs = tl.cumsum(prev, axis=0) + carry[None, :]
        tl.store(c_ptr + base + k64[:, None] * NCOL + cols[None, :], cs,
                 mask=(k < NBLK)[:, None] & cmask[None, :])
        carry += tl.sum(prev, axis=0)


@triton.jit
def _prefix_at(q_base, c_base, s_base, i, cols, m, NCOL, BT: tl.constexpr):
    """sum y[0 .. i-1] split as (carry, in-block part), both float64; 0 for i == 0.
    i: row indices [BT, 1] or [BT, BD]; cols: [1, BD] column indices; m: mask."""
    has = (i > 0) & m
    r = tl.maximum(i - 1, 0).to(tl.int64)
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
def pool_fwd_kernel_sum_out(q_ptr, c_ptr, s_ptr, win_ptr, out_ptr, T, D, NW, NBLK,
                    MEAN: tl.constexpr, PB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid_b, pid_t, pid_d = _tile_ids(T, D, BT, BD)
    t = pid_t * BT + tl.arange(0, BT)
    t64 = t.to(tl.int64)
    cols = pid_d * BD + tl.arange(0, BD)
    tmask = t < T
    cmask = cols < D
    q_base = q_ptr + pid_b * T * D
    c_base = c_ptr + pid_b * NBLK * D
    s_base = s_ptr + pid_b * NBLK * D
    o_base = out_ptr + pid_b * T * NW * D
    for w in range(NW):
        a = tl.load(win_ptr + 2 * w)
        b = tl.load(win_ptr + 2 * w + 1)
        lo = tl.minimum(tl.maximum(t + a, 0), T)
        hi = tl.maximum(tl.minimum(tl.maximum(t + b + 1, 0), T), lo)
        val = _range_sum(q_base, c_base, s_base, lo[:, None], hi[:, None], cols[None, :],
                         tmask[:, None] & cmask[None, :], D, PB)
        if MEAN:
            val = val / tl.maximum(hi - lo, 1).to(tl.float64)[:, None]
        tl.store(o_base + (t64[:, None] * NW + w) * D + cols[None, :], val.to(tl.float32).to(out_ptr.dtype.element_ty),
                 mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _acc_init(acc_ptr, ao, m, LOAD_ACC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """The float32 running sum of a backward tile: the previous window groups' (``acc [bc, T, dc]``
    at ``ao``) or zero for the first group."""
    if LOAD_ACC:
        return tl.load(acc_ptr + ao, mask=m, other=0.0)
    else:
        return tl.zeros([BT, BD], dtype=tl.float32)


@triton.jit
def _acc_store(acc, acc_ptr, ao, dx_ptr, b, s64, d, T, D, c0, m, TO_DX: tl.constexpr):
    """The last window group writes dx [B, T, D] (rows s64, columns c0 + d of sequence b), the
    others the float32 running sum (exact: the sum over windows runs in the same order whatever
    the groups)."""
    if TO_DX:
        tl.store(dx_ptr + (b * T + s64[:, None]) * D + c0 + d[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(acc_ptr + ao, acc, mask=m)


@triton.jit
def pool_bwd_kernel_sum(q_ptr, c_ptr, s_ptr, win_ptr, acc_ptr, dx_ptr, T, D, WC, DC, NBLK, b0, w0, c0,
                        LOAD_ACC: tl.constexpr, TO_DX: tl.constexpr, PB: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr):
    """dx[s] += sum_w sum_{t in [s-b, s-a]} g'[t, w] over the chunk's windows w0 .. w0+WC-1, from
    the prefix of its g' [bc, T, WC*DC] (columns c0 .. c0+DC-1 of sequences b0 ..)."""
    pid_b, pid_t, pid_d = _tile_ids(T, DC, BT, BD)
    s = pid_t * BT + tl.arange(0, BT)
    s64 = s.to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    smask = s < T
    m = smask[:, None] & (d < DC)[None, :]
    NCOL, q_base, c_base, s_base = _prefix_bases(q_ptr, c_ptr, s_ptr, pid_b, T, WC, DC, NBLK)
    ao = (pid_b * T + s64[:, None]) * DC + d[None, :]
    acc = _acc_init(acc_ptr, ao, m, LOAD_ACC, BT, BD)
    for wl in range(WC):
        a = tl.load(win_ptr + 2 * (w0 + wl))
        b = tl.load(win_ptr + 2 * (w0 + wl) + 1)
        lo = tl.minimum(tl.maximum(s - b, 0), T)
        hi = tl.maximum(tl.minimum(tl.maximum(s - a + 1, 0), T), lo)
        acc += _range_sum(q_base, c_base, s_base, lo[:, None], hi[:, None],
                          (tl.cast(wl, tl.int64) * DC + d)[None, :], m, NCOL, PB).to(tl.float32)
    _acc_store(acc, acc_ptr, ao, dx_ptr, b0 + pid_b, s64, d, T, D, c0, m, TO_DX)


def prefix_grids(B, T, ncol):
    """The grids of the two prefix launches: (block prefix: every (b, block, column block) tile,
    carry scan: every (b, column block))."""
    return (pool_grid(B, T, ncol, PBT, PRE_BD), pool_grid(B, 1, ncol, 1, SCAN_BD))


def _prefix_buffers(B, T, ncol, device):
    """Q, Bs, Cr, S of a blocked prefix over B sequences x ncol columns (flat: a smaller chunk
    uses their first elements): ``4 * T + 20 * cdiv(T, PBT)`` bytes per (sequence, column)."""
    n, nblk = B * ncol, triton.cdiv(T, PBT)
    return (torch.empty(n * T, dtype=torch.float32, device=device),
            torch.empty(n * nblk, dtype=torch.float64, device=device),
            torch.empty(n * nblk, dtype=torch.float64, device=device),
            torch.empty(n * nblk, dtype=torch.float32, device=device))


def _prefix(y3, bufs, T, wins_t, D, mean):
    """Blocked prefix of y3 (a [B, T, ncol] view with unit column stride) into ``bufs``
    (``_prefix_buffers``): Q, Cr, S, NBLK. With ``mean`` column c belongs to window c // D of
    ``wins_t``."""
    B, _, ncol = y3.shape
    nblk = triton.cdiv(T, PBT)
    q, bs, c, s = bufs
    g_blk, g_scan = prefix_grids(B, T, ncol)
    pool_fwd_kernel_block_prefix[g_blk](y3, q, bs, s, wins_t, T, ncol, D, y3.stride(0), y3.stride(1), nblk,
                                        MEAN=mean, BT=PBT, BD=PRE_BD, **LAUNCH)
    pool_fwd_kernel_carry_scan[g_scan](bs, c, ncol, nblk, BK=SCAN_BK, BD=SCAN_BD, **LAUNCH)
    return q, c, s, nblk


# ----------------------------------------------------------------------------- max
def st_plan(B, T, D, windows):
    """The sparse table of the max forward for clamped ``windows``: dict of jmax (top level), R
    (rows p in [-R, T) are stored), NR = T + R, nbuf (level buffers), BC x DC (sequences x columns
    per chunk; DC a multiple of OUT_BD unless DC = D) and scratch (bytes, allocated once per call):
    nbuf * 8 * BC * NR * DC <= max(ST_SCRATCH, nbuf * 8 * NR * min(D, OUT_BD))."""
    jmax = max((b - a + 1).bit_length() - 1 for a, b in windows)
    R = min(T, 1 << jmax)
    NR = T + R
    nbuf = 2 if jmax else 1
    unit = nbuf * 8 * NR  # bytes per (sequence, column)
    cols = ST_SCRATCH // (unit * B)
    if cols >= D:  # every sequence and column at once: then as many sequences as fit
        BC, DC = B, D
    elif cols >= OUT_BD:  # every sequence, columns in chunks
        BC, DC = B, cols // OUT_BD * OUT_BD
    else:  # OUT_BD columns (or D), sequences in chunks
        DC = min(D, OUT_BD)
        BC = max(1, min(B, ST_SCRATCH // (unit * DC)))
    return dict(jmax=jmax, R=R, NR=NR, nbuf=nbuf, BC=BC, DC=DC, scratch=nbuf * 8 * BC * NR * DC)


def _prefix_unit(T):
    """Bytes of the blocked prefix per (sequence, column): Q (float32 per row), Bs and Cr
    (float64 per block), S (float32 per block)."""
    return 4 * T + 20 * triton.cdiv(T, PBT)


def bwd_plan(B, T, D, NW, reduce):
    """The chunks of the backward: dict of BC x WC x DC (sequences x windows x columns per chunk;
    DC = D unless WC = 1, DC a multiple of OUT_BD unless DC = D), groups (window groups,
    cdiv(NW, WC)), unit (bytes per (sequence, window, column): the prefix of the gradient, and
    for max the int32 run ends st, en) and scratch (bytes, allocated once per call: the chunk's
    buffers, plus a float32 running sum [BC, T, DC] of dx when there are several window groups).
    Windows are split first (every sequence and column in each launch), then columns, then
    sequences: scratch <= max(BWD_SCRATCH, (unit + 4 * T) * min(D, OUT_BD))."""
    unit = _prefix_unit(T) + (8 * T if reduce == "max" else 0)
    acc = 4 * T  # per (sequence, column) when there are several window groups
    if B * D * NW * unit <= BWD_SCRATCH:
        BC, WC, DC = B, NW, D
    elif BWD_SCRATCH // (B * D) >= unit + acc:  # several windows of every sequence and column
        BC, WC, DC = B, (BWD_SCRATCH // (B * D) - acc) // unit, D
    else:
        per = unit + (acc if NW > 1 else 0)
        cols = BWD_SCRATCH // (B * per)
        WC = 1
        if cols >= OUT_BD:  # one window of every sequence, columns in chunks
            BC, DC = B, min(D, cols // OUT_BD * OUT_BD)
        else:  # one window of OUT_BD columns (or D), sequences in chunks
            DC = min(D, OUT_BD)
            BC = max(1, min(B, BWD_SCRATCH // (per * DC)))
    groups = triton.cdiv(NW, WC)
    scratch = BC * WC * DC * unit + (BC * T * DC * 4 if groups > 1 else 0)
    return dict(BC=BC, WC=WC, DC=DC, groups=groups, unit=unit, scratch=scratch)


# Sparse table over the extended axis p in [-R, T) (row r = p + R) of one chunk of BC sequences
# x DC columns (buffers [BC, NR, DC]): M_j[p] = first max of x over [p, p + 2^j) clipped to
# [0, T), with its index (-1 when that range is empty).
@triton.jit
def pool_fwd_kernel_st_init(x_ptr, mv_ptr, mi_ptr, T, D, R, NR, DC, b0, c0, BT: tl.constexpr, BD: tl.constexpr):
    pid_b, pid_r, pid_d = _tile_ids(NR, DC, BT, BD)
    r = pid_r * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    p = r - R
    cmask = cols < DC
    inside = (p >= 0) & (r < NR)
    xb = x_ptr + (b0 + pid_b) * T * D + c0
    v = tl.load(xb + tl.maximum(p, 0).to(tl.int64)[:, None] * D + cols[None, :],
                mask=inside[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
    idx = tl.where(inside, p, -1)[:, None] + tl.zeros([BT, BD], dtype=tl.int32)
    m = (r < NR)[:, None] & cmask[None, :]
    o = pid_b * NR * DC + r.to(tl.int64)[:, None] * DC + cols[None, :]
    tl.store(mv_ptr + o, v, mask=m)
    tl.store(mi_ptr + o, idx, mask=m)


@triton.jit
def pool_fwd_kernel_st_level(sv_ptr, si_ptr, dv_ptr, di_ptr, NR, DC, H, BT: tl.constexpr, BD: tl.constexpr):
    """M_j[p] = first max of (M_{j-1}[p], M_{j-1}[p + H]), H = 2^(j-1); NaN ranks above every number;
    ties (NaN with NaN included) keep the left (lower) index."""
    pid_b, pid_r, pid_d = _tile_ids(NR, DC, BT, BD)
    r = pid_r * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    cmask = cols < DC
    m = (r < NR)[:, None] & cmask[None, :]
    mr = (r + H < NR)[:, None] & cmask[None, :]
    base = pid_b * NR * DC
    o = base + r.to(tl.int64)[:, None] * DC + cols[None, :]
    o_r = base + (r + H).to(tl.int64)[:, None] * DC + cols[None, :]
    vl = tl.load(sv_ptr + o, mask=m, other=float("-inf"))
    il = tl.load(si_ptr + o, mask=m, other=-1)
    vr = tl.load(sv_ptr + o_r, mask=mr, other=float("-inf"))
    ir = tl.load(si_ptr + o_r, mask=mr, other=-1)
    take_r = (ir >= 0) & ((il < 0) | (vr > vl) | ((vr != vr) & (vl == vl)))
    tl.store(dv_ptr + o, tl.where(take_r, vr, vl), mask=m)
    tl.store(di_ptr + o, tl.where(take_r, ir, il), mask=m)


@triton.jit
def pool_fwd_kernel_max_out(mv_ptr, mi_ptr, out_ptr, arg_ptr, T, D, NW, R, NR, DC, b0, c0, w, a, b, H,
                    BT: tl.constexpr, BD: tl.constexpr, WITH_ARGMAX: tl.constexpr):
    """Window (a, b) of length L, H = 2^floor(log2 L): max over [t+a, t+b] = first max of
    M[t+a] and M[t+b-H+1] (NaN above every number, ties to the lower index; rows below -R are
    empty at this level); the argmax is stored as an offset from the clipped start."""
    pid_b, pid_t, pid_d = _tile_ids(T, DC, BT, BD)
    t = pid_t * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    tmask = t < T
    cmask = cols < DC
    m = tmask[:, None] & cmask[None, :]
    p1 = t + a
    p2 = t + b - H + 1
    base = pid_b * NR * DC
    m1 = m & ((p1 < T) & (p1 >= -R))[:, None]
    m2 = m & ((p2 < T) & (p2 >= -R))[:, None]
    o1 = base + (tl.minimum(tl.maximum(p1, -R), T - 1) + R).to(tl.int64)[:, None] * DC + cols[None, :]
    o2 = base + (tl.minimum(tl.maximum(p2, -R), T - 1) + R).to(tl.int64)[:, None] * DC + cols[None, :]
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
    o = (((b0 + pid_b) * T + t.to(tl.int64)[:, None]) * NW + w) * D + c0 + cols[None, :]
    tl.store(out_ptr + o, val.to(out_ptr.dtype.element_ty), mask=m)
    if WITH_ARGMAX:
        tl.store(arg_ptr + o, off.to(arg_ptr.dtype.element_ty), mask=m)


@triton.jit
def _argkey(arg_ptr, o, t, a, T, m):
    """Absolute argmax index of window (a, .) at rows t (-1: wholly outside or masked)."""
    off = tl.load(arg_ptr + o, mask=m, other=-1).to(tl.int32)
    return tl.where(off >= 0, tl.minimum(tl.maximum(t + a, 0), T)[:, None] + off, -1)


@triton.jit
def pool_bwd_kernel_max_runs(arg_ptr, win_ptr, st_ptr, en_ptr, T, D, NW, WC, DC, b0, w0, c0,
                             BT: tl.constexpr, BD: tl.constexpr):
    """For one (w, d) column the argmax of consecutive t is non-decreasing, so the t sending their
    gradient to a row s form one run [st, en]: record it at row s (each row is written once) in
    the chunk's ``st`` / ``en [bc, T, WC*DC]`` (windows w0 .. w0+WC-1, columns c0 .. c0+DC-1 of
    sequences b0 ..; argmax is the whole [B, T, NW, D])."""
    pid_b, pid_t, pid_d = _tile_ids(T, DC, BT, BD)
    t = pid_t * BT + tl.arange(0, BT)
    t64 = t.to(tl.int64)
    cols = pid_d * BD + tl.arange(0, BD)
    m = (t < T)[:, None] & (cols < DC)[None, :]
    mp = m & (t >= 1)[:, None]
    mn = m & (t + 1 < T)[:, None]
    base = (b0 + pid_b) * T * NW * D + c0 + cols[None, :]
    NCOL = tl.cast(WC, tl.int64) * DC
    tt = t[:, None] + tl.zeros([BT, BD], dtype=tl.int32)
    for wl in range(WC):
        w = w0 + wl
        a = tl.load(win_ptr + 2 * w)
        key = _argkey(arg_ptr, base + (t64[:, None] * NW + w) * D, t, a, T, m)
        key_p = _argkey(arg_ptr, base + ((t64[:, None] - 1) * NW + w) * D, t - 1, a, T, mp)
        key_n = _argkey(arg_ptr, base + ((t64[:, None] + 1) * NW + w) * D, t + 1, a, T, mn)
        dst = (pid_b * T + tl.maximum(key, 0).to(tl.int64)) * NCOL + tl.cast(wl, tl.int64) * DC + cols[None, :]
        has = m & (key >= 0)
        tl.store(st_ptr + dst, tt, mask=has & (key != key_p))
        tl.store(en_ptr + dst, tt, mask=has & (key != key_n))


@triton.jit
def pool_bwd_kernel_max(q_ptr, c_ptr, s_ptr, st_ptr, en_ptr, acc_ptr, dx_ptr, T, D, WC, DC, NBLK, b0, c0,
                        LOAD_ACC: tl.constexpr, TO_DX: tl.constexpr, PB: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr):
    """dx[s] += sum over the chunk's windows of (the sum of grad[t, w] over the run [st, en]
    recorded at s), from the prefix of the chunk's grad [bc, T, WC*DC]. en is read only where st
    was written (a run has both ends), so only st is reset between chunks."""
    pid_b, pid_t, pid_d = _tile_ids(T, DC, BT, BD)
    s = pid_t * BT + tl.arange(0, BT)
    s64 = s.to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    m = (s < T)[:, None] & (d < DC)[None, :]
    NCOL, q_base, c_base, s_base = _prefix_bases(q_ptr, c_ptr, s_ptr, pid_b, T, WC, DC, NBLK)
    ao = (pid_b * T + s64[:, None]) * DC + d[None, :]
    acc = _acc_init(acc_ptr, ao, m, LOAD_ACC, BT, BD)
    for wl in range(WC):
        wd = tl.cast(wl, tl.int64) * DC + d  # [BD] columns of window wl in the chunk's prefix
        o = pid_b * T * NCOL + s64[:, None] * NCOL + wd[None, :]
        st = tl.load(st_ptr + o, mask=m, other=-1)
        has = m & (st >= 0)
        en = tl.load(en_ptr + o, mask=has, other=-1)
        lo = tl.maximum(st, 0)
        hi = tl.maximum(en + 1, lo)
        v = _range_sum(q_base, c_base, s_base, lo, hi, wd[None, :], has, NCOL, PB).to(tl.float32)
        acc += tl.where(has, v, 0.0)
    _acc_store(acc, acc_ptr, ao, dx_ptr, b0 + pid_b, s64, d, T, D, c0, m, TO_DX)


# ----------------------------------------------------------------------------- interface
def fwd(x, windows, reduce, with_argmax=True):
    x = x.contiguous()
    B, T, D = x.shape
    wins = clamp_windows(windows, T)
    NW = len(wins)
    wins_t = _win_tensor(wins, x.device)
    valid = _valid(wins, B, T, x.device)
    out = torch.empty((B, T, NW, D), dtype=x.dtype, device=x.device)
    if reduce in ("sum", "mean"):
        q, c, s, nblk = _prefix(x, _prefix_buffers(B, T, D, x.device), T, wins_t, D, False)
        pool_fwd_kernel_sum_out[pool_grid(B, T, D, OUT_BT, OUT_BD)](q, c, s, wins_t, out, T, D, NW, nblk,
                                                           MEAN=reduce == "mean", PB=PBT, BT=OUT_BT, BD=OUT_BD,
                                                           **HEAVY)
        return out, valid, None
    arg = torch.empty((B, T, NW, D) if with_argmax else (0,), dtype=argmax_dtype(windows), device=x.device)
    # windows by sparse-table level floor(log2 L) (L <= 2T + 1 after clamping)
    levels = [(b - a + 1).bit_length() - 1 for a, b in wins]
    plan = st_plan(B, T, D, wins)
    R, NR, BC, DC = plan["R"], plan["NR"], plan["BC"], plan["DC"]
    n = BC * NR * DC
    bufs = [(torch.empty(n, dtype=torch.float32, device=x.device), torch.empty(n, dtype=torch.int32, device=x.device))
            for _ in range(plan["nbuf"])]
    for b0 in range(0, B, BC):
        bc = min(BC, B - b0)
        for c0 in range(0, D, DC):
            dc = min(DC, D - c0)
            grid_st = pool_grid(bc, NR, dc, OUT_BT, OUT_BD)
            grid_out = pool_grid(bc, T, dc, OUT_BT, OUT_BD)
            pool_fwd_kernel_st_init[grid_st](x, bufs[0][0], bufs[0][1], T, D, R, NR, dc, b0, c0, BT=OUT_BT, BD=OUT_BD,
                                     **LAUNCH)
            for j in range(plan["jmax"] + 1):
                cur = bufs[j % 2]
                if j > 0:
                    prev = bufs[(j - 1) % 2]
                    pool_fwd_kernel_st_level[grid_st](prev[0], prev[1], cur[0], cur[1], NR, dc, 1 << (j - 1), BT=OUT_BT,
                                              BD=OUT_BD, **LAUNCH)
                for w, (a, b) in enumerate(wins):
                    if levels[w] == j:
                        pool_fwd_kernel_max_out[grid_out](cur[0], cur[1], out, arg, T, D, NW, R, NR, dc, b0, c0, w, a, b,
                                                  1 << j, BT=OUT_BT, BD=OUT_BD, WITH_ARGMAX=with_argmax, **LAUNCH)
    return out, valid, (arg if with_argmax else None)


def bwd(grad, T, windows, reduce, argmax):
    grad = grad.contiguous()
    B, _, NW, D = grad.shape
    wins = clamp_windows(windows, T)
    wins_t = _win_tensor(wins, grad.device)
    is_max = reduce == "max"
    if is_max:
        if argmax is None:
            raise ValueError("argmax is required for the max backward")
        argmax = argmax.contiguous()
    plan = bwd_plan(B, T, D, NW, reduce)
    BC, WC, DC, groups = plan["BC"], plan["WC"], plan["DC"], plan["groups"]
    dev = grad.device
    n = BC * WC * DC  # (sequence, window, column) triples of one chunk
    bufs = _prefix_buffers(BC, T, WC * DC, dev)
    if is_max:
        st = torch.empty(n * T, dtype=torch.int32, device=dev)
        en = torch.empty(n * T, dtype=torch.int32, device=dev)
    dx = torch.empty((B, T, D), dtype=grad.dtype, device=dev)
    acc = torch.empty(BC * T * DC, dtype=torch.float32, device=dev) if groups > 1 else dx
    for b0 in range(0, B, BC):
        bc = min(BC, B - b0)
        for c0 in range(0, D, DC):
            dc = min(DC, D - c0)
            grid = pool_grid(bc, T, dc, OUT_BT, OUT_BD)
            for g in range(groups):
                w0 = g * WC
                wc = min(WC, NW - w0)
                # [bc, T, wc * dc] with unit column stride: dc = D, or wc = 1 (bwd_plan)
                y3 = grad[b0:b0 + bc, :, w0:w0 + wc, c0:c0 + dc].view(bc, T, wc * dc)
                flags = dict(LOAD_ACC=g > 0, TO_DX=g == groups - 1)
                if is_max:
                    st[:bc * T * wc * dc].fill_(-1)
                    pool_bwd_kernel_max_runs[grid](argmax, wins_t, st, en, T, D, NW, wc, dc, b0, w0, c0, BT=OUT_BT,
                                                   BD=OUT_BD, **HEAVY)
                q, c, s, nblk = _prefix(y3, bufs, T, wins_t[2 * w0:], dc, reduce == "mean")
                if is_max:
                    pool_bwd_kernel_max[grid](q, c, s, st, en, acc, dx, T, D, wc, dc, nblk, b0, c0, **flags, PB=PBT,
                                              BT=OUT_BT, BD=OUT_BD, **HEAVY)
                else:
                    pool_bwd_kernel_sum[grid](q, c, s, wins_t, acc, dx, T, D, wc, dc, nblk, b0, w0, c0, **flags,
                                              PB=PBT, BT=OUT_BT, BD=OUT_BD, **HEAVY)
    return dx


def scratch_bytes(B, T, D, windows, reduce, *, backward=False):
    """Bytes one ``fwd`` (``backward=False``; the max forward with or without argmax) or ``bwd``
    call allocates beyond its inputs and outputs (pooled, valid, argmax; dx), for x [B, T, D] and
    ``windows`` (as given: clamped here). Every allocation of the launchers is counted: the
    window table (int32 pairs), the sum prefix (Q, Bs, Cr, S), the max forward's sparse table
    (``st_plan``), the backward's chunk buffers (``bwd_plan``). At B=4, T=8192, D=1024 and
    dyadic_windows(8) the max path stays under 128 MiB each way (it was 1 GiB forward and 3 GiB
    backward); only the sum / mean forward's prefix of x (about 4 * B * T * D bytes) exceeds it."""
    wins = clamp_windows(windows, T)
    table = 8 * len(wins)
    if backward:
        return table + bwd_plan(B, T, D, len(wins), reduce)["scratch"]
    if reduce == "max":
        return table + st_plan(B, T, D, wins)["scratch"]
    return table + B * D * _prefix_unit(T)

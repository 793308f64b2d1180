"""Hardening of window_pool (issue 15): huge offsets, NaN / Inf rules, values near the top of
the float range, and the Triton launch grids.

Every backend runs through the ``backend`` fixture (tests/conftest.py); the oracle is
``lk.reference.window_pool`` on the same values in float64. Tolerances are DESIGN section 4's,
and for half dtypes flash-attn's rule as well: no worse than 2x the error of the plain form run
in the half dtype (``utils.plain_pool``; ``assert_close`` with ``baseline=``).
"""
import os
import sys

import numpy as np
import pytest
import torch

import leapformer_kernels as lk
from utils import HALF, TOL, assert_close, plain_pool, rel_err

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
REDUCES = ("sum", "mean", "max")


def _dname(d):
    return str(d).replace("torch.", "")


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend refuses float64 (DESIGN section 4)")


def _oracle(x, windows, reduce, grad=None):
    """float64 oracle on x's values: pooled (float64), valid, and dx for ``grad`` if given."""
    xr = x.detach().cpu().double().requires_grad_(grad is not None)
    pooled, valid = lk.reference.window_pool(xr, windows, reduce)
    dx = None
    if grad is not None:
        (dx,) = torch.autograd.grad(pooled, xr, grad.detach().cpu().double())
    return pooled.detach(), valid, dx


def _plain(backend, x, windows, reduce, grad=None):
    """The baseline of flash-attn's rule: pooled and dx (for ``grad``) of the plain form run in
    x's half dtype (``utils.plain_pool``); (None, None) where the rule does not apply: float32 /
    float64, and triton's bfloat16 under ``TRITON_INTERPRET=1``, whose float32 -> bfloat16 cast
    truncates (see ``test_window_pool.baseline_rule``)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if x.dtype not in HALF or (backend == "triton" and x.dtype == torch.bfloat16 and interpreted):
        return None, None
    xb = x.detach().cpu().requires_grad_(grad is not None)
    pooled, _ = plain_pool(xb, windows, reduce, dtype=x.dtype)
    dx = None
    if grad is not None:
        (dx,) = torch.autograd.grad(pooled, xb, grad.detach().cpu())
    return pooled.detach(), dx


def _run(backend, x, windows, reduce, grad=None):
    """pooled, valid, dx (for ``grad``) on ``backend``, back on the CPU."""
    dev = _device(backend)
    xk = x.detach().to(dev).requires_grad_(grad is not None)
    pooled, valid = lk.window_pool(xk, windows, reduce, backend=backend)
    dx = None
    if grad is not None:
        (dx,) = torch.autograd.grad(pooled, xk, grad.to(dev))
        dx = dx.cpu()
    return pooled.detach().cpu(), valid.cpu(), dx


# ------------------------------------------------------------------ 1. huge offsets
T_SMALL = 9
HUGE = {
    "to_end": (0, sys.maxsize),
    "from_start": (-sys.maxsize, 0),
    "pm_2pow62": (-(2 ** 62), 2 ** 62),
    "int64_extremes": (-(2 ** 63), 2 ** 63 - 1),
    "far_future": (2 ** 62, 2 ** 63 - 1),
    "far_past": (-(2 ** 63), -(2 ** 62)),
    "past_to_end": (-3, sys.maxsize),
}


def _clamped(w, T):
    """The same window with its offsets clamped to [-T, T] (same ranges and valid at every t)."""
    return tuple(max(-T, min(T, v)) for v in w)


def _expected_huge(x, w, reduce):
    """pooled [B, T, D] and valid [T] of one window, by a Python loop over t (float64)."""
    B, T, D = x.shape
    xd = x.double()
    out = torch.zeros(B, T, D, dtype=torch.float64)
    valid = torch.zeros(T, dtype=torch.bool)
    a, b = w
    for t in range(T):
        lo, hi = max(t + a, 0), min(t + b + 1, T)  # Python ints: no overflow
        valid[t] = t + a >= 0 and t + b < T
        if hi <= lo:
            continue
        seg = xd[:, lo:hi]
        out[:, t] = {"sum": seg.sum(1), "mean": seg.mean(1), "max": seg.amax(1)}[reduce]
    return out, valid


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("wname", list(HUGE))
def test_huge_offsets(backend, wname, reduce):
    """(0, sys.maxsize) and friends: the same result and valid as the window clamped to [-T, T]."""
    w = HUGE[wname]
    x = torch.randn(2, T_SMALL, 3)
    g = torch.randn(2, T_SMALL, 2, 3)
    windows = [w, (-1, 1)]
    pooled, valid, dx = _run(backend, x, windows, reduce, g)
    want, want_valid = _expected_huge(x, w, reduce)
    assert torch.equal(valid[:, :, 0], want_valid.expand(2, T_SMALL)), f"valid of {w}"
    assert rel_err(pooled[:, :, 0], want) <= TOL[torch.float32]
    same, same_valid, same_dx = _run(backend, x, [_clamped(w, T_SMALL), (-1, 1)], reduce, g)
    assert torch.equal(valid, same_valid)
    assert rel_err(pooled, same) <= TOL[torch.float32]
    assert rel_err(dx, same_dx) <= 2 * TOL[torch.float32]


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("wname", list(HUGE))
def test_reference_huge_offsets(wname, reduce):
    """The oracle itself (lk.reference) clamps before any arithmetic."""
    w = HUGE[wname]
    x = torch.randn(2, T_SMALL, 3, dtype=torch.float64)
    pooled, valid = lk.reference.window_pool(x, [w], reduce)
    want, want_valid = _expected_huge(x, w, reduce)
    assert torch.equal(valid[:, :, 0], want_valid.expand(2, T_SMALL))
    assert rel_err(pooled[:, :, 0], want) <= TOL[torch.float64]


def test_dyadic_windows_limit():
    """The n-th dyadic window ends at 2**n - 1, which must fit an int64 offset: n <= 63."""
    w = lk.dyadic_windows(63)
    assert w[-1] == (2 ** 62, 2 ** 63 - 1)
    assert lk.dyadic_windows(np.int64(3)) == [(1, 1), (2, 3), (4, 7)]
    for bad in (64, 70, 1000):
        with pytest.raises(ValueError, match=r"n .*63|n = %d" % bad):
            lk.dyadic_windows(bad)


@pytest.mark.parametrize("reduce", REDUCES)
def test_dyadic_63_windows(backend, reduce):
    """All 63 dyadic windows (offsets up to 2**63 - 1) run and match the oracle."""
    x = torch.randn(1, 20, 2)
    windows = lk.dyadic_windows(63)
    pooled, valid, _ = _run(backend, x, windows, reduce)
    ref, ref_valid, _ = _oracle(x, windows, reduce)
    assert torch.equal(valid, ref_valid)
    assert rel_err(pooled, ref) <= TOL[torch.float32]


NUMPY_OFFSETS = {
    "np_int64": (np.int64(-2), np.int64(1)),
    "np_int32": (np.int32(-2), np.int32(1)),
    "mixed": (np.int64(-2), 1),
    "np_uint8_b": (-2, np.uint8(1)),
}


@pytest.mark.parametrize("wname", list(NUMPY_OFFSETS))
def test_numpy_integer_offsets(backend, wname):
    x = torch.randn(2, 7, 3)
    pooled, valid, _ = _run(backend, x, [NUMPY_OFFSETS[wname]], "sum")
    want, want_valid, _ = _run(backend, x, [(-2, 1)], "sum")
    assert torch.equal(pooled, want) and torch.equal(valid, want_valid)


BAD_OFFSETS = {
    "bool": ((True, 2), TypeError),
    "np_bool": ((np.bool_(False), 2), TypeError),
    "float": ((0, 2.0), TypeError),
    "np_float": ((np.float64(0), 2), TypeError),
    "above_int64": ((0, 2 ** 63), ValueError),
    "below_int64": ((-(2 ** 63) - 1, 0), ValueError),
}


@pytest.mark.parametrize("wname", list(BAD_OFFSETS))
def test_bad_offsets(backend, wname):
    w, exc = BAD_OFFSETS[wname]
    with pytest.raises(exc, match="windows"):
        lk.window_pool(torch.randn(1, 4, 2), [(0, 1), w], "sum", backend=backend)


# ------------------------------------------------------------------ 2. NaN rules
T_NAN = 300  # crosses the prefix blocks of both kernels (cpu 256 rows, triton 128)
MAX_WINDOWS = [(0, 0), (-3, 0), (1, 2), (-2, 5), (-40, 40), (-1000, 1000), (400, 500)]


def _nan_input(dtype):
    x = torch.randn(2, T_NAN, 3, dtype=torch.float64)
    x[0, 150, 1] = NAN
    x[0, 152, 1] = NAN  # two NaNs in some windows: the first takes the gradient
    x[0, 160, 1] = 1e4  # a large finite value right after: NaN still wins
    x[1, 40, 2] = NAN
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_max_nan(backend, dtype):
    """max over a window that holds NaN is NaN (as torch.amax), elsewhere the exact maximum; the
    gradient of such a window goes to its first NaN."""
    _skip_unsupported(backend, dtype)
    x = _nan_input(dtype)
    g = torch.randn(2, T_NAN, len(MAX_WINDOWS), 3, dtype=torch.float64).to(dtype)
    pooled, valid, dx = _run(backend, x, MAX_WINDOWS, "max", g)
    ref, ref_valid, ref_dx = _oracle(x, MAX_WINDOWS, "max", g)
    _, base_dx = _plain(backend, x, MAX_WINDOWS, "max", g)
    torch.testing.assert_close(pooled, ref.to(dtype), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(valid, ref_valid)
    assert_close(dx, ref_dx, dtype, "dx", factor=2, baseline=base_dx)
    with torch.no_grad():  # the inference forward (no argmax saved) gives the same values
        inf_pooled, _, _ = _run(backend, x, MAX_WINDOWS, "max")
    torch.testing.assert_close(inf_pooled, pooled, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dname)
def test_reference_max_nan(dtype):
    """The oracle agrees with torch.amax per window (it took a value from outside the window)."""
    x = _nan_input(dtype)
    pooled, _ = lk.reference.window_pool(x, MAX_WINDOWS, "max")
    for w, (a, b) in enumerate(MAX_WINDOWS):
        for t in (0, 140, 148, 150, 151, 155, 299):
            lo, hi = max(t + a, 0), min(t + b + 1, T_NAN)
            want = x[:, lo:hi].amax(1) if hi > lo else torch.zeros(2, 3, dtype=dtype)
            torch.testing.assert_close(pooled[:, t, w], want, rtol=0, atol=0, equal_nan=True)


SUM_WINDOWS = [(0, 0), (-3, 0), (1, 2), (-2, 5), (-40, 40), (-T_NAN, 0), (0, T_NAN)]


def _nonfinite_input(dtype):
    x = torch.randn(2, T_NAN, 3, dtype=torch.float64)
    x[0, 150, 1] = NAN
    x[1, 200, 2] = INF
    return x.to(dtype), {(0, 1): 150, (1, 2): 200}


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_sum_mean_nonfinite(backend, reduce, dtype):
    """A window that holds NaN / Inf is non-finite; windows that end before the first non-finite
    row of their (sequence, feature), and every other (sequence, feature), are exact; the gradient
    (linear, independent of x) stays finite and exact."""
    _skip_unsupported(backend, dtype)
    x, bad = _nonfinite_input(dtype)
    g = torch.randn(2, T_NAN, len(SUM_WINDOWS), 3, dtype=torch.float64).to(dtype)
    pooled, valid, dx = _run(backend, x, SUM_WINDOWS, reduce, g)
    ref, ref_valid, ref_dx = _oracle(x, SUM_WINDOWS, reduce, g)
    base, base_dx = _plain(backend, x, SUM_WINDOWS, reduce, g)
    assert torch.equal(valid, ref_valid)
    holds = ~torch.isfinite(ref)
    assert holds.any() and not torch.isfinite(pooled[holds]).any()
    clean = torch.ones_like(holds)
    t = torch.arange(T_NAN)
    for (b, d), pos in bad.items():
        for w, (a, bb) in enumerate(SUM_WINDOWS):
            hi = (t + bb + 1).clamp(0, T_NAN)
            clean[b, :, w, d] = hi <= pos  # the window ends before the non-finite row
    assert_close(pooled[clean], ref[clean], dtype, "pooled (clean windows)",
                 baseline=None if base is None else base[clean])
    assert_close(dx, ref_dx, dtype, "dx", factor=2, baseline=base_dx)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dname)
def test_backward_nonfinite_grad(backend, reduce, dtype):
    """A NaN in the incoming gradient: every position it reaches mathematically is non-finite,
    and the other (sequence, feature) columns of dx are exact."""
    _skip_unsupported(backend, dtype)
    x = torch.randn(2, 70, 3, dtype=torch.float64).to(dtype)
    windows = [(-3, 0), (1, 2), (-20, 20)]
    g = torch.randn(2, 70, len(windows), 3, dtype=torch.float64)
    g[0, 33, 1, 1] = NAN
    g = g.to(dtype)
    _, _, dx = _run(backend, x, windows, reduce, g)
    _, _, ref_dx = _oracle(x, windows, reduce, g)
    _, base_dx = _plain(backend, x, windows, reduce, g)
    reached = torch.isnan(ref_dx)
    assert reached.any() and not torch.isfinite(dx[reached]).any()
    other = torch.ones_like(reached)
    other[0, :, 1] = False
    assert_close(dx[other], ref_dx[other], dtype, "dx (other columns)", factor=2,
                 baseline=None if base_dx is None else base_dx[other])


# ------------------------------------------------------------------ 2b. finite data near the top of the range
BIG = {torch.float32: 1e37, torch.bfloat16: 1e37, torch.float16: 2e3, torch.float64: 1e300}
SHORT = [(0, 0), (-1, 0), (0, 2), (-1, 1)]  # sum of at most 3 values: finite in the dtype
WIDE = [(-T_NAN, 0), (0, T_NAN), (-50, 50), (-1000, 1000), (-200, -100)]


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_large_values(backend, reduce, dtype):
    """x ~ 1e37 in float32: every result whose true value is finite is finite and accurate,
    forward and backward (the in-block prefix overflowed: mean over (0, 0) gave NaN)."""
    _skip_unsupported(backend, dtype)
    big = BIG[dtype]
    windows = SHORT + (WIDE if reduce == "mean" else [])
    x = (big * (0.5 + torch.rand(2, T_NAN, 3, dtype=torch.float64))).to(dtype)
    x[1, :, 0] = big  # the case: a constant column
    x[1, :, 1] *= -1
    g = (big / 4 * (0.5 + torch.rand(2, T_NAN, len(windows), 3, dtype=torch.float64))).to(dtype)
    pooled, _, dx = _run(backend, x, windows, reduce, g)
    ref, _, ref_dx = _oracle(x, windows, reduce, g)
    base, base_dx = _plain(backend, x, windows, reduce, g)  # may overflow in dtype: then TOL alone
    assert torch.isfinite(ref).all() and torch.isfinite(ref_dx).all()
    scaled = lambda t: None if t is None else t.double() / big  # noqa: E731
    assert_close(scaled(pooled), ref / big, dtype, "pooled / big", baseline=scaled(base))
    assert_close(scaled(dx), ref_dx / big, dtype, "dx / big", factor=2, baseline=scaled(base_dx))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_large_values_mean_one_wide(backend, dtype):
    """The issue's case: x = 1e37 everywhere (float32), window (0, 0), mean -> 1e37."""
    _skip_unsupported(backend, dtype)
    x = torch.full((1, T_NAN, 2), BIG[dtype], dtype=dtype)
    pooled, _, dx = _run(backend, x, [(0, 0)], "mean", torch.ones(1, T_NAN, 1, 2, dtype=dtype))
    base, _ = _plain(backend, x, [(0, 0)], "mean")
    want = torch.full_like(pooled, BIG[dtype], dtype=torch.float64)
    scaled = lambda t: None if t is None else t.double() / BIG[dtype]  # noqa: E731
    assert torch.isfinite(pooled).all()
    assert_close(scaled(pooled), scaled(want), dtype, "pooled / big", baseline=scaled(base))
    assert torch.equal(dx, torch.ones_like(dx))


@pytest.mark.parametrize("reduce", REDUCES)
def test_reference_large_values(reduce):
    """The oracle sums in float64 for every input dtype: float32 data near the top of the range
    gives a finite mean over long windows."""
    x = torch.full((1, 50, 2), 3e38, dtype=torch.float32)
    pooled, _ = lk.reference.window_pool(x, [(-50, 0), (0, 0)], reduce)
    if reduce == "sum":
        assert torch.isinf(pooled[:, 1:, 0]).all()  # the true sum exceeds float32
    else:
        torch.testing.assert_close(pooled, torch.full_like(pooled, 3e38), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ 3. Triton launch grids
CUDA_AXIS_MAX = 65535  # gridDim.y and gridDim.z
CUDA_AXIS0_MAX = 2 ** 31 - 1  # gridDim.x
GRID_CASES = {
    "long_T": (1, 2 ** 26, 8),
    "big_B": (2 ** 20, 16, 8),
    "big_BT": (2 ** 12, 2 ** 16, 4),
    "wide_D": (1, 4, 2 ** 23),
    "everything": (2 ** 10, 2 ** 12, 2 ** 13),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_triton_grid_function(case):
    """The pure grid function puts the tiles on axis 0 and never exceeds CUDA's limits."""
    triton_pool = pytest.importorskip("leapformer_kernels.pooling.triton_pool")
    B, T, D = GRID_CASES[case]
    for bt, bd in ((64, 64), (256, 64), (128, 16)):
        grid = triton_pool.pool_grid(B, T, D, bt, bd)
        assert len(grid) == 3
        assert grid[0] <= CUDA_AXIS0_MAX and grid[1] <= CUDA_AXIS_MAX and grid[2] <= CUDA_AXIS_MAX
        tiles = B * -(-T // bt) * -(-D // bd)
        assert grid[0] * grid[1] * grid[2] == tiles


@pytest.mark.parametrize("reduce", REDUCES)
def test_multi_tile_parity(backend, reduce):
    """B > 1 with several T-tiles and D-tiles in one launch: every tile decodes its own (b, t, d)
    from the flat axis-0 program id. Oracle: the torch backend's float64 form (the quadratic max
    oracle would need [B, T, W, T, D] here)."""
    x = torch.randn(3, 530, 70)
    windows = [(-3, 1), (2, 300)]
    g = torch.randn(3, 530, 2, 70)
    pooled, valid, dx = _run(backend, x, windows, reduce, g)
    xr = x.double().requires_grad_()
    ref, ref_valid = lk.window_pool(xr, windows, reduce, backend="torch")
    (ref_dx,) = torch.autograd.grad(ref, xr, g.double())
    assert torch.equal(valid, ref_valid)
    assert rel_err(pooled, ref) <= TOL[torch.float32]
    assert rel_err(dx, ref_dx) <= 2 * TOL[torch.float32]


class _Recorder:
    """Stands in for a Triton kernel: records the launch grid, launches nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid(kwargs) if callable(grid) else grid)))
        return launch


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("case", ["long_T", "big_B", "wide_D"])
def test_triton_launch_grids(monkeypatch, case, reduce):
    """Every pooling launch, forward and backward, at sizes where T-blocks, batch or D-blocks
    exceed 65535: axes 1 and 2 stay within CUDA's limit (shapes only: meta tensors)."""
    triton_pool = pytest.importorskip("leapformer_kernels.pooling.triton_pool")
    log = []
    for name in dir(triton_pool):
        if name.startswith(("pool_fwd_kernel_", "pool_bwd_kernel_")):
            monkeypatch.setattr(triton_pool, name, _Recorder(name, log))
    B, T, D = GRID_CASES[case]
    windows = ((-3, 0), (1, 1))
    x = torch.empty(B, T, D, device="meta")
    pooled, _, arg = triton_pool.fwd(x, windows, reduce, with_argmax=True)
    grad = torch.empty(pooled.shape, device="meta")
    triton_pool.bwd(grad, T, windows, reduce, arg)
    assert log
    for name, grid in log:
        assert grid[0] <= CUDA_AXIS0_MAX, (name, grid)
        assert all(g <= CUDA_AXIS_MAX for g in grid[1:]), (name, grid)

"""window_pool on every backend that can serve it: parity with the float64 oracle, gradients,
ties, long-T precision, the kernels' argmax storage, bad input, the layer, dyadic_windows.

Backends: ``lk.available_backends("window_pool")`` (torch; cpu once the C++ extension builds;
triton on CUDA, or through the interpreter with ``TRITON_INTERPRET=1`` as conftest sets it
without a GPU). The interpreter is slow per kernel op, so the triton cases in CI are a subset;
the full grid is marked ``slow``.
"""
import os

import pytest
import torch

import leapformer_kernels as lk
from utils import HALF as HALF_DTYPES
from utils import assert_close, plain_pool, rel_err, required_backends

POOL_BACKENDS = lk.available_backends("window_pool")
REDUCES = ("sum", "mean", "max")
F64_BACKENDS = [b for b in POOL_BACKENDS if b in ("torch", "cpu")]
KERNEL_BACKENDS = [b for b in POOL_BACKENDS if b in ("cpu", "triton")]

# offsets relative to t: negative (past), overlapping, longer than any T here, wholly outside
WINDOW_SETS = {
    "dyadic": lk.dyadic_windows(4),
    "mixed": [(-3, 0), (-1, 1), (0, 0), (2, 5), (-2, 3)],
    "oversize": [(-2000, 2000), (-1500, 0), (0, 1500), (-1, 1)],
    "outside": [(5000, 5005), (-7000, -6000), (1, 1), (-40, -30)],
}
# the half dtypes each backend's parity cases run (CI: test_parity_half; all in the slow grid)
HALF = {"cpu": [torch.bfloat16], "triton": [torch.float16, torch.bfloat16], "torch": [torch.float16]}


def _on_gpu():
    return torch.cuda.is_available()


def baseline_rule(backend, dtype):
    """Whether flash-attn's rule (DESIGN section 4: at most 2x the error of the plain form run in
    the half dtype) applies: half dtypes, except triton's bfloat16 under ``TRITON_INTERPRET=1``.
    The interpreter casts float32 to bfloat16 by truncation (round toward zero; measured with
    triton 3.9: a ``tl.store`` of float32 values to a bfloat16 pointer equals dropping the low 16
    bits), which doubles the RMS rounding error of a round-to-nearest cast, so every bfloat16
    result sits at 2x the plain form's error (a coin flip against the rule). A GPU rounds to
    nearest: there the rule applies to bfloat16 too. DESIGN's tolerance applies to every case."""
    if dtype not in HALF_DTYPES:
        return False
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return not (backend == "triton" and dtype == torch.bfloat16 and interpreted)


def _x(B, T, D, dtype, ties=False):
    x = torch.randn(B, T, D, dtype=torch.float64)
    if ties:  # few distinct values: many equal maxima
        x = torch.randint(-2, 3, (B, T, D)).double()
    return x.to(dtype)


def _oracle(x, windows, reduce, grad):
    """Float64 oracle on the same input values: pooled, valid, dx for the upstream grad.

    The quadratic reference (``lk.reference``); for max it holds a [B, T, W, T, D] tensor, so
    beyond a few million elements the oracle is the torch backend's float64 prefix form (itself
    checked against the quadratic reference here), as DESIGN section 4 does for long T."""
    xr = x.detach().double().requires_grad_()
    B, T, D = x.shape
    if reduce == "max" and B * T * T * D * len(windows) > 4_000_000:
        pooled, valid = lk.window_pool(xr, windows, reduce, backend="torch")
    else:
        pooled, valid = lk.reference.window_pool(xr, windows, reduce)
    pooled.backward(grad.double())
    return pooled.detach(), valid, xr.grad


def _check(backend, B, T, D, windows, reduce, dtype, ties=False):
    x = _x(B, T, D, dtype, ties)
    x0 = x.clone()
    xk = x.clone().requires_grad_()
    pooled, valid = lk.window_pool(xk, windows, reduce, backend=backend)
    assert pooled.shape == (B, T, len(windows), D) and pooled.dtype == dtype
    assert valid.shape == (B, T, len(windows)) and valid.dtype == torch.bool
    if reduce == "max":  # the inference forward (no argmax saved) gives the same values
        with torch.no_grad():
            assert torch.equal(lk.window_pool(x, windows, reduce, backend=backend)[0], pooled.detach())
    grad = torch.randn(pooled.shape, dtype=torch.float64).to(dtype)
    pooled.backward(grad)
    ref, ref_valid, ref_dx = _oracle(x, windows, reduce, grad)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(x, x0), "the input was modified"
    what = f"{backend} {reduce} {dtype} T={T}"
    base = base_dx = None
    if baseline_rule(backend, dtype):  # flash-attn's rule: no worse than 2x the plain form run in dtype
        xb = x.detach().clone().requires_grad_()
        base, _ = plain_pool(xb, windows, reduce, dtype=dtype)
        (base_dx,) = torch.autograd.grad(base, xb, grad)
    assert_close(pooled, ref, dtype, f"{what}: forward", baseline=base)
    assert_close(xk.grad, ref_dx, dtype, f"{what}: gradient", factor=2, baseline=base_dx)
    return pooled, xk.grad


# ------------------------------------------------------------------ parity (CI subset)
@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("wset", list(WINDOW_SETS))
def test_parity_float32(backend, reduce, wset):
    Ts = (1, 100) if backend == "triton" else (1, 2, 17, 100, 1000)  # the interpreter is slow: rest in the slow grid
    for T in Ts:
        big_max = T >= 1000 and reduce == "max"  # keeps the quadratic max oracle small
        _check(backend, 1 if big_max else 2, T, 3 if big_max else 37, WINDOW_SETS[wset], reduce, torch.float32)


@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_parity_float32_long(backend, reduce):
    """T = 1000 (several kernel tiles and prefix blocks), D = 70 (not a multiple of any block)."""
    _check(backend, 1, 1000, 70, [(-3, 0), (1, 1), (2, 300), (-1500, 0)], reduce, torch.float32)


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_parity_float64(backend, reduce):
    for wset in WINDOW_SETS.values():
        for T in (1, 2, 17, 100):
            _check(backend, 2, T, 5, wset, reduce, torch.float64)


@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_parity_half(backend, reduce):
    """Half dtypes (HALF): DESIGN section 4's tolerances and flash-attn's rule (at most 2x the
    error of the plain form run in the half dtype, ``utils.plain_pool``), forward and gradient."""
    for dtype in HALF[backend]:
        _check(backend, 2, 100, 37, WINDOW_SETS["mixed"] + [(-1500, 0), (3, 40)], reduce, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("wset", list(WINDOW_SETS))
@pytest.mark.parametrize("T", (1, 2, 17, 100, 1000))
def test_parity_grid(backend, reduce, wset, T):
    dtypes = [torch.float32] + HALF[backend] + ([torch.float64] if backend in F64_BACKENDS else [])
    for dtype in dtypes:
        for D in (1, 37, 130):
            _check(backend, 2, T, D, WINDOW_SETS[wset], reduce, dtype)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("reduce", REDUCES)
def test_gradcheck(backend, reduce):
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    windows = [(-2, 0), (1, 3), (-20, 20), (30, 31), (0, 0)]
    assert torch.autograd.gradcheck(lambda t: lk.window_pool(t, windows, reduce, backend=backend)[0], (x,),
                                    eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_deterministic(backend):
    x = _x(2, 70, 37, torch.float32, ties=True).requires_grad_()
    windows = [(-5, 0), (1, 1), (2, 40), (-200, 0)]
    for reduce in REDUCES:
        pooled, _ = lk.window_pool(x, windows, reduce, backend=backend)
        g = torch.randn_like(pooled)
        (d1,) = torch.autograd.grad(pooled, x, g, retain_graph=True)
        (d2,) = torch.autograd.grad(pooled, x, g)
        assert torch.equal(d1, d2), reduce


# ------------------------------------------------------------------ max ties
@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_max_ties_first_index(backend):
    T = 12
    x = torch.zeros(1, T, 2)
    x[0, 3:9, 1] = 5.0  # a plateau of equal maxima in column 1; column 0 all equal
    x.requires_grad_()
    windows = [(0, 2), (-2, 2), (-100, 100)]
    pooled, _ = lk.window_pool(x, windows, "max", backend=backend)
    pooled.sum().backward()
    g = x.grad[0]
    # column 0: every window's gradient goes to its clipped start max(t + a, 0)
    want0 = torch.zeros(T)
    for a, b in windows:
        for t in range(T):
            want0[max(t + a, 0)] += 1
    assert torch.equal(g[:, 0], want0)
    # column 1: windows that reach the plateau send their gradient to its first element inside them
    want1 = torch.zeros(T)
    for a, b in windows:
        for t in range(T):
            lo, hi = max(t + a, 0), min(t + b, T - 1)
            inside = [s for s in range(lo, hi + 1) if 3 <= s < 9]
            want1[inside[0] if inside else lo] += 1
    assert torch.equal(g[:, 1], want1)
    _check(backend, 2, 64, 9, [(-4, 0), (1, 8), (-70, 70)], "max", torch.float32, ties=True)


# ------------------------------------------------------------------ long T precision
def _precision(backend, T, D, windows):
    x = (torch.randn(1, T, D) + 3.0)  # a nonzero mean makes the running prefix large
    pooled, _ = lk.window_pool(x, windows, "sum", backend=backend)
    ref, _ = lk.window_pool(x.double(), windows, "sum", backend="torch")  # float64 prefix form
    for w in range(len(windows)):
        err = rel_err(pooled[:, :, w], ref[:, :, w])
        assert err <= 1e-5, f"T={T} window {windows[w]}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", [b for b in POOL_BACKENDS if b != "triton" or _on_gpu()])
def test_sum_precision_T65536(backend):
    """A float32 prefix over 65536 rows would lose ~sqrt(T) ulps on every window; the blocked
    two-level prefix keeps every window, the 1-wide one included, at float32 accuracy."""
    T = 65536
    _precision(backend, T, 16, [(0, 0), (-1, 1), (-T, 0), (0, T), (-300, -100)])


@pytest.mark.skipif("triton" not in POOL_BACKENDS, reason="triton backend not available")
def test_sum_precision_triton_interpreted():
    """The same under the interpreter at a length it runs in seconds (a plain float32 prefix over
    4096 rows of mean 3 already misses 1e-5 on the 1-wide window, at 8e-5); T = 65536 is slow."""
    T = 4096
    _precision("triton", T, 1, [(0, 0), (-1, 1), (-T, 0)])


@pytest.mark.slow
@pytest.mark.skipif("triton" not in POOL_BACKENDS, reason="triton backend not available")
def test_sum_precision_triton_T65536():
    T = 65536
    _precision("triton", T, 4, [(0, 0), (-1, 1), (-T, 0), (0, T), (-300, -100)])


# ------------------------------------------------------------------ kernel storage
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_argmax_storage(backend):
    kern = lk.backends.kernels("window_pool", backend)
    assert kern.argmax_dtype(((1, 1), (-32767, 0))) == torch.int16
    assert kern.argmax_dtype(((1, 1), (-32768, 0))) == torch.int32
    x = torch.randn(1, 50, 3)
    for windows in (((-3, 0), (5, 7)), ((-40000, 0), (1, 1))):
        pooled, valid, arg = kern.fwd(x, windows, "max")
        assert arg.dtype == kern.argmax_dtype(windows) and arg.shape == (1, 50, 2, 3)
        ref, _ = lk.reference.window_pool(x, list(windows), "max")
        assert torch.equal(pooled, ref)
    _, _, arg = kern.fwd(x, ((60, 70),), "max")  # wholly outside: no argmax
    assert bool((arg == -1).all())


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_max_without_argmax(backend):
    """Inference (no gradient needed): max runs on values only, same values, no argmax saved."""
    kern = lk.backends.kernels("window_pool", backend)
    x = torch.randn(2, 300, 37)
    x[0, 5:40, 3] = float("-inf")  # -inf inside a window beats the padding outside [0, T)
    windows = [(-300, -200), (-7, 3), (0, 0), (1, 1), (2, 3), (100, 170), (250, 400), (-5, -2)]
    pooled, valid, arg = kern.fwd(x, windows, "max", with_argmax=False)
    assert arg is None
    ref, ref_valid = lk.reference.window_pool(x, windows, "max")
    assert torch.equal(pooled, ref) and torch.equal(valid, ref_valid)
    with_arg, _, arg = kern.fwd(x, windows, "max", with_argmax=True)
    assert arg is not None and torch.equal(with_arg, ref)
    # the public op picks the mode from grad mode and x.requires_grad
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        out, _ = lk.window_pool(xg, windows, "max", backend=backend)
    assert torch.equal(out, ref) and out.grad_fn is None
    out, _ = lk.window_pool(xg, windows, "max", backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    xr = x.clone().requires_grad_()
    lk.reference.window_pool(xr, windows, "max")[0].backward(g)
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b == "cpu"])
def test_int32_argmax_long_window(backend):
    T = 40000
    x = torch.randn(1, T, 2, requires_grad=True)
    windows = [(-T, 0), (0, 2)]
    pooled, _ = lk.window_pool(x, windows, "max", backend=backend)
    ref, _ = lk.window_pool(x, windows, "max", backend="torch")
    assert torch.equal(pooled, ref)
    g = torch.randn_like(pooled)
    (dx,) = torch.autograd.grad(pooled, x, g)
    (dref,) = torch.autograd.grad(ref, x, g)
    assert rel_err(dx, dref) <= 2e-5


def test_noncontiguous_input():
    base = torch.randn(2, 30, 20)
    x = base[:, ::2, 3:11]
    for backend in POOL_BACKENDS:
        for reduce in REDUCES:
            pooled, _ = lk.window_pool(x, [(-2, 1), (3, 5)], reduce, backend=backend)
            ref, _ = lk.reference.window_pool(x.contiguous(), [(-2, 1), (3, 5)], reduce)
            assert rel_err(pooled, ref) <= 1e-5


# ------------------------------------------------------------------ bad input
BAD = [
    ("a_gt_b", ValueError, "windows", dict(windows=[(0, 1), (3, 2)])),
    ("empty", ValueError, "windows", dict(windows=[])),
    ("float_window", TypeError, "windows", dict(windows=[(0.5, 2)])),
    ("triple", TypeError, "windows", dict(windows=[(1, 2, 3)])),
    ("not_a_list", TypeError, "windows", dict(windows=3)),
    ("unknown_reduce", ValueError, "reduce", dict(reduce="median")),
    ("rank2", ValueError, "x", dict(x=torch.randn(6, 3))),
    ("rank4", ValueError, "x", dict(x=torch.randn(2, 6, 3, 1))),
    ("int_x", TypeError, "x", dict(x=torch.ones(2, 6, 3, dtype=torch.int64))),
    ("bad_backend", ValueError, "backend", dict(backend="cuda")),
]


@pytest.mark.parametrize("backend", POOL_BACKENDS)
@pytest.mark.parametrize("name,exc,word,change", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, exc, word, change):
    args = dict(x=torch.randn(2, 6, 3), windows=[(1, 2)], reduce="mean", backend=backend)
    args.update(change)
    x0 = args["x"].clone()
    with pytest.raises(exc, match=word):
        lk.window_pool(**args)
    assert torch.equal(args["x"], x0)


def test_triton_refuses_float64():
    if "triton" not in POOL_BACKENDS:
        pytest.skip("triton backend not available")
    with pytest.raises(ValueError, match="backend"):
        lk.window_pool(torch.randn(1, 4, 2, dtype=torch.float64), [(0, 1)], "sum", backend="triton")


# ------------------------------------------------------------------ layer, dyadic windows
@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_window_pool_layer(backend):
    m = lk.WindowPool(lk.dyadic_windows(3), reduce="max", backend=backend)
    x = torch.randn(2, 20, 6, requires_grad=True)
    pooled, valid = m(x)
    ref, ref_valid = lk.reference.window_pool(x, lk.dyadic_windows(3), "max")
    assert torch.equal(pooled, ref) and torch.equal(valid, ref_valid)
    pooled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert "reduce='max'" in repr(m)
    with pytest.raises(ValueError, match="reduce"):
        lk.WindowPool([(0, 1)], reduce="median")


def test_dyadic_windows():
    assert lk.dyadic_windows(1) == [(1, 1)]
    assert lk.dyadic_windows(4) == [(1, 1), (2, 3), (4, 7), (8, 15)]
    w = lk.dyadic_windows(8)
    assert all(b - a + 1 == 2 ** i for i, (a, b) in enumerate(w))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n"):
            lk.dyadic_windows(bad)


def test_backends_listed():
    """The backends this machine must have (LEAPFORMER_REQUIRE_BACKENDS, default torch,cpu,triton
    on CI) are listed for window_pool, torch always; and each listed backend runs it."""
    assert "torch" in POOL_BACKENDS
    assert set(required_backends()) <= set(POOL_BACKENDS), POOL_BACKENDS
    x = torch.randn(1, 5, 2)
    ref, _ = lk.reference.window_pool(x, [(-1, 1)], "sum")
    for b in POOL_BACKENDS:
        assert rel_err(lk.window_pool(x, [(-1, 1)], "sum", backend=b)[0], ref) <= 1e-6, b

"""What is specific to the C++ ``cpu`` kernels of monotone cross-attention (``num_visible_keys``,
issue #21; the shared parity suite is test_visible_keys.py): the C++ value checks on a direct
extension call (a call that skips the Python validation must never read out of bounds), both
drivers and any thread count giving bitwise the same results, a rate where one query chunk spans
many key chunks, limits jumping from 0 to S inside one chunk, fp16, normalize=False with GQA and an
incoming state gradient, and gradcheck of the float64 C++ code itself."""
import pytest
import torch

import leapformer_kernels as lk
from utils import assert_close, make_inputs, make_state

pytestmark = pytest.mark.skipif("cpu" not in lk.available_backends(),
                                reason="the C++ cpu backend is not available (build failed?)")


@pytest.fixture
def driver():
    """Force one of the two C++ drivers (1: sequential over chunks, 2: across chunks); restores the
    automatic choice afterwards."""
    from leapformer_kernels.attention import cpu

    yield cpu.set_mode
    cpu.set_mode(0)


def _run(ins, n, *, key_padding_mask=None, state=None, do=None, dS=None, dz=None, fn=None, **kw):
    """o, S, z and the gradients of (q, k, v, pq, pk[, S0, z0]) for cotangents do, dS, dz, from the
    cpu backend (or ``fn``: the float64 oracle)."""
    if fn is None:
        fn, kw = lk.leap_attention, dict(kw, backend="cpu")
    ins = [t.detach().clone().requires_grad_() for t in ins]
    st = None if state is None else [t.detach().clone().requires_grad_() for t in state]
    o, (Sf, zf) = fn(*ins, causal=False, num_visible_keys=n, key_padding_mask=key_padding_mask,
                     initial_state=None if st is None else tuple(st), output_final_state=True, **kw)
    outs, cots = [o], [torch.randn_like(o) if do is None else do.to(o.dtype)]
    if dS is not None:
        outs += [Sf, zf]
        cots += [dS.to(Sf.dtype), dz.to(zf.dtype)]
    grads = torch.autograd.grad(outs, ins + (st or []), cots)
    return (o, Sf, zf) + tuple(grads)


def _check(dtype, ins, n, state=None, factor=1, **kw):
    """The cpu kernels against the float64 oracle: o, final S, z and every gradient."""
    B, T, H = ins[0].shape[:3]
    Dk, Dv = ins[0].shape[3], ins[2].shape[3]
    do = torch.randn(B, T, H, Dv, dtype=torch.float64)
    dS = torch.randn(B, H, 2 * Dk, Dv, dtype=torch.float64)
    dz = torch.randn(B, H, 2 * Dk, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cast = [t.to(dtype) for t in ins[:3]] + [t.to(acc) for t in ins[3:]]
    got = _run(cast, n, state=None if state is None else [t.to(acc) for t in state], do=do, dS=dS, dz=dz, **kw)
    ref = _run([t.double() for t in ins], n, state=None if state is None else [t.double() for t in state], do=do,
               dS=dS, dz=dz, fn=lk.reference.leap_attention, **kw)
    names = ["o", "S", "z", "dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"]
    for i, (name, g, r) in enumerate(zip(names, got, ref)):
        assert_close(g, r, dtype, name, factor=factor * (2 if i >= 3 else 1))
    return got


def _ext_args(B=2, T=6, S=9, n=None, causal=False, cu=None, block_size=0):
    q, k, v, pq, pk = make_inputs(B, T, S, 2, 2, 4, 3)
    return (q, k, v, pq, pk, None, None, None, cu, n, causal, block_size, 1e-6, True), torch.empty(B, T, 2, 3)


@pytest.mark.parametrize("n,match", [
    (torch.tensor([[0, 2, 1, 3, 8, 9]] * 2), "num_visible_keys must be non-decreasing"),
    (torch.tensor([[-1, 2, 2, 3, 8, 9]] * 2), r"num_visible_keys must lie in \[0, S=9\]"),
    (torch.tensor([[0, 2, 2, 3, 8, 9], [0, 2, 2, 3, 8, 10]]), r"num_visible_keys must lie in \[0, S=9\].*\[1, 5\]"),
    (torch.tensor([0, 2, 2, 3, 8, 9]), r"num_visible_keys must be \[B, T\]"),
    (torch.zeros(2, 7, dtype=torch.long), r"num_visible_keys must be \[B, T\]"),
    (torch.zeros(2, 6, dtype=torch.int32), "num_visible_keys: a contiguous int64"),
    (torch.zeros(6, 2, dtype=torch.long).t(), "num_visible_keys: a contiguous int64"),
])
def test_direct_call_checks_values(n, match):
    """The C++ entry points check num_visible_keys themselves (ValueError naming it), forward and
    backward, and write nothing on error."""
    from leapformer_kernels.attention import cpu

    ext = cpu._ext()
    args, o = _ext_args(n=n)
    o.fill_(7.)
    with pytest.raises(ValueError, match=match):
        ext.fwd(*args, o, None, None)
    assert bool((o == 7.).all())
    q, k, v = args[:3]
    do = torch.randn(2, 6, 2, 3)
    outs = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty(2, 6, 2), torch.empty(2, 9, 2)]
    with pytest.raises(ValueError, match=match):
        ext.bwd(do, None, None, *args, *outs, None, None, None, None, None)


def test_direct_call_refuses_other_modes():
    from leapformer_kernels.attention import cpu

    ext = cpu._ext()
    n = torch.tensor([[1, 2, 3, 4, 5, 6]])
    args, o = _ext_args(B=1, T=6, S=6, n=n, causal=True)
    with pytest.raises(ValueError, match="num_visible_keys needs causal=False"):
        ext.fwd(*args, o, None, None)
    args, o = _ext_args(B=1, T=6, S=6, n=n, block_size=2)
    with pytest.raises(ValueError, match="num_visible_keys cannot be combined with block_size"):
        ext.fwd(*args, o, None, None)
    args, o = _ext_args(B=1, T=6, S=6, n=n, cu=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="num_visible_keys cannot be combined with cu_seqlens"):
        ext.fwd(*args, o, None, None)
    args, o = _ext_args(B=1, T=6, S=6, n=n)
    ext.fwd(*args, o, None, None)
    assert bool(torch.isfinite(o).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_drivers_and_threads(dtype, driver):
    """Bitwise the same outputs and gradients twice, with either driver, and with 1 or 2 threads."""
    B, T, S, H = 1, 150, 380, 2
    ins = make_inputs(B, T, S, H, 1, 32, 24, dtype=torch.float32)
    ins = [t.to(dtype) for t in ins[:3]] + ins[3:]
    S0, z0 = make_state(B, H, 32, 24)
    n = lk.wait_k(T, S, 3, 2.5)
    kpm = torch.rand(B, S) < 0.2
    do = torch.randn(B, T, H, 24)
    dS, dz = torch.randn(B, H, 64, 24), torch.randn(B, H, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for m, nt in ((1, threads), (1, threads), (2, threads), (2, 1), (1, 1), (0, threads)):
            driver(m)
            torch.set_num_threads(nt)
            results.append(_run(ins, n, key_padding_mask=kpm, state=(S0, z0), do=do, dS=dS, dz=dz))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", [1, 2])
def test_large_rate_spans_many_key_chunks(mode, driver):
    """rate 23: one 64-query chunk spans about 23 key chunks; each query reads one partial chunk."""
    driver(mode)
    B, T, S = 2, 70, 1500
    ins = make_inputs(B, T, S, 2, 1, 16, 8, dtype=torch.float64)
    n = torch.stack([lk.wait_k(T, S, 1, 23.0), lk.wait_k(T, S, 40, 21.5)])
    S0, z0 = make_state(B, 2, 16, 8, dtype=torch.float64)
    _check(torch.float64, ins, n, state=(S0, z0))
    _check(torch.float32, ins, n, state=(S0, z0))


@pytest.mark.parametrize("mode", [1, 2])
def test_limits_jump_from_zero_to_all_inside_one_chunk(mode, driver):
    """Within one 64-query chunk the limit jumps from 0 to S (and rows stay at 0, or at S, all along)."""
    driver(mode)
    B, T, S = 4, 100, 200
    ins = make_inputs(B, T, S, 2, 2, 8, 8, dtype=torch.float64)
    n = torch.zeros(B, T, dtype=torch.long)
    n[0, 30:] = S
    n[1, 64:] = S  # exactly at a query-chunk boundary
    n[2] = S
    # row 3: zero throughout (only the state is visible)
    kpm = torch.rand(B, S) < 0.1
    S0, z0 = make_state(B, 2, 8, 8, dtype=torch.float64)
    _check(torch.float64, ins, n, state=(S0, z0), key_padding_mask=kpm)
    _check(torch.float64, ins, n, key_padding_mask=kpm, eps=0.5)


def test_float16_normalize_false_gqa_and_limits_on_chunk_edges():
    """fp16 inputs (states in float32), normalize=False, H=4 over Hkv=2, limits on multiples of 64."""
    B, T, S = 2, 90, 260
    ins = make_inputs(B, T, S, 4, 2, 16, 16, dtype=torch.float64)
    ins = [t * 0.3 for t in ins[:3]] + ins[3:]  # normalize=False sums grow with S: stay in fp16 range
    n = torch.stack([torch.clamp(torch.arange(T) // 10 * 64, max=S), lk.wait_k(T, S, 0, 2.9)])
    # a plain-fp16 baseline is not needed: the kernels accumulate in float32
    _check(torch.float16, ins, n, normalize=False)
    _check(torch.float64, ins, n, normalize=False)


@pytest.mark.parametrize("mode", [1, 2])
def test_gradcheck_cpp_float64(mode, driver):
    """gradcheck on the C++ float64 kernels: GQA, padding, a state, both normalizations."""
    driver(mode)
    B, T, S, H = 2, 11, 150, 2
    ins = [t.requires_grad_() for t in make_inputs(B, T, S, H, 1, 3, 2, dtype=torch.float64, p_extremes=False)]
    S0, z0 = make_state(B, H, 3, 2, dtype=torch.float64, requires_grad=True)
    n = torch.tensor([[0, 0, 3, 64, 64, 70, 128, 129, 140, 150, 150], [5, 9, 9, 20, 63, 65, 66, 100, 127, 149, 150]])
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 1] = kpm[1, 64] = True
    for normalize in (True, False):
        def f(q, k, v, pq, pk, S0, z0):
            o, (Sf, zf) = lk.leap_attention(q, k, v, pq, pk, causal=False, num_visible_keys=n, key_padding_mask=kpm,
                                            initial_state=(S0, z0), output_final_state=True, eps=1e-3,
                                            normalize=normalize, backend="cpu")
            return o, Sf, zf

        assert torch.autograd.gradcheck(f, (*ins, S0, z0), fast_mode=True)

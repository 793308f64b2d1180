"""What is specific to the C++ ``cpu`` backend of LeaP attention (csrc/leap_attention.cpp).

The shared parity suite (test_leap_attention.py etc.) already runs against "cpu" through the
``backend`` fixture; here: gradcheck on the C++ code itself (float64 kernels), both drivers
(sequential over chunks per head, and across chunks for few heads with long sequences),
determinism, the decode step, and the build-failure fallback.
"""
import warnings

import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels import _build, backends
from utils import TOL, assert_close, make_inputs, make_state, reference

HAVE_CPU = "cpu" in lk.available_backends()
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="the C++ cpu backend is not available (build failed?)")


@pytest.fixture
def driver():
    """Force one of the two C++ drivers for the duration of a test (1: sequential over chunks,
    2: across chunks); restores the automatic choice afterwards."""
    from leapformer_kernels.attention import cpu

    def set_mode(mode):
        cpu.set_mode(mode)

    yield set_mode
    cpu.set_mode(0)


MODES = {
    "causal": dict(causal=True),
    "block1": dict(causal=True, block_size=1),
    "block3": dict(causal=True, block_size=3),
    "block100": dict(causal=True, block_size=100),
    "noncausal": dict(causal=False),
}


def _gradcheck(B=1, T=7, S=None, H=2, Hkv=None, Dk=3, Dv=2, state=False, kpm=None, cu=None, fast=False, **kw):
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv, dtype=torch.float64, requires_grad=True)
    n = B if cu is None else cu.numel() - 1
    st = make_state(n, H, Dk, Dv, dtype=torch.float64, requires_grad=True) if state else None

    def f(q, k, v, pq, pk, *st):
        o, (S_, z_) = lk.leap_attention(q, k, v, pq, pk, key_padding_mask=kpm, cu_seqlens=cu,
                                        initial_state=tuple(st) if st else None, output_final_state=True,
                                        backend="cpu", **kw)
        return o, S_, z_

    ins = (q, k, v, pq, pk) + (tuple(st) if st else ())
    assert torch.autograd.gradcheck(f, ins, fast_mode=fast)


@needs_cpu
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_modes(mode):
    _gradcheck(**MODES[mode])


@needs_cpu
@pytest.mark.parametrize("mode", ["causal", "block3", "block100", "noncausal"])
def test_gradcheck_across_chunks(mode, driver):
    # T > 64: several key chunks; block 100 ends in a later chunk than many of its queries
    for m in (1, 2):
        driver(m)
        _gradcheck(T=131, H=1, Dk=2, Dv=2, state=True, fast=True, **MODES[mode])


@needs_cpu
def test_gradcheck_cross_attention():
    _gradcheck(T=5, S=9, causal=False, state=True)


@needs_cpu
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_padding(causal):
    kpm = torch.tensor([[True, False, False, True, False, False, False]])
    _gradcheck(kpm=kpm, causal=causal)


@needs_cpu
@pytest.mark.parametrize("mode", ["causal", "block3", "noncausal"])
def test_gradcheck_varlen(mode):
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int64)  # includes a zero-length sequence
    _gradcheck(T=11, cu=cu, state=True, **MODES[mode])


@needs_cpu
def test_gradcheck_gqa_state_normalize_off():
    _gradcheck(H=4, Hkv=2, state=True)
    _gradcheck(H=3, Hkv=1, normalize=False)
    _gradcheck(state=True, normalize=False, causal=True, block_size=2)


@needs_cpu
def test_gradcheck_eps_clamp():
    # eps large enough that some denominators are clamped: zero gradient through den there
    _gradcheck(T=9, eps=0.3)


def _parity(dtype, B=2, T=65, S=None, H=2, Hkv=None, Dk=16, Dv=16, state=False, kpm=None, cu=None, **kw):
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv, dtype=torch.float32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    n = B if cu is None else cu.numel() - 1
    st = make_state(n, H, Dk, Dv) if state else None
    ins = [q, k, v, pq, pk] + (list(st) if st else [])
    for t in ins:
        t.requires_grad_()
    call = dict(key_padding_mask=kpm, cu_seqlens=cu, output_final_state=True, **kw)
    o, (S_, z_) = lk.leap_attention(*ins[:5], initial_state=tuple(ins[5:]) or None, backend="cpu", **call)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    o_r, (S_r, z_r) = lk.reference.leap_attention(*ref_ins[:5], initial_state=tuple(ref_ins[5:]) or None, **call)
    assert o.dtype == dtype and S_.dtype == torch.float32
    assert_close(o, o_r, dtype, "o")
    assert_close(S_, S_r, torch.float32 if dtype == torch.float32 else dtype, "S")
    assert_close(z_, z_r, torch.float32 if dtype == torch.float32 else dtype, "z")
    g = [torch.randn_like(t.double()) for t in (o_r, S_r, z_r)]
    loss = sum((a.double() * b).sum() for a, b in zip((o, S_, z_), g))
    loss_r = sum((a * b).sum() for a, b in zip((o_r, S_r, z_r), g))
    grads = torch.autograd.grad(loss, ins)
    grads_r = torch.autograd.grad(loss_r, ref_ins)
    names = ["dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"]
    for name, a, b in zip(names, grads, grads_r):
        assert a.dtype == (dtype if name in ("dq", "dk", "dv") else torch.float32)
        assert_close(a, b, dtype, name, factor=2)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_parity_both_drivers(dtype, mode, driver):
    for m in (1, 2):
        driver(m)
        _parity(dtype, T=150, **MODES[mode])


@needs_cpu
@pytest.mark.parametrize("mode", ["causal", "block3", "noncausal"])
def test_parity_float16(mode):
    # the kernels are also instantiated for float16 (accumulating in float32)
    _parity(torch.float16, T=100, **MODES[mode])


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_gqa_padding_state_varlen(dtype, driver):
    kpm = torch.rand(2, 130) < 0.3
    cu = torch.tensor([0, 70, 70, 200], dtype=torch.int64)
    for m in (1, 2):
        driver(m)
        _parity(dtype, T=130, H=4, Hkv=2, Dk=32, Dv=16, state=True, kpm=kpm)
        _parity(dtype, B=1, T=200, H=2, Dk=16, Dv=32, state=True, cu=cu, causal=True, block_size=7)
        _parity(dtype, T=33, S=97, causal=False, normalize=False)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_attention_padding_equals_dropped_keys(dtype, driver):
    """Cross-attention (S != T) with padded keys equals the reference on the unpadded keys only
    (padded keys contribute nothing and get zero gradients)."""
    B, T, S, H, D = 2, 33, 97, 2, 16
    q, k, v, pq, pk = make_inputs(B, T, S, H, None, D, D, dtype=dtype, requires_grad=True)
    kpm = torch.rand(B, S) < 0.3
    kpm[0, :5] = True
    for m in (1, 2):
        driver(m)
        o = lk.leap_attention(q, k, v, pq, pk, causal=False, key_padding_mask=kpm, backend="cpu")
        do = torch.randn_like(o)
        dq, dk, dv, dpq, dpk = torch.autograd.grad(o, (q, k, v, pq, pk), do)
        for b in range(B):
            keep = ~kpm[b]
            ins = [t.detach().double().requires_grad_() for t in
                   (q[b:b + 1], k[b:b + 1, keep], v[b:b + 1, keep], pq[b:b + 1], pk[b:b + 1, keep])]
            o_r = lk.reference.leap_attention(*ins, causal=False)
            g_r = torch.autograd.grad(o_r, ins, do[b:b + 1].double())
            assert_close(o[b:b + 1], o_r, dtype, "o")
            for name, a, r in zip(("dq", "dk", "dv", "dpq", "dpk"), (dq, dk, dv, dpq, dpk), g_r):
                a = a[b:b + 1] if name in ("dq", "dpq") else a[b:b + 1, keep]
                assert_close(a, r, dtype, name, factor=2)
            assert not dk[b, kpm[b]].any() and not dv[b, kpm[b]].any() and not dpk[b, kpm[b]].any()


@needs_cpu
def test_long_sequence_few_heads_across_chunks(driver):
    """B=1, H=1 with many chunks: the automatic choice runs across chunks on a multi-core
    machine; both drivers agree bitwise and match the float64 reference."""
    q, k, v, pq, pk = make_inputs(1, 1000, None, 1, None, 32, 32, dtype=torch.float64, requires_grad=True)
    st = make_state(1, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    ins = (q, k, v, pq, pk) + st
    for kw in (dict(causal=True), dict(causal=True, block_size=100), dict(causal=False)):
        outs = []
        for m in (1, 2, 0):
            driver(m)
            o, (S_, z_) = lk.leap_attention(q, k, v, pq, pk, initial_state=st, output_final_state=True,
                                            backend="cpu", **kw)
            g = torch.autograd.grad((o.sum() + S_.sum() * 1e-3 + z_.sum() * 1e-3), ins)
            outs.append((o, S_, z_) + g)
        for a, b, c in zip(*outs):
            assert torch.equal(a, b) and torch.equal(a, c)
        o_r, (S_r, z_r) = reference(q, k, v, pq, pk, initial_state=st, output_final_state=True, **kw)
        assert_close(outs[0][0], o_r, torch.float64, "o")
        assert_close(outs[0][1], S_r, torch.float64, "S")


@needs_cpu
@pytest.mark.parametrize("dtype,T", [(torch.float64, 1100), (torch.bfloat16, 2100)])
def test_head_major_copy(dtype, T, driver):
    """Calls of more than 2 MiB per input with several heads run on head-major copies of q, k, v
    and do (the kernel's own buffers): GQA, padding and a state there, both drivers bitwise equal,
    and the same gradients as the torch backend in float64."""
    B, H, Hkv, D = 2, 4, 2, 64
    q, k, v, pq, pk = make_inputs(B, T, None, H, Hkv, D, D, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    pq.requires_grad_()
    pk.requires_grad_()
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, :37] = True
    kpm[1, T // 2:T // 2 + 5] = True
    st = make_state(B, H, D, D, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                    requires_grad=True)
    ins = (q, k, v, pq, pk) + st
    do = torch.randn(B, T, H, D, dtype=torch.float64).to(dtype)
    outs = []
    for m in (1, 2):
        driver(m)
        o, (S_, z_) = lk.leap_attention(q, k, v, pq, pk, initial_state=st, output_final_state=True,
                                        key_padding_mask=kpm, backend="cpu")
        outs.append((o, S_, z_) + torch.autograd.grad((o, S_), ins, (do, torch.ones_like(S_) * 1e-3)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    o, (S_, z_) = lk.leap_attention(*ins64[:5], initial_state=tuple(ins64[5:]), output_final_state=True,
                                    key_padding_mask=kpm, backend="torch")
    ref = (o, S_, z_) + torch.autograd.grad((o, S_), ins64, (do.double(), torch.ones_like(S_) * 1e-3))
    names = ("o", "S", "z", "dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0")
    for name, a, r in zip(names, outs[0], ref):
        assert_close(a, r, dtype, name, factor=1.0 if name in ("o", "S", "z") else 2.0)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype, driver):
    """The same inputs give bitwise the same gradients: twice, with either driver, and with 1 or
    2 threads (no floating-point atomics, no thread-dependent reduction order)."""
    q, k, v, pq, pk = make_inputs(1, 300, None, 4, 2, 32, 32, dtype=torch.float32)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    pq.requires_grad_()
    pk.requires_grad_()
    do = torch.randn(1, 300, 4, 32).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for m, nt in ((1, threads), (1, threads), (2, threads), (2, 1), (0, threads)):
            driver(m)
            torch.set_num_threads(nt)
            o = lk.leap_attention(q, k, v, pq, pk, causal=True, block_size=5, backend="cpu")
            results.append((o,) + torch.autograd.grad(o, (q, k, v, pq, pk), do))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,Hkv,normalize", [(1, 4, True), (3, 2, True), (2, 1, False)])
@pytest.mark.parametrize("Dv", [8, 40, 12])  # float32 one-token sweep: 8-wide, 32+8-wide, scalar rows
def test_step(dtype, t, Hkv, normalize, Dv):
    B, H, Dk, T0 = 3, 4, 16, 20
    q, k, v, pq, pk = make_inputs(B, T0 + t, None, H, Hkv, Dk, Dv, dtype=torch.float32)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    pq, pk = pq.to(sdt), pk.to(sdt)
    _, state = lk.leap_attention(q[:, :T0], k[:, :T0], v[:, :T0], pq[:, :T0], pk[:, :T0],
                                 output_final_state=True, normalize=normalize, backend="cpu")
    saved = tuple(s.clone() for s in state)
    o, (S_, z_) = lk.leap_attention_step(q[:, T0:], k[:, T0:], v[:, T0:], pq[:, T0:], pk[:, T0:], state,
                                         normalize=normalize, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(state, saved)), "the input state was modified"
    assert o.dtype == dtype and S_.dtype == sdt and z_.dtype == sdt
    o_r, (S_r, z_r) = reference(q, k, v, pq, pk, output_final_state=True, normalize=normalize)
    assert_close(o, o_r[:, T0:], dtype, "o")
    assert_close(S_, S_r, sdt if dtype != torch.bfloat16 else dtype, "S")
    assert_close(z_, z_r, sdt if dtype != torch.bfloat16 else dtype, "z")
    # no state: zeros
    o0, _ = lk.leap_attention_step(q[:, :t], k[:, :t], v[:, :t], pq[:, :t], pk[:, :t], None,
                                   normalize=normalize, backend="cpu")
    o0_r = reference(q[:, :t], k[:, :t], v[:, :t], pq[:, :t], pk[:, :t], normalize=normalize)
    assert_close(o0, o0_r, dtype, "o (no state)")


def test_build_failure_falls_back(monkeypatch):
    """A failed build: the automatic choice falls back to torch with one warning naming the
    cause; backend="cpu" raises ValueError naming `backend` with the build log's tail."""
    import torch.utils.cpp_extension as cpp_ext

    def broken_load(*args, **kwargs):
        print("c++: fatal error: simulated-compiler-failure-1234")
        raise RuntimeError("Error building extension 'leapformer_leap_attention'")

    monkeypatch.setattr(cpp_ext, "load", broken_load)
    monkeypatch.setattr(_build, "_loaded", {})  # both caches reset (restored after the test)
    monkeypatch.setattr(_build, "_failed", {})
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_chosen", {})  # memoised backend choices
    monkeypatch.delenv("LEAPFORMER_BACKEND", raising=False)
    assert "cpu" not in lk.available_backends()
    q, k, v, pq, pk = make_inputs(1, 9, None, 2, None, 8, 8)
    with pytest.warns(RuntimeWarning, match="cpu backend is unavailable") as rec:
        o = lk.leap_attention(q, k, v, pq, pk)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert "simulated-compiler-failure-1234" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call warns no more
        o2 = lk.leap_attention(q, k, v, pq, pk)
    o_t = lk.leap_attention(q, k, v, pq, pk, backend="torch")
    assert torch.equal(o, o_t) and torch.equal(o2, o_t)
    with pytest.raises(ValueError, match="backend") as exc:
        lk.leap_attention(q, k, v, pq, pk, backend="cpu")
    assert "simulated-compiler-failure-1234" in str(exc.value)
    with pytest.raises(ValueError, match="backend"):
        lk.leap_attention_step(q[:, :1], k[:, :1], v[:, :1], pq[:, :1], pk[:, :1], None, backend="cpu")

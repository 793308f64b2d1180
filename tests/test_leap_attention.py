"""Parity of ``lk.leap_attention`` (every backend) against the float64 quadratic reference:
forward, gradients to q, k, v, pq, pk and the initial state, every mode, odd shapes."""
import pytest
import torch

import leapformer_kernels as lk
from utils import HALF, TOL, assert_close, make_inputs, make_state, plain_form, reference, rel_err

BACKENDS = lk.available_backends()
# One half type per backend in the default run (DESIGN section 4); fp16/bf16 grids are "slow".
DTYPES = {
    "torch": [torch.float64, torch.float32, torch.bfloat16],
    "cpu": [torch.float64, torch.float32, torch.bfloat16],
    "triton": [torch.float32, torch.float16, torch.bfloat16],
}


def backend_dtypes(which=slice(None)):
    """(backend, dtype) pairs, ids like "cpu-bfloat16", for DTYPES[backend][which]."""
    return [pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}") for b in BACKENDS for d in DTYPES[b][which]]

MODES = {
    "causal": dict(causal=True),
    "block1": dict(causal=True, block_size=1),
    "block5": dict(causal=True, block_size=5),
    "block100": dict(causal=True, block_size=100),
    "noncausal": dict(causal=False),
}


def _run(backend, dtype, *, B=2, T=65, S=None, H=2, Hkv=None, Dk=16, Dv=16, mode="causal", padding=False,
         state=False, normalize=True, eps=1e-6, grads=True):
    kw = dict(MODES[mode], normalize=normalize, eps=eps)
    if (T if S is None else S) == 1 and normalize and not state:
        # one key, no state: o = v exactly, so dq, dk, dpq, dpk are exactly 0 and their relative
        # error is meaningless; a carried state makes the case informative (it is a decode step).
        state = True
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv, dtype=torch.float32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if dtype == torch.float64:
        pq, pk = pq.double(), pk.double()
    S_len = k.shape[1]
    if padding:
        kpm = torch.rand(B, S_len) < 0.3
        kpm[:, 0] = True  # left padding shape too
        kw["key_padding_mask"] = kpm
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = make_state(B, H, Dk, Dv, dtype=sdt) if state else None
    inputs = [q, k, v, pq, pk] + (list(st) if st else [])
    for t in inputs:
        t.requires_grad_(grads)

    def call(fn, ins, **extra):
        init = (ins[5], ins[6]) if state else None
        return fn(*ins[:5], initial_state=init, output_final_state=True, **kw, **extra)

    o, (Sf, zf) = call(lk.leap_attention, inputs, backend=backend)
    ref_inputs = [t.detach().double().requires_grad_(grads) for t in inputs]
    o_ref, (Sf_ref, zf_ref) = call(lk.reference.leap_attention, ref_inputs)
    # flash-attn's rule (half types): no worse than 2x the plain PyTorch (quadratic) form run
    # entirely in the same dtype (proportions and state included)
    base_inputs = [t.detach().to(dtype).requires_grad_(grads) for t in inputs]
    o_base, (Sf_base, zf_base) = call(lambda *a, **k: plain_form(*a, dtype=dtype, **k), base_inputs)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert Sf.dtype == sdt and zf.dtype == sdt
    assert_close(o, o_ref, dtype, "o", baseline=o_base)
    assert_close(Sf, Sf_ref, dtype, "final S", baseline=Sf_base)
    assert_close(zf, zf_ref, dtype, "final z", baseline=zf_base)
    if not grads:
        return
    do = torch.randn_like(o_ref)
    dS = torch.randn_like(Sf_ref)
    dz = torch.randn_like(zf_ref)
    torch.autograd.backward([o, Sf, zf], [do.to(o.dtype), dS.to(Sf.dtype), dz.to(zf.dtype)])
    torch.autograd.backward([o_base, Sf_base, zf_base], [do.to(dtype), dS.to(dtype), dz.to(dtype)])
    torch.autograd.backward([o_ref, Sf_ref, zf_ref], [do.to(dtype).double(), dS, dz])
    names = ["dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"]
    for name, t, r, b in zip(names, inputs, ref_inputs, base_inputs):
        assert t.grad is not None, f"{name} missing"
        assert t.grad.dtype == t.dtype, f"{name} has dtype {t.grad.dtype}, expected {t.dtype}"
        assert_close(t.grad, r.grad, dtype, name, factor=2.0, baseline=b.grad)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T", [1, 7, 65], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("backend,dtype", backend_dtypes(slice(0, 2)))
def test_modes(backend, dtype, mode, T):
    _run(backend, dtype, T=T, mode=mode)


@pytest.mark.parametrize("mode", ["causal", "block5", "noncausal"])
@pytest.mark.parametrize("backend,dtype", backend_dtypes(slice(2, None)))
def test_half_precision(backend, dtype, mode):
    _run(backend, dtype, T=130 if backend != "triton" else 65, mode=mode)


@pytest.mark.parametrize("S", [1, 37, 200])
def test_cross_attention(backend, S):
    _run(backend, torch.float32, T=63, S=S, mode="noncausal", Dk=32, Dv=16)


@pytest.mark.parametrize("mode", ["causal", "block5", "noncausal"])
def test_gqa_padding_state(backend, mode):
    _run(backend, torch.float32, T=70, H=4, Hkv=2, mode=mode, padding=True, state=True)
    _run(backend, torch.float32, T=9, H=3, Hkv=1, mode=mode, padding=True)


@pytest.mark.parametrize("normalize,eps", [(False, 1e-6), (True, 0.1), (True, 0.0)])
def test_normalize_eps(backend, normalize, eps):
    # eps=0: the forward is finite (0 where den = 0) but the gradient at den = 0 is unbounded
    # by definition of num / den, so only the forward is compared there.
    _run(backend, torch.float32, T=65, mode="causal", normalize=normalize, eps=eps, grads=eps > 0)


@pytest.mark.parametrize("Dk,Dv", [(16, 32), (32, 16), (64, 64), (128, 16)])
def test_head_dims(backend, Dk, Dv):
    _run(backend, torch.float32, B=1, T=63, H=1, Dk=Dk, Dv=Dv)


def test_clamped_denominator_has_zero_grad(backend):
    """Where den < eps the output is num / eps: its gradient does not flow through den, so the
    gradients of o are those of num / eps. eps is twice the largest den: a kernel that let the
    gradient through den would be off by O(1)."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    q, k, v, pq, pk = make_inputs(1, 20, None, 1, None, 8, 8, dtype=dtype, requires_grad=True)
    ins = (q, k, v, pq, pk)
    with torch.no_grad():
        den = reference(q, k, torch.ones_like(v[..., :1]), pq, pk, normalize=False)
    eps = 2 * den.max().item()  # every position clamped: o = num / eps exactly
    o = lk.leap_attention(q, k, v, pq, pk, eps=eps, backend=backend)
    num = lk.leap_attention(q, k, v, pq, pk, normalize=False, backend=backend)
    assert torch.allclose(o, num / eps, rtol=tol, atol=0)
    do = torch.randn_like(o)
    g_clamped = torch.autograd.grad(o, ins, do)
    g_num = torch.autograd.grad(num / eps, ins, do)
    for name, a, b in zip(("dq", "dk", "dv", "dpq", "dpk"), g_clamped, g_num):
        assert rel_err(a, b) <= tol, name


def test_noncontiguous_inputs(backend):
    q, k, v, pq, pk = make_inputs(2, 40, None, 4, None, 16, 16)
    qn, kn, vn = q[:, 3:30], k[:, 3:30, :2], v[:, 3:30, :2]
    pqn, pkn = pq[:, 3:30], pk[:, 3:30, :2]
    assert not kn.is_contiguous()
    o = lk.leap_attention(qn, kn, vn, pqn, pkn, backend=backend)
    ref = reference(qn, kn, vn, pqn, pkn)
    assert_close(o, ref, torch.float32)


def test_float32_proportions_with_half_inputs(backend):
    dtype = torch.bfloat16
    q, k, v, pq, pk = make_inputs(1, 33, None, 2, None, 16, 16)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    pq.requires_grad_()
    pk.requires_grad_()
    o = lk.leap_attention(q, k, v, pq, pk, backend=backend)
    o.float().sum().backward()
    assert o.dtype == dtype and pq.grad.dtype == torch.float32 and pk.grad.dtype == torch.float32
    assert_close(o, reference(q, k, v, pq, pk), dtype)


GRADCHECK_CASES = {"causal-T6": ("causal", 6, 6, False), "block5-T7": ("block5", 7, 7, False),
                   "noncausal-T5-S4": ("noncausal", 5, 4, False), "causal-T6-padded": ("causal", 6, 6, True)}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # triton refuses float64
def test_gradcheck_float64(backend, case):
    mode, T, S, pad = GRADCHECK_CASES[case]
    q, k, v, pq, pk = make_inputs(1, T, S, 2, 1, 3, 2, dtype=torch.float64, p_extremes=False, requires_grad=True)
    S0, z0 = make_state(1, 2, 3, 2, requires_grad=True, dtype=torch.float64)
    kpm = None
    if pad:
        kpm = torch.zeros(1, S, dtype=torch.bool)
        kpm[0, 1] = True

    def f(q, k, v, pq, pk, S0, z0):
        o, (Sf, zf) = lk.leap_attention(q, k, v, pq, pk, initial_state=(S0, z0), output_final_state=True,
                                        key_padding_mask=kpm, backend=backend, **MODES[mode])
        return o, Sf, zf

    assert torch.autograd.gradcheck(f, (q, k, v, pq, pk, S0, z0), eps=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T", [1, 7, 63, 65, 200], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (32, 64), (64, 32), (128, 128)], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("H", [1, 2, 3, 4], ids=lambda H: f"H{H}")
@pytest.mark.parametrize("backend,dtype", backend_dtypes())
def test_full_grid(backend, dtype, mode, T, Dk, Dv, H):
    _run(backend, dtype, B=1, T=T, H=H, Dk=Dk, Dv=Dv, mode=mode, padding=H == 3, state=H == 2)


@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).split(".")[-1])
def test_tolerance_is_enforced(dtype):
    """assert_close passes an error just under TOL[dtype] (twice that for gradients) and fails
    one just over it: the DESIGN targets are what the parity tests apply."""
    ref = torch.randn(4096, dtype=torch.float64)
    noise = torch.randn(4096, dtype=torch.float64)
    noise *= ref.norm() / noise.norm()  # relative error of ref + s * noise is s
    for factor in (1.0, 2.0):
        tol = TOL[dtype] * factor
        assert_close(ref + 0.9 * tol * noise, ref, dtype, factor=factor)
        with pytest.raises(AssertionError, match="relative error"):
            assert_close(ref + 1.1 * tol * noise, ref, dtype, factor=factor)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[-1])
def test_low_precision_rule_tightens(dtype):
    """flash-attn's rule: with a baseline, the bound is 2x the baseline's error (floor 1e-6),
    not max(TOL, 2x baseline). An error under TOL but over 2x the baseline's fails."""
    ref = torch.randn(4096, dtype=torch.float64)
    noise = torch.randn(4096, dtype=torch.float64)
    noise *= ref.norm() / noise.norm()
    tol = TOL[dtype]
    baseline = ref + 0.1 * tol * noise           # the plain form's error: TOL / 10
    assert_close(ref + 0.15 * tol * noise, ref, dtype, baseline=baseline)
    with pytest.raises(AssertionError, match="2x that of the plain"):
        assert_close(ref + 0.5 * tol * noise, ref, dtype, baseline=baseline)
    exact = ref.clone()                          # an exact baseline: the floor 1e-6 applies
    assert_close(ref + 0.9e-6 * noise, ref, dtype, baseline=exact)
    with pytest.raises(AssertionError):
        assert_close(ref + 5e-6 * noise, ref, dtype, baseline=exact)
    worse = ref + 3 * tol * noise                # 2x the baseline exceeds TOL: TOL is waived
    assert_close(ref + 4 * tol * noise, ref, dtype, baseline=worse)
    with pytest.raises(AssertionError):
        assert_close(ref + 7 * tol * noise, ref, dtype, baseline=worse)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[-1])
def test_plain_form_runs_in_low_precision(dtype):
    """The baseline is the oracle's quadratic form entirely in the half type (not upcast to
    float32 as the oracle itself computes): its state comes back in that type, and its error
    against float64 is larger than the upcast oracle's."""
    q, k, v, pq, pk = (t.to(dtype) for t in make_inputs(1, 65, None, 2, None, 16, 16))
    o, (S, z) = plain_form(q, k, v, pq, pk, dtype=dtype, output_final_state=True)
    assert o.dtype == S.dtype == z.dtype == dtype
    ref = reference(q, k, v, pq, pk)
    upcast = lk.reference.leap_attention(q, k, v, pq, pk)
    assert rel_err(o, ref) > rel_err(upcast, ref)


def test_cross_attention_with_padding(backend):
    _run(backend, torch.float32, T=20, S=45, mode="noncausal", padding=True, state=True)


def test_expanded_state_gradient(backend):
    """S.sum() hands the backward a stride-0 gradient of the final state."""
    q, k, v, pq, pk = make_inputs(1, 30, None, 2, None, 8, 8, requires_grad=True)
    o, (S, z) = lk.leap_attention(q, k, v, pq, pk, output_final_state=True, backend=backend)
    (o.sum() + S.sum() + z.sum()).backward()
    qr, kr, vr, pqr, pkr = (t.detach().double().requires_grad_() for t in (q, k, v, pq, pk))
    o2, (S2, z2) = lk.reference.leap_attention(qr, kr, vr, pqr, pkr, output_final_state=True)
    (o2.sum() + S2.sum() + z2.sum()).backward()
    for t, r in ((q, qr), (k, kr), (v, vr), (pq, pqr), (pk, pkr)):
        assert_close(t.grad, r.grad, torch.float32, factor=2)

"""Monotone cross-attention (``num_visible_keys``, issue #21) on every backend against the float64
oracle: forward, final state and every gradient; wait-k rates 1 and 2.5, limits starting at 0,
per-batch limits, shapes that are not chunk multiples, GQA, padding, a carried state; equivalence
with the causal and block-causal modes; ``lk.wait_k``; bad input named in the message."""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.attention import op as aop
from utils import HALF, assert_close, make_inputs, make_state, plain_form, reference

BACKENDS = lk.available_backends()
DTYPES = {"torch": [torch.float64, torch.float32, torch.bfloat16],
          "cpu": [torch.float64, torch.float32, torch.bfloat16],
          "triton": [torch.float32, torch.float16, torch.bfloat16]}


def _limits(B, T, S, lag, rate, per_batch):
    n = lk.wait_k(T, S, lag, rate)
    if not per_batch:
        return n
    # row b reads b * 11 more source tokens (capped at S): different staircases per row
    return torch.stack([torch.clamp(n + 11 * b, max=S) for b in range(B)])


CASES = {  # (B, T, S, H, Hkv, Dk, Dv, lag, rate, per_batch, padding, state)
    "rate1": (2, 70, 75, 2, 2, 16, 12, 3, 1.0, False, False, False),
    "rate2.5-from0": (2, 70, 175, 4, 2, 16, 12, 0, 2.5, True, False, True),
    "rate2.5-pad": (2, 45, 130, 2, 1, 8, 8, 5, 2.5, True, True, True),
    "slow-rate": (1, 150, 40, 2, 2, 8, 8, 0, 0.25, False, True, False),
}


def _inputs(case, dtype):
    B, T, S, H, Hkv, Dk, Dv, lag, rate, per_batch, padding, state = CASES[case]
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv, dtype=torch.float32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if dtype == torch.float64:
        pq, pk = pq.double(), pk.double()
    kw = dict(causal=False, num_visible_keys=_limits(B, T, S, lag, rate, per_batch))
    if padding:
        kpm = torch.rand(B, S) < 0.25
        kpm[:, 0] = True
        kw["key_padding_mask"] = kpm
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = list(make_state(B, H, Dk, Dv, dtype=sdt)) if state else []
    return [q, k, v, pq, pk] + st, kw


def _call(fn, ins, kw, **extra):
    init = (ins[5], ins[6]) if len(ins) > 5 else None
    return fn(*ins[:5], initial_state=init, output_final_state=True, **kw, **extra)


def _params():
    out = []
    for b in BACKENDS:
        for d in DTYPES[b]:
            for case in CASES:
                # the interpreter is slow: the triton backend runs every case in float32 and one
                # case in each half type
                if b == "triton" and d != torch.float32 and case != "rate2.5-from0":
                    continue
                out.append(pytest.param(b, d, case, id=f"{b}-{str(d).split('.')[-1]}-{case}"))
    return out


@pytest.mark.parametrize("backend,dtype,case", _params())
def test_parity_and_gradients(backend, dtype, case):
    ins, kw = _inputs(case, dtype)
    for t in ins:
        t.requires_grad_()
    o, (Sf, zf) = _call(lk.leap_attention, ins, kw, backend=backend)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    o_ref, (S_ref, z_ref) = _call(lk.reference.leap_attention, ref_ins, kw)
    base = None
    if dtype in HALF:  # flash-attn's rule: no worse than 2x the plain form run in the half dtype
        base_ins = [t.detach().clone().requires_grad_() for t in ins]
        base = _call(plain_form, base_ins, kw, dtype=dtype)
    assert_close(o, o_ref, dtype, "o", baseline=None if base is None else base[0])
    assert_close(Sf, S_ref, dtype, "final S")
    assert_close(zf, z_ref, dtype, "final z")
    do = torch.randn_like(o_ref)
    dS, dz = torch.randn_like(S_ref), torch.randn_like(z_ref)
    grads = torch.autograd.grad((o, Sf, zf), ins, (do.to(o.dtype), dS.to(Sf.dtype), dz.to(zf.dtype)))
    grads_ref = torch.autograd.grad((o_ref, S_ref, z_ref), ref_ins, (do, dS, dz))
    base_grads = [None] * len(ins)
    if base is not None:
        base_grads = torch.autograd.grad((base[0], *base[1]), base_ins, (do.to(dtype), dS.to(dtype), dz.to(dtype)),
                                         allow_unused=True)
    names = ["dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"]
    for name, g, r, bg in zip(names, grads, grads_ref, base_grads):
        assert_close(g, r, dtype, name, factor=2, baseline=bg)
    if "key_padding_mask" in kw:  # padded keys get exactly zero gradients
        pad = kw["key_padding_mask"]
        assert bool((grads[1][pad] == 0).all()) and bool((grads[2][pad] == 0).all()) and bool(
            (grads[4][pad] == 0).all())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend, one_thread):
    """One thread: gradcheck makes ~1300 small calls, where idle OpenMP threads on a shared runner cost
    more than the work (the torch backend took 100 s at 2 threads under load, 6 s at one)."""
    B, T, S, H, D = 2, 9, 14, 2, 3
    ins = [t.double().requires_grad_() for t in make_inputs(B, T, S, H, 1, D, D, p_extremes=False)]
    S0, z0 = make_state(B, H, D, D, dtype=torch.float64, requires_grad=True)
    n = torch.tensor([[0, 2, 2, 5, 9, 9, 12, 14, 14], [1, 1, 3, 4, 4, 8, 13, 13, 14]])
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 3] = True

    def f(q, k, v, pq, pk, S0, z0):
        o, (Sf, zf) = lk.leap_attention(q, k, v, pq, pk, causal=False, num_visible_keys=n, key_padding_mask=kpm,
                                        initial_state=(S0, z0), output_final_state=True, eps=1e-3, backend=backend)
        return o, Sf, zf

    assert torch.autograd.gradcheck(f, (*ins, S0, z0))


def test_generalises_causal_and_block_causal(backend):
    dtype = torch.float32
    q, k, v, pq, pk = make_inputs(2, 77, None, 2, 1, 8, 8, dtype=dtype)
    T = 77
    t = torch.arange(T)
    causal = lk.leap_attention(q, k, v, pq, pk, causal=True, backend=backend)
    mono = lk.leap_attention(q, k, v, pq, pk, causal=False, num_visible_keys=t + 1, backend=backend)
    ref = reference(q, k, v, pq, pk, causal=True)
    assert_close(mono, ref, dtype, "n = t + 1")
    assert_close(causal, ref, dtype, "causal")
    W = 10
    block = lk.leap_attention(q, k, v, pq, pk, causal=False, num_visible_keys=torch.clamp((t // W + 1) * W, max=T),
                              backend=backend)
    assert_close(block, reference(q, k, v, pq, pk, causal=True, block_size=W), dtype, "block-causal limits")


def test_all_visible_equals_noncausal_and_none_visible_is_state_only(backend):
    dtype = torch.float32
    q, k, v, pq, pk = make_inputs(2, 40, 90, 2, 2, 8, 8, dtype=dtype)
    S0, z0 = make_state(2, 2, 8, 8)
    full = torch.full((40,), 90)
    o = lk.leap_attention(q, k, v, pq, pk, causal=False, num_visible_keys=full, backend=backend)
    assert_close(o, reference(q, k, v, pq, pk, causal=False), dtype, "n = S")
    # n = 0: only the carried state is visible; the final state still holds all S keys
    o0, (Sf, zf) = lk.leap_attention(q, k, v, pq, pk, causal=False, num_visible_keys=torch.zeros(40, dtype=torch.int32),
                                     initial_state=(S0, z0), output_final_state=True, backend=backend)
    k0 = torch.zeros_like(k[:, :1])
    pad = torch.ones(2, 1, dtype=torch.bool)
    ref0 = reference(q, k0, k0, pq, pk[:, :1], causal=False, key_padding_mask=pad, initial_state=(S0, z0))
    assert_close(o0, ref0, dtype, "n = 0 with a state")
    _, (S_all, z_all) = reference(q, k, v, pq, pk, causal=False, initial_state=(S0, z0), output_final_state=True)
    assert_close(Sf, S_all, dtype, "final S of all keys")
    assert_close(zf, z_all, dtype, "final z of all keys")


def test_padded_key_nonfinite_is_ignored(backend):
    q, k, v, pq, pk = make_inputs(1, 30, 50, 2, 2, 8, 8)
    kpm = torch.zeros(1, 50, dtype=torch.bool)
    kpm[0, [3, 20, 49]] = True
    k[0, 3] = float("nan")
    v[0, 20] = float("inf")
    pk[0, 49] = float("nan")
    n = lk.wait_k(30, 50, 4, 1.5)
    o, (Sf, zf) = lk.leap_attention(q, k, v, pq, pk, causal=False, num_visible_keys=n, key_padding_mask=kpm,
                                    output_final_state=True, backend=backend)
    assert bool(torch.isfinite(o).all()) and bool(torch.isfinite(Sf).all()) and bool(torch.isfinite(zf).all())
    clean = [t.clone() for t in (k, v, pk)]
    for t in clean:
        t[0, [3, 20, 49]] = 0
    ref = reference(q, clean[0], clean[1], pq, clean[2], causal=False, num_visible_keys=n, key_padding_mask=kpm)
    assert_close(o, ref, torch.float32, "o with non-finite padded keys")


def test_compiled_and_opcheck(backend):
    q, k, v, pq, pk = make_inputs(1, 20, 33, 2, 1, 4, 4)
    n = lk.wait_k(20, 33, 2, 1.5).expand(1, 20).contiguous()
    args = (q, k, v, pq, pk, None, None, None, None, n, False, 0, 1e-6, True, True, backend)
    torch.library.opcheck(aop.leap_attention_fwd, args)


def test_wait_k_values():
    assert lk.wait_k(6, 9, 2, 2.5).tolist() == [2, 4, 7, 9, 9, 9]
    assert lk.wait_k(4, 10, 3).tolist() == [3, 4, 5, 6]
    assert lk.wait_k(3, 2, 5).tolist() == [2, 2, 2]  # the lag is capped by the source length
    assert lk.wait_k(3, 10, 1, 0.0).tolist() == [1, 1, 1]
    assert lk.wait_k(0, 10, 1).shape == (0,)
    assert lk.wait_k(5, 10, 1).dtype == torch.int64
    with pytest.raises(ValueError, match="lag"):
        lk.wait_k(5, 10, -1)
    with pytest.raises(TypeError, match="num_queries"):
        lk.wait_k(5.0, 10, 1)
    with pytest.raises(ValueError, match="rate"):
        lk.wait_k(5, 10, 1, float("nan"))
    with pytest.raises(TypeError, match="rate"):
        lk.wait_k(5, 10, 1, "2")


def _bad(**override):
    q, k, v, pq, pk = make_inputs(2, 6, 9, 2, 2, 4, 4)
    kw = dict(causal=False, num_visible_keys=torch.tensor([0, 1, 3, 3, 8, 9]))
    kw.update(override)
    return lk.leap_attention(q, k, v, pq, pk, **kw)


@pytest.mark.parametrize("override,exc,match", [
    (dict(num_visible_keys=torch.tensor([0, 2, 1, 3, 8, 9])), ValueError, "non-decreasing"),
    (dict(num_visible_keys=torch.tensor([-1, 2, 2, 3, 8, 9])), ValueError, r"\[0, S\]"),
    (dict(num_visible_keys=torch.tensor([0, 2, 2, 3, 8, 10])), ValueError, r"\[0, S\]"),
    (dict(num_visible_keys=torch.tensor([0, 2, 2, 3, 8])), ValueError, "num_visible_keys has shape"),
    (dict(num_visible_keys=torch.zeros(3, 6, dtype=torch.long)), ValueError, "num_visible_keys has shape"),
    (dict(num_visible_keys=torch.zeros(6)), TypeError, "num_visible_keys must have dtype"),
    (dict(num_visible_keys=[0, 1, 2, 3, 4, 5]), TypeError, "num_visible_keys must be an int tensor"),
    (dict(causal=True), ValueError, "causal=True"),
])
def test_bad_input(override, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**override)


def test_bad_input_with_cu_seqlens():
    q, k, v, pq, pk = make_inputs(1, 8, None, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        lk.leap_attention(q, k, v, pq, pk, causal=False, cu_seqlens=torch.tensor([0, 3, 8]),
                          num_visible_keys=torch.arange(1, 9))


def test_unchecked_values_are_clamped_under_compile(backend):
    """Under torch.compile the value checks are skipped; the op clamps into [0, S] and makes the
    limits non-decreasing before any kernel reads them (no out-of-bounds access)."""
    q, k, v, pq, pk = make_inputs(1, 10, 12, 2, 2, 4, 4)
    bad = torch.tensor([[3, 1, -5, 4, 40, 2, 6, 7, 12, 100]])
    fixed = torch.cummax(bad.clamp(0, 12), 1).values
    f = torch.compile(lambda *a: lk.leap_attention(*a, causal=False, num_visible_keys=bad, backend=backend),
                      backend="eager", fullgraph=True)
    o = f(q, k, v, pq, pk)
    assert_close(o, reference(q, k, v, pq, pk, causal=False, num_visible_keys=fixed), torch.float32, "clamped")

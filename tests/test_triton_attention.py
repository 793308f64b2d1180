"""Triton-specific tests of LeaP attention (``backend="triton"``), under ``TRITON_INTERPRET=1``
on CPU tensors when there is no GPU.

Forward, final state and every gradient against the float64 reference (DESIGN section 4:
fp32 1e-5, fp16 2e-3, bf16 1e-2 relative norm error, gradients twice that, or within 2x of
the plain PyTorch form run in the same dtype). Shapes are chosen around the kernels' tiles
(BT = 64 rows, BK = next_pow2(Dk), BV <= 64 value columns, <= 32 for Dk = 128): T = 1, 7,
65, 130 cross chunk edges; block sizes below, equal to and above the chunk exercise the two
sweep shapes (intra-chunk masks vs whole-block chunks) and blocks spanning chunks.
Also: determinism (bitwise), the decode kernel against the full causal op, float64 refused.
The full grid is marked ``slow``.
"""
import itertools

import pytest
import torch

import leapformer_kernels as lk
from utils import TOL, assert_close, make_inputs, make_state, plain_form, rel_err

pytestmark = pytest.mark.skipif("triton" not in lk.available_backends(),
                                reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)")

MODES = {
    "causal": dict(causal=True),
    "block1": dict(causal=True, block_size=1),
    "block5": dict(causal=True, block_size=5),  # several blocks per chunk; chunk = 60 rows
    "block33": dict(causal=True, block_size=33),  # one block per chunk (33 of 64 rows used)
    "block64": dict(causal=True, block_size=64),  # block == tile
    "block70": dict(causal=True, block_size=70),  # blocks longer than a tile, spanning chunks
    "noncausal": dict(causal=False),
    "cross": dict(causal=False),  # S != T
}
HALF = (torch.float16, torch.bfloat16)
ALL = (torch.float32,) + HALF


def _check(dtype, *, B=2, T=65, S=None, H=2, Hkv=None, Dk=16, Dv=16, mode="causal", padding=False, state=False,
           final_state=True, normalize=True, eps=1e-6, cu_seqlens=None, p32=True):
    """Run the triton op and the float64 reference on the same inputs; compare o, the final
    state and the gradients of q, k, v, pq, pk (and S0, z0) of a random linear loss."""
    kw = dict(MODES[mode], normalize=normalize, eps=eps)
    if mode == "cross" and S is None:
        S = T + 17 if T > 1 else 5
    if cu_seqlens is not None:
        B, S = 1, None
        kw["cu_seqlens"] = cu_seqlens
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv, dtype=torch.float32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if not p32:
        pq, pk = pq.to(dtype), pk.to(dtype)
    if padding:
        kpm = torch.rand(B, k.shape[1]) < 0.3
        kpm[:, 0] = True
        kw["key_padding_mask"] = kpm
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    ins = [q, k, v, pq, pk] + (list(make_state(n, H, Dk, Dv)) if state else [])
    for t in ins:
        t.requires_grad_()

    def call(fn, xs, **extra):
        init = (xs[5], xs[6]) if state else None
        args, kwargs = list(xs[:5]), dict(kw, **extra)
        if padding and fn is not lk.leap_attention and k.shape[1] != T:
            # lk.reference slices key_padding_mask by T, not S, in cross-attention (naive.py,
            # reported); a padded key equals a key with relu(k) = 0 (no feature, no gradient).
            m = kwargs.pop("key_padding_mask")[:, :, None, None]
            args[1] = torch.where(m, -args[1].abs() - 1, args[1])
        out = fn(*args, initial_state=init, output_final_state=final_state, **kwargs)
        return out if final_state else (out, (None, None))

    o, (Sf, zf) = call(lk.leap_attention, ins, backend="triton")
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    o_r, (S_r, z_r) = call(lk.reference.leap_attention, ref_ins)
    # flash-attn's rule (half types): no worse than 2x the plain quadratic PyTorch form run
    # entirely in the same dtype (proportions and state included)
    base_ins = [t.detach().to(dtype).requires_grad_() for t in ins]
    o_b, (S_b, z_b) = call(lambda *a, **k: plain_form(*a, dtype=dtype, **k), base_ins)
    assert o.dtype == dtype and o.shape == o_r.shape
    assert_close(o, o_r, dtype, "o", baseline=o_b)
    gens = [torch.randn(o_r.shape, dtype=torch.float64)]
    outs, refs, bases = [o], [o_r], [o_b]
    if final_state:
        assert Sf.dtype == torch.float32 and zf.dtype == torch.float32
        assert_close(Sf, S_r, dtype, "final S", baseline=S_b)
        assert_close(zf, z_r, dtype, "final z", baseline=z_b)
        gens += [torch.randn(S_r.shape, dtype=torch.float64), torch.randn(z_r.shape, dtype=torch.float64)]
        outs, refs, bases = [o, Sf, zf], [o_r, S_r, z_r], [o_b, S_b, z_b]

    def loss(ys):
        return sum((y.double() * g).sum() for y, g in zip(ys, gens))

    loss(outs).backward()
    loss(refs).backward()
    loss(bases).backward()  # the plain form's gradients, in dtype
    names = ["dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"]
    for name, t, r, b in zip(names, ins, ref_ins, base_ins):
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        assert_close(t.grad, r.grad, dtype, name, factor=2.0, baseline=b.grad)
    return o


# ----------------------------------------------------------------------------- default grid

@pytest.mark.parametrize("mode", list(MODES))
def test_modes_fp32(mode):
    T = 130 if mode in ("block64", "block70") else 65
    _check(torch.float32, T=T, mode=mode, padding=True, state=True, H=2, Hkv=1)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", ["causal", "block5", "block70", "cross"])
def test_modes_half(dtype, mode):
    T = 130 if mode == "block70" else 65
    _check(dtype, T=T, mode=mode, padding=True, state=True, Dk=32, Dv=32, p32=dtype == torch.float16)


@pytest.mark.parametrize("mode", ["causal", "block70", "cross"])
def test_half_operand_dots(monkeypatch, mode):
    """The GPU's bf16 path (features, scores, states and do/den as dot operands in the input
    dtype, DOT_MODE 1) cannot run in bf16 under the interpreter (its bf16 dot is wrong), so run
    that code path with fp16 operands, whose interpreter dot is right."""
    from leapformer_kernels.attention import triton_chunk
    real = triton_chunk._dot_mode
    monkeypatch.setattr(triton_chunk, "_dot_mode", lambda dt: 1 if dt == torch.float16 else real(dt))
    T = 130 if mode == "block70" else 65
    _check(torch.float16, T=T, mode=mode, padding=True, state=True, H=2, Hkv=1, Dk=32, Dv=32)


@pytest.mark.parametrize("T,D", [(1, 16), (7, 32), (65, 64), (130, 16), (130, 32)])
def test_lengths_and_head_dims(T, D):
    _check(torch.float32, B=1, T=T, Dk=D, Dv=D, state=True)


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "causal"), (torch.float32, "noncausal"),
                                        (torch.float16, "block5"), (torch.bfloat16, "block70")], ids=str)
def test_varlen(dtype, mode):
    cu = torch.tensor([0, 7, 7, 85, 86, 100], dtype=torch.int64)  # includes an empty sequence
    _check(dtype, T=100, mode=mode, cu_seqlens=cu, padding=True, state=True)


@pytest.mark.parametrize("mode", ["causal", "block70"])
def test_one_program_dk_dv(monkeypatch, mode):
    """``triton_chunk.MERGE_DKV``: dk and dv in one reverse sweep (Dk, Dv <= 64), the switch kept for
    a GPU timing against the default two kernels, with GQA and a carried state."""
    from leapformer_kernels.attention import triton_chunk as tc

    monkeypatch.setattr(tc, "MERGE_DKV", True)
    _check(torch.float32, B=1, T=70, H=4, Hkv=2, Dk=32, Dv=48, mode=mode, state=True, padding=True)


@pytest.mark.parametrize("D,seeds", [(32, 12), (128, 8)])
def test_dpq_r_correction_bf16(D, seeds):
    """dpq is the difference of two nearly equal terms (through num and through den). r = dL/dden from the
    forward's bf16 o put up to 4.6x (Dk = 32) and 2.9x (Dk = 128, four key blocks) the plain bf16 form's
    error into dpq at T = 1 over 20 / 10 seeds; with the dq sweep's correction (``triton_fwd._dq_store``,
    FIX_R) at most 0.40x and 0.33x (the dpq that an exact r gives)."""
    for seed in range(seeds):
        torch.manual_seed(seed)
        _check(torch.bfloat16, B=2, T=1, H=2, Hkv=1, Dk=D, Dv=D, padding=True, state=True)


@pytest.mark.parametrize("mode", ["causal", "block5", "noncausal", "cross"])
def test_forward_saves_den_and_its_derivative(mode):
    """The forward's residual ``den`` is ``[2, B, T, H]``: the normaliser q~ . z per row and its
    derivative d den / d(pi/2 pq), which the dq sweep's r correction reads; both against float64
    autograd of the reference's unnormalised output with v = 1 (= den; row t depends on pq_t only)."""
    from leapformer_kernels.attention import triton_chunk as tc

    kw = dict(MODES[mode])
    T = 70
    S = T + 9 if mode == "cross" else T
    q, k, v, pq, pk = make_inputs(2, T, S, 2, 1, 16, 16, dtype=torch.float32)
    kpm = torch.rand(2, S) < 0.3
    kpm[:, 0] = True
    o, _, _, den = tc.fwd(q, k, v, pq, pk, None, None, kpm.contiguous(), None, None, kw["causal"],
                          kw.get("block_size"), 1e-6, True, False)
    assert den.shape == (2, 2, T, 2) and den.dtype == torch.float32
    pq64 = pq.double().requires_grad_()
    ones = torch.ones(2, S, 1, 1, dtype=torch.float64)
    # a padded key = a key with relu(k) = 0 (the reference slices the mask by T in cross-attention)
    k64 = torch.where(kpm[:, :, None, None], -k.double().abs() - 1, k.double())
    ref = lk.reference.leap_attention(q.double(), k64, ones, pq64, pk.double(), normalize=False, **kw)[..., 0]
    (dref,) = torch.autograd.grad(ref.sum(), pq64)
    assert_close(den[0], ref, torch.float32, "den")
    assert_close(den[1], dref / (torch.pi / 2), torch.float32, "d den / d(pi/2 pq)")


@pytest.mark.parametrize("mode", ["causal", "block5", "block70", "cross"])
def test_wide_tiles_gqa(mode):
    """Dk = 128 (BT = 64, BK = 128) and Dv = 80 (three value tiles of 32) with GQA: the forward's
    factored query tile (BK > BV: one relu(q) operand) in every sweep shape."""
    _check(torch.float32, B=1, T=70 if mode != "causal" else 40, H=4, Hkv=2, Dk=128, Dv=80, mode=mode, state=True,
           padding=True)


def test_value_tiles_noncausal():
    """Dv = 100 (two value tiles of 64) with MQA: per-tile partial dq / dk summed on the host."""
    _check(torch.float32, B=1, T=33, S=20, H=3, Hkv=1, Dk=20, Dv=100, mode="cross", state=True)


@pytest.mark.parametrize("normalize,eps", [(False, 1e-6), (True, 0.5)])
def test_normalize_eps(normalize, eps):
    """normalize=False returns num; a large eps clamps many rows (zero grad through den)."""
    _check(torch.float32, T=65, mode="block5", normalize=normalize, eps=eps, state=not normalize)


def test_no_final_state_and_no_initial_state():
    _check(torch.bfloat16, T=65, final_state=False)
    _check(torch.float32, T=7, final_state=False, mode="noncausal", padding=True)


def test_adversarial_all_negative_stays_finite():
    q, k, v, pq, pk = make_inputs(1, 70, None, 2, None, 16, 16)
    for x in (q, k):
        x.copy_(-x.abs())
    for t in (q, k, v, pq, pk):
        t.requires_grad_()
    o = lk.leap_attention(q, k, v, pq, pk, backend="triton")
    o.sum().backward()
    assert torch.isfinite(o).all() and (o == 0).all()
    for t in (q, k, v, pq, pk):
        assert torch.isfinite(t.grad).all()


def test_large_magnitude_fp16_forward():
    q, k, v, pq, pk = make_inputs(1, 65, None, 2, None, 32, 32)
    q, k = q * 1e3, k * 1e3
    o = lk.leap_attention(q.half(), k.half(), v.half(), pq, pk, backend="triton")
    ref = lk.reference.leap_attention(q.half().double(), k.half().double(), v.half().double(), pq.double(),
                                      pk.double())
    assert torch.isfinite(o).all()
    assert rel_err(o, ref) <= TOL[torch.float16]


def test_deterministic():
    """The same inputs give bitwise the same outputs and gradients (no atomics)."""
    def once():
        torch.manual_seed(1)
        q, k, v, pq, pk = make_inputs(1, 70, None, 2, 1, 16, 80, requires_grad=True)
        S0, z0 = make_state(1, 2, 16, 80, requires_grad=True)
        o, (S, z) = lk.leap_attention(q, k, v, pq, pk, block_size=3, initial_state=(S0, z0),
                                      output_final_state=True, backend="triton")
        (o.square().sum() + S.sum() + z.sum()).backward()
        return [o, S, z] + [t.grad for t in (q, k, v, pq, pk, S0, z0)]
    a, b = once(), once()
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()  # S.sum() gives a stride-0 dS: read as a dense tensor
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t", [1, 3])
def test_step_matches_full_causal(dtype, t):
    """Decode steps (one launch each) over a prompt's state equal the full causal op."""
    B, P, H, Hkv, D = 2, 9, 4, 2, 32
    n = P + 2 * t
    q, k, v, pq, pk = make_inputs(B, n, None, H, Hkv, D, 24)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    full, (S_full, z_full) = lk.leap_attention(q, k, v, pq, pk, output_final_state=True, backend="triton")
    ref, (S_ref, z_ref) = lk.reference.leap_attention(*(x.double() for x in (q, k, v, pq, pk)),
                                                      output_final_state=True)
    _, state = lk.leap_attention(q[:, :P], k[:, :P], v[:, :P], pq[:, :P], pk[:, :P], output_final_state=True,
                                 backend="triton")
    outs = []
    for i in range(P, n, t):
        sl = slice(i, i + t)
        S_in, z_in = state[0].clone(), state[1].clone()
        o, new = lk.leap_attention_step(q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl], state,
                                        backend="triton")
        assert torch.equal(state[0], S_in) and torch.equal(state[1], z_in), "step modified its input state"
        assert new[0] is not state[0] and new[1] is not state[1]
        outs.append(o)
        state = new
    o_steps = torch.cat(outs, 1)
    assert o_steps.dtype == dtype
    assert_close(o_steps, ref[:, P:], dtype, "step o")
    assert rel_err(o_steps, full[:, P:]) <= 2 * TOL[dtype]
    assert_close(state[0], S_ref, dtype, "step S")
    assert_close(state[1], z_ref, dtype, "step z")


def test_step_from_zero_state_unnormalized():
    q, k, v, pq, pk = make_inputs(3, 2, None, 2, 1, 16, 16)
    o, (S, z) = lk.leap_attention_step(q, k, v, pq, pk, None, normalize=False, backend="triton")
    ref, (S_r, z_r) = lk.reference.leap_attention_step(*(x.double() for x in (q, k, v, pq, pk)), None,
                                                       normalize=False)
    assert_close(o, ref, torch.float32, "o")
    assert_close(S, S_r, torch.float32, "S")
    assert_close(z, z_r, torch.float32, "z")


@pytest.mark.parametrize("inplace", [False, True], ids=["step", "step_"])
def test_step_reads_half_proportions_without_a_cast(inplace):
    """The decode step takes pq, pk in q's half dtype as they are (the kernel converts them): no
    host-side cast, i.e. no launch besides the step kernel's, and the result equals the step with
    float32 proportions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks import aot

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, pq, pk = make_inputs(2, 1, None, 2, 1, 16, 16)
    q, k, v = (t.to(torch.float16) for t in (q, k, v))
    pq16, pk16 = pq.to(torch.float16), pk.to(torch.float16)
    S0, z0 = make_state(2, 2, 16, 16)

    def step(a, b):
        if inplace:
            S, z = S0.clone(), z0.clone()
            return lk.leap_attention_step_(q, k, v, a, b, (S, z), backend="triton"), S, z
        o, (S, z) = lk.leap_attention_step(q, k, v, a, b, (S0, z0), backend="triton")
        return o, S, z

    step(pq16, pk16)  # warm: the backend choice, the kernel's compile
    with aot.record() as launches, _Ops() as rec:
        step(pq16, pk16)
    assert [L.name for L in launches] == ["leap_fwd_kernel_step"]
    assert not any("_to_copy" in op or "copy_" in op for op in rec.ops), rec.ops
    got, want = step(pq16, pk16), step(pq16.float(), pk16.float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_refused():
    q, k, v, pq, pk = make_inputs(1, 5, None, 1, None, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        lk.leap_attention(q, k, v, pq, pk, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        lk.leap_attention_step(q, k, v, pq, pk, None, backend="triton")


# ----------------------------------------------------------------------------- full grid

@pytest.mark.slow
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T,D", list(itertools.product([1, 7, 65, 130], [16, 32, 64])))
def test_full_grid(dtype, mode, T, D):
    _check(dtype, T=T, Dk=D, Dv=D, mode=mode, padding=True, state=True, H=2, Hkv=1)

"""Hardening of LeaP attention (issue #15): sizes, aliasing, unchecked cu_seqlens, NaN rules, grids.

1. any ``block_size >= T`` is one block on every backend, whatever its size (no 32-bit truncation);
2. every custom op returns fresh tensors (``opcheck`` on causal=False, normalize=False, with a state);
3. a bad ``cu_seqlens`` that reaches a kernel (validation skipped under torch.compile) never
   reads or writes out of bounds: the C++ and torch kernels raise, the Triton kernels clamp;
4. the torch backend allocates O(T) rows, not ``block_size`` rows;
5. relu keeps NaN (a non-finite q_t, or k / v / pk of a visible unpadded key, makes o_t
   non-finite); a padded key is selected to 0 where loaded (NaN / Inf there reach nothing and
   its gradients are exactly 0), on every backend and in the oracle;
6. Triton grids keep B*H on axis 0 (CUDA limits axes 1 and 2 to 65535).

Small shapes, not block multiples; float32 (the triton backend runs under the interpreter).
"""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels import backends
from leapformer_kernels.attention import op as aop
from utils import assert_close, make_inputs, make_state, reference

HUGE_BLOCKS = [2 ** 31 - 1, 2 ** 31, 2 ** 32 + 2, 2 ** 63 - 1, 2 ** 64 + 2]


def _kernels(backend):
    return backends.kernels("leap_attention", backend)


def _grads(out, ins):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    return torch.autograd.grad(loss, ins, allow_unused=True)


# ----------------------------------------------------------------------------- 1. block_size
@pytest.mark.parametrize("bs", HUGE_BLOCKS)
def test_huge_block_size_is_one_block(backend, bs):
    """block_size >= T: every query sees the whole sequence (= causal=False for T == S),
    output, final state and gradients; with packed sequences each is one block."""
    T = 7
    q, k, v, pq, pk = make_inputs(2, T, None, 2, 1, 8, 4, requires_grad=True)
    S0, z0 = make_state(2, 2, 8, 4, requires_grad=True)
    ins = (q, k, v, pq, pk, S0, z0)
    kw = dict(initial_state=(S0, z0), output_final_state=True)
    o, (S, z) = lk.leap_attention(q, k, v, pq, pk, causal=True, block_size=bs, backend=backend, **kw)
    ro, (rS, rz) = reference(q, k, v, pq, pk, causal=False, **kw)
    assert_close(o, ro, torch.float32)
    assert_close(S, rS, torch.float32, "S")
    assert_close(z, rz, torch.float32, "z")
    # the oracle itself takes any block size
    bo = reference(q, k, v, pq, pk, causal=True, block_size=bs, **kw)[0]
    assert torch.allclose(bo, ro, atol=1e-12, rtol=1e-12)
    torch.manual_seed(1)
    g = _grads((o, S, z), ins)
    torch.manual_seed(1)
    o2, (S2, z2) = lk.leap_attention(q, k, v, pq, pk, causal=False, backend="torch", **kw)
    rg = _grads((o2, S2, z2), ins)
    for name, a, b in zip("q k v pq pk S0 z0".split(), g, rg):
        assert_close(a, b, torch.float32, f"d{name}", factor=2)


@pytest.mark.parametrize("bs", [2 ** 31, 2 ** 32 + 2, 2 ** 63 - 1])
def test_huge_block_size_varlen(backend, bs):
    q, k, v, pq, pk = make_inputs(1, 9, None, 2, None, 8, 4)
    cu = torch.tensor([0, 4, 9])
    o = lk.leap_attention(q, k, v, pq, pk, causal=True, block_size=bs, cu_seqlens=cu, backend=backend)
    ref = torch.cat([reference(q[:, a:b], k[:, a:b], v[:, a:b], pq[:, a:b], pk[:, a:b], causal=False)
                     for a, b in ((0, 4), (4, 9))], 1)
    assert_close(o, ref, torch.float32)


@pytest.mark.parametrize("bs", [2, 2 ** 31, 2 ** 32 + 2, 2 ** 63 - 1])
def test_kernel_block_size_int64(backend, bs):
    """The kernel interface itself (below the op's clamp) takes any int64 block size."""
    q, k, v, pq, pk = make_inputs(1, 6, None, 2, None, 4, 4)
    o, S, z = _kernels(backend).fwd(q, k, v, pq, pk, None, None, None, None, None, True, bs, 1e-6, True, True)[:3]  # triton adds den (SAVES_DEN)
    ro, (rS, rz) = reference(q, k, v, pq, pk, causal=True, block_size=bs, output_final_state=True)
    assert_close(o, ro, torch.float32)
    assert_close(S, rS, torch.float32, "S")


# ----------------------------------------------------------------------------- 2. aliasing
def _noncausal_args(backend, normalize=False, causal=False):
    q, k, v, pq, pk = make_inputs(2, 5, 3 if not causal else None, 2, 1, 4, 3)
    S0, z0 = make_state(2, 2, 4, 3)
    for t in (q, k, v, pq, pk, S0, z0):
        t.requires_grad_()
    return (q, k, v, pq, pk, S0, z0, None, None, None, causal, 0, 1e-6, normalize, True, backend)


def test_opcheck_noncausal_unnormalized_state(backend):
    """Issue #15 bug 2: the torch backend's backward returned the incoming dz as dz0."""
    torch.library.opcheck(aop.leap_attention_fwd, _noncausal_args(backend))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_backward_outputs_are_fresh(backend, causal, normalize):
    """No gradient the backward op returns shares memory with one of its inputs."""
    q, k, v, pq, pk, S0, z0, *_ = [a.detach() if isinstance(a, torch.Tensor) else a
                                   for a in _noncausal_args(backend, normalize, causal)]
    o, S, z, den = aop.leap_attention_fwd(q, k, v, pq, pk, S0, z0, None, None, None, causal, 0, 1e-6, normalize, True,
                                          backend)
    do, dS, dz = torch.randn_like(o), torch.randn_like(S), torch.randn_like(z)
    ins = (do, dS, dz, q, k, v, pq, pk, S0, z0)
    outs = aop.leap_attention_bwd(*ins, None, None, None, o, den, causal, 0, 1e-6, normalize, backend)
    ptrs = {t.untyped_storage().data_ptr() for t in ins}
    for name, t in zip("dq dk dv dpq dpk dS0 dz0".split(), outs):
        assert t.untyped_storage().data_ptr() not in ptrs, f"{name} aliases an input"


# ----------------------------------------------------------------------------- 3. cu_seqlens
BAD_CU = {
    "beyond_T": [0, 4, 100000],
    "short_of_T": [0, 4, 7],
    "decreasing": [0, 6, 3, 9],
    "negative": [0, -3, 9],
    "not_from_0": [2, 5, 9],
}


def _triton_clamped(cu, T):
    """The documented reading of a bad cu_seqlens by the Triton kernels (triton_chunk.py):
    offsets clamped into [0, T], made non-decreasing (a running maximum), first 0, last T."""
    out, m = [], 0
    for c in cu:
        m = max(m, min(max(c, 0), T))
        out.append(m)
    out[0], out[-1] = 0, T
    return out


@pytest.mark.parametrize("case", list(BAD_CU))
def test_bad_cu_seqlens_in_kernels(backend, case):
    """The kernels are called directly (as under torch.compile, where value checks are skipped):
    cpu and torch raise naming cu_seqlens; triton stays in bounds, as its docstring says."""
    T = 9
    q, k, v, pq, pk = make_inputs(1, T, None, 2, None, 4, 4)
    bad = BAD_CU[case]
    cu = torch.tensor(bad, dtype=torch.int64)
    kern = _kernels(backend)
    n = len(bad) - 1
    S0, z0 = make_state(n, 2, 4, 4)
    if backend in ("cpu", "torch"):
        with pytest.raises((ValueError, RuntimeError), match="cu_seqlens"):
            kern.fwd(q, k, v, pq, pk, S0, z0, None, cu, None, True, 0, 1e-6, True, True)
        do = torch.randn(1, T, 2, 4)
        with pytest.raises((ValueError, RuntimeError), match="cu_seqlens"):
            kern.bwd(do, None, None, q, k, v, pq, pk, S0, z0, None, cu, None, True, 0, 1e-6, True)
        return
    c = _triton_clamped(bad, T)
    o, S, z = kern.fwd(q, k, v, pq, pk, S0, z0, None, cu, None, True, 0, 1e-6, True, True)[:3]
    assert o.shape == (1, T, 2, 4) and S.shape == (n, 2, 8, 4)
    covered = torch.zeros(T, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(c[:-1], c[1:])):
        covered[a:b] = True
        if b > a:
            ro, (rS, rz) = reference(q[:, a:b], k[:, a:b], v[:, a:b], pq[:, a:b], pk[:, a:b],
                                     initial_state=(S0[i:i + 1], z0[i:i + 1]), output_final_state=True)
            assert_close(o[:, a:b], ro, torch.float32)
            assert_close(S[i:i + 1], rS, torch.float32, "S")
        else:
            assert torch.equal(S[i], S0[i]) and torch.equal(z[i], z0[i])
    assert torch.equal(o[:, ~covered], torch.zeros_like(o[:, ~covered]))
    do = torch.randn(1, T, 2, 4)
    g = kern.bwd(do, torch.randn_like(S), torch.randn_like(z), q, k, v, pq, pk, S0, z0, None, cu, None, True, 0, 1e-6,
                 True)
    for name, t in zip("dq dk dv dpq dpk dS0 dz0".split(), g):
        assert torch.isfinite(t).all(), f"{name} holds NaN / uninitialised memory"
    for t in g[:5]:
        assert torch.equal(t[:, ~covered], torch.zeros_like(t[:, ~covered]))


def test_bad_cu_seqlens_cpu_under_compile():
    """Value checks are skipped while tracing; the C++ kernel checks cu_seqlens itself."""
    if "cpu" not in lk.available_backends():
        pytest.skip("the cpu backend is not available")
    torch._dynamo.reset()
    q, k, v, pq, pk = make_inputs(1, 9, None, 2, None, 4, 4)
    f = torch.compile(lambda cu, *a: lk.leap_attention(*a, cu_seqlens=cu, backend="cpu"), fullgraph=True,
                      backend="aot_eager")
    assert f(torch.tensor([0, 4, 9]), q, k, v, pq, pk).shape == q.shape
    with pytest.raises(Exception, match="cu_seqlens"):
        f(torch.tensor([0, 4, 100000]), q, k, v, pq, pk)


# ----------------------------------------------------------------------------- 4. allocation
def test_torch_backend_allocates_T_rows():
    from leapformer_kernels.attention import torch_chunk

    for bs in (6, 100, 2 ** 31 - 1, 2 ** 63 - 1):
        C, _ = torch_chunk._chunk_plan(5, bs)
        assert C <= 64, (bs, C)
    q, k, v, pq, pk = make_inputs(1, 5, None, 2, None, 4, 4)
    o = lk.leap_attention(q, k, v, pq, pk, block_size=2 ** 31 - 1, backend="torch")
    assert_close(o, reference(q, k, v, pq, pk, causal=False), torch.float32)


# ----------------------------------------------------------------------------- 5. NaN rules
NONFINITE = {"nan": float("nan"), "inf": float("inf")}
ATTN = {
    "causal": dict(causal=True),
    "block": dict(causal=True, block_size=3),
    "cross": dict(causal=False),
}


def _visible_rows(mode, s, T):
    if mode == "causal":
        return list(range(s, T))
    if mode == "block":
        return list(range(s // 3 * 3, T))
    return list(range(T))


def _attn(impl, *a, **kw):
    if impl == "oracle":
        return lk.reference.leap_attention(*a, **kw)
    return lk.leap_attention(*a, backend=impl, **kw)


IMPLS = lk.available_backends() + ["oracle"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", list(ATTN))
@pytest.mark.parametrize("where", ["q", "k", "v", "pk"])
@pytest.mark.parametrize("val", list(NONFINITE))
def test_nonfinite_propagates(impl, mode, where, val):
    T, s = 7, 3
    S_len = 5 if mode == "cross" else T
    q, k, v, pq, pk = make_inputs(1, T, S_len, 2, None, 8, 4, p_extremes=False)
    x = NONFINITE[val]
    if where == "q":
        q[0, s, 0, :3] = x
    elif where == "k":
        k[0, s, 0, 0] = x
        k[0, s, 0, 1:] = k[0, s, 0, 1:].abs()  # some positive feature: +inf is not hidden by zeros
    elif where == "v":
        v[0, s, 0, 1] = x
    else:
        pk[0, s, 0] = x
    o, (S, z) = _attn(impl, q, k, v, pq, pk, output_final_state=True, **ATTN[mode])
    rows = [s] if where == "q" else _visible_rows(mode, s, T)
    for t in rows:
        assert not torch.isfinite(o[0, t, 0]).all(), f"o[{t}] is finite"
    if where != "q":
        assert not torch.isfinite(S[0, 0]).all(), "final state is finite"
    assert torch.isfinite(o[0, :, 1]).all()  # the other head is untouched


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["q", "k", "pk"])
def test_nonfinite_propagates_step(impl, where):
    """The decode step: a NaN key reaches every later token and the new state."""
    q, k, v, pq, pk = make_inputs(2, 3, None, 2, None, 8, 4, p_extremes=False)
    state = make_state(2, 2, 8, 4)
    {"q": q, "k": k, "pk": pk}[where][1, 1, 0, ...] = float("nan")
    if impl == "oracle":
        o, (S, z) = lk.reference.leap_attention_step(q, k, v, pq, pk, state)
    else:
        o, (S, z) = lk.leap_attention_step(q, k, v, pq, pk, state, backend=impl)
    rows = [1] if where == "q" else [1, 2]
    for t in rows:
        assert not torch.isfinite(o[1, t, 0]).all()
    if where != "q":
        assert not torch.isfinite(S[1, 0]).all()
    assert torch.isfinite(o[0]).all() and torch.isfinite(S[0]).all()


PAD_MODES = {
    "causal": dict(causal=True),
    "block": dict(causal=True, block_size=3),
    "cross": dict(causal=False),
    "cross_gqa": dict(causal=False),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", list(PAD_MODES))
def test_padded_key_nonfinite_is_ignored(impl, mode):
    """Padded keys holding NaN / Inf in k, v, pk: the same outputs, final state and gradients
    as with finite values there; their dk, dv, dpk exactly 0."""
    T = 7
    S_len = 6 if mode.startswith("cross") else T
    Hkv = 1 if mode == "cross_gqa" else 2
    q, k, v, pq, pk = make_inputs(2, T, S_len, 2, Hkv, 8, 4)
    kpm = torch.zeros(2, S_len, dtype=torch.bool)
    kpm[0, :2] = True  # left padding
    kpm[1, 4] = True
    kpm[1, S_len - 1] = True
    S0, z0 = make_state(2, 2, 8, 4)
    bad = [t.clone() for t in (k, v, pk)]
    bad[0][kpm] = float("nan")
    bad[1][kpm] = float("inf")
    bad[2][kpm] = float("nan")
    bad[0][1, 4] = float("inf")
    bad[1][1, S_len - 1] = float("nan")
    torch.manual_seed(5)
    wo, wS, wz = torch.randn(2, T, 2, 4), torch.randn(2, 2, 16, 4), torch.randn(2, 2, 16)

    def run(k_, v_, pk_):
        ins = [t.detach().clone().requires_grad_() for t in (q, k_, v_, pq, pk_, S0, z0)]
        o, (S, z) = _attn(impl, *ins[:5], key_padding_mask=kpm, initial_state=(ins[5], ins[6]),
                          output_final_state=True, **PAD_MODES[mode])
        g = torch.autograd.grad((o * wo).sum() + (S * wS).sum() + (z * wz).sum(), ins)
        return (o, S, z), g

    (o, S, z), g = run(*bad)
    (ro, rS, rz), rg = run(k, v, pk)
    for name, a, b in (("o", o, ro), ("S", S, rS), ("z", z, rz)):
        assert torch.isfinite(a).all(), f"{name} is not finite"
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
    for name, a, b in zip("q k v pq pk S0 z0".split(), g, rg):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"d{name}"
    for name, a in zip(("k", "v", "pk"), (g[1], g[2], g[4])):
        assert (a[kpm] == 0).all(), f"d{name} of a padded key is not 0"


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_key_grads_zero_under_nan_state_grad(impl):
    """A NaN query makes the state gradient NaN for every key it sees; padded keys still get
    exactly zero dk, dv, dpk."""
    q, k, v, pq, pk = make_inputs(1, 7, None, 2, None, 8, 4, requires_grad=True)
    kpm = torch.zeros(1, 7, dtype=torch.bool)
    kpm[0, 1] = kpm[0, 3] = True
    with torch.no_grad():
        q[0, 6, 0] = float("nan")
    o = _attn(impl, q, k, v, pq, pk, key_padding_mask=kpm)
    dq, dk, dv, dpq, dpk = torch.autograd.grad((o * torch.randn_like(o)).sum(), (q, k, v, pq, pk))
    assert not torch.isfinite(dk[0, 0, 0]).all()  # the NaN does reach unpadded keys
    for name, a in (("k", dk), ("v", dv), ("pk", dpk)):
        assert (a[kpm] == 0).all(), f"d{name} of a padded key is not 0"


# ----------------------------------------------------------------------------- 6. Triton grids
def test_triton_grids_fit_cuda_limits():
    pytest.importorskip("triton")
    from leapformer_kernels.attention import triton_chunk as tc

    for grid_fn in (tc.sweep_grid, tc.step_grid):
        for NV in (1, 2, 8):
            grid = grid_fn(7000, 10, NV)  # B*H = N*H = 70000
            assert grid[0] == 70000
            assert all(g <= 65535 for g in grid[1:]), grid
            prod = 1
            for g in grid:
                prod *= g
            assert prod == 70000 * NV

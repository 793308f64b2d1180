"""The C++ kernels of the ``cpu`` backend write into outputs allocated in Python.

``attention/cpu.py`` and ``pooling/cpu.py`` allocate every output (and the backward's
per-query-head key-gradient buffers) with ``torch.empty`` and hand them to the C++ entry points,
so the NaN poisoning of fresh buffers in conftest.py reaches them. Here a spy stands in for the
extension module: it checks that every floating buffer handed to the C++ is NaN-filled before the
call (the poisoning reaches it) and finite after (the C++ wrote every element), on odd shapes
(T not a multiple of the 64-key chunk, D not a multiple of the 64-column block), padding,
varlen with an empty sequence, GQA, monotone cross-attention, and both attention drivers. The
non-floating outputs of window_pool (valid, argmax), which the poisoning does not cover, are
filled with two different sentinels and must come back equal. Bad output buffers are refused by
the C++ checks.
"""
import pytest
import torch

import leapformer_kernels as lk
from utils import assert_close, make_inputs, make_state, reference

HAVE_CPU = "cpu" in lk.available_backends()
pytestmark = pytest.mark.skipif(not HAVE_CPU, reason="the C++ cpu backend is not available (build failed?)")

# positions and names of the output arguments of each C++ entry point (as attention/cpu.py and
# pooling/cpu.py pass them), and the number of configuration arguments after them (the driver
# mode and the instruction-set path)
ATTN_OUTS = {
    "fwd": (14, ("o", "S", "z"), 2),
    "bwd": (17, ("dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0", "dkh", "dvh", "dpkh"), 2),
    "step": (9, ("o", "S", "z"), 1),
}
POOL_OUTS = {"pool_fwd": (4, ("pooled", "valid", "argmax"), 0), "pool_bwd": (6, ("dx",), 0)}


class _Spy:
    """Stands in for an extension module: records, for every floating output argument of the
    wrapped entry points, whether it was all NaN before the call and all finite after."""

    def __init__(self, ext, outs):
        self._ext, self._outs, self.log = ext, outs, []

    def __getattr__(self, name):
        fn = getattr(self._ext, name)
        if name not in self._outs:
            return fn
        first, names, n_config = self._outs[name]

        def call(*args):
            outs = [(n, t) for n, t in zip(names, args[first:]) if isinstance(t, torch.Tensor)]
            assert len(args) == first + len(names) + n_config, f"{name}: {len(args)} arguments"
            assert all(isinstance(a, int) for a in args[first + len(names):]), f"{name}: configuration arguments"
            before = {n: bool(torch.isnan(t).all()) for n, t in outs if t.is_floating_point()}
            res = fn(*args)
            after = {n: bool(torch.isfinite(t).all()) for n, t in outs if t.is_floating_point()}
            self.log.append((name, before, after))
            return res

        return call

    def check(self, *names):
        """Every entry point in ``names`` was called; each floating output was poisoned before
        and fully written after."""
        called = {entry for entry, _, _ in self.log}
        assert set(names) <= called, f"called {sorted(called)}, expected {names}"
        for entry, before, after in self.log:
            assert before and all(before.values()), f"{entry}: outputs not NaN-filled before the call: {before}"
            bad = [n for n, ok in after.items() if not ok]
            assert not bad, f"{entry}: elements of {bad} not written (NaN left)"
        return self.log


@pytest.fixture
def attn_spy(monkeypatch):
    from leapformer_kernels.attention import cpu

    spy = _Spy(cpu._ext(), ATTN_OUTS)
    monkeypatch.setattr(cpu, "_ext", lambda: spy)
    yield spy
    cpu.set_mode(0)


@pytest.fixture
def pool_spy(monkeypatch):
    from leapformer_kernels.pooling import cpu

    spy = _Spy(cpu._ext(), POOL_OUTS)
    monkeypatch.setattr(cpu, "_ext", lambda: spy)
    return spy


def test_poisoning_is_active():
    """conftest's poisoning: torch.empty and new_empty give NaN-filled floating tensors."""
    assert torch.isnan(torch.empty(3, 5)).all()
    assert torch.isnan(torch.empty(4, dtype=torch.bfloat16)).all()
    assert torch.isnan(torch.zeros(1).new_empty(2, 3)).all()


ATTN_CASES = {
    # T = 67: one full 64-key chunk and 3 keys; GQA (Hkv = 1 of H = 3); odd head dims; padding
    "gqa_padding_state": dict(B=2, T=67, H=3, Hkv=1, Dk=5, Dv=7, kpm=True, state=True, causal=True),
    # varlen with an empty sequence and one crossing a chunk boundary, block-causal
    "varlen_block": dict(B=1, T=131, H=2, Hkv=2, Dk=6, Dv=3, cu=[0, 1, 66, 66, 131], state=True, causal=True,
                         block_size=5),
    # cross-attention (S != T), padded keys, no state (no dS0), un-normalised
    "cross_padding": dict(B=2, T=7, S=70, H=2, Hkv=2, Dk=4, Dv=9, kpm=True, causal=False, normalize=False),
    # monotone cross-attention (num_visible_keys): per-batch wait-k limits, GQA, padding, state
    "monotone": dict(B=2, T=70, S=150, H=3, Hkv=1, Dk=5, Dv=7, kpm=True, state=True, causal=False,
                     num_visible_keys=torch.stack([lk.wait_k(70, 150, 0, 2.5), lk.wait_k(70, 150, 9, 1.5)])),
}


@pytest.mark.parametrize("mode", [1, 2], ids=["sequential", "across_chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_outputs_poisoned_and_written(attn_spy, case, dtype, mode):
    from leapformer_kernels.attention import cpu

    c = dict(ATTN_CASES[case])
    B, T, H, Hkv, Dk, Dv = (c.pop(n) for n in ("B", "T", "H", "Hkv", "Dk", "Dv"))
    S = c.pop("S", T)
    kpm = torch.rand(B, S) < 0.3 if c.pop("kpm", False) else None
    cu = c.pop("cu", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    n = B if cu is None else cu.numel() - 1
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    st = make_state(n, H, Dk, Dv) if c.pop("state", False) else None
    ins = [q, k, v, pq, pk] + (list(st) if st else [])
    for t in ins:
        t.requires_grad_()
    cpu.set_mode(mode)
    kw = dict(key_padding_mask=kpm, cu_seqlens=cu, **c)
    o, (S_, z_) = lk.leap_attention(*ins[:5], initial_state=tuple(ins[5:]) or None, output_final_state=True,
                                    backend="cpu", **kw)
    g = [torch.randn_like(t) for t in (o, S_, z_)]
    grads = torch.autograd.grad((o, S_, z_), ins, g)
    log = attn_spy.check("fwd", "bwd")
    # the buffers handed down: the per-query-head key gradients exactly for GQA or a half dtype
    bwd_outs = [set(after) for entry, _, after in log if entry == "bwd"][0]
    assert ("dkh" in bwd_outs) == (Hkv != H or dtype != torch.float32)
    assert ("dpkh" in bwd_outs) == (Hkv != H)
    assert ("dS0" in bwd_outs) == (st is not None)
    if dtype == torch.float32:  # and the values written are the right ones
        ref_ins = [t.detach().double().requires_grad_() for t in ins]
        o_r, (S_r, z_r) = lk.reference.leap_attention(*ref_ins[:5], initial_state=tuple(ref_ins[5:]) or None,
                                                      output_final_state=True, **kw)
        for name, a, r in (("o", o, o_r), ("S", S_, S_r), ("z", z_, z_r)):
            assert_close(a, r, dtype, name)
        grads_r = torch.autograd.grad((o_r, S_r, z_r), ref_ins, [t.double() for t in g])
        for name, a, r in zip(("dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"), grads, grads_r):
            assert_close(a, r, dtype, name, factor=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["float32", "bfloat16", "float64"])
def test_step_outputs_poisoned_and_written(attn_spy, dtype):
    B, t, H, Hkv, Dk, Dv = 3, 3, 4, 2, 5, 12
    q, k, v, pq, pk = make_inputs(B, t, None, H, Hkv, Dk, Dv, dtype=torch.float32)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    pq, pk = pq.to(acc), pk.to(acc)
    state = tuple(s.to(acc) for s in make_state(B, H, Dk, Dv))
    for st in (state, None):
        o, (S_, z_) = lk.leap_attention_step(q, k, v, pq, pk, st, backend="cpu")
        o_r, (S_r, z_r) = reference(q, k, v, pq, pk, initial_state=st, output_final_state=True)
        assert_close(o, o_r, dtype, "o")
        assert_close(S_, S_r, acc if dtype != torch.bfloat16 else dtype, "S")
    assert len(attn_spy.check("step")) == 2


POOL_WINDOWS = [(-3, 0), (1, 1), (2, 300), (-1500, 0), (5000, 5005), (-40, -30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_pool_outputs_poisoned_and_written(pool_spy, reduce, dtype):
    """T = 300 crosses the 256-row prefix block; D = 70 leaves a partial 64-column block; the
    windows include wholly-outside ones (0, argmax -1) and ones longer than T."""
    x = torch.randn(2, 300, 70, dtype=torch.float64).to(dtype).requires_grad_()
    pooled, valid = lk.window_pool(x, POOL_WINDOWS, reduce, backend="cpu")
    g = torch.randn(pooled.shape, dtype=torch.float64).to(dtype)
    (dx,) = torch.autograd.grad(pooled, x, g)
    log = pool_spy.check("pool_fwd", "pool_bwd")
    assert [set(b) for e, b, _ in log] == [{"pooled"}, {"dx"}]
    xr = x.detach().double().requires_grad_()
    ref, ref_valid = lk.window_pool(xr, POOL_WINDOWS, reduce, backend="torch")
    (ref_dx,) = torch.autograd.grad(ref, xr, g.double())
    assert torch.equal(valid, ref_valid)
    assert_close(pooled, ref, dtype, "pooled")
    assert_close(dx, ref_dx, dtype, "dx", factor=2)


@pytest.mark.parametrize("wide", [False, True], ids=["int16", "int32"])
def test_pool_non_float_outputs_written(wide):
    """valid (bool) and argmax (int), which the NaN poisoning does not reach: filled with two
    different sentinels before the call, they come back equal (every element written)."""
    from leapformer_kernels.pooling import cpu

    ext = cpu._ext()
    x = torch.randn(2, 300, 70)
    windows = POOL_WINDOWS + ([(-40000, 0)] if wide else [])
    a, b = cpu._clamp(windows, 300)
    adt = cpu.argmax_dtype(windows)
    assert adt == (torch.int32 if wide else torch.int16)
    res = []
    for fill_valid, fill_arg in ((True, torch.iinfo(adt).min), (False, torch.iinfo(adt).max)):
        pooled = torch.full((2, 300, len(windows), 70), float("nan"))
        valid = torch.full((2, 300, len(windows)), fill_valid)
        arg = torch.full((2, 300, len(windows), 70), fill_arg, dtype=adt)
        ext.pool_fwd(x, a, b, "max", pooled, valid, arg)
        res.append((pooled, valid, arg))
    for u, w in zip(*res):
        assert torch.equal(u, w)
    pooled, valid, arg = res[0]
    ref, ref_valid = lk.reference.window_pool(x[:, :, :3], windows, "max")
    assert torch.equal(valid, ref_valid) and torch.equal(pooled[..., :3], ref)
    assert bool((arg[:, :, 4] == -1).all())  # (5000, 5005): wholly outside


def test_attention_output_checks():
    """The C++ refuses output buffers of the wrong shape, dtype, layout, or aliasing an input."""
    from leapformer_kernels.attention import cpu

    ext = cpu._ext()
    q, k, v, pq, pk = make_inputs(1, 9, None, 2, None, 4, 3)
    args = (q, k, v, pq, pk, None, None, None, None, None, True, 0, 1e-6, True)
    good = torch.empty(1, 9, 2, 3)
    bad = {
        "shape": torch.empty(1, 9, 2, 4),
        "dtype": torch.empty(1, 9, 2, 3, dtype=torch.float64),
        "contiguous": torch.empty(1, 9, 3, 2).transpose(2, 3),
        "alias": v,
    }
    for what, o in bad.items():
        with pytest.raises(RuntimeError, match="output o"):
            ext.fwd(*args, o, None, None)
    with pytest.raises(RuntimeError, match="S and z"):
        ext.fwd(*args, good, torch.empty(1, 2, 8, 3), None)
    with pytest.raises(RuntimeError, match="output S"):
        ext.fwd(*args, good, torch.empty(2, 2, 8, 3), torch.empty(1, 2, 8))
    ext.fwd(*args, good, None, None)
    assert torch.isfinite(good).all()
    # the backward: the workspaces are needed exactly where dk, dv, dpk cannot be written directly
    do = torch.randn(1, 9, 2, 3)
    outs = [torch.empty(1, 9, 2, 4), torch.empty(1, 9, 2, 4), torch.empty(1, 9, 2, 3), torch.empty(1, 9, 2),
            torch.empty(1, 9, 2), None, None]
    bargs = (do, None, None) + args
    with pytest.raises(RuntimeError, match="workspaces dkh, dvh"):
        ext.bwd(*bargs, *outs, torch.empty(1, 9, 2, 4), torch.empty(1, 9, 2, 3), None)
    with pytest.raises(RuntimeError, match="dS0, dz0"):
        ext.bwd(*bargs, *outs[:5], torch.empty(1, 2, 8, 3), torch.empty(1, 2, 8), None, None, None)
    ext.bwd(*bargs, *outs, None, None, None)
    assert all(torch.isfinite(t).all() for t in outs[:5])
    with pytest.raises(RuntimeError, match="output z"):
        ext.step(q[:, :1], k[:, :1], v[:, :1], pq[:, :1], pk[:, :1], None, None, 1e-6, True,
                 torch.empty(1, 1, 2, 3), torch.empty(1, 2, 8, 3), torch.empty(1, 2, 8, dtype=torch.float16))


def test_pool_output_checks():
    from leapformer_kernels.pooling import cpu

    ext = cpu._ext()
    x = torch.randn(2, 10, 3)
    out, valid = torch.empty(2, 10, 1, 3), torch.empty(2, 10, 1, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="output pooled"):
        ext.pool_fwd(x, [-1], [1], "sum", torch.empty(2, 10, 2, 3), valid, None)
    with pytest.raises(RuntimeError, match="output valid"):
        ext.pool_fwd(x, [-1], [1], "sum", out, torch.empty(2, 10, 1), None)
    with pytest.raises(RuntimeError, match="reduce='max' only"):
        ext.pool_fwd(x, [-1], [1], "sum", out, valid, torch.empty(2, 10, 1, 3, dtype=torch.int16))
    with pytest.raises(RuntimeError, match="argmax output"):
        ext.pool_fwd(x, [-1], [1], "max", out, valid, torch.empty(2, 10, 1, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="int16 argmax"):
        ext.pool_fwd(torch.randn(1, 40000, 1), [-40000], [0], "max", torch.empty(1, 40000, 1, 1),
                     torch.empty(1, 40000, 1, dtype=torch.bool), torch.empty(1, 40000, 1, 1, dtype=torch.int16))
    g = torch.randn(2, 10, 1, 3)
    with pytest.raises(RuntimeError, match="output dx"):
        ext.pool_bwd(g, 10, [-1], [1], "sum", None, torch.empty(2, 10, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="shares memory"):
        ext.pool_bwd(g, 10, [-1], [1], "sum", None, g.view(2, 10, 3))

"""torch.library registration: opcheck of every op and backend; torch.compile(fullgraph=True)
of models using LeapAttention, same outputs and gradients as eager, no recompile when T changes;
autocast."""
import pytest
import torch
import torch._dynamo

import leapformer_kernels as lk
from leapformer_kernels.attention import op as aop
from leapformer_kernels.pooling import op as pop
from utils import make_inputs, make_state

POOL_BACKENDS = lk.available_backends("window_pool")


def _attn_args(backend, dtype=torch.float32, state=True, mode="causal", cu=False):
    q, k, v, pq, pk = make_inputs(1 if cu else 2, 19, None if mode != "cross" else 11, 2, 1, 8, 4, dtype=dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    n = 2 if cu else q.shape[0]
    S0, z0 = make_state(n, 2, 8, 4, dtype=sdt) if state else (None, None)
    for t in (q, k, v, pq, pk, S0, z0):
        if t is not None:
            t.requires_grad_()
    kpm = torch.rand(k.shape[0], k.shape[1]) < 0.2
    cuseq = torch.tensor([0, 7, 19], dtype=torch.int64) if cu else None
    causal = mode != "cross"
    return (q, k, v, pq.to(sdt), pk.to(sdt), S0, z0, kpm, cuseq, None, causal, 4 if mode == "block" else 0, 1e-6,
            True, True, backend)


@pytest.mark.parametrize("mode", ["causal", "block", "cross", "varlen"])
def test_opcheck_attention(backend, mode):
    args = _attn_args(backend, mode=mode if mode != "varlen" else "causal", cu=mode == "varlen")
    torch.library.opcheck(aop.leap_attention_fwd, args)


def test_opcheck_attention_no_state(backend):
    args = list(_attn_args(backend, state=False))
    args[14] = False  # output_final_state
    torch.library.opcheck(aop.leap_attention_fwd, tuple(args))


def test_opcheck_step(backend):
    q, k, v, pq, pk = make_inputs(2, 3, None, 2, 1, 8, 4)
    S0, z0 = make_state(2, 2, 8, 4)
    torch.library.opcheck(aop.leap_attention_step_op, (q, k, v, pq, pk, S0, z0, 1e-6, True, backend))
    torch.library.opcheck(aop.leap_attention_step_op, (q, k, v, pq, pk, None, None, 1e-6, True, backend))


@pytest.mark.parametrize("pool_backend", POOL_BACKENDS)
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_opcheck_window_pool(pool_backend, reduce):
    x = torch.randn(2, 13, 5, requires_grad=True)
    torch.library.opcheck(pop.window_pool_fwd, (x, [1, -3, 2], [1, 0, 40], reduce, True, pool_backend))
    if reduce == "max":  # the inference form, without the argmax
        torch.library.opcheck(pop.window_pool_fwd, (x.detach(), [1, -3, 2], [1, 0, 40], reduce, False, pool_backend))


class Tiny(torch.nn.Module):
    """Self-attention, block-causal self-attention and cross-attention, one of each."""

    def __init__(self, backend):
        super().__init__()
        self.self_attn = lk.LeapAttention(16, 2, backend=backend)
        self.block_attn = lk.LeapAttention(16, 2, num_kv_heads=1, block_size=4, backend=backend)
        self.cross_attn = lk.LeapAttention(16, 2, cross=True, causal=False, kdim=8, vdim=8, backend=backend)

    def forward(self, x, ctx):
        x = x + self.self_attn(x)
        x = x + self.block_attn(x)
        return x + self.cross_attn(x, context=ctx)


# Inductor once, on the backend the automatic choice takes on this machine's CPU tensors (a cold
# inductor compile takes tens of seconds, and the ops are opaque custom ops to it whatever kernel
# runs behind them); the other backends through AOT autograd (aot_eager), which traces the same
# graphs, forward and backward.
INDUCTOR_BACKEND = "cpu" if "cpu" in lk.available_backends() else "torch"


def test_compile_fullgraph_matches_eager(backend):
    """fullgraph: the same outputs and input gradients as eager (inductor on one backend)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Tiny(backend)
    compiled = torch.compile(m, fullgraph=True, backend="inductor" if backend == INDUCTOR_BACKEND else "aot_eager")
    for T in (9, 23):
        x = torch.randn(2, T, 16, requires_grad=True)
        ctx = torch.randn(2, 5, 8)
        torch._dynamo.mark_dynamic(x, 1)
        ye = m(x, ctx)
        (gxe,) = torch.autograd.grad(ye.square().sum(), x)
        yc = compiled(x, ctx)
        (gxc,) = torch.autograd.grad(yc.square().sum(), x)
        assert torch.allclose(yc, ye, atol=1e-5, rtol=1e-5)
        assert torch.allclose(gxc, gxe, atol=1e-4, rtol=1e-4)


def test_no_recompile_when_T_changes(backend):
    """Nothing in the package specialises on T. (Inductor itself buckets some reductions by
    size, e.g. weight gradients over B*T <= 1024, so the check traces with AOT autograd only.)"""
    torch._dynamo.reset()
    m = Tiny(backend)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for i, T in enumerate((9, 14, 23)):
        x = torch.randn(2, T, 16, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 1)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            compiled(x, torch.randn(2, 5, 8)).sum().backward()


def test_compile_with_state(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = lk.LeapAttention(16, 2, backend=backend).eval()

    def step(x, S, z):
        y, (S2, z2) = attn(x, state=(S, z), use_cache=True)
        return y, S2, z2

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(3, 1, 16)
    S, z = torch.zeros(3, 2, 16, 8), torch.zeros(3, 2, 16)
    _, S, z = step(torch.randn(3, 5, 16), S, z)
    ye, Se, ze = step(x, S, z)
    yc, Sc, zc = compiled(x, S, z)
    assert torch.allclose(yc, ye, atol=1e-5) and torch.allclose(Sc, Se, atol=1e-5) and torch.allclose(zc, ze)


def test_compile_window_pool():
    torch._dynamo.reset()
    f = torch.compile(lambda x: lk.window_pool(x, lk.dyadic_windows(3), "max")[0].sum(), fullgraph=True)
    x = torch.randn(2, 17, 4, requires_grad=True)
    (g,) = torch.autograd.grad(f(x), x)
    (ge,) = torch.autograd.grad(lk.window_pool(x, lk.dyadic_windows(3), "max")[0].sum(), x)
    assert torch.equal(g, ge)


def test_autocast_runs_in_autocast_dtype(backend):
    q, k, v, pq, pk = make_inputs(1, 10, None, 2, None, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = lk.leap_attention(q, k, v, pq, pk, backend=backend)
        y = lk.LeapAttention(16, 2, backend=backend)(torch.randn(1, 10, 16))
    assert o.dtype == torch.bfloat16 and y.dtype == torch.bfloat16


def test_cu_seqlens_value_checks_skipped_under_compile(backend):
    torch._dynamo.reset()
    q, k, v, pq, pk = make_inputs(1, 12, None, 2, None, 8, 8)
    cu = torch.tensor([0, 5, 12])
    f = torch.compile(lambda *a: lk.leap_attention(*a, cu_seqlens=cu, backend=backend), fullgraph=True)
    assert torch.allclose(f(q, k, v, pq, pk), lk.leap_attention(q, k, v, pq, pk, cu_seqlens=cu, backend=backend),
                          atol=1e-6)

"""Inputs that must stay finite with normalize=True (DESIGN section 4), forward and backward."""
import pytest
import torch

import leapformer_kernels as lk
from utils import make_inputs, rel_err


def _finite_fwd_bwd(backend, q, k, v, pq, pk, **kw):
    for t in (q, k, v, pq, pk):
        t.requires_grad_()
    o = lk.leap_attention(q, k, v, pq, pk, backend=backend, **kw)
    assert torch.isfinite(o).all()
    o.float().sum().backward()
    for name, t in zip(("q", "k", "v", "pq", "pk"), (q, k, v, pq, pk)):
        assert torch.isfinite(t.grad).all(), f"d{name} is not finite"
    return o


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("causal", [True, False])
def test_all_negative(backend, which, causal):
    q, k, v, pq, pk = make_inputs(2, 37, None, 2, None, 16, 16)
    if which == "q":
        q = -q.abs() - 0.1
    else:
        k = -k.abs() - 0.1
    o = _finite_fwd_bwd(backend, q, k, v, pq, pk, causal=causal)
    assert o.abs().max() == 0  # phi = 0 everywhere: nothing is attended


def test_orthogonal_proportions(backend):
    """pq = 1, pk = 0: the features are exactly orthogonal, den = 0 exactly, o = 0."""
    q, k, v, pq, pk = make_inputs(1, 20, None, 2, None, 16, 16, p_extremes=False)
    pq = torch.ones_like(pq)
    pk = torch.zeros_like(pk)
    o = _finite_fwd_bwd(backend, q, k, v, pq, pk)
    assert o.abs().max() == 0


def test_large_magnitude_fp16_forward(backend):
    if backend == "cpu":
        dtype = torch.bfloat16  # the cpu backend's half type in CI
    else:
        dtype = torch.float16
    q, k, v, pq, pk = make_inputs(1, 50, None, 2, None, 16, 16)
    q, k, v = (1e3 * q).to(dtype), (1e3 * k).to(dtype), (1e3 * v).to(dtype)
    o = lk.leap_attention(q, k, v, pq, pk, backend=backend)
    assert torch.isfinite(o).all()
    ref = lk.reference.leap_attention(q.double(), k.double(), v.double(), pq.double(), pk.double())
    assert rel_err(o, ref) < (2e-3 if dtype == torch.float16 else 1e-2)


def test_long_sequence_bf16(backend):
    """den grows with T; bf16 inputs, float32 accumulation keep it finite and accurate."""
    q, k, v, pq, pk = make_inputs(1, 4096, None, 1, None, 16, 16)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    o = _finite_fwd_bwd(backend, q, k, v, pq, pk)
    ref = lk.leap_attention(q.double(), k.double(), v.double(), pq.double(), pk.double(), backend="torch")
    assert rel_err(o, ref) < 1e-2


@pytest.mark.slow
def test_very_long_sequence_bf16(backend):
    T = 65536
    q, k, v, pq, pk = make_inputs(1, T, None, 1, None, 16, 16)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    o = _finite_fwd_bwd(backend, q, k, v, pq, pk)
    ref = lk.leap_attention(q.double(), k.double(), v.double(), pq.double(), pk.double(), backend="torch")
    assert rel_err(o, ref) < 1e-2

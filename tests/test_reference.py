"""The oracle itself, checked against an independent formulation: FLA-style expanded features,
a ones column appended to v for the denominator, and a token-by-token recurrence."""
import math

import pytest
import torch

import leapformer_kernels as lk
from utils import make_inputs


def recurrent_linear_attention(q, k, v, pq, pk, causal, block_size, eps, S0=None, z0=None):
    """Written from the paper's formulas, without the package's helpers."""
    B, T, H, Dk = q.shape
    S = k.shape[1]
    g = H // k.shape[2]
    k, v, pk = (x.repeat_interleave(g, dim=2) for x in (k, v, pk))

    def feats(x, p):
        th = (math.pi / 2) * p[..., None]
        return torch.cat([torch.relu(x) * torch.sin(th), torch.relu(x) * torch.cos(th)], -1)

    qf, kf = feats(q, pq), feats(k, pk)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # ones column carries the denominator
    state = torch.zeros(B, H, 2 * Dk, v1.shape[-1], dtype=q.dtype)
    if S0 is not None:
        state[..., :-1] = S0
        state[..., -1] = z0
    out = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    if not causal:
        state = state + torch.einsum("bshd,bshe->bhde", kf, v1)
        nd = torch.einsum("bthd,bhde->bthe", qf, state)
        return nd[..., :-1] / nd[..., -1:].clamp(min=eps)
    W = block_size or 1
    s = 0
    for t in range(T):
        last = min(T - 1, (t // W + 1) * W - 1)  # the last key visible from t
        while s <= last:
            state = state + torch.einsum("bhd,bhe->bhde", kf[:, s], v1[:, s])
            s += 1
        nd = torch.einsum("bhd,bhde->bhe", qf[:, t], state)
        out[:, t] = nd[..., :-1] / nd[..., -1:].clamp(min=eps)
    return out


@pytest.mark.parametrize("mode", [dict(causal=True, block_size=None), dict(causal=True, block_size=3),
                                  dict(causal=False, block_size=None)])
def test_reference_matches_recurrence(mode):
    q, k, v, pq, pk = make_inputs(2, 11, None, 4, 2, 5, 3, dtype=torch.float64)
    S0 = torch.rand(2, 4, 10, 3, dtype=torch.float64)
    z0 = torch.rand(2, 4, 10, dtype=torch.float64)
    ref = lk.reference.leap_attention(q, k, v, pq, pk, initial_state=(S0, z0), eps=1e-3, **mode)
    rec = recurrent_linear_attention(q, k, v, pq, pk, mode["causal"], mode["block_size"], 1e-3, S0, z0)
    assert (ref - rec).abs().max() < 1e-12


def test_reference_cross_attention_shape():
    q, k, v, pq, pk = make_inputs(1, 4, 9, 2, None, 3, 5, dtype=torch.float64)
    ref = lk.reference.leap_attention(q, k, v, pq, pk, causal=False)
    rec = recurrent_linear_attention(q, k, v, pq, pk, False, None, 1e-6)
    assert ref.shape == (1, 4, 2, 5) and (ref - rec).abs().max() < 1e-12


def test_reweighting_identity():
    """q~ . k~ = relu(q) . relu(k) * cos(pi/2 (pq - pk)): the cosFormer identity."""
    from leapformer_kernels.attention.features import reweight

    q, k = torch.randn(2, 7, 8, dtype=torch.float64).unbind(0)
    pq, pk = torch.rand(2, 7, dtype=torch.float64).unbind(0)
    lhs = (reweight(q, pq) * reweight(k, pk)).sum(-1)
    rhs = (torch.relu(q) * torch.relu(k)).sum(-1) * torch.cos(math.pi / 2 * (pq - pk))
    assert (lhs - rhs).abs().max() < 1e-14

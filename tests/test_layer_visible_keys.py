"""``LeapAttention(cross=True, causal=False)`` with ``num_visible_keys`` (issue #21): the training
forward equals wait-k decoding, where each step passes the source tokens that arrived since the
last call as ``context`` with the carried state, for every attention of the zoo."""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.layers.attention import ATTENTIONS

E, H = 16, 2


def _layer(attention, **kw):
    torch.manual_seed(1)
    return lk.LeapAttention(E, H, cross=True, causal=False, attention=attention, eps=1e-3, **kw).double()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("lag,rate", [(1, 1.0), (3, 2.5)])
def test_training_forward_equals_wait_k_decoding(attention, lag, rate):
    B, T, S = 2, 9, 20
    layer = _layer(attention, num_kv_heads=1)
    x = torch.randn(B, T, E, dtype=torch.float64)
    ctx = torch.randn(B, S, E, dtype=torch.float64)
    n = lk.wait_k(T, S, lag, rate)
    full = layer(x, ctx, num_visible_keys=n)
    state, seen, outs = None, 0, []
    for t in range(T):
        new = ctx[:, seen:int(n[t])]
        seen = int(n[t])
        y, state = layer(x[:, t:t + 1], new if new.shape[1] else None, state=state, use_cache=True)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_limits_of_a_decode_block_count_from_the_state(attention):
    """Several target tokens in one call with a state: their limits count keys of the new context;
    everything the state holds stays visible."""
    B, T, S = 1, 6, 14
    layer = _layer(attention)
    x = torch.randn(B, T, E, dtype=torch.float64)
    ctx = torch.randn(B, S, E, dtype=torch.float64)
    n = torch.tensor([4, 4, 7, 9, 12, 14])
    full = layer(x, ctx, num_visible_keys=n)
    y1, st = layer(x[:, :2], ctx[:, :4], use_cache=True)
    y2, _ = layer(x[:, 2:], ctx[:, 4:], state=st, use_cache=True, num_visible_keys=n[2:] - 4)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-10, atol=1e-10)


def test_gradients_reach_the_visible_context_only():
    layer = _layer("leap")
    x = torch.randn(1, 5, E, dtype=torch.float64)
    ctx = torch.randn(1, 12, E, dtype=torch.float64, requires_grad=True)
    n = torch.tensor([2, 3, 3, 6, 8])
    layer(x, ctx, num_visible_keys=n).sum().backward()
    assert bool((ctx.grad[0, 8:] == 0).all()) and bool((ctx.grad[0, :8].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("kw,match", [
    (dict(cross=False, causal=True), "non-causal cross-attention"),
    (dict(cross=True, causal=True), "non-causal cross-attention"),
])
def test_num_visible_keys_needs_a_noncausal_cross_layer(kw, match):
    layer = lk.LeapAttention(E, H, **kw)
    x = torch.randn(1, 4, E)
    ctx = torch.randn(1, 4, E) if kw["cross"] else None
    with pytest.raises(ValueError, match=match):
        layer(x, ctx, num_visible_keys=torch.arange(1, 5))


@pytest.mark.parametrize("attention", ["leap", "softmax"])
def test_bad_limits_are_refused_by_the_layer(attention):
    layer = lk.LeapAttention(E, H, cross=True, causal=False, attention=attention)
    x, ctx = torch.randn(1, 4, E), torch.randn(1, 6, E)
    with pytest.raises(ValueError, match="non-decreasing"):
        layer(x, ctx, num_visible_keys=torch.tensor([1, 3, 2, 6]))
    with pytest.raises(ValueError, match=r"\[0, S\]"):
        layer(x, ctx, num_visible_keys=torch.tensor([1, 3, 5, 7]))
    with pytest.raises(ValueError, match="pass context"):
        layer(x, None, state=layer(x, ctx, use_cache=True)[1], num_visible_keys=torch.tensor([0, 0, 0, 0]))

"""nn.Module layers: LeaP, LeapAttention (leap and softmax), WindowPool."""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.attention.features import expand_kv_heads


def test_leap_predictor():
    m = lk.LeaP(32)
    assert m.hidden == 8
    x = torch.randn(2, 5, 3, 32)
    p = m(x)
    assert p.shape == (2, 5, 3) and bool(((p > 0) & (p < 1)).all())
    lin = lk.LeaP(32, hidden=1)
    assert isinstance(lin.net[0], torch.nn.Linear) and len(lin.net) == 2
    assert torch.allclose(lin(x), torch.sigmoid(lin.net[0](x)).squeeze(-1))
    with pytest.raises(ValueError, match="hidden"):
        lk.LeaP(8, hidden=0)


def _layer(attention="leap", **kw):
    torch.manual_seed(1)
    return lk.LeapAttention(32, 4, attention=attention, **kw).eval()


def test_layer_matches_functional(backend):
    m = _layer(num_kv_heads=2)
    m.backend = backend
    x = torch.randn(2, 11, 32)
    y = m(x)
    B, T, hd = 2, 11, 8
    q = m.q_proj(x).view(B, T, 4, hd) * hd ** -0.5
    k = m.k_proj(x).view(B, T, 2, hd)
    v = m.v_proj(x).view(B, T, 2, hd)
    o = lk.reference.leap_attention(q, k, v, m.leap_q(torch.relu(q)), m.leap_k(torch.relu(k)), eps=0.1)
    assert torch.allclose(y, m.out_proj(o.reshape(B, T, 32)), atol=1e-5)


@pytest.mark.parametrize("attention", ["leap", "softmax"])
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_decode_with_cache_equals_full(attention, num_kv_heads):
    m = _layer(attention, num_kv_heads=num_kv_heads)
    x = torch.randn(2, 12, 32)
    full = m(x)
    y0, state = m(x[:, :5], use_cache=True)
    outs = [y0]
    for t in range(5, 12, 2):
        y, state = m(x[:, t:t + 2], state=state, use_cache=True)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


@pytest.mark.parametrize("attention", ["leap", "softmax"])
def test_left_padded_prompts(attention):
    """Batched prompts of different lengths (left padding) decode as each prompt alone."""
    m = _layer(attention)
    a, b = torch.randn(1, 7, 32), torch.randn(1, 3, 32)
    pad = torch.zeros(1, 4, 32)
    x = torch.cat([a, torch.cat([pad, b], 1)], 0)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, :4] = True
    y, state = m(x, key_padding_mask=kpm, use_cache=True)
    ya, sa = m(a, use_cache=True)
    yb, sb = m(b, use_cache=True)
    assert torch.allclose(y[0], ya[0], atol=1e-5) and torch.allclose(y[1, 4:], yb[0], atol=1e-5)
    nxt = torch.randn(2, 1, 32)
    y2, _ = m(nxt, state=state, use_cache=True)
    y2a, _ = m(nxt[:1], state=sa, use_cache=True)
    y2b, _ = m(nxt[1:], state=sb, use_cache=True)
    assert torch.allclose(y2[0], y2a[0], atol=1e-5) and torch.allclose(y2[1], y2b[0], atol=1e-5)


@pytest.mark.parametrize("attention", ["leap", "softmax"])
def test_cross_attention_state_reuse(attention):
    m = lk.LeapAttention(32, 4, cross=True, causal=False, kdim=24, vdim=24, attention=attention).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 9, 24)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, -2:] = True
    full = m(x, context=ctx, key_padding_mask=kpm)
    y0, state = m(x[:, :2], context=ctx, key_padding_mask=kpm, use_cache=True)
    y1, state2 = m(x[:, 2:], state=state, use_cache=True)
    assert torch.allclose(torch.cat([y0, y1], 1), full, atol=1e-5)


def test_causal_aligned_cross_attention():
    """Query i sees context positions <= i only."""
    m = lk.LeapAttention(32, 4, cross=True, causal=True).eval()
    x, ctx = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    y = m(x, context=ctx)
    ctx2 = ctx.clone()
    ctx2[:, 5:] += 1.0
    y2 = m(x, context=ctx2)
    assert torch.allclose(y[:, :5], y2[:, :5], atol=1e-6) and not torch.allclose(y[:, 5:], y2[:, 5:])


@pytest.mark.parametrize("attention", ["leap", "softmax"])
def test_block_causal_streaming(attention):
    """A block-causal encoder fed block by block with the state equals the whole at once."""
    m = _layer(attention, block_size=4)
    x = torch.randn(2, 12, 32)
    full = m(x)
    y, state, outs = None, None, []
    for i in range(0, 12, 4):
        y, state = m(x[:, i:i + 4], state=state, use_cache=True)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    x2 = x.clone()
    x2[:, 8:] += 1
    assert torch.allclose(m(x2)[:, :8], full[:, :8], atol=1e-6)  # later blocks do not leak back


def test_softmax_matches_sdpa_reference():
    m = _layer("softmax", num_kv_heads=2)
    x = torch.randn(2, 10, 32)
    y = m(x)
    q = m.q_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    k = expand_kv_heads(m.k_proj(x).view(2, 10, 2, 8), 4).transpose(1, 2)
    v = expand_kv_heads(m.v_proj(x).view(2, 10, 2, 8), 4).transpose(1, 2)
    att = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32)
    assert torch.allclose(y, m.out_proj(o), atol=1e-5)


def test_layer_gradients_flow():
    m = lk.LeapAttention(32, 4, num_kv_heads=2).train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.leap_q.net[0].weight.grad.abs().sum() > 0


def test_layer_bad_config():
    with pytest.raises(ValueError, match="num_heads"):
        lk.LeapAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        lk.LeapAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attention"):
        lk.LeapAttention(32, 4, attention="flash")
    with pytest.raises(ValueError, match="context"):
        lk.LeapAttention(32, 4, cross=True)(torch.randn(1, 3, 32))


def test_window_pool_module():
    m = lk.WindowPool(lk.dyadic_windows(3), reduce="sum")
    x = torch.randn(2, 20, 5)
    pooled, valid = m(x)
    assert pooled.shape == (2, 20, 3, 5) and valid.shape == (2, 20, 3)
    assert torch.allclose(pooled[:, 0, 1], x[:, 2:4].sum(1), atol=1e-6)
    assert bool(valid[0, 12, 2]) and not bool(valid[0, 13, 2])

"""LeapAttention: one cross-attention state rule, a fair softmax baseline, packed sequences,
validation with the argument named, empty batches, activation checkpointing, old checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import leapformer_kernels as lk

ATTENTIONS = ["leap", "softmax"]
E, H = 16, 4


def _layer(attention, **kw):
    torch.manual_seed(0)
    return lk.LeapAttention(E, H, attention=attention, **kw).double()


# ------------------------------------------------------------------ cross-attention state rule
@pytest.mark.parametrize("pieces", [1, 2, 3], ids=lambda n: f"{n}pieces")
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cross_state_extends_like_one_call(attention, pieces):
    layer = _layer(attention, causal=False, cross=True, kdim=12, vdim=12)
    x = torch.randn(2, 5, E, dtype=torch.float64)
    ctx = torch.randn(2, 10, 12, dtype=torch.float64)
    full = layer(x, context=ctx)
    state = None
    for part in torch.tensor_split(ctx, pieces, dim=1):
        y, state = layer(x, context=part, state=state, use_cache=True)
    torch.testing.assert_close(y, full, rtol=1e-10, atol=1e-10)
    y_again, state_again = layer(x, context=None, state=state, use_cache=True)  # no new source
    torch.testing.assert_close(y_again, full, rtol=1e-10, atol=1e-10)
    if attention == "leap":  # the state does not grow when no source arrives
        torch.testing.assert_close(state_again[1], state[1], rtol=0, atol=0)
    else:
        assert state_again[0].shape[1] == 10


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cross_state_with_padding_extends(attention):
    layer = _layer(attention, causal=False, cross=True)
    x = torch.randn(2, 3, E, dtype=torch.float64)
    ctx = torch.randn(2, 7, E, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, :2] = True
    full = layer(x, context=ctx, key_padding_mask=pad)
    y, st = layer(x, context=ctx[:, :4], key_padding_mask=pad[:, :4], use_cache=True)
    y, st = layer(x, context=ctx[:, 4:], key_padding_mask=pad[:, 4:], state=st, use_cache=True)
    torch.testing.assert_close(y, full, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ a fair softmax baseline
def test_softmax_has_no_leap_predictors():
    soft = lk.LeapAttention(E, H, attention="softmax")
    leap = lk.LeapAttention(E, H, attention="leap")
    assert soft.leap_q is None and soft.leap_k is None
    assert not any("leap_" in n for n, _ in soft.named_parameters())
    n_pred = sum(p.numel() for m in (leap.leap_q, leap.leap_k) for p in m.parameters())
    assert sum(p.numel() for p in soft.parameters()) == sum(p.numel() for p in leap.parameters()) - n_pred
    x = torch.randn(2, 6, E)
    soft(x).sum().backward()
    assert all(p.grad is not None for p in soft.parameters())  # no dead parameters (DDP-safe)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_softmax_plain_calls_use_is_causal_without_mask(monkeypatch, causal):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    layer = _layer("softmax", causal=causal)
    x = torch.randn(2, 7, E, dtype=torch.float64)
    y = layer(x)
    assert calls and calls[-1].get("attn_mask") is None and calls[-1].get("is_causal") == causal
    # the same result as the masked path (a padding mask that pads nothing forces it)
    y_masked = layer(x, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    assert calls[-1].get("attn_mask") is not None
    torch.testing.assert_close(y, y_masked, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padded_keys_holding_nan_reach_nothing(attention):
    layer = _layer(attention, causal=False, cross=True)
    x = torch.randn(2, 4, E, dtype=torch.float64)
    ctx = torch.randn(2, 6, E, dtype=torch.float64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    bad = ctx.clone()
    bad[1, 4:] = float("nan")
    y = layer(x, context=bad, key_padding_mask=pad)
    assert torch.isfinite(y).all()
    alone = layer(x[1:], context=ctx[1:, :4])
    torch.testing.assert_close(y[1:], alone, rtol=1e-10, atol=1e-10)


def test_old_softmax_checkpoint_loads():
    soft = lk.LeapAttention(E, H, attention="softmax")
    old = dict(soft.state_dict())
    leap = lk.LeapAttention(E, H, attention="leap")
    old.update({k: v for k, v in leap.state_dict().items() if k.startswith(("leap_q.", "leap_k."))})
    fresh = lk.LeapAttention(E, H, attention="softmax")
    fresh.load_state_dict(old)  # strict: the old predictors are dropped, nothing else is missing
    for k, v in soft.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


# ------------------------------------------------------------------ packed sequences
PACK_MODES = {"causal": dict(causal=True), "noncausal": dict(causal=False), "block3": dict(causal=True, block_size=3)}


@pytest.mark.parametrize("mode", list(PACK_MODES))
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_equals_each_sequence_alone(attention, mode):
    layer = _layer(attention, **PACK_MODES[mode])
    lens = [5, 1, 7]
    seqs = [torch.randn(1, n, E, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    packed = layer(torch.cat(seqs, 1), cu_seqlens=cu)
    alone = torch.cat([layer(s) for s in seqs], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    if attention == "leap":
        _, (S, z) = layer(torch.cat(seqs, 1), cu_seqlens=cu, use_cache=True)
        assert S.shape[0] == 3
        for i, s in enumerate(seqs):
            _, (Si, zi) = layer(s, use_cache=True)
            torch.testing.assert_close(S[i:i + 1], Si, rtol=1e-10, atol=1e-10)


def test_packed_bad_use():
    x = torch.randn(2, 6, E)
    cu = torch.tensor([0, 3, 6])
    with pytest.raises(ValueError, match="batch size 1"):
        lk.LeapAttention(E, H)(x, cu_seqlens=cu)
    with pytest.raises(ValueError, match="use_cache with cu_seqlens"):
        lk.LeapAttention(E, H, attention="softmax")(x[:1], cu_seqlens=cu, use_cache=True)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs,needle", [
    (dict(embed_dim=16, num_heads=0), "num_heads"),
    (dict(embed_dim=16, num_heads=4, num_kv_heads=0), "num_kv_heads"),
    (dict(embed_dim=16, num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(embed_dim=10, num_heads=4), "embed_dim"),
    (dict(embed_dim=0, num_heads=1), "embed_dim"),
    (dict(embed_dim=16, num_heads=4, block_size=0), "block_size"),
    (dict(embed_dim=16, num_heads=4, block_size=-2), "block_size"),
    (dict(embed_dim=16, num_heads=4, eps=-0.1), "eps"),
    (dict(embed_dim=16, num_heads=4, eps=float("nan")), "eps"),
    (dict(embed_dim=16, num_heads=4, attention="flash"), "attention"),
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()))
def test_construction_errors_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        lk.LeapAttention(**kwargs)


@pytest.mark.parametrize("x,needle", [
    (torch.randn(6, E), "x must be"),
    (torch.randn(2, 6, E + 1), "x must be"),
], ids=["2d", "width"])
def test_call_errors_name_the_argument(x, needle):
    with pytest.raises(ValueError, match=needle):
        lk.LeapAttention(E, H)(x)


def test_bad_padding_mask_named():
    with pytest.raises(ValueError, match="key_padding_mask"):
        lk.LeapAttention(E, H)(torch.randn(2, 6, E), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("windows,err", [([], ValueError), ([(3, 1)], ValueError), ([(0.5, 1)], TypeError),
                                         ("ab", TypeError)], ids=["empty", "reversed", "float", "str"])
def test_window_pool_module_validates(windows, err):
    with pytest.raises(err, match="windows"):
        lk.WindowPool(windows)


# ------------------------------------------------------------------ empty batch
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_empty_batch_attention(attention):
    x = torch.randn(0, 5, E, requires_grad=True)
    y = lk.LeapAttention(E, H, attention=attention)(x)
    assert y.shape == (0, 5, E)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_empty_batch_window_pool(backend, reduce):
    x = torch.randn(0, 5, 3, requires_grad=True)
    pooled, valid = lk.window_pool(x, [(0, 1), (-2, 0)], reduce, backend=backend)
    assert pooled.shape == (0, 5, 2, 3) and valid.shape == (0, 5, 2) and valid.dtype == torch.bool
    pooled.sum().backward()
    assert x.grad.shape == x.shape
    q, k, v = torch.randn(3, 0, 5, 2, 4).unbind(0)
    p = torch.rand(2, 0, 5, 2).unbind(0)
    assert lk.leap_attention(q, k, v, *p, backend=backend).shape == (0, 5, 2, 4)


# ------------------------------------------------------------------ activation checkpointing
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "nonreentrant"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_activation_checkpointing_same_grads(attention, reentrant):
    layer = _layer(attention, causal=True)
    x = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    ref = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

"""The linear and cosFormer baselines of ``LeapAttention`` (issue #22): ``linear`` equals ``leap``
with pq = pk = 0, ``cosformer`` equals ``leap`` with the position-ratio proportions; states,
left padding, the position limit, and every zoo model with every attention."""
import pytest
import torch
from torch import nn

import leapformer_kernels as lk
import leapformer_models as lm
from leapformer_kernels.layers.attention import CosformerState

M = 40  # cosformer_max_len of the layers below


class _Fixed(nn.Module):
    """Stands in for a LeaP predictor: x [B, T, H, D] -> p [B, T, H] given by ``fn(B, T, H)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(*x.shape[:3]).to(x.dtype)


def _pair(attention, **kw):
    """(baseline layer, leap layer with the same projections)."""
    torch.manual_seed(0)
    base = lk.LeapAttention(16, 2, attention=attention, cosformer_max_len=M, **kw)
    leap = lk.LeapAttention(16, 2, attention="leap", **kw)
    leap.load_state_dict(base.state_dict(), strict=False)
    return base, leap


def _zeros(B, T, H):
    return torch.zeros(B, T, H)


def _ratio(B, T, H):
    return (torch.arange(T, dtype=torch.float32) / M)[None, :, None].expand(B, T, H)


MODES = {"causal": dict(), "noncausal": dict(causal=False), "block": dict(block_size=3),
         "gqa": dict(num_kv_heads=1)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("attention,fn", [("linear", _zeros), ("cosformer", _ratio)], ids=["linear", "cosformer"])
def test_baseline_equals_leap_with_fixed_proportions(attention, fn, mode):
    base, leap = _pair(attention, **MODES[mode])
    leap.leap_q = leap.leap_k = _Fixed(fn)
    x = torch.randn(3, 13, 16)
    torch.testing.assert_close(base(x), leap(x), rtol=0, atol=1e-6)


def test_baselines_build_no_predictors_and_load_leap_checkpoints():
    base, leap = _pair("linear")
    n = {a: sum(p.numel() for p in lk.LeapAttention(16, 2, attention=a).parameters())
         for a in ("leap", "softmax", "linear", "cosformer")}
    assert n["softmax"] == n["linear"] == n["cosformer"] < n["leap"]
    for a in ("linear", "cosformer"):
        layer = lk.LeapAttention(16, 2, attention=a)
        assert layer.leap_q is None and layer.leap_k is None
        layer.load_state_dict(leap.state_dict())  # the predictors are dropped


@pytest.mark.parametrize("attention", ["linear", "cosformer"])
def test_state_pieces_equal_whole(attention):
    base, _ = _pair(attention)
    x = torch.randn(2, 11, 16)
    y = base(x)
    y1, st = base(x[:, :5], use_cache=True)
    y2, st = base(x[:, 5:9], state=st, use_cache=True)
    y3, st = base(x[:, 9:], state=st, use_cache=True)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, rtol=0, atol=1e-5)
    if attention == "cosformer":
        assert isinstance(st, CosformerState) and st.pos.tolist() == [11, 11]
    else:
        assert isinstance(st, tuple) and len(st) == 2


def test_cosformer_left_padded_rows_count_real_tokens():
    base, _ = _pair("cosformer")
    a, b = torch.randn(1, 7, 16), torch.randn(1, 4, 16)
    x = torch.cat([a, torch.cat([torch.randn(1, 3, 16), b], 1)])
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, :3] = True
    y, st = base(x, key_padding_mask=pad, use_cache=True)
    assert st.pos.tolist() == [7, 4]
    torch.testing.assert_close(y[1, 3:], base(b)[0], rtol=0, atol=1e-6)
    nxt = torch.randn(2, 1, 16)  # decoding: each row continues at its own position
    y2, _ = base(nxt, state=st, use_cache=True)
    torch.testing.assert_close(y2[0], base(torch.cat([a, nxt[:1]], 1))[0, -1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(y2[1], base(torch.cat([b, nxt[1:]], 1))[0, -1:], rtol=0, atol=1e-5)


def test_cosformer_position_limit_and_validation():
    layer = lk.LeapAttention(16, 2, attention="cosformer", cosformer_max_len=8)
    layer(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="beyond cosformer_max_len=8"):
        layer(torch.randn(1, 9, 16))
    _, st = layer(torch.randn(1, 8, 16), use_cache=True)
    with pytest.raises(ValueError, match="cosformer_max_len"):
        layer(torch.randn(1, 1, 16), state=st, use_cache=True)
    for bad in (0, 2.5, True, None):
        with pytest.raises(ValueError, match="cosformer_max_len"):
            lk.LeapAttention(16, 2, attention="cosformer", cosformer_max_len=bad)
    with pytest.raises(ValueError, match="'linear', 'cosformer'"):
        lk.LeapAttention(16, 2, attention="cosine")


def test_cosformer_packed_sequences_count_from_their_starts():
    base, _ = _pair("cosformer")
    a, b = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    y, st = base(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 8]), use_cache=True)
    torch.testing.assert_close(y, torch.cat([base(a), base(b)], 1), rtol=0, atol=1e-6)
    assert st.pos.tolist() == [5, 3] and st.S.shape[0] == 2


def test_cosformer_cross_attention_state():
    torch.manual_seed(0)
    layer = lk.LeapAttention(16, 2, attention="cosformer", causal=False, cross=True, cosformer_max_len=M)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    y = layer(x, context=ctx)
    _, st = layer(x[:, :2], context=ctx[:, :6], use_cache=True)
    _, st = layer(x[:, :2], context=ctx[:, 6:], state=st, use_cache=True)  # the state holds the whole source
    assert st.pos.tolist() == [9, 9]
    y_all, _ = layer(x, context=None, state=st._replace(qpos=torch.zeros(2, dtype=torch.long)), use_cache=True)
    torch.testing.assert_close(y_all, y, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- zoo models
TINY = {"leapformer-lm": dict(n_layer=1, n_head=2, n_embd=16, seq_len=16),
        "leap-transformer": dict(embed_dim=16, num_heads=2, num_layers=1),
        "leapformer-lra": dict(n_layer=1, n_embd=16, ffn_dim=32, seq_len=32)}


@pytest.mark.parametrize("attention", ["linear", "cosformer"])
@pytest.mark.parametrize("name", list(TINY))
def test_every_zoo_model_takes_the_baselines(name, attention):
    from leapformer_models.tasks import task_data
    model = lm.build(name, attention=attention, **TINY[name])
    corpus = torch.randint(0, 256, (500,))
    if name == "leapformer-lra":
        corpus = task_data("listops", dict(min_len=4, max_depth=3, max_args=4))[1]
    batch = model.get_batch(corpus, 3, torch.Generator().manual_seed(0))
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert not any(isinstance(m, lk.LeaP) for m in model.modules())


@pytest.mark.parametrize("attention", ["linear", "cosformer"])
def test_lm_baseline_generation_cached_equals_recompute_and_batched(attention):
    torch.manual_seed(0)
    model = lm.build("leapformer-lm", attention=attention, **TINY["leapformer-lm"]).eval()
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    kw = dict(max_new_tokens=6, temperature=0)
    cached = model.generate(prompts, **kw)
    assert cached == model.generate(prompts, use_cache=False, **kw)
    assert [model.generate([p], **kw)[0] for p in prompts] == cached


def test_lm_cosformer_generation_limit():
    model = lm.build("leapformer-lm", attention="cosformer", pos_emb="none", cosformer_max_len=10,
                     **{k: v for k, v in TINY["leapformer-lm"].items() if k != "seq_len"}, seq_len=8).eval()
    assert model.max_new_tokens_that_fit([[1, 2, 3]]) == 7
    with pytest.raises(ValueError, match="cosformer_max_len"):
        model.generate([[1, 2, 3]], max_new_tokens=8)
    with pytest.raises(ValueError, match=r"seq_len \(--seq-len\) must be <= cosformer_max_len"):
        lm.build("leapformer-lm", attention="cosformer", cosformer_max_len=8, seq_len=16)

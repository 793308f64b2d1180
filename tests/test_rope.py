"""RoPE in ``LeapAttention`` (issue #26): stepwise decoding equals the full forward for every
attention (also with left-padded prompts of different lengths), softmax scores depend only on
t - s, LeaP predicts its proportions from the unrotated q and k, bad arguments are refused."""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.layers.attention import ATTENTIONS, RotaryState

E, H = 16, 2


def _layer(attention, **kw):
    torch.manual_seed(3)
    return lk.LeapAttention(E, H, rope=True, attention=attention, eps=1e-3, **kw).double()


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_stepwise_equals_full(attention):
    layer = _layer(attention, num_kv_heads=1)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    full = layer(x)
    y, st = layer(x[:, :4], use_cache=True)  # a prompt, then one token at a time
    outs = [y]
    for t in range(4, 11):
        y, st = layer(x[:, t:t + 1], state=st, use_cache=True)
        outs.append(y)
    assert isinstance(st, RotaryState) and st.pos.tolist() == [11, 11]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_left_padded_rows_start_at_their_own_positions(attention):
    """Row 1 is left-padded by 3: its real tokens are rotated at positions 0, 1, ... as if alone."""
    layer = _layer(attention)
    a = torch.randn(1, 8, E, dtype=torch.float64)
    b = torch.randn(1, 5, E, dtype=torch.float64)
    x = torch.cat([a, torch.cat([torch.zeros(1, 3, E, dtype=torch.float64), b], 1)], 0)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, :3] = True
    y, st = layer(x, key_padding_mask=pad, use_cache=True)
    assert st.pos.tolist() == [8, 5]
    torch.testing.assert_close(y[1:, 3:], layer(b), rtol=1e-10, atol=1e-10)
    nxt = torch.randn(2, 1, E, dtype=torch.float64)
    y2, _ = layer(nxt, state=st, use_cache=True)
    torch.testing.assert_close(y2[1:], layer(torch.cat([b, nxt[1:]], 1))[:, -1:], rtol=1e-10, atol=1e-10)


def test_softmax_scores_depend_only_on_the_distance():
    layer = _layer("softmax")
    x = torch.randn(1, 9, E, dtype=torch.float64)
    shift = torch.tensor([37])
    shifted = layer(x, state=RotaryState(None, shift, shift))
    torch.testing.assert_close(shifted, layer(x), rtol=1e-10, atol=1e-10)
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    layer8 = lk.LeapAttention(16, 2, rope=True)
    score = lambda t, s: (layer8._rotate(q, torch.tensor([[t]])) * layer8._rotate(k, torch.tensor([[s]]))).sum()
    assert torch.allclose(score(5, 2), score(105, 102)) and not torch.allclose(score(5, 2), score(5, 3))


def test_leap_rotation_is_absolute_and_proportions_see_unrotated_q():
    layer = _layer("leap")
    x = torch.randn(1, 9, E, dtype=torch.float64)
    shift = torch.tensor([37])
    assert not torch.allclose(layer(x, state=RotaryState(None, shift, shift)), layer(x))
    seen = []
    layer.leap_q.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    layer(x)
    q = layer.q_proj(x).view(1, 9, H, E // H) * (E // H) ** -0.5
    torch.testing.assert_close(seen[0], torch.relu(q))


def test_rope_argument_checks():
    with pytest.raises(ValueError, match="even head_dim"):
        lk.LeapAttention(6, 2, rope=True)
    with pytest.raises(ValueError, match="rope_base"):
        lk.LeapAttention(8, 2, rope=True, rope_base=1.0)
    layer = lk.LeapAttention(8, 2, rope=True)
    _, st = lk.LeapAttention(8, 2)(torch.randn(1, 3, 8), use_cache=True)
    with pytest.raises(ValueError, match="RotaryState"):
        layer(torch.randn(1, 1, 8), state=st)

"""DeepSight (issue #26): shapes, the window-pooled planning target against a direct loop, no
future leak (logits and the planning head), generation through the state of both stacks equals
recomputation (every attention, rope too), learning, checkpoints and exact resume."""

import pytest
import torch

import leapformer_models as lm
from leapformer_models.deepsight import plan_target, plan_windows
from utils import TINY_TEXT as TEXT, check_roundtrip_and_exact_resume

TINY = dict(n_encoder_layer=1, n_decoder_layer=2, n_head=2, n_embd=32, seq_len=32, plan_horizon=5)


def tiny(**kw):
    torch.manual_seed(0)
    return lm.build("deepsight", **{**TINY, **kw})


@pytest.fixture(scope="module")
def corpus():
    return torch.tensor(list(TEXT.encode()), dtype=torch.long)


def test_shapes_and_loss_terms(corpus):
    model = tiny()
    x, y = model.get_batch(corpus, 3, torch.Generator().manual_seed(0))
    assert model(x).shape == (3, 32, 256)
    terms = model.loss_terms((x, y))
    assert set(terms) == {"next_token", "plan"} and all(torch.isfinite(v) for v in terms.values())
    model.loss((x, y)).backward()
    assert model.plan_norm.weight.grad is not None and model.encoder[0].attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("F", [1, 4, 11])
def test_plan_target_equals_a_direct_loop(F):
    emb = torch.randn(2, 19, 6, dtype=torch.float64)
    target, valid = plan_target(emb, F)
    T = emb.shape[1]
    for i in range(T):
        assert bool(valid[0, i]) == (i + F <= T - 1)
        if i + F > T - 1:
            continue
        fut = sum(emb[:, i + k] / k for k in range(1, F + 1))
        past = emb[:, :i + 1].mean(1)
        want = torch.nn.functional.layer_norm(0.5 * fut + 0.5 * past, (6,))
        torch.testing.assert_close(target[:, i], want)
    _, coef = plan_windows(F)
    assert abs(sum(coef) - 1.0) < 1e-12  # the weight of E[i+1] is 1


@pytest.mark.parametrize("attention,pos_emb", [("leap", "learned"), ("softmax", "rope"), ("leap", "rope")])
def test_no_future_leak(attention, pos_emb):
    model = tiny(attention=attention, pos_emb=pos_emb).eval()
    x = torch.randint(0, 256, (2, 20))
    t = 9
    x2 = x.clone()
    x2[:, t + 1] = (x2[:, t + 1] + 7) % 256
    with torch.no_grad():
        la, ha, _ = model.run(x)
        lb, hb, _ = model.run(x2)
    torch.testing.assert_close(la[:, :t + 1], lb[:, :t + 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(ha[:, :t + 1], hb[:, :t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(la[:, t + 1:], lb[:, t + 1:])


@pytest.mark.parametrize("attention,pos_emb", [("leap", "learned"), ("softmax", "learned"), ("linear", "sinusoidal"),
                                               ("cosformer", "none"), ("leap", "rope"), ("softmax", "rope")])
def test_generation_through_the_state_equals_recompute(attention, pos_emb):
    model = tiny(attention=attention, pos_emb=pos_emb).double().eval()
    prompts = [[72, 101, 108], [84, 104, 101, 32, 113]]  # different lengths: a left-padded batch
    a = model.generate(prompts, max_new_tokens=6, temperature=0.0, use_cache=True)
    b = model.generate(prompts, max_new_tokens=6, temperature=0.0, use_cache=False)
    assert a == b
    # the logits of a decode step equal those of the full recomputation
    x = torch.tensor([prompts[1] + a[1]])
    full = model(x)
    logits, st = model(x[:, :5], use_cache=True)
    steps = [logits]
    for i in range(5, x.shape[1]):
        logits, st = model(x[:, i:i + 1], state=st, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("one_thread")
def test_loss_decreases(corpus):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = model.loss(model.get_batch(corpus, 8, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@pytest.mark.parametrize("kw,match", [(dict(seq_len=5, plan_horizon=5), "plan-horizon"),
                                      (dict(plan_loss="l1"), "plan-loss"), (dict(plan_weight=-1.0), "plan-weight"),
                                      (dict(pos_emb="rope", n_embd=30, n_head=2), "even head size")])
def test_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_roundtrip_and_exact_resume(tmp_path, corpus):
    check_roundtrip_and_exact_resume("deepsight", dict(TINY, plan_loss="cosine"), corpus, tmp_path)

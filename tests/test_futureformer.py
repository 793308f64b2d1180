"""FutureFormer (issue #27): shapes, the window targets of both schemes against a direct loop, no
future leak (the logits and every future prediction and context, for both window schemes x every
target x leap/softmax), generation through the state equals recomputation (future predictions
included), learning, configuration checks, checkpoints and exact resume."""

import pytest
import torch

import leapformer_models as lm
from leapformer_models.futureformer import FS_TARGETS, future_targets, future_windows
from leapformer_models.train import TrainConfig, train
from utils import TINY_TEXT as TEXT, check_roundtrip_and_exact_resume

TINY = dict(n_layer=4, fs_periods=2, n_head=2, n_embd=32, seq_len=32)


def tiny(**kw):
    torch.manual_seed(0)
    return lm.build("futureformer", **{**TINY, **kw})


@pytest.fixture(scope="module")
def corpus():
    return torch.tensor(list(TEXT.encode()), dtype=torch.long)


def test_windows():
    assert future_windows("dyadic", 3) == [(2, 3), (4, 7), (8, 15)]
    assert future_windows("nested", 3) == [(2, 4), (2, 10), (2, 28)]  # 3, 9, 27 tokens after the next one
    assert future_windows("nested", 2, mult=2) == [(2, 3), (2, 5)]


@pytest.mark.parametrize("fs_target", FS_TARGETS)
def test_shapes_and_loss_terms(corpus, fs_target):
    model = tiny(fs_target=fs_target)
    x, y = model.get_batch(corpus, 3, torch.Generator().manual_seed(0))
    assert model(x).shape == (3, 32, 256)
    logits, preds, ctxs, state = model.run(x)
    assert logits.shape == (3, 32, 256) and state is None and len(preds) == len(ctxs) == 2
    width = 256 if fs_target == "bce" else 32
    assert all(p.shape == (3, 32, width) for p in preds) and all(c.shape == (3, 32, 32) for c in ctxs)
    terms = model.loss_terms((x, y))
    assert set(terms) == {"next_token", "future_1", "future_2"} and all(torch.isfinite(v) for v in terms.values())
    model.loss((x, y)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fs_norm.parameters())
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.blocks[-1].cross.k_proj.weight.grad.abs().sum() > 0  # the last block reads the predictions
    assert [b.cross is not None for b in model.blocks] == [False, False, True, True]
    assert model.blocks[0].attn.k_proj.weight.shape == (16, 32)  # multi-query: one key head of 16


def test_lambda_weights_and_off(corpus):
    model = tiny(fs_lambda=0.3, fs_target="sum")
    batch = model.get_batch(corpus, 2, torch.Generator().manual_seed(0))
    t = model.loss_terms(batch)
    want = t["next_token"] + 0.3 * t["future_1"] + 0.09 * t["future_2"]
    torch.testing.assert_close(model.loss(batch), want)
    off = tiny(fs_lambda=0.0, fs_target="sum")
    torch.testing.assert_close(off.loss(batch), off.loss_terms(batch)["next_token"])


def test_the_next_token_block_reads_the_predictions():
    model = tiny().eval()
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        a = model(x)
        model.fs_proj[0].weight.mul_(3.0)  # the finest prediction, read only through the cross-attention
        b = model(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("scheme", ["nested", "dyadic"])
@pytest.mark.parametrize("kind", FS_TARGETS)
def test_targets_equal_a_direct_loop(scheme, kind):
    g = torch.Generator().manual_seed(0)
    V, D, T, B = 11, 6, 30, 2
    weight = torch.randn(V, D, dtype=torch.float64, generator=g)
    seq = torch.randint(0, V, (B, T + 1), generator=g)
    windows = future_windows(scheme, 3)
    targets, valid = future_targets(seq, weight, windows, kind)
    assert targets.shape == (B, T, 3, V if kind == "bce" else D) and valid.shape == (B, T, 3)
    normed = weight / weight.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    for i in range(T):
        for k, (a, b) in enumerate(windows):
            assert bool(valid[0, i, k]) == (i + b <= T)
            if i + b > T:
                continue
            toks = seq[:, i + a:i + b + 1]
            if kind == "bce":
                want = torch.zeros(B, V, dtype=torch.float64)
                for r in range(B):
                    for tok in toks[r].tolist():
                        want[r, tok] = 1.0
            else:
                e = normed[toks]
                want = {"sum": e.sum(1), "mean": e.mean(1), "max": e.amax(1)}[kind]
            torch.testing.assert_close(targets[:, i, k], want)


@pytest.mark.parametrize("attention", ["leap", "softmax"])
@pytest.mark.parametrize("fs_target", FS_TARGETS)
@pytest.mark.parametrize("scheme", ["nested", "dyadic"])
def test_no_future_leak(scheme, fs_target, attention):
    """Changing x_{t+1} leaves the logits, every future prediction and every context at positions
    <= t unchanged (and does change them after t)."""
    model = tiny(fs_windows=scheme, fs_target=fs_target, attention=attention, fs_loss="cosine").eval()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for t in (0, 11, 22):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 7) % 256
        with torch.no_grad():
            la, pa, ca, _ = model.run(x)
            lb, pb, cb, _ = model.run(x2)
        for u, v in zip([la] + pa + ca, [lb] + pb + cb):
            torch.testing.assert_close(u[:, :t + 1], v[:, :t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(la[:, t + 1:], lb[:, t + 1:])
        assert not torch.allclose(pa[0][:, t + 1:], pb[0][:, t + 1:])


def test_the_leak_test_catches_upstreams_teacher_forced_context():
    """Upstream meant to cross-attend to the pooled *true* future windows in training: with that
    context the same perturbation changes outputs at positions <= t (position t - 1's window
    holds x_{t+1}, and the causal cross-attention lets t read it)."""
    model = tiny(fs_windows="nested").eval()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    t = 11

    def upstream_run(tokens):
        seq = torch.cat([tokens, tokens[:, :1]], 1)  # a dummy last label: positions <= t never read it
        true, _ = future_targets(seq, model.tok_emb.weight, model.windows, "mean")
        model._predict = lambda k, h: (model.fs_proj[k](model.fs_norm[k](h)), true[:, :, k])
        try:
            return model.run(tokens)[0]
        finally:
            del model._predict

    x2 = x.clone()
    x2[:, t + 1] = (x2[:, t + 1] + 7) % 256
    with torch.no_grad():
        a, b = upstream_run(x), upstream_run(x2)
    assert (a[:, :t + 1] - b[:, :t + 1]).abs().amax(-1).amax(0)[t] > 1e-3  # position t saw its own target


@pytest.mark.parametrize("attention,fs_target,scheme", [
    ("leap", "mean", "nested"), ("softmax", "bce", "dyadic"), ("leap", "bce", "nested"),
    ("softmax", "max", "nested"), ("linear", "sum", "dyadic"), ("cosformer", "mean", "dyadic")])
def test_generation_through_the_state_equals_recompute(attention, fs_target, scheme):
    model = tiny(attention=attention, fs_target=fs_target, fs_windows=scheme).double().eval()
    prompts = [[72, 101, 108], [84, 104, 101, 32, 113]]  # different lengths: a left-padded batch
    a = model.generate(prompts, max_new_tokens=6, temperature=0.0, use_cache=True)
    b = model.generate(prompts, max_new_tokens=6, temperature=0.0, use_cache=False)
    assert a == b
    # each decode step: the logits and the future predictions equal those of the full recomputation
    x = torch.tensor([prompts[1] + a[1]])
    with torch.no_grad():
        full_l, full_p, full_c, _ = model.run(x)
        logits, preds, ctxs, st = model.run(x[:, :5], use_cache=True)
        steps = [[logits] + preds + ctxs]
        for i in range(5, x.shape[1]):
            logits, preds, ctxs, st = model.run(x[:, i:i + 1], state=st, use_cache=True)
            steps.append([logits] + preds + ctxs)
    for j, want in enumerate([full_l] + full_p + full_c):
        torch.testing.assert_close(torch.cat([s[j] for s in steps], 1), want, rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fs_target", ["mean", "bce"])
def test_loss_decreases(corpus, fs_target):
    model = tiny(fs_target=fs_target)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses, nt = [], []
    for _ in range(40):
        batch = model.get_batch(corpus, 8, g)
        terms = model.loss_terms(batch)
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        nt.append(terms["next_token"].item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert sum(nt[-5:]) / 5 < 0.8 * sum(nt[:5]) / 5


@pytest.mark.parametrize("kw,match", [
    (dict(n_layer=2, fs_periods=2), "n-layer"),
    (dict(seq_len=20, fs_windows="nested", fs_periods=3), "farthest future window"),
    (dict(fs_windows="disjoint"), "fs-windows"), (dict(fs_target="l2"), "fs-target"),
    (dict(fs_loss="l1"), "fs-loss"), (dict(fs_lambda=-0.5), "fs-lambda"), (dict(fs_mult=1), "fs-mult"),
    (dict(n_kv_head=3), "n-kv-head"), (dict(n_embd=30, n_head=2), "even head size"),
    (dict(fs_topk=0), "fs-topk"), (dict(fs_periods=0), "fs-periods")])
def test_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_refuses_generated_tasks(tmp_path):
    from leapformer_models.errors import UsageError
    with pytest.raises(UsageError, match="does not train on mqar"):
        train(TrainConfig(model="futureformer", data="mqar", steps=1, out=str(tmp_path / "r"), progress=False),
              dict(TINY))


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_roundtrip_and_exact_resume(tmp_path, corpus):
    over = dict(TINY, fs_target="bce", fs_windows="dyadic")
    _, loaded, _ = check_roundtrip_and_exact_resume("futureformer", over, corpus, tmp_path)
    assert loaded.config.fs_target == "bce" and loaded.windows == [(2, 3), (4, 7)]

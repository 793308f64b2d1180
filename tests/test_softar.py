"""softAR (issue #28): shapes and loss terms, the window_pool history summaries against a direct loop,
the running sums of the state against window_pool over the whole sequence, collapse, no future leak,
generation through the state equals recomputation for every collapse policy, learning, checkpoints
and exact resume, config checks and the generate flags."""

import pytest
import torch

import leapformer_models as lm
from leapformer_models.cli import main as cli_main
from leapformer_models.softar import HistorySums, history_summaries
from leapformer_models.train import train
from utils import TINY_TEXT as TEXT, check_roundtrip_and_exact_resume, tiny_run_config

# one intra-op thread everywhere: tiny models, and on a shared 2-core runner two OpenMP threads waiting for
# descheduled peers made these tests tens of times slower
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, window=8)


def tiny(**kw):
    torch.manual_seed(0)
    return lm.build("softar", **{**TINY, **kw})


@pytest.fixture(scope="module")
def corpus():
    return torch.tensor(list(TEXT.encode()), dtype=torch.long)


def direct_summaries(v, W):
    """The summaries by a loop: at t with window start s, mean(v[:s]), sum(v[s-W:s]), sum(v[s-2W:s-W])."""
    B, T, m = v.shape
    out = torch.zeros(B, T, 3, m, dtype=v.dtype)
    for t in range(T):
        s = (t // W) * W
        if s:
            out[:, t, 0] = v[:, :s].mean(1)
        out[:, t, 1] = v[:, max(0, s - W):s].sum(1)
        out[:, t, 2] = v[:, max(0, s - 2 * W):max(0, s - W)].sum(1)
    return out


def test_shapes_and_loss_terms(corpus):
    model = tiny()
    x, y = model.get_batch(corpus, 3, torch.Generator().manual_seed(0))
    assert model(x).shape == (3, 32, 256)
    out, state = model.run(model.tok_emb(x))
    assert out.shape == (3, 32, 32) and state is None
    terms = model.loss_terms((x, y))
    assert set(terms) == {"next_token", "mse"} and all(torch.isfinite(v) for v in terms.values())
    model.loss((x, y)).backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert model.blocks[0].cross.k_proj.weight.grad.abs().sum() > 0  # the summaries reach the loss
    # the MSE target is detached: with ce_weight = 0 the embedding is trained only as an input
    m2 = tiny(ce_weight=0.0)
    m2.loss((x, y)).backward()
    emb = m2.tok_emb.weight
    with torch.no_grad():
        t = m2.loss_terms((x, y))
    assert torch.isclose(m2.loss((x, y)), t["mse"]) and emb.grad is not None


@pytest.mark.parametrize("W,T", [(1, 7), (4, 19), (8, 8), (5, 23)])
def test_summaries_equal_a_direct_loop(W, T):
    v = torch.randn(2, T, 6, dtype=torch.float64)
    torch.testing.assert_close(history_summaries(v, W), direct_summaries(v, W))


@pytest.mark.parametrize("pieces", [[1] * 21, [3, 5, 1, 12], [21], [8, 8, 5]])
def test_running_sums_equal_window_pool_over_the_whole_sequence(pieces):
    W, m = 4, 8
    v = torch.randn(2, sum(pieces) + 1, m, dtype=torch.float64)
    whole = history_summaries(v, W)
    sums, pos, got = HistorySums.zeros(2, m, v), 0, []
    for n in pieces:
        s, sums = sums.advance(v[:, pos:pos + n], pos, W)
        got.append(s)
        pos += n
        # the summaries the state holds for the next position: window_pool over the whole sequence
        torch.testing.assert_close(sums.summaries(pos, W), whole[:, pos])
        start = (pos // W) * W
        torch.testing.assert_close(sums.older, v[:, :start].sum(1))
        torch.testing.assert_close(sums.current, v[:, start:pos].sum(1))
    torch.testing.assert_close(torch.cat(got, 1), whole[:, :pos])
    # and the model's state after a cached run holds the same sums
    model = tiny(n_embd=8, n_head=2, window=W).double()
    _, st = model.run(v[:, :pos], use_cache=True)
    torch.testing.assert_close(st.sums.summaries(pos, W), whole[:, pos])
    assert st.pos == pos


def test_collapse_returns_a_tokens_own_token():
    model = tiny().double()
    ids = torch.arange(256)
    E = model.tok_emb.weight
    got, dist = model.collapse(E[ids])
    assert torch.equal(got, ids) and float(dist.abs().max().detach()) < 1e-12
    got, _ = model.collapse(3.7 * E[ids[:, None]])  # cosine: the scale does not matter
    assert torch.equal(got[:, 0], ids)


@pytest.mark.parametrize("attention", ["leap", "softmax"])
def test_no_future_leak(attention):
    model = tiny(attention=attention).eval()
    x = torch.randint(0, 256, (2, 30))
    for t in (5, 7, 14):  # inside a window, just before a boundary, across the summaries
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 7) % 256
        with torch.no_grad():
            ya, _ = model.run(model.tok_emb(x))
            yb, _ = model.run(model.tok_emb(x2))
        torch.testing.assert_close(ya[:, :t + 1], yb[:, :t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(ya[:, t + 1:], yb[:, t + 1:])
        assert not torch.allclose(ya[:, -1], yb[:, -1])  # reaches later windows (through the summaries)


@pytest.mark.parametrize("attention", ["leap", "softmax", "linear", "cosformer"])
def test_generation_through_the_state_equals_recompute(attention):
    model = tiny(attention=attention, pos_emb="sinusoidal" if attention == "linear" else "window").double().eval()
    prompt = torch.tensor([[72, 101, 108, 108, 111], [84, 104, 101, 32, 113]])
    ref = model.rollout(prompt, 20, "never", use_cache=False)
    thr = float(ref["distance"].median())  # a threshold that collapses some steps and not others
    for policy in ("never", "always", "threshold"):
        a = model.rollout(prompt, 20, policy, thr, use_cache=True)
        b = model.rollout(prompt, 20, policy, thr, use_cache=False)
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["collapsed"], b["collapsed"])
        torch.testing.assert_close(a["y"], b["y"], rtol=1e-9, atol=1e-9)
        if policy == "threshold":
            assert 0 < a["collapsed"].float().mean() < 1
    # tokens: each decode step's logits equal those of the full recomputation
    x = torch.cat([prompt, a["tokens"]], 1)
    full = model(x)
    logits, st = model(x[:, :3], use_cache=True)
    steps = [logits]
    for i in range(3, x.shape[1]):
        logits, st = model(x[:, i:i + 1], state=st, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    # prompts of different lengths: the same tokens as each prompt alone
    prompts = [[72, 101, 108], [84, 104, 101, 32, 113], [65]]
    both = model.generate(prompts, max_new_tokens=6, collapse="always")
    assert both == [model.generate([p], max_new_tokens=6, collapse="always")[0] for p in prompts]


def test_loss_decreases(corpus):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        terms = model.loss_terms(model.get_batch(corpus, 8, g))
        loss = terms["next_token"] + terms["mse"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((terms["next_token"].item(), terms["mse"].item()))
    first, last = torch.tensor(losses[:5]).mean(0), torch.tensor(losses[-5:]).mean(0)
    assert (last < 0.8 * first).all(), (first, last)


@pytest.mark.parametrize("kw,match", [(dict(window=0), "window"), (dict(mse_weight=-1.0), "mse-weight"),
                                      (dict(mse_weight=0.0, ce_weight=0.0), "nothing would be trained"),
                                      (dict(pos_emb="learned"), "pos-emb"),
                                      (dict(attention="cosformer", cosformer_max_len=16), "cosformer-max-len")])
def test_config_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_policy_checks():
    model = tiny()
    with pytest.raises(ValueError, match="collapse must be one of"):
        model.generate([[65]], 2, collapse="sometimes")
    with pytest.raises(ValueError, match="threshold must be"):
        model.generate([[65]], 2, threshold=-0.1)
    with pytest.raises(ValueError, match="no padding"):
        model(torch.zeros(2, 3, dtype=torch.long), key_padding_mask=torch.tensor([[True, False, False]] * 2))


def test_checkpoint_roundtrip_exact_resume_and_generate_flags(tmp_path, corpus, capsys):
    summary, _, p = check_roundtrip_and_exact_resume("softar", TINY, corpus, tmp_path)

    def cfg(out, model="softar", **kw):
        return tiny_run_config(p, out, model, **kw)

    ck = summary["checkpoint"]
    capsys.readouterr()
    base = ["generate", "--ckpt", ck, "--prompt", "The ", "--max-new-tokens", "12"]
    assert cli_main(base + ["--collapse", "never"]) == 0
    never = capsys.readouterr().out
    assert cli_main(base + ["--collapse", "never", "--no-cache"]) == 0
    assert capsys.readouterr().out == never
    assert cli_main(base + ["--collapse-threshold", "0.2"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    assert cli_main(base + ["--collapse", "sometimes"]) == 2
    assert cli_main(base + ["--collapse-threshold", "-1"]) == 2
    assert "--collapse-threshold must be" in capsys.readouterr().err
    assert cli_main(base + ["--collapse", "always", "--collapse-threshold", "0.3"]) == 2
    lm_run = train(cfg(tmp_path / "lm", model="leapformer-lm", steps=1),
                   dict(n_layer=1, n_head=2, n_embd=16, seq_len=16))
    capsys.readouterr()
    assert cli_main(["generate", "--ckpt", lm_run["checkpoint"], "--collapse", "never"]) == 2
    assert "--collapse is for softar" in capsys.readouterr().err

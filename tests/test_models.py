"""Model zoo tests (small configs, seconds each): shapes, learning, checkpoints, exact resume,
generation through the state, batched generation, no future leakage, softmax drop-in."""
import os

import pytest
import torch

import leapformer_kernels as lk
import leapformer_models as lm
from leapformer_models.blocks import MLP, Block, RMSNorm, left_pad, sample_logits
from leapformer_models.leap import sample_leap_batch
from leapformer_models.train import TrainConfig, load_model, train
from utils import TINY_TEXT as TEXT

TINY = {
    "leapformer-lm": dict(n_layer=2, n_head=2, n_embd=32, seq_len=32),
    "leap-lstm": dict(embed_dim=16, hidden_dim=32),
    "leap-transformer": dict(embed_dim=32, num_heads=4, num_layers=2),
}
# (model, attention) pairs: every model, and softmax as a drop-in wherever attention is used
CASES = [("leapformer-lm", "leap"), ("leapformer-lm", "softmax"), ("leap-lstm", None),
         ("leap-transformer", "leap"), ("leap-transformer", "softmax")]
IDS = [f"{m}-{a}" if a else m for m, a in CASES]



def tiny(name, attention=None, **kw):
    cfg = dict(TINY[name], **kw)
    if attention is not None:
        cfg["attention"] = attention
    return lm.build(name, **cfg)


@pytest.fixture(scope="module")
def corpus():
    return torch.tensor(list(TEXT.encode()), dtype=torch.long)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "tiny.txt"
    p.write_text(TEXT)
    return str(p)


def _batch(model, corpus, bs=4, seed=0):
    return model.get_batch(corpus, bs, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- blocks
BLOCK_CONFIGS = {"default": dict(), "block2": dict(block_size=2), "noncausal": dict(causal=False),
                 "softmax": dict(attention="softmax"), "rmsnorm-swiglu": dict(norm="rmsnorm", activation="swiglu")}


def test_rmsnorm_shape():
    x = torch.randn(2, 5, 16)
    assert RMSNorm(16)(x).shape == x.shape


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_mlp_shape(act):
    x = torch.randn(2, 5, 16)
    assert MLP(16, 32, act)(x).shape == x.shape


@pytest.mark.parametrize("cfg", list(BLOCK_CONFIGS))
def test_block_shape(cfg):
    x = torch.randn(2, 5, 16)
    assert Block(16, 2, **BLOCK_CONFIGS[cfg])(x).shape == x.shape


def test_cross_blocks_shapes():
    x = torch.randn(2, 5, 16)
    ctx = torch.randn(2, 7, 16)
    blk = Block(16, 2, cross=True)
    assert blk(x, context=ctx, context_padding_mask=torch.zeros(2, 7, dtype=torch.bool)).shape == x.shape
    blk = Block(16, 2, cross=True, cross_causal=True)
    assert blk(x, context=torch.randn(2, 5, 16)).shape == x.shape


def test_block_causal_block_sees_its_block_only():
    blk = Block(16, 2, block_size=4).eval()
    x = torch.randn(1, 12, 16)
    y = blk(x)
    x2 = x.clone()
    x2[:, 9] += torch.randn(16)  # block 2 (positions 8..11); not a constant (LayerNorm removes it)
    y2 = blk(x2)
    assert torch.equal(y[:, :8], y2[:, :8])
    assert not torch.allclose(y[:, 8], y2[:, 8])


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_logits(logits, 0.0).item() == 1
    assert all(sample_logits(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(10))
    assert all(sample_logits(logits, 1.0, top_p=0.01, generator=g).item() == 1 for _ in range(10))
    seen = {sample_logits(logits, 5.0, top_k=2, generator=g).item() for _ in range(60)}
    assert seen == {1, 3}


def test_left_pad():
    t, p = left_pad([[1, 2, 3], [4]])
    assert t.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert p.tolist() == [[False, False, False], [True, True, False]]


# ----------------------------------------------------------------------------- every model
@pytest.mark.parametrize("name,attention", CASES, ids=IDS)
def test_forward_backward_shapes(name, attention, corpus):
    model = tiny(name, attention)
    batch = _batch(model, corpus)
    if name == "leapformer-lm":
        x, _ = batch
        logits = model(x)
        assert logits.shape == (4, 32, 256)
    else:
        out = model(batch["context"], batch["context_pad"], batch["distance"], batch["target"])
        assert out.target_logits.shape == (4, 256)
        assert out.gap_logits.shape == (4, model.config.max_distance - 1, 256)
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name,attention", CASES, ids=IDS)
def test_loss_decreases(name, attention, corpus):
    model = tiny(name, attention)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = model.loss(model.get_batch(corpus, 8, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def _run_cfg(tmp, name, steps, **kw):
    return TrainConfig(model=name, data=kw.pop("data"), steps=steps, batch_size=4, warmup=2, eval_interval=4,
                       eval_batches=1, ckpt_interval=100, threads=1, time_limit=None, out=str(tmp),
                       progress=False, **kw)


def _overrides(name, attention):
    o = dict(TINY[name])
    if attention is not None:
        o["attention"] = attention
    return o


@pytest.mark.parametrize("name,attention", CASES, ids=IDS)
def test_checkpoint_roundtrip(name, attention, tmp_path, text_file, corpus):
    summary, model = train(_run_cfg(tmp_path, name, 3, data=text_file), _overrides(name, attention),
                           return_model=True)
    loaded = lm.load_checkpoint(summary["checkpoint"])
    assert not loaded.training
    batch = _batch(model, corpus)
    with torch.no_grad():
        if name == "leapformer-lm":
            assert torch.equal(model(batch[0]), loaded(batch[0]))
        else:
            a = model(batch["context"], batch["context_pad"], batch["distance"], batch["target"])
            b = loaded(batch["context"], batch["context_pad"], batch["distance"], batch["target"])
            assert torch.equal(a.target_logits, b.target_logits) and torch.equal(a.gap_logits, b.gap_logits)
    for f in ("ckpt.pt", "metrics.csv", "metrics.json", "loss.png"):
        assert os.path.exists(tmp_path / f)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp file left behind


@pytest.mark.parametrize("name,attention", CASES, ids=IDS)
def test_resume_is_exact(name, attention, tmp_path, text_file):
    over = _overrides(name, attention)
    full = train(_run_cfg(tmp_path / "full", name, 8, data=text_file), over)
    train(_run_cfg(tmp_path / "cut", name, 8, data=text_file, stop_after=4), over)
    resumed = train(_run_cfg(tmp_path / "cut", name, 8, data=text_file), over, resume=True)
    la = [json_row["train_loss"] for json_row in _history(tmp_path / "full")]
    lb = [json_row["train_loss"] for json_row in _history(tmp_path / "cut")]
    assert len(la) == len(lb) == 9
    assert la == lb  # bitwise: the same next losses as the uninterrupted run
    assert full["final_val_loss"] == resumed["final_val_loss"]


def _history(folder):
    import json
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)["history"]


# ----------------------------------------------------------------------------- causal LM
LM_ATT = ["leap", "softmax"]


@pytest.mark.parametrize("attention", LM_ATT)
def test_lm_generation_state_equals_recompute(attention):
    model = tiny("leapformer-lm", attention).eval()
    prompts = [[72, 101, 108, 108, 111]]
    a = model.generate(prompts, 16, temperature=0, use_cache=True)
    b = model.generate(prompts, 16, temperature=0, use_cache=False)
    assert a == b
    # the logits of every step through the state match the full forward
    seq = torch.tensor([prompts[0] + a[0]])
    with torch.no_grad():
        full = model(seq)
        logits, state = model(seq[:, :5], use_cache=True)
        steps = [logits[:, -1]]
        for t in range(5, seq.shape[1] - 1):
            logits, state = model(seq[:, t:t + 1], state=state, use_cache=True)
            steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:-1], atol=1e-4, rtol=1e-4)


def test_lm_leap_state_is_constant_size():
    model = tiny("leapformer-lm", "leap").eval()
    with torch.no_grad():
        _, s1 = model(torch.randint(0, 256, (1, 8)), use_cache=True)
        _, s2 = model(torch.randint(0, 256, (1, 64)), use_cache=True)
        _, s3 = model(torch.randint(0, 256, (1, 1)), state=s2, use_cache=True)
    sizes = [[t.shape for t in layer["self"]] for layer in s1.layers]
    assert sizes == [[t.shape for t in layer["self"]] for layer in s2.layers]
    assert sizes == [[t.shape for t in layer["self"]] for layer in s3.layers]
    assert s3.pos.tolist() == [65]


@pytest.mark.parametrize("name,attention", CASES, ids=IDS)
def test_batched_generation_equals_alone(name, attention):
    model = tiny(name, attention).eval()
    prompts = [[84, 104, 101, 32, 113, 117, 105], [65], [100, 101, 102]]
    batched = model.generate(prompts, 10, temperature=0)
    alone = [model.generate([p], 10, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert all(len(o) == 10 for o in batched)


@pytest.mark.parametrize("attention", LM_ATT)
def test_lm_batched_prompt_logits_match(attention):
    """Left-padded prompts: the last logits equal those of each prompt alone (not just argmax)."""
    model = tiny("leapformer-lm", attention).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    tokens, pad = left_pad(prompts)
    with torch.no_grad():
        batched, _ = model(tokens, key_padding_mask=pad, use_cache=True)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))
            torch.testing.assert_close(batched[i, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", LM_ATT)
def test_lm_no_future_leak(attention):
    model = tiny("leapformer-lm", attention).eval()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
        for t in (0, 7, 15, 22):
            x2 = x.clone()
            x2[:, t + 1] = (x2[:, t + 1] + 1) % 256
            y2 = model(x2)
            torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(y2[:, t + 1], y[:, t + 1])


@pytest.mark.parametrize("be", [b for b in lk.available_backends() if b != "torch"])
def test_lm_same_outputs_on_every_backend(be):
    """Models do not depend on which kernel backend runs: each kernel backend against torch."""
    model = tiny("leapformer-lm", "leap").eval()
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.no_grad():
        for name in ("torch", be):
            for m in model.modules():
                if isinstance(m, lk.LeapAttention):
                    m.backend = name
            outs[name] = model(x)
    torch.testing.assert_close(outs[be], outs["torch"], atol=1e-4, rtol=1e-4, msg=f"backend {be}")


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "none"])
def test_lm_position_options_and_swiglu(corpus, pos_emb):
    model = tiny("leapformer-lm", pos_emb=pos_emb, activation="swiglu", norm="rmsnorm", max_positions=64)
    x, _ = _batch(model, corpus)
    assert model(x).shape == (4, 32, 256)
    assert model.generate([[1, 2]], 4, temperature=0) == model.generate([[1, 2]], 4, temperature=0, use_cache=False)
    if pos_emb == "learned":
        with pytest.raises(ValueError, match="max_positions"):
            model(torch.zeros(1, 65, dtype=torch.long))


def test_lm_sampling_options():
    model = tiny("leapformer-lm").eval()
    g = torch.Generator().manual_seed(0)
    out = model.generate([[1, 2, 3], [4]], 7, temperature=0.8, top_k=20, top_p=0.9, generator=g)
    assert [len(o) for o in out] == [7, 7] and all(0 <= t < 256 for o in out for t in o)


# ----------------------------------------------------------------------------- LEAP
def test_leap_sampler_is_aligned():
    data = torch.arange(1000) % 997
    b = sample_leap_batch(data, 64, torch.Generator().manual_seed(0), context_len=12, max_distance=30)
    for k in range(64):
        ctx = b["context"][k][~b["context_pad"][k]].tolist()
        i, d = ctx[-1], int(b["distance"][k])
        assert 2 <= d <= 30 and len(ctx) == min(12, i + 1)
        assert ctx == list(range(i - len(ctx) + 1, i + 1))
        assert b["gap"][k][~b["gap_pad"][k]].tolist() == list(range(i + 1, i + d))
        assert int(b["target"][k]) == i + d
    # d is clipped to the text near its end
    short = torch.arange(10)
    b = sample_leap_batch(short, 64, torch.Generator().manual_seed(1))
    assert all(int(c[~p][-1]) + int(d) <= 9 for c, p, d in zip(b["context"], b["context_pad"], b["distance"]))


@pytest.mark.parametrize("name", ["leap-lstm", "leap-transformer"])
def test_leap_gap_positions_aligned(name):
    """Gap logits at position g < d do not depend on how many gap positions beyond d - 1 are
    asked for (each gap token is predicted from its own position; positions past the gap are
    masked), nor on the other rows' padding."""
    model = tiny(name).eval()
    ctx, pad = left_pad([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]], length=12)
    d, tgt = torch.tensor([5, 9]), torch.tensor([3, 4])
    with torch.no_grad():
        full = model(ctx, pad, d, tgt)
        short = model(ctx, pad, d, tgt, gap_len=8)
        alone = model(ctx[:1], pad[:1], d[:1], tgt[:1], gap_len=4)
    torch.testing.assert_close(short.gap_logits, full.gap_logits[:, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.gap_logits[0], full.gap_logits[0, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.target_logits[0], full.target_logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["leap-lstm", "leap-transformer"])
def test_leap_distance_head_and_sampling(name, corpus):
    model = tiny(name, distance_head=True)
    batch = _batch(model, corpus)
    out = model(batch["context"], batch["context_pad"], batch["distance"], batch["target"])
    assert out.distance_logits.shape == (4, 31)
    model.loss(batch).backward()
    model.eval()
    g = torch.Generator().manual_seed(0)
    gen = model.generate([[1, 2, 3], [4, 5]], 15, temperature=0.9, top_k=10, top_p=0.9, generator=g)
    assert [len(o) for o in gen] == [15, 15]
    leaps = model.leap([[1, 2, 3]], temperature=0)
    gap, tgt = leaps[0]
    assert 1 <= len(gap) + 1 <= model.config.max_distance and 0 <= tgt < 256


@pytest.mark.parametrize("name", ["leap-lstm", "leap-transformer"])
def test_leap_generate_equals_recompute(name):
    """generate() leap by leap equals the same leaps recomputed by calling forward on the whole
    running sequence's last context window (greedy)."""
    model = tiny(name).eval()
    prompt = [10, 20, 30, 40, 50]
    out = model.generate([prompt], 14, temperature=0, distance=5)[0]
    seq = list(prompt)
    with torch.no_grad():
        while len(seq) - len(prompt) < 14:
            ctx, pad = left_pad([seq[-12:]], length=12)
            o = model(ctx, pad, torch.tensor([5]))  # target = argmax of the target head
            tgt = int(o.target_logits.argmax(-1))
            gap = o.gap_logits[0, :4].argmax(-1).tolist()
            seq += gap + [tgt]
    assert out == seq[len(prompt):len(prompt) + 14]


def test_load_model_returns_tokenizer(tmp_path, text_file):
    s = train(_run_cfg(tmp_path, "leap-lstm", 2, data=text_file), dict(TINY["leap-lstm"]))
    model, tok, ckpt = load_model(s["checkpoint"])
    assert tok.decode(tok.encode("héllo")) == "héllo" and ckpt["step"] == 2


def test_build_rejects_unknown_fields():
    with pytest.raises(TypeError, match="no config field"):
        lm.build("leapformer-lm", n_layers=3)
    with pytest.raises(ValueError, match="unknown model"):
        lm.build("gpt-5")


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact and no temp file."""
    from leapformer_models import train as train_mod
    path = str(tmp_path / "ckpt.pt")
    train_mod.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_mod.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]

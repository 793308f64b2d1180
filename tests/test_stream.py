"""``leapformer-stream`` (issue #23): the generated simultaneous task (deterministic, labels equal a
direct solver), average lagging by hand, incremental block-by-block encoding equals one
block-causal pass, incremental simultaneous decoding equals full-sequence decoding with the same
policy (every attention), no reads beyond the policy, training, checkpoints and ``leapformer eval``."""
import json
import os

import numpy as np
import pytest
import torch

import leapformer_models as lm
from leapformer_models import stream_task as st
from leapformer_models.blocks import ATTENTIONS
from leapformer_models.cli import main
from leapformer_models.stream import StreamConfig
from leapformer_models.tasks import task_data
from leapformer_models.train import TrainConfig, train

TINY = dict(n_embd=16, n_head=2, n_enc_layer=1, n_dec_layer=1, src_len=16, block_size=4)


def _model(attention="leap", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return lm.build("leapformer-stream", **{**TINY, "attention": attention, **kw}).to(dtype).eval()


def _batch(model, bs=3, seed=0, split=1):
    return model.get_batch(task_data("stream", {})[1 + split], bs, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the task
@pytest.mark.parametrize("S,rate,delay", [(32, 2, 7), (12, 3, 0), (9, 1, 4), (6, 2, 11)])
def test_task_labels_equal_solver(S, rate, delay):
    rng = np.random.default_rng(S)
    for _ in range(20):
        x, y = st.stream_example(rng, S, rate, delay)
        assert len(x) == S and len(y) == S // rate
        assert all(1 <= v <= st.STREAM_SYMBOLS for v in x)
        assert y == st.stream_solve(x, rate, delay)


def test_task_by_hand_and_checks():
    x = list(range(1, 13))                                  # S = 12, rate 2, delays 0 1 2 0 1 2
    assert st.stream_solve(x, 2, 2) == [1, 4, 7, 7, 10, 12]  # p = 0, 3, 6, 6, 9, min(12, 11)
    with pytest.raises(ValueError, match="multiple of rate"):
        st.stream_check(13, 2, 3)
    with pytest.raises(ValueError, match="max_delay"):
        st.stream_check(12, 2, -1)


def test_task_batches_are_deterministic_and_splits_differ():
    _, tr, va = task_data("stream", {})
    draw = lambda d, s: st.stream_batch(d, 4, 32, 2, 7, torch.Generator().manual_seed(s))  # noqa: E731
    a, b = draw(tr, 0), draw(tr, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(draw(va, 0)[0], a[0]) and not torch.equal(draw(tr, 1)[0], a[0])
    for x, y in zip(*a):
        assert y.tolist() == st.stream_solve(x.tolist(), 2, 7)


# ----------------------------------------------------------------------------- latency
def test_average_lagging_by_hand():
    # S = 8 source tokens, T = 4 targets (rate 2), wait-1: g = 1 3 5 7
    assert st.block_reads(4, 8, 1, 2, 1) == [1, 3, 5, 7]
    assert st.average_lagging([1, 3, 5, 7], 8) == pytest.approx(1.0)       # never reads all: tau = T; AL = k
    assert st.block_reads(4, 8, 1, 2, 2) == [2, 4, 6, 8]                   # blocks of 2
    assert st.average_lagging([2, 4, 6, 8], 8) == pytest.approx(2.0)       # (2 + 2 + 2 + 2) / 4
    assert st.block_reads(4, 8, 1, 2, 4) == [4, 4, 8, 8]                   # blocks of 4: tau = 3
    assert st.average_lagging([4, 4, 8, 8], 8) == pytest.approx(10 / 3)    # (4 + 2 + 4) / 3
    assert st.block_reads(4, 8, None, 2, 4) == [8] * 4
    assert st.average_lagging([8] * 4, 8) == pytest.approx(8.0)            # offline: AL = S
    assert st.block_reads(4, 8, 3, 2, 1) == [3, 5, 7, 8]
    assert st.average_lagging([3, 5, 7, 8], 8) == pytest.approx(11 / 4)    # (3 + 3 + 3 + (8 - 6)) / 4: k until
    #                                                                        the source ends
    # the best accuracy the reads allow: p = 0 3 4 7 (delays 0 1 0 1); [4, 4, 8, 8] sees targets 0, 1, 2, 3
    assert st.policy_ceiling(8, 2, 1, [4, 4, 8, 8]) == 1.0
    assert st.policy_ceiling(8, 2, 1, [1, 3, 5, 7]) == pytest.approx((2 + 2 / 16) / 4)  # t = 0, 2 seen


def test_model_latency_matches_its_reads():
    m = _model(wait_k=3)
    assert m.reads(16) == [4, 8, 8, 12, 12, 16, 16, 16]
    assert m.average_lagging() == pytest.approx((4 + 6 + 4 + 6 + 4 + 6) / 6)
    ev = m.extra_eval(None, 1, 1)
    assert ev["average_lagging"] == m.average_lagging() and ev["chance_accuracy"] == 1 / 16
    assert _model(wait_k=None).average_lagging() == 16


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_incremental_encoding_equals_one_block_causal_pass(attention, one_thread):
    m = _model(attention, n_enc_layer=2)
    src, _ = _batch(m)
    full = m.encode(src)
    state, outs = None, []
    for s in range(0, src.shape[1], 4):  # one block of W = 4 per call, the encoder state carried
        o, state = m.encode(src[:, s:s + 4], start=s, state=state, use_cache=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    # block-causal: a change in block 2 leaves blocks 0-1 alone and reaches all of block 2
    src2 = src.clone()
    src2[:, 10] = src[:, 10] % 16 + 1
    d = (m.encode(src2) - full).abs().amax(-1)
    assert bool((d[:, :8] == 0).all()) and bool((d[:, 8:12] > 0).all())


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("wait_k", [1, 3, None])
def test_incremental_decoding_equals_full_sequence_decoding(attention, wait_k, one_thread):
    m = _model(attention, wait_k=wait_k, n_dec_layer=2)
    src, _ = _batch(m)
    trace = []
    out, logits = m.simultaneous_decode(src, return_logits=True, trace=trace)
    ref, ref_logits = m.full_sequence_decode(src, return_logits=True)
    assert out.shape == (3, 8)
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    # the policy: whole blocks read, and target t written after exactly R(t) source tokens
    reads, n = m.reads(16), 0
    for kind, v in trace:
        if kind == "read":
            assert v == n + 4
            n = v
        else:
            assert n == reads[v]


def test_training_forward_reads_no_further_than_the_policy(one_thread):
    m = _model(wait_k=3)
    src, tgt = _batch(m, bs=1)
    tin = m.decoder_input(tgt)
    base = m(src, tin)
    reads = m.reads(16)
    for s in (5, 9, 13):  # change one source token: targets whose reads end before it do not move
        src2 = src.clone()
        src2[0, s] = src[0, s] % 16 + 1
        d = (m(src2, tin) - base).abs().amax(-1)[0]
        for t, r in enumerate(reads):
            assert (d[t] == 0) == (r <= s), (s, t, r, d)


# ----------------------------------------------------------------------------- model
def test_config_checks_and_help():
    from dataclasses import fields
    assert set(StreamConfig.HELP) == {f.name for f in fields(StreamConfig)}
    with pytest.raises(ValueError, match=r"src_len \(--src-len\) must be a multiple of rate"):
        StreamConfig(src_len=15, rate=2)
    with pytest.raises(ValueError, match=r"wait_k \(--wait-k\)"):
        StreamConfig(wait_k=0)
    with pytest.raises(ValueError, match=r"attention \(--attention\)"):
        StreamConfig(attention="cos")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_shapes_and_loss_decreases(attention, one_thread):
    m = _model(attention, dtype=torch.float32, wait_k=5).train()
    batch = _batch(m, bs=8)
    assert m(batch[0], m.decoder_input(batch[1])).shape == (8, 8, st.STREAM_VOCAB)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert m.generate([list(range(1, 11)), [3]], max_new_tokens=3) == [m.generate([list(range(1, 11))])[0][:3], []]


def _cfg(out, steps, **kw):
    return TrainConfig(model="leapformer-stream", steps=steps, batch_size=4, warmup=2, eval_interval=3,
                       eval_batches=1, ckpt_interval=100, threads=1, time_limit=None, out=str(out), progress=False,
                       **kw)


def test_checkpoint_roundtrip_resume_and_cli_eval(tmp_path, capsys):
    over = dict(TINY, attention="linear", wait_k=1)
    full, model = train(_cfg(tmp_path / "full", 6), over, return_model=True)
    assert 0 <= full["val_accuracy"] <= 1
    loaded = lm.load_checkpoint(full["checkpoint"])
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(model.loss(batch), loaded.loss(batch))
        assert torch.equal(model.simultaneous_decode(batch[0]), loaded.simultaneous_decode(batch[0]))
    train(_cfg(tmp_path / "cut", 6, stop_after=3), over)
    resumed = train(_cfg(tmp_path / "cut", 6), over, resume=True)
    hist = [json.load(open(os.path.join(tmp_path / d, "metrics.json")))["history"] for d in ("full", "cut")]
    assert [r["train_loss"] for r in hist[0]] == [r["train_loss"] for r in hist[1]]
    assert resumed["final_val_loss"] == full["final_val_loss"]
    capsys.readouterr()
    assert main(["eval", "--ckpt", full["checkpoint"], "--batches", "2"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["task"] == "stream" and 0 <= ev["accuracy"] <= 1 and ev["wait_k"] == 1
    assert ev["average_lagging"] == pytest.approx(st.average_lagging(st.block_reads(8, 16, 1, 2, 4), 16))
    assert main(["generate", "--ckpt", full["checkpoint"], "--prompt", "1 2 3 4 5 6", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.split()) == 6 + 3
    assert main(["train", "--model", "leapformer-stream", "--data", "mqar", "--out", str(tmp_path / "x")]) == 2
    assert "leapformer-stream does not train on mqar" in capsys.readouterr().err

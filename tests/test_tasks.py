"""Generated tasks (issue #22): MQAR and ListOps labels equal a direct solver, generation is
deterministic for a seed; ``leapformer-lra`` and ``--data mqar`` train, checkpoint, resume
exactly, and ``leapformer eval`` reports the accuracy."""
import json
import os
import random

import numpy as np
import pytest
import torch

import leapformer_models as lm
from leapformer_models import tasks
from leapformer_models.cli import main
from leapformer_models.train import TrainConfig, train


@pytest.mark.parametrize("pairs,vocab,length", [(1, 5, 4), (8, 64, 64), (4, 20, 37), (64, 8192, 1024)])
def test_mqar_labels_equal_solver(pairs, vocab, length):
    rng = np.random.default_rng(pairs)
    K = (vocab - 1) // 2
    for _ in range(20):
        x, y = tasks.mqar_example(rng, pairs, vocab, length)
        assert len(x) == len(y) == length
        assert y == tasks.mqar_solve(x, pairs)
        scored = [t for t, v in enumerate(y) if v != tasks.IGNORE]
        assert len(scored) == pairs and all(x[t + 1] == y[t] for t in scored)  # the answer follows its query
        assert sorted(x[t] for t in scored) == sorted(x[0:2 * pairs:2])     # every key queried once
        assert all(1 <= k <= K for k in x[0:2 * pairs:2]) and all(K < v < vocab for v in x[1:2 * pairs:2])


def test_mqar_rejects_impossible_configs():
    with pytest.raises(ValueError, match="seq_len"):
        tasks.mqar_check(8, 64, 31)
    with pytest.raises(ValueError, match="vocab_size"):
        tasks.mqar_check(8, 16, 64)


@pytest.mark.parametrize("min_len,max_len,depth,args", [(1, 16, 3, 3), (16, 128, 10, 10), (500, 2000, 10, 10)])
def test_listops_labels_equal_solver(min_len, max_len, depth, args):
    rng = random.Random(min_len)
    for _ in range(10):
        toks, value = tasks.listops_example(rng, min_len, max_len, depth, args)
        assert min_len <= len(toks) <= max_len and toks[0] in tasks.LISTOPS_OPS
        assert tasks.listops_solve(toks) == value
        assert tasks.listops_decode(tasks.listops_encode(toks)) == toks


def test_listops_solver_by_hand():
    e = "[MAX 2 9 [MIN 4 7 ] 0 ]".split()
    assert tasks.listops_solve(e) == 9
    assert tasks.listops_solve("[MED 1 2 3 4 ]".split()) == 2         # (2 + 3) // 2
    assert tasks.listops_solve("[SM 9 8 [MED 5 ] ]".split()) == 2      # (9 + 8 + 5) % 10


@pytest.mark.parametrize("task", ["mqar", "listops"])  # stream: tests/test_stream.py
def test_task_batches_are_deterministic_and_splits_differ(task):
    params = dict(num_pairs=4, vocab_size=32) if task == "mqar" else dict(min_len=4, max_depth=4, max_args=4)
    _, train_d, val_d = tasks.task_data(task, params)
    draw = (lambda d, s: d.mqar_batch(3, 32, torch.Generator().manual_seed(s))) if task == "mqar" else \
        (lambda d, s: d.listops_batch(3, 32, torch.Generator().manual_seed(s)))
    a, b = draw(train_d, 0), draw(train_d, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(draw(val_d, 0)[0][:, :4], a[0][:, :4])
    if task == "listops":
        x, pad, label = a
        for row, p, v in zip(x, pad, label):
            assert tasks.listops_solve(tasks.listops_decode(row[~p])) == int(v)
    else:
        x, y = a
        for row, lab in zip(x, y):
            assert lab.tolist() == tasks.mqar_solve(row.tolist(), 4)


# ----------------------------------------------------------------------------- leapformer-lra
def test_lra_config_help_and_checks():
    from dataclasses import fields
    from leapformer_models.lra import LRAConfig
    c = LRAConfig()
    assert (c.n_embd, c.ffn_dim, c.n_embd // c.n_head, c.n_head, c.n_layer, c.leap_hidden) == (64, 128, 32, 2, 2, 16)
    assert set(LRAConfig.HELP) == {f.name for f in fields(c)}
    with pytest.raises(ValueError, match=r"attention \(--attention\) must be one of leap, softmax, linear, cosformer"):
        LRAConfig(attention="cos")
    with pytest.raises(ValueError, match=r"seq_len \(--seq-len\) must be <= cosformer_max_len"):
        LRAConfig(attention="cosformer", cosformer_max_len=100, seq_len=128)


LRA_TINY = dict(n_layer=1, n_embd=16, ffn_dim=32, seq_len=48)


@pytest.mark.parametrize("attention", ["leap", "softmax", "linear", "cosformer"])
def test_lra_shapes_and_fits_a_batch(attention):
    torch.manual_seed(0)
    model = lm.build("leapformer-lra", attention=attention, **LRA_TINY)
    data = tasks.task_data("listops", dict(min_len=8, max_depth=4, max_args=4))[1]
    batch = model.get_batch(data, 8, torch.Generator().manual_seed(0))
    assert model(batch[0], batch[1]).shape == (8, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # padding: a row's logits do not depend on how far it is padded
    x, pad, _ = batch
    n = int((~pad[0]).sum())
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1, :n])[0], model(x, pad)[0], rtol=0, atol=1e-5)


def _cfg(out, model, steps, **kw):
    return TrainConfig(model=model, steps=steps, batch_size=4, warmup=2, eval_interval=4, eval_batches=1,
                       ckpt_interval=100, threads=1, time_limit=None, out=str(out), progress=False, **kw)


RUNS = {"lra": ("leapformer-lra", dict(listops_min_len=4, listops_max_depth=4, listops_max_args=4),
                dict(LRA_TINY, attention="cosformer")),
        "lm-mqar": ("leapformer-lm", dict(data="mqar", mqar_pairs=4, mqar_vocab=32),
                    dict(n_layer=1, n_head=2, n_embd=16, seq_len=32, attention="linear"))}


@pytest.mark.parametrize("run", list(RUNS))
def test_task_checkpoint_roundtrip_and_exact_resume(run, tmp_path):
    name, tkw, over = RUNS[run]
    full, model = train(_cfg(tmp_path / "full", name, 6, **tkw), over, return_model=True)
    assert 0 <= full["val_accuracy"] <= 1
    loaded = lm.load_checkpoint(full["checkpoint"])
    data = tasks.task_data(*(("listops", dict(min_len=4, max_depth=4, max_args=4)) if run == "lra" else
                             ("mqar", dict(num_pairs=4, vocab_size=32))))[2]
    batch = model.get_batch(data, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.loss(batch), loaded.loss(batch))
    train(_cfg(tmp_path / "cut", name, 6, stop_after=3, **tkw), over)
    resumed = train(_cfg(tmp_path / "cut", name, 6, **tkw), over, resume=True)
    hist = [json.load(open(os.path.join(tmp_path / d, "metrics.json")))["history"] for d in ("full", "cut")]
    assert [r["train_loss"] for r in hist[0]] == [r["train_loss"] for r in hist[1]]
    assert resumed["final_val_loss"] == full["final_val_loss"]


def test_cli_tasks(tmp_path, capsys):
    common = ["--steps", "2", "--batch-size", "2", "--eval-batches", "1", "--threads", "1", "--no-progress",
              "--time-limit", "none"]
    out = tmp_path / "mqar"
    assert main(["train", "--model", "leapformer-lm", "--data", "mqar", "--mqar-pairs", "2", "--mqar-vocab", "16",
                 "--attention", "cosformer", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--seq-len", "16",
                 "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out / "ckpt.pt"), "--batches", "2"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["task"] == "mqar" and 0 <= ev["accuracy"] <= 1
    out = tmp_path / "lra"
    assert main(["train", "--model", "leapformer-lra", "--attention", "linear", "--n-embd", "16", "--ffn-dim", "16",
                 "--n-layer", "1", "--seq-len", "32", "--listops-min-len", "4", "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out / "ckpt.pt"), "--batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "listops"
    assert main(["generate", "--ckpt", str(out / "ckpt.pt"), "--prompt", "[MAX 2 9 [MIN 4 7 ] 0 ]",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-1] in [str(d) for d in range(10)]
    # a task a model does not train on, and text for the LRA classifier: one-line usage errors
    assert main(["train", "--model", "leap-lstm", "--data", "mqar", "--out", str(tmp_path / "x"), *common]) == 2
    assert "leap-lstm does not train on mqar" in capsys.readouterr().err
    assert main(["train", "--model", "leapformer-lm", "--data", "mqar", "--seq-len", "16", "--mqar-pairs", "8",
                 "--out", str(tmp_path / "y"), *common]) == 2
    assert "--data mqar" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

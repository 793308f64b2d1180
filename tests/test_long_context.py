"""Long context (issue #24): the ``leapformer-lm-long`` preset, ``leapformer eval``'s full pass with a
sliding window (checked against direct computations), and ``python -m benchmarks.lm_speed --quick``."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import leapformer_models as lm
from leapformer_models.cli import main
from leapformer_models.sliding_eval import position_bin_edges, sliding_window_loss
from leapformer_models.train import TrainConfig

TEXT = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n\nThe quick brown fox jumps over the lazy dog.\n") * 30
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32"]
COMMON = ["--eval-batches", "1", "--threads", "1", "--no-progress", "--time-limit", "none"]


def _json_out(out):
    return json.loads(out[out.index("{"):])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("long") / "tiny.txt"
    p.write_text(TEXT)
    return str(p)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Two tiny LMs trained 2 steps on the tiny text, LeaP and softmax, with no position table
    (``train`` runs on --threads 1; the conftest restores the thread count)."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for att in ("leap", "softmax"):
        d = base / att
        assert main(["train", "--model", "leapformer-lm-long", "--attention", att, "--data", data, "--steps", "2",
                     "--seq-len", "32", "--batch-size", "2", "--out", str(d), *COMMON, *TINY]) == 0
        out[att] = d
    return out


def _val_ids(data):
    from leapformer_models.data import encode_corpus, load_text, make_tokenizer, split_text
    return encode_corpus(make_tokenizer("byte"), split_text(load_text(data), 0.1)[1])


@torch.no_grad()
def _nll(model, x, y):
    return F.cross_entropy(model(x[None])[0].float(), y, reduction="none").double()


def test_long_preset_defaults_and_train(tmp_path, capsys, one_thread):
    """The preset is T = 2048 with no position table, and trains (at its real T, tiny width) on the
    shipped corpus with its own training defaults."""
    c = lm.MODELS["leapformer-lm-long"].Config()
    assert c.seq_len >= 2048 and c.pos_emb in ("none", "sinusoidal")
    tc = TrainConfig.for_model("leapformer-lm-long", steps=7)
    assert tc.steps == 7 and tc.batch_size == lm.MODELS["leapformer-lm-long"].train_defaults["batch_size"]
    assert TrainConfig.for_model("leapformer-lm").batch_size == TrainConfig().batch_size
    out = tmp_path / "long"
    assert main(["train", "--model", "leapformer-lm-long", "--steps", "2", "--batch-size", "1", "--out", str(out),
                 *COMMON, *TINY]) == 0
    s = _json_out(capsys.readouterr().out)
    assert s["steps"] == 2 and s["model"] == "leapformer-lm-long" and math.isfinite(s["final_val_loss"])
    summary = json.load(open(out / "metrics.json"))["summary"]
    defaults = lm.MODELS["leapformer-lm-long"].train_defaults
    assert summary["model_config"]["seq_len"] == 2048 and summary["train_config"]["steps"] == 2
    assert all(summary["train_config"][k] == v for k, v in defaults.items() if k not in ("steps", "batch_size", "eval_batches"))
    # no position table: the model reads and generates past its training length
    model = lm.load_checkpoint(str(out / "ckpt.pt"))
    assert model.max_new_tokens_that_fit([[1] * 3000]) is None
    assert model(torch.randint(0, 256, (1, 2100))).shape == (1, 2100, 256)


def test_softmax_disjoint_windows_are_the_mean_of_window_losses(runs, data, capsys):
    """stride == window, fresh windows: the loss is the token-weighted mean of each window's loss,
    computed here window by window with the model's own loss."""
    ckpt = str(runs["softmax"] / "ckpt.pt")
    assert main(["eval", "--ckpt", ckpt, "--window", "16", "--no-progress"]) == 0
    ev = _json_out(capsys.readouterr().out)
    model = lm.load_checkpoint(ckpt)
    ids = _val_ids(data)
    n = len(ids) - 1
    losses, sizes = [], []
    for s in range(0, n, 16):
        e = min(s + 16, n)
        with torch.no_grad():
            losses.append(float(model.loss((ids[s:e][None], ids[s + 1:e + 1][None]))))
        sizes.append(e - s)
    want = sum(l * k for l, k in zip(losses, sizes)) / n
    assert ev["carry_state"] is False and ev["windows"] == len(losses) and ev["tokens_scored"] == n
    assert ev["val_loss"] == pytest.approx(want, rel=1e-6)
    if n % 16 == 0:
        assert ev["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    saved = json.load(open(runs["softmax"] / "eval.json"))
    assert saved["val_loss"] == ev["val_loss"] and (runs["softmax"] / "eval_position_loss.png").stat().st_size > 1000
    bp = saved["loss_by_position"]
    assert sum(bp["tokens"]) == n and bp["context_lo"][0] == 1 and max(bp["context_hi"]) == 16
    # the first bin holds the first prediction of every window, scored with one token of context
    first = [float(_nll(model, ids[s:s + 1], ids[s + 1:s + 2])[0]) for s in range(0, n, 16)]
    assert bp["loss"][0] == pytest.approx(sum(first) / len(first), rel=1e-5)


def test_softmax_overlapping_windows(runs, data):
    """stride < window: window j scores only the tokens no earlier window scored (the last `stride`)."""
    model = lm.load_checkpoint(str(runs["softmax"] / "ckpt.pt"))
    ids = _val_ids(data)[:60]
    r = sliding_window_loss(model, ids, window=16, stride=6)
    n, total, done = len(ids) - 1, 0.0, 0
    s = 0
    while True:
        e = min(s + 16, n)
        nll = _nll(model, ids[s:e], ids[s + 1:e + 1])
        total += float(nll[done - s:].sum())
        done = e
        if e == n:
            break
        s += 6
    assert r["tokens"] == n and r["loss"] == pytest.approx(total / n, rel=1e-6)


def test_leap_carried_state_is_one_pass_over_the_text(runs, data, capsys):
    """LeaP with the state carried (the default) equals one forward pass over the whole text, and
    context lengths run to the end of the text."""
    ckpt = str(runs["leap"] / "ckpt.pt")
    out = runs["leap"] / "ev"
    assert main(["eval", "--ckpt", ckpt, "--window", "16", "--out", str(out), "--no-progress"]) == 0
    ev = _json_out(capsys.readouterr().out)
    model = lm.load_checkpoint(ckpt)
    ids = _val_ids(data)
    full = float(_nll(model, ids[:-1], ids[1:]).mean())
    assert ev["carry_state"] is True and ev["val_loss"] == pytest.approx(full, rel=1e-4)
    bp = json.load(open(out / "eval.json"))["loss_by_position"]
    assert max(bp["context_hi"]) == len(ids) - 1 and (out / "eval_position_loss.png").exists()
    # fresh windows instead: another number, the windows' own
    assert main(["eval", "--ckpt", ckpt, "--window", "16", "--no-carry-state", "--out", str(out),
                 "--no-progress"]) == 0
    fresh = _json_out(capsys.readouterr().out)
    assert fresh["carry_state"] is False and fresh["val_loss"] != pytest.approx(full, rel=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["--window", "8", "--stride", "9"], "--stride"),
    (["--window", "0"], "--window"),
    (["--batches", "2", "--window", "8"], "exclude"),
])
def test_eval_flag_errors(runs, capsys, args, needle):
    assert main(["eval", "--ckpt", str(runs["leap"] / "ckpt.pt"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_eval_carry_state_errors(runs, capsys):
    assert main(["eval", "--ckpt", str(runs["softmax"] / "ckpt.pt"), "--carry-state"]) == 2
    assert "softmax" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(runs["leap"] / "ckpt.pt"), "--carry-state", "--window", "8",
                 "--stride", "4"]) == 2
    assert "--no-carry-state" in capsys.readouterr().err


def test_position_bins():
    e = position_bin_edges(2048)
    assert e[:16] == list(range(1, 17)) and e[-1] > 2048 and all(a < b for a, b in zip(e, e[1:]))
    assert position_bin_edges(5)[:5] == [1, 2, 3, 4, 5]


def test_lm_speed_quick(tmp_path):
    from benchmarks import lm_speed
    res = lm_speed.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"lm_speed_cpu.{ext}").exists()
    saved = json.load(open(tmp_path / "lm_speed_cpu.json"))
    assert saved["meta"]["threads"] == 1 and "torch" in saved["meta"]
    rows = saved["train"]
    assert rows and all(r["leap_vs_softmax"] > 0 for r in rows) and saved["decode"]
    assert res["meta"]["device"]

"""``leapformer compare`` on tiny runs: the table's numbers are the metrics files' numbers, the PNG
is written, a corrupt run is one line on stderr (the others still compared), and user mistakes
never show a traceback."""
import csv
import json
import shutil

import pytest

from leapformer_models.cli import main

TEXT = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n\nThe quick brown fox jumps over the lazy dog.\n") * 20
COMMON = ["--batch-size", "4", "--eval-batches", "1", "--eval-interval", "2", "--threads", "1", "--no-progress",
          "--time-limit", "none", "--steps", "4"]
TINY_LM = ["--model", "leapformer-lm", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16"]
TINY_LEAP = ["--model", "leap-transformer", "--embed-dim", "32", "--num-heads", "4", "--num-layers", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs on one text: LM with leap / softmax attention, and a LEAP transformer."""
    root = tmp_path_factory.mktemp("compare")
    data = root / "tiny.txt"
    data.write_text(TEXT)
    spec = {"lm-leap": TINY_LM + ["--attention", "leap"], "lm-softmax": TINY_LM + ["--attention", "softmax"],
            "leap-tf": TINY_LEAP}
    for name, args in spec.items():
        assert main(["train", "--data", str(data), "--out", str(root / name), *COMMON, *args]) == 0
    return root, data, [str(root / n) for n in spec]


def _compare(capsys, *args):
    rc = main(["compare", *map(str, args), "--batches", "2", "--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def test_table_equals_metrics_files(runs, tmp_path, capsys):
    root, data, dirs = runs
    capsys.readouterr()
    rc, out, err = _compare(capsys, *dirs, "--out", tmp_path / "cmp", "--topk", "1", "3")
    assert rc == 0, err
    assert err.strip() == ""
    res = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert [r["path"] for r in res["rows"]] == dirs and res["skipped"] == [] and res["same_heldout"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    for row, d in zip(res["rows"], dirs):
        s = json.load(open(f"{d}/metrics.json"))["summary"]
        for k in ("model", "attention", "params", "steps", "tokens_seen", "train_time_s", "tokens_per_s",
                  "final_val_loss", "best_val_loss"):
            assert row[k] == s[k], k
        with open(f"{d}/metrics.csv") as f:
            vals = [float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]]
        assert row["final_val_loss"] == pytest.approx(vals[-1], rel=1e-12)
        assert row["best_val_loss"] == pytest.approx(min(vals), rel=1e-12)
        assert 0 < row["params_no_emb"] < row["params"]
        assert 0 <= row["top1_acc"] <= row["top3_acc"] <= 1 and row["scored_tokens"] > 0
        assert f"| {row['run']} | {s['model']} | {s['attention']} |" in md
        assert f"{s['final_val_loss']:.4f}" in md and f"{s['params']:,}" in md
    assert "same held-out text" in res["note"]
    png = tmp_path / "cmp" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "| lm-softmax |" in out  # the table is also printed


def test_corrupt_run_is_one_line(runs, tmp_path, capsys):
    root, data, dirs = runs
    garbage, no_ckpt = tmp_path / "garbage", tmp_path / "no-ckpt"
    shutil.copytree(dirs[0], garbage)
    (garbage / "metrics.json").write_text("{not json")
    shutil.copytree(dirs[1], no_ckpt)
    (no_ckpt / "ckpt.pt").unlink()
    bad_ckpt = tmp_path / "bad-ckpt"
    shutil.copytree(dirs[1], bad_ckpt)
    (bad_ckpt / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    missing = tmp_path / "missing"
    capsys.readouterr()
    rc, out, err = _compare(capsys, garbage, dirs[1], no_ckpt, bad_ckpt, missing, "--out", tmp_path / "cmp",
                            "--data", data, "--log")
    assert rc == 0
    lines = err.strip().splitlines()
    assert len(lines) == 4, err
    for line, name, why in zip(lines, (garbage, no_ckpt, bad_ckpt, missing),
                               ("metrics.json is corrupt", "no checkpoint", "cannot be read", "does not exist")):
        assert line.startswith(f"leapformer compare: skipped {name}: ") and why in line, line
    res = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert [r["path"] for r in res["rows"]] == [dirs[1]] and len(res["skipped"]) == 4
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_csv_only_run_and_differing_heldout(runs, tmp_path, capsys):
    """metrics.json absent: metrics.csv + the checkpoint; a run with another validation split is
    flagged as scored on different text."""
    root, data, dirs = runs
    csv_only = tmp_path / "csv-only"
    shutil.copytree(dirs[0], csv_only)
    (csv_only / "metrics.json").unlink()
    other = tmp_path / "other-split"
    assert main(["train", "--data", str(data), "--out", str(other), "--val-fraction", "0.3", *COMMON,
                 *TINY_LM]) == 0
    capsys.readouterr()
    rc, out, err = _compare(capsys, csv_only, other, "--out", tmp_path / "cmp")
    assert rc == 0 and err.strip() == "", err
    res = json.load(open(tmp_path / "cmp" / "compare.json"))
    s = json.load(open(f"{dirs[0]}/metrics.json"))["summary"]
    row = res["rows"][0]
    for k in ("steps", "tokens_seen", "final_val_loss", "best_val_loss"):
        assert row[k] == pytest.approx(s[k], rel=1e-12), k
    assert not res["same_heldout"] and "DIFFER" in res["note"]


@pytest.mark.parametrize("args,code,needle", [
    ([], 2, "RUN_DIR"),
    (["{tmp}/nope"], 1, "no run could be read"),
    (["{run}", "--topk", "0"], 2, "--topk"),
    (["{run}", "--data", "{tmp}/absent.txt"], 2, "does not exist"),
    (["{run}", "--device", "cuda:99"], 2, "cuda:99"),
])
def test_user_mistakes(runs, tmp_path, capsys, args, code, needle):
    run = runs[2][0]
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    capsys.readouterr()
    rc, out, err = _compare(capsys, *args, "--out", tmp_path / "cmp")
    assert rc == code, err
    assert 1 <= len(err.strip().splitlines()) <= 2 and needle in err, err

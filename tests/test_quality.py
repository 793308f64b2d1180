"""Smoke test of python -m benchmarks.quality --quick: all four attentions on every task (tiny
models, 3 steps), the md/json/png files, the table's structure (a reference beside every result,
the budget stated), and that --quick leaves the committed results alone."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ATTENTIONS = ("leap", "softmax", "linear", "cosformer")
TASKS = ("mqar64", "mqar256", "listops", "stream_k1", "stream_k5", "lm2048")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("quality.*"))}


def test_quality_quick(tmp_path):
    before = _digest(RESULTS)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPFORMER_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(tmp_path),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(RESULTS) == before  # --quick writes only where told
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"quality.{ext}").stat().st_size > 0
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((tmp_path / "quality.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["quick"] and meta["threads"] == 1 and meta["budget_min"] > 0 and meta["device"]
    assert [(r["task"], r["attention"]) for r in rows] == [(t, a) for t in TASKS for a in ATTENTIONS]
    for r in rows:
        assert r["steps"] == r["planned_steps"] == 3 and r["seed"] == meta["seed"]
        assert r["params"] > 0 and r["tokens_per_s"] > 0 and r["history"]
        if r["task"] == "lm2048":
            assert r["heldout_loss"] > 0 and r["uniform_loss"] > r["unigram_loss"] > 0
        else:
            assert 0 <= r["accuracy"] <= 1 and 0 < r["chance"] < 1
        if r["task"].startswith("stream"):
            assert r["average_lagging"] > 0 and r["chance"] <= r["ceiling"] <= 1
    # same budget per task: steps, batch, learning rate for every attention; same shape (LeaP adds predictors)
    for t in TASKS:
        rs = [r for r in rows if r["task"] == t]
        assert len({(r["steps"], r["batch_size"], r["lr"], r["time_limit_s"]) for r in rs}) == 1
        assert len({r["params"] for r in rs if r["attention"] != "leap"}) == 1
    assert {v["task"] for v in data["verdicts"]} == set(TASKS)

    md = (tmp_path / "quality.md").read_text()
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| task |"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cols == ["task", "attention", "result", "reference", "params", "steps", "batch", "train s", "tokens/s",
                    "eval"]
    body = [line for line in lines[header + 2:] if line.startswith("|")]
    assert len(body) == len(TASKS) * len(ATTENTIONS)
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(cols) and cells[1] in ATTENTIONS
        assert "chance" in cells[3] or "uniform" in cells[3]  # a reference beside every result
    assert "Budget:" in md and "LeaP's place per task" in md


def test_quality_bad_flags(capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks.quality import parse
    for args in (["--budget", "0"], ["--attentions", "leap,nope"], ["--tasks", "nope"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as e:
            parse(args)
        assert e.value.code == 2, args
    assert "error" in capsys.readouterr().err
    a = parse(["--budget", "30"])
    assert a.out == "benchmarks/results" and a.runs == os.path.join("runs", "quality")

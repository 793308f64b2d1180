"""The installed ``leapformer`` console script answers every user mistake in one or two lines
(exit code 2 for usage, 1 otherwise, never a traceback), never overwrites a run, and saves a
resumable checkpoint on Ctrl-C / SIGTERM. Everything runs through ``subprocess``."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

TEXT = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n\nThe quick brown fox jumps over the lazy dog.\n") * 40
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16", "--batch-size", "4",
        "--eval-batches", "1", "--eval-interval", "5", "--threads", "1", "--no-progress", "--time-limit", "none"]


def _exe():
    exe = shutil.which("leapformer")
    return [exe] if exe else [sys.executable, "-m", "leapformer_models.cli"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("LEAPFORMER_DEBUG", "TRITON_INTERPRET")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(*args, cwd=None, timeout=300):
    return subprocess.run(_exe() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=_env())


def assert_user_error(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    p.write_text(TEXT)
    return str(p)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    """One finished tiny LM run (6 steps, max_positions 24) shared by the checkpoint tests."""
    out = tmp_path_factory.mktemp("run") / "lm"
    r = run("train", "--data", corpus, "--steps", "6", "--max-positions", "24", "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("args,code,needle", [
    (["train", "--batch-size", "0"], 2, "--batch-size"),
    (["train", "--steps", "many"], 2, "--steps"),
    (["train", "--lr", "nan"], 2, "--lr"),
    (["train", "--n-head", "3"], 2, "--n-head"),
    (["train", "--dropout", "1"], 2, "--dropout"),
    (["train", "--attention", "soft"], 2, "--attention"),
    (["train", "--model", "gpt5"], 2, "unknown model"),
    (["train", "--model", "leap-lstm", "--n-layer", "2"], 2, "--n-layer"),
    (["train", "--device", "cuda:7"], 2, "devices here"),
    (["train", "--data", "/no/such/file.txt"], 2, "does not exist"),
    (["train", "--resume", "--overwrite"], 2, "not allowed with"),
    (["generate"], 2, "--ckpt"),
    (["generate", "--ckpt", "x.pt", "--top-p", "0"], 2, "--top-p"),
    (["generate", "--ckpt", "x.pt", "--max-new-tokens", "-1"], 2, "--max-new-tokens"),
    (["eval", "--ckpt", "x.pt", "--batches", "0"], 2, "--batches"),
    (["frobnicate"], 2, "unknown command"),
])
def test_usage_mistakes(tmp_path, args, code, needle):
    assert_user_error(run(*args, cwd=tmp_path), code, needle)
    assert not (tmp_path / "runs").exists()  # a failed run leaves no folder behind


def test_bad_checkpoints(tmp_path, run_dir):
    folder = tmp_path / "folder"
    folder.mkdir()
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    good = (run_dir / "ckpt.pt").read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[: len(good) // 2])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    cases = [(tmp_path / "missing.pt", "does not exist"), (folder, "is a folder"), (empty, "empty"),
             (text, "cannot be read"), (trunc, "cannot be read"), (other, "not a leapformer checkpoint")]
    for i, (path, needle) in enumerate(cases):  # generate and eval share the checkpoint reader
        assert_user_error(run("generate" if i % 2 else "eval", "--ckpt", path), 1, needle)
    assert_user_error(run("generate", "--ckpt", run_dir), 1, "is a folder", "ckpt.pt")


def test_incompatible_checkpoint_names_the_version(tmp_path, run_dir):
    ck = torch.load(run_dir / "ckpt.pt", weights_only=False)
    ck["package_version"] = "0.0.1"
    ck["model_config"]["no_such_field"] = 3
    path = tmp_path / "old.pt"
    torch.save(ck, path)
    assert_user_error(run("generate", "--ckpt", path), 1, "0.0.1")


def test_flags_the_model_does_not_have(run_dir):
    ck = run_dir / "ckpt.pt"
    assert_user_error(run("generate", "--ckpt", ck, "--distance", "3"), 2, "--distance")


def test_generation_stops_at_max_positions(run_dir):
    r = run("generate", "--ckpt", run_dir / "ckpt.pt", "--prompt", "def f", "--max-new-tokens", "100",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f") and len(r.stdout.rstrip("\n").encode()) >= len("def f") + 10
    assert "stopped after 19 of 100" in r.stderr and "max_positions" in r.stderr
    long_prompt = "x" * 30
    assert_user_error(run("generate", "--ckpt", run_dir / "ckpt.pt", "--prompt", long_prompt), 1, "max_positions")


def test_no_silent_overwrite(tmp_path, corpus, run_dir):
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    before = (out / "ckpt.pt").read_bytes()
    r = run("train", "--data", corpus, "--steps", "2", "--out", out, *TINY)
    assert_user_error(r, 2, "--resume", "--overwrite")
    assert (out / "ckpt.pt").read_bytes() == before
    r = run("train", "--data", corpus, "--steps", "2", "--out", out, "--overwrite", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


def test_debug_shows_the_traceback(tmp_path):
    r = run("train", "--batch-size", "0", "--debug", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_help_and_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("leapformer-kernels ")
    r = run("train", "--help")
    assert r.returncode == 0
    for needle in ("{leap,softmax,linear,cosformer}", "{byte,bpe}", "seconds", "--resume", "--overwrite"):
        assert needle in r.stdout, needle
    r = run("generate", "--help")
    assert r.returncode == 0 and "(0, 1]" in r.stdout


def _train_until_step(args, k, sig):
    proc = subprocess.Popen(_exe() + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {k}/"):
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(seen)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + out, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_and_resume_matches(tmp_path, corpus, sig):
    base = ["train", "--data", corpus, "--steps", "30", "--log-interval", "1", "--ckpt-interval", "100", *TINY]
    rc, out, err = _train_until_step(base + ["--out", tmp_path / "cut"], 5, sig)
    assert rc == 130, err
    assert "Traceback" not in err and "--resume" in err
    step = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["step"]
    assert 5 <= step < 30
    resume_cmd = err.strip().splitlines()[-1].split()
    assert resume_cmd[0] == "leapformer" and resume_cmd[-1] == "--resume"
    r = run(*resume_cmd[1:])
    assert r.returncode == 0, r.stderr[-2000:]
    full = run(*base, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    a = json.loads((tmp_path / "cut" / "metrics.json").read_text())["summary"]["final_val_loss"]
    b = json.loads((tmp_path / "full" / "metrics.json").read_text())["summary"]["final_val_loss"]
    assert a == b


def test_resume_reuses_the_thread_count(tmp_path, corpus):
    tiny = TINY[:TINY.index("--threads")] + TINY[TINY.index("--threads") + 2:]  # no --threads
    base = ["train", "--data", corpus, "--steps", "4", "--out", tmp_path / "t", *tiny]
    assert run(*base, "--stop-after", "2", "--threads", "2").returncode == 0
    ck = torch.load(tmp_path / "t" / "ckpt.pt", weights_only=False)
    assert ck["train_config"]["threads"] == 2
    r = run(*base, "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["threads"] == 2


def test_eval_reports_leap_terms(tmp_path, corpus):
    out = tmp_path / "leap"
    r = run("train", "--model", "leap-lstm", "--embed-dim", "16", "--hidden-dim", "32", "--data", corpus,
            "--steps", "2", "--out", out, *TINY[8:])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("eval", "--ckpt", out / "ckpt.pt", "--batches", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["terms"]) == {"target", "gap"} and "perplexity" not in res
    assert abs(res["val_loss"] - sum(t["loss"] for t in res["terms"].values())) < 1e-9
    for t in res["terms"].values():
        assert 0 < t["loss"] < 10 and abs(t["bits_per_token"] * 0.6931471805599453 - t["loss"]) < 1e-9

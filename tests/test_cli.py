"""The ``leapformer`` command end to end on tiny configs: train, resume, generate, eval, list."""
import json
import shutil
import subprocess
import sys

import pytest

from leapformer_models.cli import main

TEXT = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n\nThe quick brown fox jumps over the lazy dog.\n") * 20
TINY_LM = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16"]
COMMON = ["--batch-size", "4", "--eval-batches", "1", "--eval-interval", "2", "--threads", "1", "--no-progress",
          "--time-limit", "none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "tiny.txt"
    p.write_text(TEXT)
    return str(p)


def _json_out(out):
    return json.loads(out[out.index("{"):])


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("leapformer-lm", "leap-lstm", "leap-transformer"):
        assert name in out


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2


@pytest.mark.parametrize("attention", ["leap", "softmax"])
def test_train_generate_eval(tmp_path, data, capsys, attention):
    out = tmp_path / "run"
    rc = main(["train", "--model", "leapformer-lm", "--attention", attention, "--data", data, "--steps", "4",
               "--out", str(out), *COMMON, *TINY_LM])
    assert rc == 0
    summary = _json_out(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["attention"] == attention
    for f in ("ckpt.pt", "metrics.csv", "metrics.json", "loss.png"):
        assert (out / f).exists()
    with open(out / "metrics.csv") as f:
        assert f.readline().startswith("step,train_loss,val_loss")

    ckpt = str(out / "ckpt.pt")
    assert main(["generate", "--ckpt", ckpt, "--prompt", "def ", "--prompt", "The quick",
                 "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95"]) == 0
    gen = capsys.readouterr().out
    assert "def " in gen and "The quick" in gen
    # greedy: cached and recomputed generation print the same text
    assert main(["generate", "--ckpt", ckpt, "--prompt", "def ", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", "--ckpt", ckpt, "--prompt", "def ", "--max-new-tokens", "10", "--temperature", "0",
                 "--no-cache"]) == 0
    assert capsys.readouterr().out == a

    assert main(["eval", "--ckpt", ckpt, "--batches", "2"]) == 0
    ev = _json_out(capsys.readouterr().out)
    assert ev["step"] == 4 and ev["val_loss"] > 0 and ev["tokenizer"] == "byte"


def test_train_resume(tmp_path, data, capsys):
    base = ["train", "--data", data, "--steps", "6", *COMMON, *TINY_LM]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--stop-after", "3"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    capsys.readouterr()
    la = json.load(open(tmp_path / "a" / "metrics.json"))["history"]
    lb = json.load(open(tmp_path / "b" / "metrics.json"))["history"]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]


@pytest.mark.parametrize("model,extra", [("leap-lstm", ["--embed-dim", "16", "--hidden-dim", "32"]),
                                         ("leap-transformer", ["--embed-dim", "32", "--num-heads", "4",
                                                               "--num-layers", "1", "--distance-head"])])
def test_leap_models_cli(tmp_path, data, capsys, model, extra):
    out = tmp_path / model
    assert main(["train", "--model", model, "--data", data, "--steps", "3", "--out", str(out), *COMMON,
                 *extra]) == 0
    capsys.readouterr()
    ckpt = str(out / "ckpt.pt")
    assert main(["generate", "--ckpt", ckpt, "--prompt", "def f", "--max-new-tokens", "9", "--distance", "4"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert main(["eval", "--ckpt", ckpt, "--batches", "1"]) == 0
    assert _json_out(capsys.readouterr().out)["model"] == model


def test_bad_arguments(tmp_path, data, capsys):
    assert main(["train", "--model", "nope", "--data", data]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["train", "--model", "leap-lstm", "--n-layer", "2", "--data", data]) == 2  # another model's field
    assert "--n-layer" in capsys.readouterr().err
    assert main(["train", "--data", data, "--out", str(tmp_path / "none"), "--resume", *COMMON]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_bpe_tokenizer_or_clear_error(tmp_path, data, capsys):
    args = ["train", "--data", data, "--tokenizer", "bpe", "--bpe-vocab-size", "300", "--steps", "2",
            "--out", str(tmp_path / "bpe"), *COMMON, *TINY_LM]
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "leapformer-kernels[bpe]" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bpe").exists()
        return
    assert main(args) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "bpe" / "ckpt.pt"), "--prompt", "def",
                 "--max-new-tokens", "5"]) == 0


def test_console_script_subprocess():
    """The installed console script runs (train / generate / eval go through main() above)."""
    exe = shutil.which("leapformer")
    cmd = [exe] if exe else [sys.executable, "-m", "leapformer_models.cli"]
    r = subprocess.run(cmd + ["list"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "leapformer-lm" in r.stdout

"""lk.hf part 2: attention transfer, fine-tuning (LoRA / full) and `leapformer linearize`, on tiny
config-built models (random weights, no network). Skipped without the [hf] extra."""
import copy
import itertools
import json
import signal

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import leapformer_kernels as lk  # noqa: E402
from test_hf import V, attn_modules, gpt2, llama, mistral, qwen2, randomize_leap  # noqa: E402

MODELS = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2, "mistral": mistral}


def batches(n=2, B=4, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (B, T), generator=g) for _ in range(n)]


def leap_layers(model):
    return [m for m in attn_modules(model) if isinstance(m, lk.hf.LeapSelfAttention)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def is_leap(name):
    return ".leap_q." in name or ".leap_k." in name


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "mistral"])
def test_transfer_mode_runs_the_replaced_softmax(name):
    """In transfer mode the layers return the softmax output of the original attention (what flows
    downstream), so the model's logits are the softmax model's, padding and sliding window included."""
    model = MODELS[name](layers=2)
    ref = copy.deepcopy(model)
    lk.hf.linearize(model)
    randomize_leap(model)
    ids = torch.randint(1, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for m in leap_layers(model):
        m.transfer = True
    with torch.no_grad():
        got = model(ids, attention_mask=mask, use_cache=False).logits
        want = ref(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=1e-5, rtol=1e-5)
    losses = [m.transfer_loss for m in leap_layers(model)]
    assert len(losses) == 2 and all(float(x) > 0 for x in losses)
    if name == "mistral":  # the window (4) is shorter than the prompt: it is in the teacher
        assert leap_layers(model)[0].sliding_window == 4


def test_transfer_loss_decreases_and_trains_only_the_predictors():
    model = lk.hf.linearize(llama(layers=2))
    randomize_leap(model)  # far from the softmax output to start with
    before = snapshot(model)
    log = lk.hf.transfer_attention(model, batches(), 30, lr=2e-2, progress=False)
    assert log.steps_done == 30 and not log.interrupted and len(log.history) == 30
    first, last = log.history[0], log.history[-1]
    assert set(first["layers"]) == set(last["layers"]) == {0, 1}  # per-layer losses logged
    assert abs(sum(first["layers"].values()) - first["loss"]) < 1e-6
    tail = sum(r["loss"] for r in log.history[-5:]) / 5
    assert tail < 0.95 * first["loss"], (first["loss"], tail)  # predictors only: what they can do on random weights
    for layer in (0, 1):
        assert last["layers"][layer] < first["layers"][layer]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_leap(k) for k in changed), changed
    assert set(log.trainable) == {n for n, _ in model.named_parameters() if is_leap(n)}
    # the model is left as it was found: no transfer mode, flags and mode restored
    assert all(not m.transfer and m.transfer_loss is None for m in leap_layers(model))
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_transfer_loss_with_qk_falls_far():
    model = lk.hf.linearize(llama(layers=2))
    log = lk.hf.transfer_attention(model, batches(), 30, lr=2e-2, train_qk=True, progress=False)
    losses = [r["loss"] for r in log.history]
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses
    assert any(".q_proj." in n for n in log.trainable) and not any(".v_proj." in n for n in log.trainable)


def test_transfer_train_qk_gpt2_keeps_v_columns():
    model = lk.hf.linearize(gpt2(layers=2), layers=[1])
    before = snapshot(model)
    log = lk.hf.transfer_attention(model, batches(n=1), 5, train_qk=True, progress=False)
    after = model.state_dict()
    D = model.config.n_embd
    w0, w1 = before["transformer.h.1.attn.c_attn.weight"], after["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(w0[:, 2 * D:], w1[:, 2 * D:])  # v columns untouched
    assert not torch.equal(w0[:, :2 * D], w1[:, :2 * D])  # q, k columns trained
    b0, b1 = before["transformer.h.1.attn.c_attn.bias"], after["transformer.h.1.attn.c_attn.bias"]
    assert torch.equal(b0[2 * D:], b1[2 * D:])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= {k for k in before if k.startswith("transformer.h.1.attn.") and
                       (is_leap(k) or ".c_attn." in k)}
    assert "transformer.h.0.attn.c_attn.weight" not in log.trainable  # a softmax layer: untouched
    assert set(log.history[-1]["layers"]) == {1}


def test_finetune_lora_adapters_attach_where_they_should():
    model = lk.hf.linearize(llama(layers=2), layers=[1])  # hybrid: layer 0 keeps softmax
    before = snapshot(model)
    log = lk.hf.finetune(model, batches(), 6, lora=True, lora_r=2, lr=1e-2, merge=False, progress=False)
    pm = log.model
    assert isinstance(pm, peft.PeftModel) and log.steps_done == 6
    lora_names = [n for n in log.trainable if "lora_" in n]
    # adapters on the LeaP layer's q, k, v, o projections only: not on layer 0, not on the MLP
    assert {n.split(".self_attn.")[1].split(".")[0] for n in lora_names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(".layers.1." in n for n in lora_names)
    assert not any("mlp" in n or "embed" in n for n, p in pm.named_parameters() if p.requires_grad)
    assert set(log.trainable) == set(lora_names) | {n for n, _ in pm.named_parameters() if is_leap(n)}
    assert all(not p.requires_grad for n, p in pm.named_parameters() if n not in log.trainable)
    # the pretrained weights did not move; the adapters (B starts at 0) and predictors did
    for n, p in pm.named_parameters():
        key = n.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in n or key not in before:
            continue
        if is_leap(key):
            assert not torch.equal(p, before[key]), key
        else:
            assert torch.equal(p, before[key]), key
    assert any(float(p.detach().abs().max()) > 0 for n, p in pm.named_parameters() if "lora_B" in n)
    # merging folds the adapters into the same model object, which then saves and loads as usual
    ids = batches(n=1, B=2)[0]
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    merged = pm.merge_and_unload()
    assert merged is model and not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_finetune_gpt2_lora_merged_then_saved(tmp_path):
    model = lk.hf.linearize(gpt2(layers=2))
    log = lk.hf.finetune(model, batches(), 4, progress=False)  # merge=True: the linearised model back
    assert log.model is model and isinstance(attn_modules(model)[0].c_attn, transformers.pytorch_utils.Conv1D)
    assert {n.split(".attn.")[1].split(".")[0] for n in log.trainable if "lora_" in n} == {"c_attn", "c_proj"}
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    model.save_pretrained(tmp_path)
    back = lk.hf.load(tmp_path)
    ids = batches(n=1, B=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_finetune_full_trains_everything_and_lowers_the_loss():
    model = lk.hf.linearize(llama(layers=2))
    data = batches(n=1)
    loss0 = lk.hf.evaluate_loss(model, data)
    log = lk.hf.finetune(model, data, 25, lora=False, lr=3e-3, progress=False)
    assert set(log.trainable) == {n for n, _ in model.named_parameters()}
    assert lk.hf.evaluate_loss(model, data) < loss0 - 0.3


def test_evaluate_loss_and_token_batches():
    model = lk.hf.linearize(llama())
    ids = torch.randint(1, V, (2, 10))
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
    assert abs(lk.hf.evaluate_loss(model, [ids]) - want) < 1e-5
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # padded tokens are not scored
    assert lk.hf.evaluate_loss(model, [{"input_ids": ids, "attention_mask": mask}]) > 0
    it = lk.hf.token_batches(torch.arange(50), seq_len=8, batch_size=3, seed=1)
    a, b = next(it), next(it)
    assert a.shape == (3, 8) and a.dtype == torch.long and not torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(3, 7, dtype=torch.long))  # contiguous windows
    assert torch.equal(a, next(lk.hf.token_batches(torch.arange(50), 8, 3, seed=1)))  # seeded


def test_ctrl_c_stops_after_the_step_and_keeps_it():
    model = lk.hf.linearize(llama())
    before = snapshot(model)
    data = batches(n=1)[0]

    def source():
        for i in range(100):
            if i == 3:
                signal.raise_signal(signal.SIGINT)  # as a Ctrl-C would, between steps
            yield data
    handler = signal.getsignal(signal.SIGINT)
    log = lk.hf.transfer_attention(model, source(), 100, progress=False)
    # the signal comes while step 4 fetches its batch: that step is finished, then the loop stops
    assert log.interrupted and log.steps_done == 4 and len(log.history) == 4
    assert signal.getsignal(signal.SIGINT) is handler
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if is_leap(k))  # kept
    log = lk.hf.finetune(model, iter([data] * 2), 5, progress=False)  # an iterator that runs out
    assert log.exhausted and log.steps_done == 2 and not log.interrupted


def test_bad_input_named():
    plain = llama()
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        lk.hf.transfer_attention(torch.nn.Linear(2, 2), batches(), 1)
    with pytest.raises(ValueError, match="no LeaP layers: call lk.hf.linearize"):
        lk.hf.transfer_attention(plain, batches(), 1)
    model = lk.hf.linearize(llama())
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        lk.hf.transfer_attention(model, batches(), 0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        lk.hf.finetune(model, batches(), 1, lr=float("nan"))
    with pytest.raises(TypeError, match="batches must be an iterable .* got Tensor"):
        lk.hf.transfer_attention(model, batches()[0], 1)
    with pytest.raises(ValueError, match="batches is empty"):
        lk.hf.finetune(model, [], 1)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, T\]"):
        lk.hf.transfer_attention(model, [torch.rand(2, 8)], 1, progress=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        lk.hf.finetune(model, [torch.full((2, 8), V)], 1, progress=False)
    with pytest.raises(TypeError, match="lora must be a bool"):
        lk.hf.finetune(model, batches(), 1, lora="yes")
    with pytest.raises(ValueError, match="nothing to train: attention='linear'"):
        lk.hf.transfer_attention(lk.hf.linearize(llama(), attention="linear"), batches(), 1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a PeftModel"):
        lk.hf.finetune(pm, batches(), 1)
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        lk.hf.token_batches(torch.arange(10), 1, 2)


# --------------------------------------------------------------------------- leapformer linearize
@pytest.fixture
def hf_run(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "teacher")
    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 80)
    return tmp_path


def _argv(p, *extra):
    return ["linearize", "--model", str(p / "teacher"), "--data", str(p / "text.txt"), "--out", str(p / "lin"),
            "--seq-len", "32", "--batch-size", "2", "--eval-batches", "2", "--transfer-steps", "3",
            "--finetune-steps", "3", "--no-progress", "--threads", "1", *extra]


def test_cli_linearize_end_to_end(hf_run, capsys):
    from leapformer_models.cli import main
    assert main(_argv(hf_run, "--layers", "1")) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["layers"] == [1] and "no tokenizer" in out.err  # byte ids for a folder without a tokenizer
    res = json.loads((hf_run / "lin" / "linearize.json").read_text())
    held = res["held_out_loss"]
    assert set(held) == {"softmax", "before_transfer", "after_transfer", "after_finetune"}
    assert all(v > 0 for v in held.values())
    assert len(res["transfer"]["history"]) == 3 and set(res["transfer"]["history"][-1]["layers"]) == {"1"}
    assert all(is_leap(n) for n in res["trainable"]["transfer"])
    assert (hf_run / "lin" / "linearize_loss.png").stat().st_size > 0
    model = lk.hf.load(hf_run / "lin")
    assert [type(m).__name__ for m in attn_modules(model)] == ["GPT2Attention", "LeapSelfAttention"]
    # the saved model is the fine-tuned one: its held-out loss on the command's batches is the reported one
    text = (hf_run / "text.txt").read_text()
    val = torch.tensor(list(text[int(len(text) * 0.9):].encode()))
    held_out = list(itertools.islice(lk.hf.token_batches(val, 32, 2, seed=1), 2))
    assert abs(lk.hf.evaluate_loss(model, held_out) - held["after_finetune"]) < 1e-5
    # the run refuses to overwrite, and a linearised folder is not a starting point
    assert main(_argv(hf_run)) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(["linearize", "--model", str(hf_run / "lin"), "--data", str(hf_run / "text.txt"), "--out",
                 str(hf_run / "x")]) == 2
    assert "already linearised" in capsys.readouterr().err


@pytest.mark.parametrize("extra,code,msg", [
    (["--transfer-steps", "-1"], 2, "--transfer-steps must be >= 0, got -1"),
    (["--seq-len", "500"], 2, "--seq-len 500 is longer than the model's 64 positions"),
    (["--layers", "0", "7"], 2, "--layers 7: not layer indices of this model (it has 2 layers"),
    (["--attention", "cosformer"], 2, "invalid choice"),
])
def test_cli_linearize_errors_are_one_line(hf_run, capsys, extra, code, msg):
    from leapformer_models.cli import main
    assert main(_argv(hf_run, *extra)) == code
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_linearize_unsupported_architecture(hf_run, capsys):
    from leapformer_models.cli import main
    transformers.BertModel(transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=64)
                           ).save_pretrained(hf_run / "teacher")
    capsys.readouterr()  # save_pretrained's own progress bar
    assert main(_argv(hf_run)) == 2
    err = capsys.readouterr().err.strip()
    assert "is a 'bert' model: leapformer linearize supports model_type 'gpt2'" in err and len(err.splitlines()) == 1


def test_cli_linearize_missing_model_folder(hf_run, capsys):
    from leapformer_models.cli import main
    argv = _argv(hf_run)
    argv[argv.index("--model") + 1] = str(hf_run / "nope")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "is not a save_pretrained folder" in err and len(err.splitlines()) == 1


def test_cli_linearize_ctrl_c_saves_what_was_trained(hf_run, capsys, monkeypatch):
    from leapformer_models.cli import main
    real = lk.hf.token_batches

    def interrupting(ids, seq_len, batch_size, seed=0):
        it = real(ids, seq_len, batch_size, seed=seed)
        if seed != 0:  # the held-out batches
            return it

        def gen():
            for i, b in enumerate(it):
                if i == 2:
                    signal.raise_signal(signal.SIGINT)
                yield b
        return gen()
    monkeypatch.setattr(lk.hf, "token_batches", interrupting)
    assert main(_argv(hf_run, "--transfer-steps", "50")) == 130
    assert "attention transfer stopped after step 3 of 50" in capsys.readouterr().err
    res = json.loads((hf_run / "lin" / "linearize.json").read_text())
    assert res["interrupted"] == "attention transfer, after step 3" and len(res["transfer"]["history"]) == 3
    back = lk.hf.load(hf_run / "lin")  # the partly transferred model was saved
    assert len(leap_layers(back)) == 2


def test_linearize_demo_quick(tmp_path):
    """The demo behind the README table runs end to end at tiny sizes (python -m benchmarks.linearize_demo
    --quick): teacher, leapformer linearize, decode timing, md / json / png."""
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import linearize_demo
    assert linearize_demo.main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "linearize_demo.json").read_text())
    assert set(res["held_out_loss"]) == {"softmax", "before_transfer", "after_transfer", "after_finetune"}
    assert set(res["decode_ms_per_token"]) == {64, 256} or set(res["decode_ms_per_token"]) == {"64", "256"}
    assert all(v["softmax"] > 0 and v["leap"] > 0 for v in res["decode_ms_per_token"].values())
    md = (tmp_path / "linearize_demo.md").read_text()
    assert "| softmax teacher |" in md and "after LoRA fine-tuning" in md and res["device"] in md
    assert (tmp_path / "linearize_demo.png").stat().st_size > 0
    assert lk.hf.load(tmp_path / "work" / "linearised").config.leapformer["layers"] == [0, 1]

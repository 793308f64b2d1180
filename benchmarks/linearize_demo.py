"""Linearisation end to end on a CPU, with a teacher trained here (no weights can be downloaded).

    python -m benchmarks.linearize_demo            # about 10-15 minutes on 2 cores
    python -m benchmarks.linearize_demo --quick    # a smoke test: tiny sizes, a scratch folder

1. the teacher: a small softmax GPT-2 (``transformers.GPT2LMHeadModel`` from a ``GPT2Config``: 4
   layers, width 128, 4 heads, UTF-8 bytes) trained on the Python docs corpus (``pydoc_data.topics``)
   with the zoo's tooling (corpus, split, byte tokenizer, warm-up + cosine schedule, AdamW groups,
   thread choice, tqdm bar, Ctrl-C handling), saved with ``save_pretrained``;
2. ``leapformer linearize`` on that folder and the same text (the command's own code): every layer
   becomes LeaP attention, attention transfer (LeaP predictors only), LoRA fine-tuning (adapters on
   the attention projections + the LeaP predictors, merged);
3. decode speed, ms per new token at batch 1 after a prompt of 512 and of 4096 tokens: the teacher
   with its KV cache, the linearised model (``lk.hf.load``) with its (S, z) state.

Writes benchmarks/results/linearize_demo.md / .json / .png (``--out``). Ctrl-C while the teacher
trains saves it (``<work>/teacher``) and stops; during linearisation the command saves what it trained.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def device_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def train_teacher(args, work):
    """The softmax GPT-2 teacher on the pydoc corpus; returns (folder, history, seconds, params)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from leapformer_models.data import ByteTokenizer, encode_corpus, load_text, split_text
    from leapformer_kernels._training import StopRequest
    from leapformer_models.train import TrainConfig, lr_at, make_optimizer
    torch.manual_seed(args.seed)
    tok = ByteTokenizer()
    train_text, val_text = split_text(load_text(None), 0.1)
    train_ids, val_ids = encode_corpus(tok, train_text), encode_corpus(tok, val_text)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
                     n_positions=max(args.contexts) + args.decode_tokens + 8, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    tcfg = TrainConfig(steps=args.teacher_steps, lr=args.teacher_lr, warmup=max(1, args.teacher_steps // 20),
                       batch_size=args.batch_size, weight_decay=0.1)
    opt = make_optimizer(model, tcfg)
    gen = torch.Generator().manual_seed(args.seed)
    val_gen_seed = args.seed + 1

    def batch(ids, g):
        ix = torch.randint(0, len(ids) - args.seq_len, (args.batch_size,), generator=g)
        return torch.stack([ids[i:i + args.seq_len] for i in ix.tolist()])

    @torch.no_grad()
    def val_loss():
        model.eval()
        g = torch.Generator().manual_seed(val_gen_seed)
        out = sum(float(model(input_ids=(x := batch(val_ids, g)), labels=x).loss) for _ in range(4)) / 4
        model.train()
        return out

    history = [{"step": 0, "train_loss": None, "val_loss": val_loss()}]
    folder = os.path.join(work, "teacher")
    from tqdm import tqdm
    bar = tqdm(total=args.teacher_steps, desc="softmax teacher (GPT-2)", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    with StopRequest() as stop:
        try:
            for step in range(args.teacher_steps):
                if stop.signal is not None:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr_at(tcfg, step)
                x = batch(train_ids, gen)
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                row = {"step": step + 1, "train_loss": loss.item(), "val_loss": None}
                if (step + 1) % max(1, args.teacher_steps // 10) == 0 or step + 1 == args.teacher_steps:
                    row["val_loss"] = val_loss()
                history.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", refresh=False)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        model.eval().save_pretrained(folder)
        if stop.signal is not None:
            print(f"\ninterrupted: the teacher (step {len(history) - 1}) is saved in {folder}", file=sys.stderr)
            sys.exit(130)
    return folder, history, seconds, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def decode_ms(model, context: int, tokens: int, seed: int = 0) -> float:
    """Median ms per new token (batch 1, greedy, the model's cache) after a prompt of ``context`` tokens."""
    import inspect

    from transformers import DynamicCache
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (1, context), generator=g)
    cache = DynamicCache()
    # transformers >= 5.2x calls the argument `cache` (past_key_values is deprecated there)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{key: cache})
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{key: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:] if len(times) > 4 else times)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.linearize_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, results in a scratch folder (a smoke test)")
    p.add_argument("--out", default=None, help="folder for linearize_demo.md/.json/.png (default benchmarks/results)")
    p.add_argument("--work", default=None, help="folder for the teacher and the linearised model "
                   "(default: runs/linearize_demo)")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--transfer-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=250)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="teacher batch (linearisation: half)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--decode-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        import tempfile
        scratch = tempfile.mkdtemp(prefix="linearize_demo_")
        args.out = args.out or scratch
        args.work = args.work or scratch
        args.teacher_steps, args.transfer_steps, args.finetune_steps = 20, 5, 5
        args.layers, args.width, args.seq_len, args.batch_size = 2, 32, 64, 4
        args.contexts, args.decode_tokens = [64, 256], 4
    out = args.out or os.path.join(HERE, "results")
    work = args.work or os.path.join("runs", "linearize_demo")
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    from leapformer_models.cli import plot_linearize, run_linearize
    from leapformer_models.data import load_text
    from leapformer_models.train import attention_backend, auto_threads
    import transformers

    import leapformer_kernels as lk
    threads = auto_threads()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    try:  # the C++ CPU kernels: cached, or built once now (about 1-3 minutes on 2 cores), not mid-measurement
        lk.build()
    except Exception as e:  # noqa: BLE001 - a failed build: the torch backend runs instead
        print(f"linearize_demo: C++ build failed ({str(e).strip().splitlines()[-1][:120] if str(e).strip() else e}); "
              "LeaP runs on the torch backend", file=sys.stderr)
    build_s = time.perf_counter() - t0
    folder, teacher_history, teacher_s, params = train_teacher(args, work)
    data = os.path.join(work, "pydoc_topics.txt")
    with open(data, "w") as f:
        f.write(load_text(None))
    lin_dir = os.path.join(work, "linearised")
    t0 = time.perf_counter()
    code, res = run_linearize(["--model", folder, "--data", data, "--out", lin_dir, "--overwrite", "--tokenizer", "byte",
                               "--transfer-steps", str(args.transfer_steps), "--finetune-steps", str(args.finetune_steps),
                               "--seq-len", str(args.seq_len), "--batch-size", str(max(1, args.batch_size // 2)),
                               "--eval-batches", "8", "--threads", str(threads), "--seed", str(args.seed)],
                              teacher_history=teacher_history)
    linearize_s = time.perf_counter() - t0
    if code:
        sys.exit(code)
    teacher = transformers.GPT2LMHeadModel.from_pretrained(folder)
    student = lk.hf.load(lin_dir)
    decode = {}
    for ctx in args.contexts:
        decode[ctx] = {"softmax": decode_ms(teacher, ctx, args.decode_tokens),
                       "leap": decode_ms(student, ctx, args.decode_tokens)}
        print(f"decode after {ctx} tokens: softmax {decode[ctx]['softmax']:.2f} ms/token, "
              f"LeaP {decode[ctx]['leap']:.2f} ms/token", file=sys.stderr)
    total_s = time.perf_counter() - t_all
    held = res["held_out_loss"]
    result = {
        "device": device_name(), "threads": threads, "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "cores": os.cpu_count(),
        "leap_backend": attention_backend("cpu").replace("_backend", ""), "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "teacher": {"config": {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads,
                               "vocab": 256, "n_positions": max(args.contexts) + args.decode_tokens + 8},
                    "params": params, "steps": args.teacher_steps, "batch": [args.batch_size, args.seq_len],
                    "seconds": teacher_s, "history": teacher_history},
        "held_out_loss": held, "held_out": f"{res['eval_batches']} batches of {res['batch_size']} x {res['seq_len']} "
                                          "bytes from the last 10% of the corpus",
        "linearize": {k: res[k] for k in ("layers", "attention", "trainable", "seconds", "transfer", "finetune")},
        "linearize_seconds": linearize_s, "decode_ms_per_token": decode, "decode_tokens": args.decode_tokens,
        "kernel_build_seconds": build_s, "total_seconds": total_s, "quick": args.quick,
    }
    with open(os.path.join(out, "linearize_demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_linearize(res, os.path.join(out, "linearize_demo.png"),
                   f"GPT-2 ({args.layers} layers, width {args.width}) on pydoc bytes: softmax teacher -> LeaP",
                   teacher_history)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    cl = " | ".join(f"decode ms/token @ {c}" for c in args.contexts)
    lines = [
        f"Linearisation end to end (`python -m benchmarks.linearize_demo`{' --quick' if args.quick else ''}) on "
        f"{result['device']}, {os.cpu_count()} cores, {threads} torch thread(s), LeaP backend "
        f"`{result['leap_backend']}`; the machine was shared with other "
        f"jobs (1-min load average {load_start[0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end), "
        f"so times are indicative. Teacher: GPT-2, {args.layers} layers, width {args.width}, {args.heads} heads, "
        f"bytes, {params / 1e6:.2f} M parameters, {args.teacher_steps} steps of {args.batch_size} x {args.seq_len} "
        f"({teacher_s:.0f} s); attention transfer {args.transfer_steps} steps and LoRA fine-tuning (r 8) "
        f"{args.finetune_steps} steps of {max(1, args.batch_size // 2)} x {args.seq_len} (transfer "
        f"{res['transfer'].get('seconds', 0):.0f} s, fine-tuning {res['finetune'].get('seconds', 0):.0f} s; "
        f"{linearize_s:.0f} s with evaluations); {total_s / 60:.1f} min in all"
        + (f", {build_s / 60:.1f} min of which a one-time build of the C++ CPU kernels (the kernel cache missed)"
           if build_s > 20 else "") + f". Held-out loss: next-token cross-entropy, nats per byte, "
        f"{result['held_out']}. Decode: batch 1, median of {args.decode_tokens} greedy steps after a random prompt "
        "(softmax: KV cache; LeaP: (S, z) state).",
        "",
        f"| model | held-out loss | {cl} |",
        "|---|---|" + "---|" * len(args.contexts),
        f"| softmax teacher | {fmt(held.get('softmax'))} | "
        + " | ".join(f"{decode[c]['softmax']:.2f}" for c in args.contexts) + " |",
        f"| linearised (LeaP), before transfer | {fmt(held.get('before_transfer'))} | " + " | ".join("" for _ in
                                                                                                    args.contexts) + " |",
        f"| linearised, after attention transfer | {fmt(held.get('after_transfer'))} | "
        + " | ".join("" for _ in args.contexts) + " |",
        f"| linearised, after LoRA fine-tuning | {fmt(held.get('after_finetune'))} | "
        + " | ".join(f"{decode[c]['leap']:.2f}" for c in args.contexts) + " |",
    ]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "linearize_demo.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {out}/linearize_demo.md, .json, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

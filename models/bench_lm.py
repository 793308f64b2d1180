"""Compare ``leapformer-lm`` with LeaP and with softmax attention under the same budget.

    python -m leapformer_models.bench_lm --steps 300 --threads 1 --out benchmarks/results

Trains both with the same TrainConfig (same seed, same batches, same steps; no time limit),
then writes ``lm_leap_vs_softmax.png`` (train and validation loss curves),
``lm_leap_vs_softmax.md`` (table) and ``lm_leap_vs_softmax.json`` into --out. The runs'
checkpoints go to --runs.
"""
import argparse
import json
import os
import platform

import torch

from .train import TrainConfig, evaluate, load_model, plot_losses, prepare_data, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--final-eval-batches", type=int, default=40)
    p.add_argument("--device-label", default="2-core CPU, shared with other jobs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runs", default="runs/bench")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results, histories = {}, {}
    for att in ("leap", "softmax"):
        cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, eval_interval=a.eval_interval,
                          ckpt_interval=a.steps, threads=a.threads, time_limit=None,
                          out=os.path.join(a.runs, f"lm-{att}"))
        s = train(cfg, {"attention": att, "seq_len": a.seq_len})
        model, tok, ck = load_model(s["checkpoint"])
        _, _, val = prepare_data(cfg, tok)
        s["final_val_loss_full"] = evaluate(model, val, a.final_eval_batches, a.batch_size, seed=12345)
        results[att] = s
        histories[f"{att}"] = json.load(open(os.path.join(cfg.out, "metrics.json")))["history"]
    base = os.path.join(a.out, "lm_leap_vs_softmax")
    plot_losses(histories, base + ".png", f"leapformer-lm on pydoc text, {a.steps} steps, {a.device_label}")
    lines = [
        "# leapformer-lm: LeaP vs softmax attention",
        "",
        f"Device: {a.device_label} ({platform.machine()}, torch {torch.__version__}, {a.threads} thread(s)). "
        f"Same budget for both: {a.steps} steps of {a.batch_size} x {a.seq_len} byte tokens, same seed and "
        "batches; pydoc_data.topics corpus (last 10% = validation), model "
        f"{results['leap']['model_config']['n_layer']} layers x {results['leap']['model_config']['n_embd']} wide.",
        f"Validation loss in nats per byte over {a.final_eval_batches} fixed batches of the validation text.",
        "Tokens/s: training tokens over the time spent in training steps (not evaluation); the machine is "
        "shared, so absolute speeds move with the other jobs' load.",
        "",
        "| attention | attention backend | params | val loss | bits/byte | train tokens/s | train time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for att, s in results.items():
        v = s["final_val_loss_full"]
        lines.append(f"| {att} | {s['attention_backend'] if att == 'leap' else 'torch SDPA'} | {s['params']:,} | "
                     f"{v:.3f} | {v / 0.6931471805599453:.3f} | {s['tokens_per_s']:,.0f} | {s['train_time_s']:.0f} |")
    lines += ["", f"Loss curves: `{os.path.basename(base)}.png`. Reproduce: "
              f"`python -m leapformer_models.bench_lm --steps {a.steps} --threads {a.threads}`.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Accuracy against latency of ``leapformer-stream`` for wait-k, k in {1, 3, 5, 9, full}.

    python -m leapformer_models.stream_table [--steps 600] [--time-limit 100] [--attention leap]

Trains one model per k on the generated stream task (each run: at most ``--steps`` steps and
``--time-limit`` seconds of training), then decodes the validation split simultaneously (source
block by block, targets by the policy) and reports the accuracy beside chance and beside the best
accuracy the policy's reads allow, and the average lagging (source tokens, reads rounded up to
encoder blocks). Writes ``<out>/stream_waitk.{md,json,png}`` (default ``benchmarks/results``).
"""
import argparse
import json
import os
import platform
import time

import torch

from .stream_task import STREAM_SYMBOLS, policy_ceiling
from .tasks import accuracy, task_data
from .train import TrainConfig, train

KS = ("1", "3", "5", "9", "full")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default=",".join(KS), help="comma list of k values (full = the whole source first)")
    p.add_argument("--attention", default="leap")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--time-limit", type=float, default=100.0, help="seconds of training per k")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches for the accuracy")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-label", default="2-core CPU shared with other jobs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runs", default="runs/stream_table")
    a = p.parse_args(argv)
    rows = []
    for k in a.ks.split(","):
        over = dict(attention=a.attention, wait_k=None if k == "full" else int(k))
        t0 = time.perf_counter()
        s, model = train(TrainConfig(model="leapformer-stream", steps=a.steps, batch_size=a.batch_size,
                                     eval_interval=100, eval_batches=4, threads=a.threads, time_limit=a.time_limit,
                                     device=a.device, out=os.path.join(a.runs, f"k{k}-{a.attention}"),
                                     progress=False, log_interval=100), over, overwrite=True, return_model=True)
        wall = time.perf_counter() - t0
        c = model.config
        val = task_data("stream", {})[2]
        acc = accuracy(model, val, a.eval_batches, a.batch_size, seed=12345)
        reads = model.reads(c.src_len)
        rows.append({"k": k, "accuracy": acc, "chance": 1 / STREAM_SYMBOLS,
                     "ceiling": policy_ceiling(c.src_len, c.rate, c.max_delay, reads),
                     "average_lagging": model.average_lagging(), "val_loss": s["final_val_loss"], "steps": s["steps"],
                     "train_time_s": s["train_time_s"], "wall_s": wall, "params": s["params"],
                     "model_config": s["model_config"]})
        print(json.dumps({x: rows[-1][x] for x in ("k", "accuracy", "ceiling", "average_lagging", "steps",
                                                   "train_time_s")}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, "stream_waitk")
    c = rows[0]["model_config"]
    device = (f"{a.device_label} ({platform.machine()}, torch {torch.__version__}, {a.threads} thread(s), "
              f"device {a.device})")
    with open(base + ".json", "w") as f:
        json.dump({"device": device, "attention": a.attention, "steps": a.steps, "time_limit_s": a.time_limit,
                   "batch_size": a.batch_size, "eval_targets": a.eval_batches * a.batch_size * c["src_len"] // c["rate"],
                   "rows": rows}, f, indent=1)
    lines = [f"# leapformer-stream: wait-k accuracy against average lagging ({a.attention} attention)", "",
             f"Device: {device}. Budget per k: at most {a.steps} steps of {a.batch_size} examples and "
             f"{a.time_limit:g} s of training. Task: S = {c['src_len']} source tokens, rate {c['rate']} "
             f"(T = {c['src_len'] // c['rate']} targets), max delay {c['max_delay']}, {STREAM_SYMBOLS} symbols; "
             f"encoder block W = {c['block_size']}; model {c['n_enc_layer']} + {c['n_dec_layer']} layers x "
             f"{c['n_embd']} wide ({rows[0]['params']:,} parameters). Accuracy: greedy simultaneous decoding "
             f"of {a.eval_batches * a.batch_size} validation streams, every target token scored. Ceiling: the best "
             "accuracy the policy's reads allow (target known once its source token is read, else chance). "
             "AL: average lagging in source tokens, reads rounded up to blocks.", "",
             "| k | accuracy | chance | ceiling | AL (source tokens) | steps | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['accuracy']:.3f} | {r['chance']:.3f} | {r['ceiling']:.3f} | "
                     f"{r['average_lagging']:.2f} | {r['steps']} | {r['train_time_s']:.0f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    al = [r["average_lagging"] for r in rows]
    ax.plot(al, [r["accuracy"] for r in rows], "o-", label=f"accuracy ({a.attention})")
    ax.plot(al, [r["ceiling"] for r in rows], "s--", alpha=0.6, label="ceiling of the policy's reads")
    ax.axhline(1 / STREAM_SYMBOLS, color="gray", ls=":", label="chance")
    for r in rows:
        ax.annotate(f"k={r['k']}", (r["average_lagging"], r["accuracy"]), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel("average lagging (source tokens)")
    ax.set_ylabel("target accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"leapformer-stream, wait-k, W = {c['block_size']}")
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

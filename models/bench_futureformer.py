"""Does FutureFormer's future loss help? ``futureformer`` with the future loss on and off, with LeaP
and with softmax attention, under one budget.

    python -m leapformer_models.bench_futureformer --steps 100 --threads 1 --out benchmarks/results

Four runs with the same TrainConfig (seed, batches, steps; no time limit): attention in
{leap, softmax} x fs_lambda in {--fs-lambda, 0} (0: next-token loss only; the future blocks still
run and are read, so the architecture and parameters are the same). The comparison is the
validation **next-token** loss (the future terms left out, so runs with and without them are
scored alike), over fixed batches of the held-out text. Writes ``futureformer_future_loss.png``
(validation next-token loss curves), ``.md`` (table) and ``.json`` into --out; checkpoints go to
--runs.
"""
import argparse
import json
import os
import platform

import torch
from tqdm.auto import tqdm

from .bench_util import LN2, add_run_args, plot_curves, train_with_curve
from .futureformer import future_windows
from .train import TrainConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=100, eval_interval=20, final_batches=24, curve_batches=6, runs="runs/bench-futureformer")
    p.add_argument("--fs-lambda", type=float, default=0.5)
    p.add_argument("--fs-target", default="mean")
    p.add_argument("--fs-windows", default="nested")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results, curves = {}, {}
    cases = [(att, w) for att in ("leap", "softmax") for w in (a.fs_lambda, 0.0)]
    for att, w in tqdm(cases, desc="futureformer runs", unit="run"):
        label = f"{att}, future loss {'on' if w else 'off'}"
        cfg = TrainConfig(model="futureformer", steps=a.steps, batch_size=a.batch_size,
                          eval_interval=a.eval_interval, eval_batches=2, ckpt_interval=a.steps, threads=a.threads,
                          time_limit=None, progress=False,
                          out=os.path.join(a.runs, f"{att}-future{'on' if w else 'off'}"))
        over = {"attention": att, "seq_len": a.seq_len, "fs_lambda": w, "fs_target": a.fs_target,
                "fs_windows": a.fs_windows}
        s, steps, vals, terms = train_with_curve(cfg, over, a.eval_interval, a.curve_eval_batches,
                                                 a.final_eval_batches)
        s["final_val_terms"] = terms
        s["curve"] = {"step": steps, "val_next_token": vals, "batches": a.curve_eval_batches}
        results[label] = s
        curves[label] = (steps, vals)
    base = os.path.join(a.out, "futureformer_future_loss")
    plot_curves(curves, base + ".png", f"futureformer on pydoc text, {a.steps} steps of {a.batch_size} x {a.seq_len}, "
          f"{a.device_label}")
    first = next(iter(results.values()))["model_config"]
    windows = ", ".join(f"{a_}..{b_}" for a_, b_ in future_windows(first["fs_windows"], first["fs_periods"],
                                                                   first["fs_mult"]))

    target = ("multi-hot of the window's tokens with BCE" if first["fs_target"] == "bce" else
              f"{first['fs_target']} of the normed embeddings with {first['fs_loss']}")

    def fut(t):
        return " / ".join(f"{t[f'future_{k}']:.3f}" for k in range(1, first["fs_periods"] + 1))
    lines = [
        "# FutureFormer: does the future loss help?",
        "",
        f"Device: {a.device_label} ({platform.machine()}, torch {torch.__version__}, {a.threads} thread(s)). "
        f"Same budget for every row: {a.steps} steps of {a.batch_size} x {a.seq_len} byte tokens, same seed and "
        f"batches, pydoc_data.topics (last 10% = validation); model {first['n_layer']} blocks x {first['n_embd']} wide "
        f"({first['n_head']} query heads, {first['n_kv_head']} key/value head), {first['fs_periods']} "
        f"{first['fs_windows']} future windows {windows} (offsets from the position; 1 = the next token), target: "
        + target + f", weights lambda^k with lambda = {a.fs_lambda:g} when on.",
        f"Validation next-token loss in nats per byte over {a.final_eval_batches} fixed batches of the validation "
        "text (the future terms are not counted, so rows with and without them are scored alike; the val future "
        "losses of the off rows are those of untrained predictions, for reference).",
        "",
        "| attention | future loss | params | val next-token loss | bits/byte | val future loss per window "
        "(finest first) | train tokens/s | train time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in results.items():
        t = s["final_val_terms"]
        att, w = label.split(", ")
        lines.append(f"| {att} | {w.split()[-1]} | {s['params']:,} | {t['next_token']:.3f} | "
                     f"{t['next_token'] / LN2:.3f} | {fut(t)} | {s['tokens_per_s']:,.0f} | "
                     f"{s['train_time_s']:.0f} |")
    on_off = {att: [results[f"{att}, future loss {x}"]["final_val_terms"]["next_token"] for x in ("on", "off")]
              for att in ("leap", "softmax")}
    lines += ["", "Future loss on minus off (val next-token loss): " + ", ".join(
        f"{att} {v[0] - v[1]:+.3f}" for att, v in on_off.items()) + " nats/byte."]
    lines += ["", f"Curves: `{os.path.basename(base)}.png` (each point over the same first {a.curve_eval_batches} of "
              "those batches). Reproduce: "
              f"`python -m leapformer_models.bench_futureformer --steps {a.steps} --threads {a.threads} "
              f"--fs-lambda {a.fs_lambda:g} --fs-target {a.fs_target} --fs-windows {a.fs_windows}`.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in results.items()}, f, indent=1,
                  default=str)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

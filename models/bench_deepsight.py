"""Does DeepSight's planning loss help? ``deepsight`` with the planning loss on and off, with LeaP and
with softmax attention, under one budget.

    python -m leapformer_models.bench_deepsight --steps 250 --threads 1 --out benchmarks/results

Four runs with the same TrainConfig (seed, batches, steps; no time limit): attention in
{leap, softmax} x plan_weight in {1, 0}. The comparison is the validation **next-token** loss
(the planning term left out, so runs with and without it are scored alike), over fixed batches of
the held-out text. Writes ``deepsight_plan.png`` (validation next-token loss curves),
``deepsight_plan.md`` (table) and ``deepsight_plan.json`` into --out; checkpoints go to --runs.
"""
import argparse
import json
import os
import platform

import torch
from tqdm.auto import tqdm

from .bench_util import LN2, add_run_args, plot_curves, train_with_curve
from .train import TrainConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, steps=250, eval_interval=50, final_batches=40, curve_batches=10, runs="runs/bench-deepsight")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results, curves = {}, {}
    cases = [(att, w) for att in ("leap", "softmax") for w in (1.0, 0.0)]
    for att, w in tqdm(cases, desc="deepsight runs", unit="run"):
        label = f"{att}, plan {'on' if w else 'off'}"
        cfg = TrainConfig(model="deepsight", steps=a.steps, batch_size=a.batch_size, eval_interval=a.eval_interval,
                          ckpt_interval=a.steps, threads=a.threads, time_limit=None, progress=False,
                          out=os.path.join(a.runs, f"{att}-plan{int(w)}"))
        over = {"attention": att, "seq_len": a.seq_len, "plan_weight": w}
        s, steps, vals, terms = train_with_curve(cfg, over, a.eval_interval, a.curve_eval_batches,
                                                 a.final_eval_batches)
        s["final_val_terms"] = terms
        s["curve"] = {"step": steps, "val_next_token": vals, "batches": a.curve_eval_batches}
        results[label] = s
        curves[label] = (steps, vals)
    base = os.path.join(a.out, "deepsight_plan")
    plot_curves(curves, base + ".png", f"deepsight on pydoc text, {a.steps} steps of {a.batch_size} x {a.seq_len}, "
          f"{a.device_label}")
    first = next(iter(results.values()))["model_config"]
    lines = [
        "# DeepSight: does the planning loss help?",
        "",
        f"Device: {a.device_label} ({platform.machine()}, torch {torch.__version__}, {a.threads} thread(s)). "
        f"Same budget for every row: {a.steps} steps of {a.batch_size} x {a.seq_len} byte tokens, same seed and "
        f"batches, pydoc_data.topics (last 10% = validation); model {first['n_encoder_layer']} encoder + "
        f"{first['n_decoder_layer']} decoder layers x {first['n_embd']} wide, plan horizon F = "
        f"{first['plan_horizon']}, {first['plan_loss']} planning loss.",
        f"Validation next-token loss in nats per byte over {a.final_eval_batches} fixed batches of the validation "
        "text (the planning term is not counted, so rows with and without it are scored alike).",
        "",
        "| attention | planning loss | params | val next-token loss | bits/byte | val plan loss | train tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in results.items():
        t = s["final_val_terms"]
        att, w = label.split(", ")
        lines.append(f"| {att} | {w.split()[-1]} | {s['params']:,} | {t['next_token']:.3f} | "
                     f"{t['next_token'] / LN2:.3f} | {t['plan']:.3f} | {s['tokens_per_s']:,.0f} |")
    lines += ["", f"Curves: `{os.path.basename(base)}.png` (every point over the same first {a.curve_eval_batches} of "
              "those batches). Reproduce: "
              f"`python -m leapformer_models.bench_deepsight --steps {a.steps} --threads {a.threads}`.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in results.items()}, f, indent=1,
                  default=str)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

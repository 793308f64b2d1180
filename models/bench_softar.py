"""softAR's collapse policies: how often the threshold policy collapses and what feeding soft vectors
back does to the validation loss; LeaP vs softmax attention under one budget.

    python -m leapformer_models.bench_softar --steps 150 --threads 1 --out benchmarks/results

Two training runs with the same TrainConfig (seed, batches, steps; no time limit): ``softar`` with
attention in {leap, softmax}. Each is scored on the held-out text in two ways:

- teacher-forced (the training setting): next-token cross-entropy of ``y @ E^T`` and the MSE of y
  against the next token's embedding, over fixed validation batches;
- free-running: N fixed validation windows, the first P tokens as a hard prompt, then K steps of
  generation that feed the model's own outputs back by a collapse policy (``never``: the soft
  vector y; ``always``: the embedding of its nearest token by cosine; ``threshold`` t: collapse
  where the cosine distance 1 - max cos exceeds t); at step j the output is scored against the
  true token P + j (cross-entropy of y @ E^T, MSE, and whether the collapsed token is the true
  one). ``teacher`` feeds the true tokens instead (the same positions, teacher-forced): the
  distance from it is what the model's own context costs. The collapse rate is the fraction of
  fed-back vectors that were collapsed.

Writes ``softar.md`` (tables), ``softar.json`` and ``softar.png`` (validation curves; free-running
cross-entropy by step) into --out; checkpoints go to --runs.
"""
import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from .train import TrainConfig, evaluate_terms, load_model, prepare_data, train

LN2 = 0.6931471805599453


@torch.no_grad()
def free_running(model, windows: torch.Tensor, prompt_len: int, policy: str, threshold: float = 0.0,
                 batch: int = 32) -> dict:
    """Score K = windows.shape[1] - prompt_len generated steps against the true continuation.

    windows [N, P + K] token ids. policy: teacher | never | always | threshold. Returns per-step
    means (lists of K) of the cross-entropy, the MSE and the top-1 accuracy of the collapsed
    token, the collapse rate of the fed-back vectors (over the K - 1 that are fed back), and the
    cosine distances of the outputs (for quantiles)."""
    P = prompt_len
    K = windows.shape[1] - P
    E = model.tok_emb.weight
    ce, mse, acc, coll, dist = [], [], [], [], []
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        truth = w[:, P:]
        if policy == "teacher":
            y, _ = model.run(model.tok_emb(w[:, :P + K - 1]))
            y = y[:, P - 1:]
            _, d = model.collapse(y)
            c = torch.zeros(w.shape[0], K, dtype=torch.bool)
        else:
            r = model.rollout(w[:, :P], K, policy, threshold)
            y, d, c = r["y"], r["distance"], r["collapsed"]
        logits = model.logits(y).float()
        ce.append(F.cross_entropy(logits.transpose(1, 2), truth, reduction="none"))
        mse.append(((y - E[truth]) ** 2).mean(-1))
        acc.append((model.collapse(y)[0] == truth).float())
        coll.append(c[:, :-1].float())
        dist.append(d)
    ce, mse, acc, coll, dist = (torch.cat(t, 0) for t in (ce, mse, acc, coll, dist))
    return {"ce_by_step": ce.mean(0).tolist(), "ce": float(ce.mean()), "mse": float(mse.mean()),
            "accuracy": float(acc.mean()), "collapse_rate": float(coll.mean()) if coll.numel() else 0.0,
            "distance_quantiles": {str(q): float(dist.float().quantile(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
            "distances": dist.flatten().tolist()}


def _windows(val: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, len(val) - length, (n,), generator=g)
    return torch.stack([val[i:i + length] for i in ix.tolist()])


def _plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for att, r in results.items():
        axes[0].plot(*zip(*r["val_history"]), marker="o", ms=3, label=att)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("validation loss (CE + MSE, teacher-forced)")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    for ax, (att, r) in zip(axes[1:], results.items()):
        for label, fr in r["free_running"].items():
            ax.plot(range(1, len(fr["ce_by_step"]) + 1), fr["ce_by_step"], label=label)
        ax.set_xlabel("generated step j (1 = predicted from the prompt alone)")
        ax.set_ylabel("cross-entropy of the true token (nats/byte)")
        ax.set_title(f"{att}: free-running by policy", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=20, help="teacher-forced validation batches")
    p.add_argument("--rollouts", type=int, default=64, help="free-running validation windows")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-steps", type=int, default=32)
    p.add_argument("--threshold-quantiles", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                   help="threshold policies at these quantiles of the cosine distances seen under policy never")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.5], help="threshold policies at fixed distances")
    p.add_argument("--device-label", default="2-core CPU, shared with other jobs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runs", default="runs/bench-softar")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(a.threads)
    results = {}
    for att in ("leap", "softmax"):
        cfg = TrainConfig(model="softar", steps=a.steps, batch_size=a.batch_size, eval_interval=a.eval_interval,
                          ckpt_interval=a.steps, threads=a.threads, time_limit=None, progress=False,
                          out=os.path.join(a.runs, att))
        t0 = time.perf_counter()
        s = train(cfg, {"attention": att, "seq_len": a.seq_len, "window": a.window}, overwrite=True)
        wall = time.perf_counter() - t0
        model, tok, ckpt = load_model(s["checkpoint"])
        history = [(row["step"], row["val_loss"]) for row in ckpt["history"] if row["val_loss"] is not None]
        _, _, val = prepare_data(cfg, tok)
        tf = evaluate_terms(model, val, a.val_batches, a.batch_size, seed=12345)
        wins = _windows(val, a.rollouts, a.prompt_len + a.gen_steps, seed=4321)
        fr = {pol: free_running(model, wins, a.prompt_len, pol) for pol in ("teacher", "never", "always")}
        seen = torch.tensor(fr["never"]["distances"])
        thresholds = [(f"threshold q{round(100 * q)}", float(seen.quantile(q))) for q in a.threshold_quantiles]
        thresholds += [(f"threshold {t:g}", t) for t in a.thresholds]
        for label, thr in thresholds:
            fr[label] = {"threshold": thr, **free_running(model, wins, a.prompt_len, "threshold", thr)}
        for f in fr.values():
            f.pop("distances")
        results[att] = {"train": s, "train_wall_s": wall, "val_history": history, "teacher_forced": tf,
                        "free_running": fr}
        print(att, json.dumps({"teacher_forced": tf, "free_running": {k: {kk: vv for kk, vv in v.items()
                                                                          if kk != "ce_by_step"}
                                                                      for k, v in fr.items()}}, indent=1))
    base = os.path.join(a.out, "softar")
    cfg0 = results["leap"]["train"]["model_config"]
    title = (f"softar on pydoc text, {a.steps} steps of {a.batch_size} x {a.seq_len}, window {a.window}, "
             f"{a.device_label}")
    _plot(results, base + ".png", title)
    lines = [
        "# softAR: collapse policies, LeaP vs softmax",
        "",
        f"Device: {a.device_label} ({platform.machine()}, torch {torch.__version__}, {a.threads} thread(s)). "
        f"Same budget for both attentions: {a.steps} steps of {a.batch_size} x {a.seq_len} byte tokens, same seed "
        f"and batches, pydoc_data.topics (last 10% = validation); model {cfg0['n_layer']} layers x "
        f"{cfg0['n_embd']} wide, window W = {cfg0['window']}, loss = {cfg0['ce_weight']:g} x CE + "
        f"{cfg0['mse_weight']:g} x MSE.",
        "",
        f"Teacher-forced, over {a.val_batches} fixed validation batches (CE in nats per byte; MSE per dimension, "
        "the embedding starts at unit variance):",
        "",
        "| attention | params | val CE | bits/byte | val MSE | train tokens/s | train wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for att, r in results.items():
        s, tf = r["train"], r["teacher_forced"]
        lines.append(f"| {att} | {s['params']:,} | {tf['next_token']:.3f} | {tf['next_token'] / LN2:.3f} | "
                     f"{tf['mse']:.3f} | {s['tokens_per_s']:,.0f} | {r['train_wall_s']:.0f} |")
    lines += [
        "",
        f"Free-running, {a.rollouts} fixed validation windows: a {a.prompt_len}-byte hard prompt, then "
        f"{a.gen_steps} generated steps fed back by the policy, each scored against the true next byte "
        "(means over the steps; `teacher` feeds the true bytes at the same positions). Collapse rate: the "
        "fraction of fed-back vectors that were collapsed to their nearest token.",
        "",
        "| attention | policy | threshold | collapse rate | CE | MSE | top-1 of the collapsed token |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for att, r in results.items():
        for label, f in r["free_running"].items():
            rate = "-" if label == "teacher" else f"{f['collapse_rate']:.1%}"
            thr = f"{f['threshold']:.4f}" if "threshold" in f else "-"
            lines.append(f"| {att} | {label} | {thr} | {rate} | {f['ce']:.3f} | {f['mse']:.3f} | "
                         f"{f['accuracy']:.1%} |")
    lines += ["", "Cosine distance of the outputs to their nearest token (policy never), quantiles 10/25/50/75/90 %:",
              ""]
    for att, r in results.items():
        q = r["free_running"]["never"]["distance_quantiles"]
        lines.append(f"- {att}: " + " / ".join(f"{v:.3f}" for v in q.values()))
    lines += ["", f"Curves: `{os.path.basename(base)}.png`. Reproduce: `python -m leapformer_models.bench_softar "
              f"--steps {a.steps} --threads {a.threads}`.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""What the zoo's same-budget comparisons (``bench_deepsight``, ``bench_futureformer``) share: a run
scored on next-token loss along the way, and the curves' plot.

A model whose validation loss includes auxiliary terms (a planning or future loss) cannot be
compared with its ablation on ``train``'s history; ``train_with_curve`` stops the run at every
curve point (``stop_after``; ``--resume`` continues it bitwise) and scores the next-token term of
``model.loss_terms`` there, every point on the same held-out batches.
"""
import os

from .train import evaluate_terms, load_model, prepare_data, train

LN2 = 0.6931471805599453
EVAL_SEED = 12345


def train_with_curve(cfg, overrides: dict, interval: int, curve_batches: int, final_batches: int,
                     term: str = "next_token"):
    """Train ``cfg.steps`` steps, scoring ``term`` every ``interval`` steps on ``curve_batches`` fixed
    validation batches (the same at every point), then on ``final_batches`` at the end.
    Returns (summary, steps, values, final terms)."""
    steps, vals = [], []
    points = list(range(interval, cfg.steps, interval)) + [cfg.steps]
    for i, stop in enumerate(points):
        cfg.stop_after = stop if stop < cfg.steps else None
        summary = train(cfg, overrides, resume=i > 0, overwrite=i == 0)
        model, tok, _ = load_model(summary["checkpoint"])
        _, _, val = prepare_data(cfg, tok)
        steps.append(stop)
        vals.append(evaluate_terms(model, val, curve_batches, cfg.batch_size, seed=EVAL_SEED)[term])
    final = evaluate_terms(model, val, final_batches, cfg.batch_size, seed=EVAL_SEED)
    return summary, steps, vals, final


def add_run_args(p, *, steps: int, eval_interval: int, final_batches: int, curve_batches: int, runs: str):
    """The flags every same-budget bench takes (the budget, the scoring and where things go)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-interval", type=int, default=eval_interval)
    p.add_argument("--final-eval-batches", type=int, default=final_batches)
    p.add_argument("--curve-eval-batches", type=int, default=curve_batches)
    p.add_argument("--device-label", default="2-core CPU, shared with other jobs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runs", default=runs)


def plot_curves(curves: dict, path: str, title: str, ylabel: str = "validation next-token loss (nats/byte)"):
    """curves {label: (steps, values)} -> a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (steps, vals) in curves.items():
        ax.plot(steps, vals, marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

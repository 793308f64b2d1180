"""``leapformer compare``: several training runs side by side.

Reads, for each run folder written by ``leapformer train``: ``metrics.json`` (the run's summary
and per-step history; ``metrics.csv`` plus the checkpoint's summary fields when the JSON is
absent) and ``ckpt.pt`` (loaded with ``train.load_model``, as ``leapformer eval`` does).

Writes into ``--out`` (default ``runs/compare``):

- ``compare.png``: train (smoothed) and validation loss of every run, by step and by training
  tokens (``--log`` for log-scale axes);
- ``compare.md`` / ``compare.json``: one row per run: model, attention, tokenizer, parameters
  (all, and without embedding tables), steps, training tokens, wall time, tokens/s, final and
  best validation loss, bits per token, and teacher-forcing top-k accuracy on held-out text.

The held-out text is ``--data FILE`` (all of it) for every run, or else each run's own validation
split; the output says whether the runs were scored on the same text. A run that cannot be read is
reported in one line (``skipped RUN: why``) and the others are still compared.
"""
import csv
import hashlib
import json
import math
import os
from typing import List, Optional

import numpy as np
import torch

from .errors import UserError

IGNORE = -100


class RunError(UserError):
    """A run folder that cannot be compared (missing or corrupt files)."""


def _num(v):
    if v in (None, ""):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load_run(path: str) -> dict:
    """{"path", "label", "summary", "history", "ckpt"} of a run folder; ``RunError`` (one line) if it
    cannot be read."""
    from .train import CKPT_NAME
    if not os.path.isdir(path):
        raise RunError("not a folder" if os.path.exists(path) else "does not exist")
    ckpt = os.path.join(path, CKPT_NAME)
    if not os.path.isfile(ckpt):
        raise RunError(f"no checkpoint ({CKPT_NAME})")
    mj, mc = os.path.join(path, "metrics.json"), os.path.join(path, "metrics.csv")
    if os.path.isfile(mj):
        try:
            with open(mj) as f:
                m = json.load(f)
            summary, history = m["summary"], m["history"]
            if not isinstance(summary, dict) or not isinstance(history, list):
                raise TypeError("summary / history of the wrong type")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"metrics.json is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})") \
                from None
    elif os.path.isfile(mc):
        try:
            with open(mc, newline="") as f:
                history = [{k: (int(v) if k == "step" else _num(v)) for k, v in row.items()} for row in csv.DictReader(f)]
        except (OSError, ValueError, csv.Error) as e:
            raise RunError(f"metrics.csv is corrupt ({type(e).__name__})") from None
        summary = None  # filled from the checkpoint in evaluate_run
    else:
        raise RunError("no metrics.json or metrics.csv")
    return {"path": path, "label": os.path.basename(os.path.normpath(path)) or path, "summary": summary,
            "history": history, "ckpt": ckpt}


def count_params(model) -> dict:
    """{"params": all (shared tensors once), "params_no_emb": without nn.Embedding tables}."""
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    ps = list(model.parameters())
    return {"params": sum(p.numel() for p in ps), "params_no_emb": sum(p.numel() for p in ps if id(p) not in emb)}


def heldout_ids(ckpt: dict, tok, data: Optional[str]):
    """(token tensor or TaskData, key of the text): all of ``data`` when given, else the run's own
    validation split (``train.prepare_data``)."""
    from .data import encode_corpus, load_text
    from .train import TrainConfig, prepare_data
    if data is not None:
        text = load_text(data)
        return encode_corpus(tok, text), hashlib.sha1(text.encode()).hexdigest()
    tcfg = TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in TrainConfig.__dataclass_fields__})
    _, _, val = prepare_data(tcfg, tok)
    if isinstance(val, torch.Tensor):
        from .data import split_text
        from .train import data_name
        key = hashlib.sha1(split_text(load_text(data_name(tcfg)), tcfg.val_fraction)[1].encode()).hexdigest()
    else:
        key = f"{val.task}:{sorted(val.params.items())}"
    return val, key


@torch.no_grad()
def topk_counts(model, batch, ks) -> Optional[tuple]:
    """({k: right}, scored) teacher-forcing predictions of one batch: next tokens for a causal LM
    (positions with y != -100), target and valid gap tokens for a LEAP model; None for others."""
    dev = next(model.parameters()).device
    if isinstance(batch, tuple) and getattr(model, "causal", False):
        x, y = (t.to(dev) for t in batch)
        logits, gold = model(x)[y != IGNORE], y[y != IGNORE]
    elif isinstance(batch, dict) and hasattr(model, "gap_logits"):
        b = {k: v.to(dev) for k, v in batch.items()}
        out = model(b["context"], b["context_pad"], b["distance"], b["target"])
        G = out.gap_logits.shape[1]
        valid = ~b["gap_pad"][:, :G]
        logits = torch.cat([out.target_logits, out.gap_logits[valid]])
        gold = torch.cat([b["target"], b["gap"][:, :G][valid]])
    else:
        return None
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == gold[:, None]
    return {k: int(hit[:, :k].any(-1).sum()) for k in ks}, int(gold.numel())


def evaluate_run(run: dict, data: Optional[str], ks, batches: int, device, bar=None) -> dict:
    """The table row of a loaded run (``load_run``); loads its checkpoint and scores top-k accuracy
    on ``batches`` batches drawn with a fixed seed. ``RunError`` if the checkpoint cannot be loaded."""
    from .train import load_model
    try:
        model, tok, ckpt = load_model(run["ckpt"], map_location=device)
    except UserError as e:
        raise RunError(str(e)) from None
    s = run["summary"]
    if s is None:  # metrics.csv only: the fields the checkpoint holds
        vals = [r["val_loss"] for r in run["history"] if r.get("val_loss") is not None]
        t = ckpt.get("train_time")
        s = {"model": ckpt["model_name"], "attention": ckpt["model_config"].get("attention", "n/a"),
             "steps": ckpt["step"], "tokens_seen": ckpt.get("tokens_seen"), "train_time_s": t,
             "tokens_per_s": ckpt.get("tokens_seen", 0) / t if t else None,
             "final_val_loss": vals[-1] if vals else None, "best_val_loss": min(vals) if vals else None}
    row = {"run": run["label"], "path": run["path"], "model": s.get("model", ckpt["model_name"]),
           "attention": s.get("attention", "n/a"), "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
           **count_params(model)}
    for k in ("steps", "tokens_seen", "train_time_s", "tokens_per_s", "final_val_loss", "best_val_loss"):
        row[k] = s.get(k)
    fv = row["final_val_loss"]
    row["bits_per_token"] = fv / math.log(2) if isinstance(fv, (int, float)) else None
    row["val_loss_is"] = ("next-token cross-entropy" if getattr(model, "causal", False) else
                          "sum of the loss terms (LEAP: target + gap)" if hasattr(model, "gap_logits") else "loss")
    try:
        ids, row["heldout"] = heldout_ids(ckpt, tok, data)
    except UserError as e:
        if data is not None:  # --data is the user's mistake, not the run's
            raise
        raise RunError(f"its validation data cannot be read ({e})") from None
    gen = torch.Generator().manual_seed(12345)
    bs = ckpt["train_config"].get("batch_size", 16)
    right, scored = {k: 0 for k in ks}, 0
    for _ in range(batches):
        c = topk_counts(model, model.get_batch(ids, bs, gen), ks)
        if bar is not None:
            bar.update(1)
        if c is None:
            break
        for k in ks:
            right[k] += c[0][k]
        scored += c[1]
    for k in ks:
        row[f"top{k}_acc"] = right[k] / scored if scored else None
    row["scored_tokens"] = scored
    return row


def token_axis(history: list) -> list:
    """Cumulative training tokens at each history row (rows hold tokens/s and elapsed seconds)."""
    out, tok, prev = [], 0.0, 0.0
    for r in history:
        el, rate = r.get("elapsed_s"), r.get("tokens_per_s")
        if el is not None and rate is not None:
            tok += rate * (el - prev)
        prev = el if el is not None else prev
        out.append(round(tok))
    return out


def plot(rows_runs, path: str, log: bool = False) -> None:
    """PNG: loss by step (left) and by training tokens (right), one colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (row, run) in enumerate(rows_runs):
        hist, toks = run["history"], token_axis(run["history"])
        label = f"{row['run']} ({row['model']}, {row['attention']})"
        for ax, xs in zip(axes, ([r["step"] for r in hist], toks)):
            tr = [(x, r["train_loss"]) for x, r in zip(xs, hist) if r.get("train_loss") is not None]
            if tr:
                x, l = zip(*tr)
                k = max(1, len(l) // 50)
                ax.plot(x[k - 1:], np.convolve(l, np.ones(k) / k, mode="valid"), color=f"C{i}", alpha=0.5, lw=1,
                        label=f"{label} train")
            va = [(x, r["val_loss"]) for x, r in zip(xs, hist) if r.get("val_loss") is not None]
            if va:
                x, l = zip(*va)
                ax.plot(x, l, "o-", color=f"C{i}", lw=2, ms=3, label=f"{label} val")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training tokens")
    axes[0].set_ylabel("loss (nats / predicted token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("symlog", linthresh=1)
            ax.set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt(v, nd=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(rows: List[dict], ks, note: str) -> str:
    cols = ["run", "model", "attention", "tokenizer", "params", "params_no_emb", "steps", "tokens_seen",
            "train_time_s", "tokens_per_s", "final_val_loss", "best_val_loss", "bits_per_token",
            *[f"top{k}_acc" for k in ks]]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), {"train_time_s": 2, "tokens_per_s": 0}.get(c, 4))
                                       for c in cols) + " |")
    return "\n".join(lines) + f"\n\n{note}\n"


def compare(paths: List[str], out: str, data: Optional[str] = None, ks=(1, 5), batches: int = 20,
            device="cpu", log: bool = False, progress: bool = True, warn=print) -> dict:
    """Compare the runs in ``paths``; write compare.png / .md / .json into ``out``. A run that cannot
    be read is passed to ``warn`` as one line. Returns {"rows", "skipped", "note", "png", "md", "json"};
    ``UserError`` if no run can be read."""
    loaded, skipped = [], []
    for i, p in enumerate(paths):
        try:
            loaded.append((i, load_run(p)))
        except RunError as e:
            skipped.append((i, {"run": p, "error": str(e)}))
    rows_runs = []
    bar = None
    if loaded and progress:
        from tqdm import tqdm
        bar = tqdm(total=batches * len(loaded), desc="top-k accuracy", delay=1.0, leave=False)
    try:
        for i, run in loaded:
            try:
                rows_runs.append((evaluate_run(run, data, ks, batches, device, bar), run))
            except RunError as e:
                skipped.append((i, {"run": run["path"], "error": str(e)}))
    finally:
        if bar is not None:
            bar.close()
    skipped = [sk for _, sk in sorted(skipped, key=lambda t: t[0])]
    for sk in skipped:  # in the order the runs were given
        warn(f"skipped {sk['run']}: {sk['error']}")
    if not rows_runs:
        raise UserError(f"no run could be read ({len(paths)} given): each needs the ckpt.pt and metrics.json "
                        "that leapformer train writes")
    rows = [r for r, _ in rows_runs]
    same = len({r["heldout"] for r in rows}) == 1
    where = f"all of {data}" if data else "each run's validation split"
    note = (f"Top-k accuracy: teacher forcing, {batches} batches (fixed seed) of {where}; "
            + ("the runs were scored on the same held-out text." if same else
               "the held-out texts DIFFER between runs (different data or validation split): pass --data FILE "
               "to score all on the same text."))
    if len({(r["tokenizer"], r["vocab_size"]) for r in rows}) > 1:
        note += " Tokenizers differ: losses, bits and accuracies are per token of each run's own tokenizer."
    if any(r["val_loss_is"].startswith("sum") for r in rows):
        note += " A LEAP model's validation loss (and bits) is the sum of its target and gap cross-entropies."
    os.makedirs(out, exist_ok=True)
    paths_out = {k: os.path.join(out, f"compare.{k}") for k in ("png", "md", "json")}
    plot(rows_runs, paths_out["png"], log)
    with open(paths_out["md"], "w") as f:
        f.write(markdown(rows, ks, note))
    with open(paths_out["json"], "w") as f:
        json.dump({"rows": rows, "skipped": skipped, "note": note, "same_heldout": same}, f, indent=1)
    return {"rows": rows, "skipped": skipped, "note": note, **paths_out}

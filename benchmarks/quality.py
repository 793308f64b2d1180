"""python -m benchmarks.quality: LeaP against softmax, relu-linear and cosFormer on the same budget.

Four attentions (leap, softmax, linear, cosformer) x six tasks of the model zoo, every run with
the same model shape, seed, batch, optimizer and number of steps per task, through
``leapformer_models.train.train`` (no other training loop):

- ``mqar64`` / ``mqar256``: MQAR (Zoology-style associative recall) with ``leapformer-lm`` (2 layers x
  64, learned positions) at T = 64 (8 key-value pairs) and T = 256 (16 pairs); accuracy of the queried
  values, chance = 1 / the number of values.
- ``listops``: ListOps with ``leapformer-lra`` at length <= 512 (expressions of 16 .. 512 tokens);
  accuracy, chance = the majority class of the scored expressions.
- ``stream_k1`` / ``stream_k5``: the stream task with ``leapformer-stream`` under wait-1 and wait-5;
  accuracy of greedy simultaneous decoding and average lagging, chance 1/16, and the ceiling the
  policy's reads allow.
- ``lm2048``: ``leapformer-lm-long`` (smaller: 2 layers x 128) at T = 2048 on the pydoc text; held-out
  next-token loss of one full pass over the validation text in fresh 2048-token windows (the same
  protocol for all four attentions), against uniform (ln 256) and unigram baselines.

Budget: ``--budget`` minutes in all (default 60; the issue's cap: 5 minutes per run). The step count of
each task scales with it (``FULL_STEPS`` at 60 minutes) and is the same for every attention; each run
also has a wall-time safety net of 80 % of its share (budget / 24 runs, at most 300 s of training),
and the table marks the runs that hit it. One thread, seed 1337, CPU by default.

Writes ``<out>/quality.{md,json,png}`` (default benchmarks/results; with ``--quick``, tiny sizes for a
smoke test, a scratch folder). Ctrl-C writes the finished runs (marked interrupted) and exits 130.

    python -m benchmarks.quality --budget 60      # the full table (about an hour on 2 CPU cores)
    python -m benchmarks.quality --quick          # seconds
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from .lm_speed import cpu_model, device_label, setup  # one device label for the CPU benchmarks

RESULTS = "benchmarks/results"
SCRATCH = str(Path(tempfile.gettempdir()) / "leapformer-benchmarks")
ATTENTIONS = ("leap", "softmax", "linear", "cosformer")
FULL_BUDGET_MIN = 60.0
SEED = 1337
EVAL_SEED = 12345

# One entry per task: model, data, model overrides, TrainConfig fields, steps at the full budget,
# evaluation batches. "quick" replaces fields for the smoke test.
TASKS = [
    {"key": "mqar64", "title": "MQAR T={T}", "model": "leapformer-lm", "data": "mqar",
     "over": {"seq_len": 64, "n_layer": 2, "n_embd": 64, "n_head": 2, "max_positions": 256,
              "cosformer_max_len": 64},
     "train": {"mqar_pairs": 8, "mqar_vocab": 64, "batch_size": 32, "lr": 3e-3, "warmup": 30},
     "full_steps": 1100, "eval_batches": 16,
     "quick": {"over": {"n_embd": 32}, "train": {"batch_size": 4}, "eval_batches": 1}},
    {"key": "mqar256", "title": "MQAR T={T}", "model": "leapformer-lm", "data": "mqar",
     "over": {"seq_len": 256, "n_layer": 2, "n_embd": 64, "n_head": 2, "max_positions": 256,
              "cosformer_max_len": 256},
     "train": {"mqar_pairs": 16, "mqar_vocab": 64, "batch_size": 16, "lr": 3e-3, "warmup": 30},
     "full_steps": 800, "eval_batches": 16,
     "quick": {"over": {"n_embd": 32}, "train": {"batch_size": 2}, "eval_batches": 1}},
    {"key": "listops", "title": "ListOps L<={T}", "model": "leapformer-lra", "data": "listops",
     "over": {"seq_len": 512},
     "train": {"listops_min_len": 16, "batch_size": 16, "lr": 1e-3, "warmup": 30},
     "full_steps": 250, "eval_batches": 16,
     "quick": {"over": {"seq_len": 64, "n_embd": 32, "ffn_dim": 64}, "train": {"batch_size": 4},
               "eval_batches": 1}},
    {"key": "stream_k1", "title": "stream wait-1", "model": "leapformer-stream", "data": None,
     "over": {"wait_k": 1},
     "train": {"batch_size": 32, "lr": 3e-3, "warmup": 30},
     "full_steps": 900, "eval_batches": 8,
     "quick": {"over": {"n_embd": 32}, "train": {"batch_size": 4}, "eval_batches": 1}},
    {"key": "stream_k5", "title": "stream wait-5", "model": "leapformer-stream", "data": None,
     "over": {"wait_k": 5},
     "train": {"batch_size": 32, "lr": 3e-3, "warmup": 30},
     "full_steps": 900, "eval_batches": 8,
     "quick": {"over": {"n_embd": 32}, "train": {"batch_size": 4}, "eval_batches": 1}},
    {"key": "lm2048", "title": "LM T={T}", "model": "leapformer-lm-long", "data": None,
     "over": {"n_layer": 2, "n_embd": 128, "n_head": 4, "seq_len": 2048, "cosformer_max_len": 2048},
     "train": {"batch_size": 2, "lr": 3e-3, "warmup": 10},
     "full_steps": 150, "eval_batches": 2,
     "quick": {"over": {"n_embd": 32, "n_head": 2, "seq_len": 256}, "train": {"batch_size": 1},
               "eval_batches": 1}},
]


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=FULL_BUDGET_MIN,
                   help=f"minutes in all (default {FULL_BUDGET_MIN:g}): scales every task's steps and sets each "
                        "run's wall-time safety net")
    p.add_argument("--attentions", default=",".join(ATTENTIONS), help="comma list (default all four)")
    p.add_argument("--tasks", default=",".join(t["key"] for t in TASKS), help="comma list of task keys")
    p.add_argument("--seed", type=int, default=SEED, help=f"training seed of every run (default {SEED})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--device-label", default=None, help="words for the machine (e.g. 'shared with other jobs')")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (smoke test); a scratch folder")
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS}; with --quick {SCRATCH})")
    p.add_argument("--runs", default=None, help="run folders (default runs/quality; with --quick under --out)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    a = p.parse_args(argv)
    if not (a.budget > 0 and math.isfinite(a.budget)):
        p.error("--budget must be a positive number of minutes")
    if a.threads < 1:
        p.error("--threads must be at least 1")
    if a.seed < 0:
        p.error("--seed must be >= 0")
    a.attentions = [x for x in a.attentions.split(",") if x]
    bad = [x for x in a.attentions if x not in ATTENTIONS]
    if bad or not a.attentions:
        p.error(f"--attentions: choose from {', '.join(ATTENTIONS)}")
    keys = [t["key"] for t in TASKS]
    a.tasks = [x for x in a.tasks.split(",") if x]
    bad = [x for x in a.tasks if x not in keys]
    if bad or not a.tasks:
        p.error(f"--tasks: choose from {', '.join(keys)}")
    a.out = a.out or (SCRATCH if a.quick else RESULTS)
    a.runs = a.runs or (os.path.join(a.out, "quality_runs") if a.quick else os.path.join("runs", "quality"))
    return a


def plan(a):
    """-> list of task specs with steps, time limit and eval batches resolved for this budget."""
    n_runs = len(a.tasks) * len(a.attentions)
    share_s = a.budget * 60.0 / n_runs
    out = []
    for t in TASKS:
        if t["key"] not in a.tasks:
            continue
        t = {**t, "over": dict(t["over"]), "train": dict(t["train"])}
        if a.quick:
            q = t["quick"]
            t["over"].update(q.get("over", {}))
            t["train"].update(q.get("train", {}))
            t["eval_batches"] = q.get("eval_batches", t["eval_batches"])
            t["steps"] = 3
            t["time_limit"] = 30.0
        else:
            t["steps"] = max(2, int(round(t["full_steps"] * a.budget / FULL_BUDGET_MIN)))
            t["time_limit"] = min(300.0, 0.8 * share_s)
        if t["over"].get("cosformer_max_len") is not None:
            t["over"]["cosformer_max_len"] = t["over"]["seq_len"]
        t["eval_interval"] = t["steps"] if a.quick else max(1, t["steps"] // 8)
        t["title"] = t["title"].format(T=t["over"].get("seq_len", ""))
        out.append(t)
    return out, share_s


# --------------------------------------------------------------------------- evaluation per task
def _mqar_eval(model, val, t):
    from leapformer_models.tasks import accuracy
    p = val.params
    K = (p["vocab_size"] - 1) // 2
    acc = accuracy(model, val, t["eval_batches"], t["train"]["batch_size"], seed=EVAL_SEED)
    n = t["eval_batches"] * t["train"]["batch_size"]
    return {"accuracy": acc, "chance": 1.0 / (p["vocab_size"] - K - 1), "eval_n": n * p["num_pairs"],
            "eval": f"{n} sequences, {n * p['num_pairs']:,} queries", "pairs": p["num_pairs"],
            "vocab": p["vocab_size"]}


def _listops_eval(model, val, t):
    from leapformer_models.tasks import accuracy
    bs = t["train"]["batch_size"]
    acc = accuracy(model, val, t["eval_batches"], bs, seed=EVAL_SEED)
    gen = torch.Generator().manual_seed(EVAL_SEED)  # the same batches: their majority class
    counts = torch.zeros(10)
    for _ in range(t["eval_batches"]):
        lab = model.get_batch(val, bs, gen)[2]
        counts += torch.bincount(lab, minlength=10)[:10].float()
    return {"accuracy": acc, "chance": float(counts.max() / counts.sum()), "eval_n": t["eval_batches"] * bs,
            "eval": f"{t['eval_batches'] * bs} expressions"}


def _stream_eval(model, val, t):
    from leapformer_models.stream_task import STREAM_SYMBOLS, average_lagging, policy_ceiling
    from leapformer_models.tasks import accuracy
    c = model.config
    bs = t["train"]["batch_size"]
    reads = model.reads(c.src_len)
    acc = accuracy(model, val, t["eval_batches"], bs, seed=EVAL_SEED)
    n = t["eval_batches"] * bs
    return {"accuracy": acc, "chance": 1.0 / STREAM_SYMBOLS, "eval_n": n * c.src_len // c.rate,
            "ceiling": policy_ceiling(c.src_len, c.rate, c.max_delay, reads),
            "average_lagging": average_lagging(reads, c.src_len), "wait_k": c.wait_k,
            "eval": f"{n} streams, {n * c.src_len // c.rate:,} targets (greedy simultaneous decoding)"}


def _lm_eval(model, val, t, train_ids=None):
    from leapformer_models.sliding_eval import sliding_window_loss
    c = model.config
    r = sliding_window_loss(model, val, window=c.seq_len, carry_state=False, batch_size=4)
    out = {"heldout_loss": r["loss"], "uniform_loss": math.log(c.vocab_size),
           "eval": f"one pass over the {r['tokens']:,} validation predictions, {r['windows']} fresh "
                   f"{r['window']}-token windows"}
    if train_ids is not None:
        freq = torch.bincount(train_ids, minlength=c.vocab_size).double() + 1.0
        logp = (freq / freq.sum()).log()
        out["unigram_loss"] = float(-logp[val[1:]].mean())
    return out


def run_one(a, t, attention, device):
    from leapformer_models.train import TrainConfig, prepare_data, train
    cfg = TrainConfig.for_model(
        t["model"], data=t["data"], steps=t["steps"], time_limit=t["time_limit"], eval_interval=t["eval_interval"],
        eval_batches=2 if a.quick else 4, ckpt_interval=10 ** 9, seed=a.seed, threads=a.threads, device=a.device,
        out=os.path.join(a.runs, f"{t['key']}-{attention}"), progress=False, log_interval=10 ** 9, **t["train"])
    t0 = time.perf_counter()
    summary, model = train(cfg, {**t["over"], "attention": attention}, overwrite=True, return_model=True)
    train_wall = time.perf_counter() - t0
    _, train_ids, val = prepare_data(cfg)
    t1 = time.perf_counter()
    if t["data"] == "mqar":
        m = _mqar_eval(model, val, t)
    elif t["data"] == "listops":
        m = _listops_eval(model, val, t)
    elif t["model"] == "leapformer-stream":
        m = _stream_eval(model, val, t)
    else:
        m = _lm_eval(model, val, t, train_ids)
    eval_s = time.perf_counter() - t1
    hist = [{"step": r["step"], "train_loss": r["train_loss"], "val_loss": r["val_loss"]}
            for r in json.load(open(os.path.join(cfg.out, "metrics.json")))["history"]]
    return {"task": t["key"], "title": t["title"], "attention": attention, "model": t["model"],
            **m, "params": summary["params"], "steps": summary["steps"], "planned_steps": t["steps"],
            "hit_time_limit": summary["steps"] < t["steps"], "time_limit_s": t["time_limit"], "seed": a.seed,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "train_time_s": summary["train_time_s"],
            "wall_s": train_wall + eval_s, "eval_s": eval_s, "tokens_per_s": summary["tokens_per_s"],
            "tokens_seen": summary["tokens_seen"], "final_val_loss": summary["final_val_loss"],
            "attention_backend": summary["attention_backend"], "model_config": summary["model_config"],
            "history": hist}


# --------------------------------------------------------------------------- output
def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def result_cell(r):
    if "heldout_loss" in r:
        return f"{r['heldout_loss']:.3f}"
    s = f"{r['accuracy']:.3f}"
    if "average_lagging" in r:
        s += f" (AL {r['average_lagging']:.2f})"
    return s


def reference_cell(r):
    if "heldout_loss" in r:
        uni = f", unigram {r['unigram_loss']:.2f}" if r.get("unigram_loss") is not None else ""
        return f"uniform {r['uniform_loss']:.2f}{uni}"
    s = f"chance {r['chance']:.3f}"
    if "ceiling" in r:
        s += f", ceiling {r['ceiling']:.3f}"
    return s


def verdicts(rows):
    """Per task: the best attention, and LeaP's place and gap to the best (plain words)."""
    out = []
    for key in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == key]
        loss = "heldout_loss" in rs[0]
        val = (lambda r: -r["heldout_loss"]) if loss else (lambda r: r["accuracy"])
        best = max(rs, key=val)
        leap = next((r for r in rs if r["attention"] == "leap"), None)
        if leap is None:
            continue
        rank = 1 + sum(val(r) > val(leap) for r in rs)
        gap = val(best) - val(leap)
        unit = "nats" if loss else "accuracy"
        # the evaluation's own sampling noise (binomial standard error of a difference of two accuracies);
        # seed-to-seed noise of training is larger and not measured by one run per row
        se = None
        if not loss and leap.get("eval_n"):
            p = min(max((leap["accuracy"] + best["accuracy"]) / 2, 1e-3), 1 - 1e-3)
            se = math.sqrt(2 * p * (1 - p) / leap["eval_n"])
        out.append({"task": key, "title": rs[0]["title"], "best": best["attention"], "leap_rank": rank,
                    "of": len(rs), "leap_gap_to_best": gap, "unit": unit, "eval_se_of_gap": se,
                    "leap_loses": rank > 1 and gap > 0,
                    "above_chance": {r["attention"]: (r["accuracy"] - r["chance"] > 2 * math.sqrt(
                        r["chance"] * (1 - r["chance"]) / r["eval_n"])) for r in rs}
                    if not loss and all(r.get("eval_n") for r in rs) else None})
    return out


def markdown(payload) -> str:
    m = payload["meta"]
    rows = payload["rows"]
    L = ["# LeaP against softmax, relu-linear and cosFormer at the same budget", "",
         f"Device: {m['device']}, {m['device_note']}; torch {m['torch']}, LeaP backend {m['leap_backend']}. "
         f"Command: `python -m benchmarks.quality {' '.join(m['argv'])}` on {m['date']}, total wall time "
         f"{m.get('wall_s', 0) / 60:.1f} min{' (INTERRUPTED)' if m['interrupted'] else ''}.", "",
         f"Budget: {m['budget_min']:g} minutes in all ({m['runs']} runs, {m['share_s']:.0f} s each); per task the "
         "same steps, batch, learning rate, seed "
         f"({m['seed']}) and model shape for every attention; each run's training stops at its step count or at the "
         f"wall-time safety net ({m['time_limit_s']:.0f} s of training), whichever comes first (* = stopped by the "
         "net, fewer steps than planned). Accuracy is higher-better, loss (nats/byte) lower-better; AL = average "
         "lagging in source tokens.", "",
         "| task | attention | result | reference | params | steps | batch | train s | tokens/s | eval |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        steps = f"{r['steps']}/{r['planned_steps']}" + (" *" if r["hit_time_limit"] else "")
        L.append(f"| {r['title']} | {r['attention']} | {result_cell(r)} | {reference_cell(r)} | {r['params']:,} | "
                 f"{steps} | {r['batch_size']} | {r['train_time_s']:.0f} | {_f(r['tokens_per_s'], '{:,.0f}')} | "
                 f"{r['eval']} |")
    v = payload.get("verdicts", [])
    if v:
        L += ["", "LeaP's place per task (1 = best of the attentions run):", ""]
        for x in v:
            gap = f"{x['leap_gap_to_best']:.3f} {'nats' if x['unit'] == 'nats' else 'accuracy'} behind {x['best']}"
            if x["leap_loses"] and x.get("eval_se_of_gap"):
                gap += (f" ({x['leap_gap_to_best'] / x['eval_se_of_gap']:.1f} x the evaluation's sampling error "
                        "of the gap)")
            chance = ""
            if x.get("above_chance") is not None:
                near = [k for k, v in x["above_chance"].items() if not v]
                chance = (f"; not distinguishable from chance: {', '.join(near)}" if near else "")
            L.append(f"- {x['title']}: LeaP {x['leap_rank']} of {x['of']}" +
                     (f", {gap}" if x["leap_loses"] else " (best)") + chance)
    L += ["", "Tasks: " + "; ".join(m["task_notes"]) + "."]
    if payload.get("notes"):  # checks run by hand after the table (not by this command)
        L += ["", "Checks run after the table:", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(L) + "\n"


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = payload["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    n = len(tasks)
    cols = min(3, n)
    nr = (n + cols - 1) // cols
    fig, axes = plt.subplots(nr, cols, figsize=(4.6 * cols, 3.4 * nr), squeeze=False)
    colors = {a: f"C{i}" for i, a in enumerate(ATTENTIONS)}
    for ax, key in zip(axes.flat, tasks):
        for r in (r for r in rows if r["task"] == key):
            va = [(h["step"], h["val_loss"]) for h in r["history"] if h["val_loss"] is not None]
            tr = [(h["step"], h["train_loss"]) for h in r["history"] if h["train_loss"] is not None]
            if tr:
                s, l = zip(*tr)
                ax.plot(s, l, color=colors[r["attention"]], alpha=0.25, lw=0.8)
            if va:
                s, l = zip(*va)
                ax.plot(s, l, "o-", color=colors[r["attention"]], ms=3, lw=1.6,
                        label=f"{r['attention']}: {result_cell(r)}")
        vals = [h["val_loss"] for r in rows if r["task"] == key for h in r["history"] if h["val_loss"] is not None]
        if vals:  # train-loss spikes do not set the scale
            lo, hi = min(vals), max(vals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_title(next(r["title"] for r in rows if r["task"] == key), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (faint: train)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = payload["meta"]
    fig.suptitle(f"quality at the same budget ({m['budget_min']:g} min): validation loss by step", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(payload, out: Path, stem="quality"):
    out.mkdir(parents=True, exist_ok=True)
    payload["verdicts"] = verdicts(payload["rows"])
    for ext, writer in (("json", lambda p: p.write_text(json.dumps(payload, indent=1))),
                        ("md", lambda p: p.write_text(markdown(payload))),
                        ("png", lambda p: plot(payload, p))):
        tmp = out / f".{stem}.tmp.{ext}"
        writer(tmp)
        os.replace(tmp, out / f"{stem}.{ext}")


def task_notes(specs):
    notes = []
    for t in specs:
        o, tr = t["over"], t["train"]
        if t["data"] == "mqar":
            notes.append(f"{t['title']}: leapformer-lm {o['n_layer']} x {o['n_embd']}, {o.get('n_head', 4)} heads, "
                         f"learned positions, {tr['mqar_pairs']} pairs, vocabulary {tr['mqar_vocab']}")
        elif t["data"] == "listops":
            notes.append(f"{t['title']}: leapformer-lra (2 x {o.get('n_embd', 64)}), expressions of "
                         f"{tr['listops_min_len']} .. {o['seq_len']} tokens, chance = majority class of the scored set")
        elif t["model"] == "leapformer-stream":
            notes.append(f"{t['title']}: leapformer-stream (2 + 2 x {o.get('n_embd', 64)}), S = 32, rate 2, "
                         f"max delay 7, W = 4, k = {o['wait_k']}")
        else:
            notes.append(f"{t['title']}: leapformer-lm-long {o['n_layer']} x {o['n_embd']}, no positions, "
                         f"{tr['batch_size']} x {o['seq_len']} bytes of pydoc text per step")
    return notes


def main(argv=None):
    a = parse(argv)
    device = setup("benchmarks.quality", a.device)
    from tqdm import tqdm

    from leapformer_models.train import attention_backend
    a.device = str(device)
    before = torch.get_num_threads()
    specs, share_s = plan(a)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    meta = {"device": device_label(device, a.threads), "cpu": cpu_model(), "threads": a.threads,
            "device_note": a.device_label or (f"load average {load:.1f} at the start (shared machine)"
                                              if device.type == "cpu" else "GPU"),
            "torch": torch.__version__, "python": platform.python_version(),
            "leap_backend": attention_backend(device).replace("_backend", ""),
            "budget_min": a.budget, "quick": a.quick, "runs": len(specs) * len(a.attentions), "share_s": share_s,
            "time_limit_s": specs[0]["time_limit"], "seed": a.seed,
            "steps": {t["key"]: t["steps"] for t in specs}, "task_notes": task_notes(specs),
            "date": time.strftime("%Y-%m-%d %H:%M"), "argv": list(sys.argv[1:] if argv is None else argv),
            "interrupted": False}
    payload = {"meta": meta, "rows": []}
    out = Path(a.out)
    cases = [(t, att) for t in specs for att in a.attentions]
    t0 = time.perf_counter()
    bar = tqdm(cases, desc="quality", unit="run", disable=not a.progress, dynamic_ncols=True)
    try:
        for t, att in bar:
            bar.set_postfix_str(f"{t['key']} {att}")
            row = run_one(a, t, att, device)
            payload["rows"].append(row)
            bar.write(json.dumps({k: row[k] for k in ("task", "attention", "steps", "train_time_s", "tokens_per_s")
                                  } | {k: row.get(k) for k in ("accuracy", "heldout_loss")}))
        bar.close()
    except KeyboardInterrupt:
        bar.close()
        meta["interrupted"] = True
        meta["wall_s"] = time.perf_counter() - t0
        if payload["rows"]:
            write(payload, out)
        print(f"\ninterrupted: wrote the {len(payload['rows'])} finished runs to {out}/quality.{{md,json,png}}",
              file=sys.stderr)
        torch.set_num_threads(before)
        if argv is None:
            sys.exit(130)
        raise
    finally:
        torch.set_num_threads(before)
    meta["wall_s"] = time.perf_counter() - t0
    write(payload, out)
    print(markdown(payload))
    print(f"wrote {out}/quality.md, .json and .png ({meta['wall_s']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()

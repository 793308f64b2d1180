"""Training loop, evaluation, metrics and atomic checkpoints for every model of the zoo.

A model class provides ``Config`` (dataclass), ``get_batch(data, batch_size, generator)``,
``loss(batch)``, ``batch_tokens(batch)`` and ``generate(prompts, ...)``; this module does the rest.
Runs are seeded: the batch sampler draws from its own ``torch.Generator``, evaluation from a
freshly seeded one, and a checkpoint holds the model, the optimizer, both configs, the step,
the tokenizer and every RNG state, so ``--resume`` continues with exactly the losses an
uninterrupted run would have had.
"""
import csv
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from . import get_model_class
from .data import encode_corpus, load_text, make_tokenizer, split_text, tokenizer_from_state

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainConfig:
    model: str = "leapformer-lm"
    data: Optional[str] = None          # text file; None = pydoc_data.topics
    tokenizer: str = "byte"             # byte | bpe
    bpe_vocab_size: int = 1024
    val_fraction: float = 0.1
    steps: int = 500
    stop_after: Optional[int] = None    # stop (as if interrupted) after this step; the schedule spans `steps`
    time_limit: Optional[float] = 240.0  # safety net: stop after this many seconds of training (none = off)
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 200
    seed: int = 1337
    device: str = "auto"
    threads: Optional[int] = None       # None = auto: the cores not busy with other work (>= 1)
    out: Optional[str] = None           # None = runs/<model>-<attention> (runs/<model> for the LSTM)
    progress: bool = True


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_threads() -> int:
    """Threads for torch: the cores not already busy (1-minute load average), at least 1.

    On a shared 2-core machine, two intra-op threads competing with other jobs run several
    times slower than one (threads wait for descheduled peers), so a loaded machine gets 1.
    """
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(torch.get_num_threads(), cores - busy))


def attention_backend(device) -> str:
    """The backend the package picks automatically for float32 attention on ``device``."""
    import warnings
    from leapformer_kernels import backends
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return backends.select("leap_attention", None, torch.device(device), torch.float32).__name__.split(".")[-1]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def prepare_data(cfg: TrainConfig, tokenizer=None):
    train_text, val_text = split_text(load_text(cfg.data), cfg.val_fraction)
    if tokenizer is None:
        tokenizer = make_tokenizer(cfg.tokenizer, train_text, cfg.bpe_vocab_size)
    return tokenizer, encode_corpus(tokenizer, train_text), encode_corpus(tokenizer, val_text)


@torch.no_grad()
def evaluate(model, data, batches: int, batch_size: int, seed: int = 0) -> float:
    """Mean loss over ``batches`` batches drawn with a generator seeded by ``seed`` (the same
    batches every time)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    total = 0.0
    for _ in range(batches):
        total += float(model.loss(_to_device(model.get_batch(data, batch_size, gen), dev)))
    model.train(was_training)
    return total / batches


def _to_device(batch, dev):
    if isinstance(batch, dict):
        return {k: v.to(dev) for k, v in batch.items()}
    return tuple(t.to(dev) for t in batch)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, obj: dict) -> None:
    """Write atomically: a temp file in the same folder, fsync, then os.replace (a kill during
    the save leaves the previous checkpoint intact)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _rng_states(gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else None, "python": random.getstate(), "numpy": np.random.get_state(), "batch": gen.get_state()}


def _set_rng_states(states: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    gen.set_state(states["batch"])


def load_model(path: str, map_location="cpu"):
    """-> (model in eval mode, tokenizer, checkpoint dict)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    cls = get_model_class(ckpt["model_name"])
    model = cls(cls.Config(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(map_location).eval()
    return model, tokenizer_from_state(ckpt["tokenizer"]), ckpt


# --------------------------------------------------------------------------- metrics
def write_metrics(out: str, history: list, summary: dict) -> None:
    keys = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k) for k in keys})
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "history": history}, f, indent=1)


def plot_losses(histories: dict, path: str, title: str = "") -> None:
    """PNG of train (smoothed) and validation loss against step, one colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, hist) in enumerate(histories.items()):
        col = f"C{i}"
        tr = [(r["step"], r["train_loss"]) for r in hist if r.get("train_loss") is not None]
        if tr:
            s, l = zip(*tr)
            k = max(1, len(l) // 50)
            sm = np.convolve(l, np.ones(k) / k, mode="valid")
            ax.plot(s[k - 1:], sm, color=col, alpha=0.6, lw=1, label=f"{label} train")
        va = [(r["step"], r["val_loss"]) for r in hist if r.get("val_loss") is not None]
        if va:
            s, l = zip(*va)
            ax.plot(s, l, "o-", color=col, lw=2, ms=3, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- training
_RUN_CONTROL = ("steps", "stop_after", "time_limit", "eval_interval", "ckpt_interval", "device", "threads", "out",
                "progress")


def train(cfg: TrainConfig, model_overrides: Optional[dict] = None, resume: bool = False,
          return_model: bool = False):
    """Train (or resume with ``resume=True`` from <out>/ckpt.pt) and return the run summary
    (and the trained model with ``return_model=True``).

    Writes <out>/ckpt.pt, metrics.csv, metrics.json and loss.png.
    """
    model_overrides = dict(model_overrides or {})
    torch.set_num_threads(cfg.threads or auto_threads())
    att = model_overrides.get("attention", getattr(get_model_class(cfg.model).Config, "attention", None))
    out = cfg.out or os.path.join("runs", f"{cfg.model}-{att}" if att else cfg.model)
    ckpt_path = os.path.join(out, CKPT_NAME)
    ckpt = None
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = TrainConfig(**ckpt["train_config"])
        for k in _RUN_CONTROL:  # the new invocation controls how far and where the run goes
            setattr(saved, k, getattr(cfg, k))
        cfg = saved
    cfg.out = out
    os.makedirs(out, exist_ok=True)
    device = resolve_device(cfg.device)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else None
    tokenizer, train_ids, val_ids = prepare_data(cfg, tokenizer)

    cls = get_model_class(cfg.model)
    if ckpt:
        mcfg = cls.Config(**ckpt["model_config"])
    else:
        mcfg = cls.Config(**{**model_overrides, "vocab_size": tokenizer.vocab_size})
    model = cls(mcfg).to(device)
    opt = make_optimizer(model, cfg)
    step, history, train_time, tokens_seen = 0, [], 0.0, 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
        train_time, tokens_seen = ckpt.get("train_time", 0.0), ckpt.get("tokens_seen", 0)
        _set_rng_states(ckpt["rng"], gen)
    n_params = sum(p.numel() for p in model.parameters())
    attention = getattr(mcfg, "attention", "n/a")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model_name": cfg.model, "model_config": asdict(mcfg), "train_config": asdict(cfg),
            "tokenizer": tokenizer.state(), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "history": history, "train_time": train_time, "tokens_seen": tokens_seen,
            "rng": _rng_states(gen), "version": 1})

    def val_loss():
        return evaluate(model, val_ids, cfg.eval_batches, cfg.batch_size, seed=cfg.seed + 1)

    if step == 0:
        history.append({"step": 0, "train_loss": None, "val_loss": val_loss(), "lr": None, "tokens_per_s": None,
                        "elapsed_s": 0.0})
    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.model} ({attention})", dynamic_ncols=True)
    model.train()
    rate = None
    while step < last:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = _to_device(model.get_batch(train_ids, cfg.batch_size, gen), device)
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_v = loss.item()
        dt = time.perf_counter() - t0
        ntok = model.batch_tokens(batch)
        step += 1
        train_time += dt
        tokens_seen += ntok
        rate = ntok / dt if rate is None else 0.9 * rate + 0.1 * ntok / dt
        row = {"step": step, "train_loss": loss_v, "val_loss": None, "lr": lr, "tokens_per_s": ntok / dt,
               "elapsed_s": train_time}
        out_of_time = cfg.time_limit is not None and train_time >= cfg.time_limit
        if step % cfg.eval_interval == 0 or step == last or out_of_time:
            row["val_loss"] = val_loss()
        history.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{rate:,.0f}",
                            val=f"{row['val_loss']:.3f}" if row["val_loss"] is not None else None, refresh=False)
        if step % cfg.ckpt_interval == 0 or step == last or out_of_time:
            checkpoint()
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    if history[-1]["val_loss"] is None:  # e.g. resumed at the end
        history[-1]["val_loss"] = val_loss()
        checkpoint()
    vals = [r["val_loss"] for r in history if r["val_loss"] is not None]
    summary = {"model": cfg.model, "attention": attention, "params": n_params, "steps": step,
               "final_val_loss": vals[-1], "best_val_loss": min(vals), "train_time_s": train_time,
               "tokens_seen": tokens_seen, "tokens_per_s": tokens_seen / train_time if train_time else None,
               "device": str(device), "attention_backend": attention_backend(device),
               "threads": torch.get_num_threads(), "checkpoint": ckpt_path,
               "model_config": asdict(mcfg), "train_config": asdict(cfg)}
    write_metrics(out, history, summary)
    plot_losses({f"{cfg.model} ({attention})": history}, os.path.join(out, "loss.png"),
                f"{cfg.model}, {attention} attention")
    return (summary, model.eval()) if return_model else summary


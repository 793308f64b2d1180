"""Training loop, evaluation, metrics and atomic checkpoints for every model of the zoo.

A model class provides ``Config`` (dataclass), ``get_batch(data, batch_size, generator)``,
``loss(batch)``, ``batch_tokens(batch)`` and ``generate(prompts, ...)``; this module does the rest.
Runs are seeded: the batch sampler draws from its own ``torch.Generator``, evaluation from a
freshly seeded one, and a checkpoint holds the model, the optimizer, both configs, the step,
the tokenizer and every RNG state, so ``--resume`` continues with exactly the losses an
uninterrupted run would have had.
"""
import contextlib
import csv
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import ClassVar, Optional

import numpy as np
import torch

from leapformer_kernels._training import StopRequest, warmup_cosine

from . import distributed, get_model_class
from .errors import (CheckpointError, RunExistsError, TrainingInterrupted, UsageError,
                     require)
from .data import encode_corpus, load_text, make_tokenizer, split_text, tokenizer_from_state
from .tasks import TaskData
from .tasks import accuracy as task_accuracy

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainConfig:
    model: str = "leapformer-lm"
    data: Optional[str] = None          # text file, or a generated task (mqar | listops); None = the model's default
    tokenizer: str = "byte"             # byte | bpe
    bpe_vocab_size: int = 1024
    mqar_pairs: int = 8                 # --data mqar: key-value pairs per sequence (length: the model's seq_len)
    mqar_vocab: int = 64                # --data mqar: vocabulary (keys and values)
    listops_min_len: int = 16           # --data listops: shortest expression (longest: the model's seq_len)
    listops_max_depth: int = 10         # LRA: 10
    listops_max_args: int = 10          # LRA: 10
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
    grad_accum: int = 1                 # micro-batches per step (per process); batch_size is the global batch
    distributed: str = "ddp"            # under torchrun: ddp | fsdp (FSDP2, fully_shard)
    autocast: str = "auto"              # auto (bf16 on CUDA, off elsewhere) | bf16 | off
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 200
    log_interval: int = 10              # without a progress bar: one "step N/M" line every this many steps
    seed: int = 1337
    device: str = "auto"
    threads: Optional[int] = None       # None = auto: the cores not busy with other work (>= 1)
    out: Optional[str] = None           # None = runs/<model>-<attention> (runs/<model> for the LSTM)
    progress: bool = True

    HELP: ClassVar[dict] = {
        "model": "the model to train (leapformer list shows them)",
        "data": "UTF-8 text file to train on, or a generated task: mqar | listops (none = the model's default: "
                "the Python docs shipped with CPython, ListOps for leapformer-lra)",
        "tokenizer": "byte | bpe (bpe is trained locally and needs the tokenizers package)",
        "bpe_vocab_size": "vocabulary size of the BPE tokenizer (> 256)",
        "mqar_pairs": "--data mqar: key-value pairs per sequence (the sequence is the model's seq_len, >= 4x this)",
        "mqar_vocab": "--data mqar: vocabulary size (keys and values; >= 2 * mqar_pairs + 1)",
        "listops_min_len": "--data listops: shortest expression in tokens (the longest: the model's seq_len)",
        "listops_max_depth": "--data listops: deepest nesting of operators",
        "listops_max_args": "--data listops: most arguments of an operator (>= 2)",
        "val_fraction": "fraction of the text, taken from its end, used for validation, in (0, 1)",
        "steps": "optimizer steps; the learning-rate schedule spans them",
        "stop_after": "stop after this step as if interrupted (the schedule still spans --steps)",
        "time_limit": "stop after this many seconds of training (none = no limit)",
        "batch_size": "sequences per step",
        "lr": "peak learning rate (AdamW)",
        "min_lr_ratio": "final learning rate as a fraction of --lr, in [0, 1]",
        "warmup": "linear warm-up steps",
        "weight_decay": "AdamW weight decay on matrices",
        "grad_clip": "clip the gradient norm to this (0 = off)",
        "grad_accum": "gradient accumulation: micro-batches per step and process (--batch-size is the global "
                      "batch, divisible by processes x grad-accum)",
        "distributed": "under torchrun: ddp (replicated model) | fsdp (FSDP2, parameters sharded); "
                       "ignored in a one-process run",
        "autocast": "mixed precision: auto (bf16 on CUDA, off elsewhere) | bf16 | off",
        "eval_interval": "steps between validation losses",
        "eval_batches": "batches per validation loss",
        "ckpt_interval": "steps between checkpoints (one is also written at the end and on Ctrl-C)",
        "log_interval": "with --no-progress: steps between log lines",
        "seed": "random seed (data order, initialisation)",
        "device": "auto | cpu | cuda | cuda:N | mps",
        "threads": "CPU threads (none = the idle cores; stored in the checkpoint and reused by --resume)",
        "out": "run folder (default runs/<model>-<attention>)",
        "progress": "show a progress bar (--no-progress: plain log lines)",
    }

    @classmethod
    def for_model(cls, model: str = "leapformer-lm", **fields) -> "TrainConfig":
        """A TrainConfig for ``model`` whose unset fields take the model's ``train_defaults`` (e.g.
        ``leapformer-lm-long``: 4 sequences per step, 100 steps), then the class defaults; what the
        command line does with the flags it was not given."""
        return cls(model=model, **{**getattr(get_model_class(model), "train_defaults", {}), **fields})

    def __post_init__(self):
        check = _Checker()
        check.choice("tokenizer", self.tokenizer, ("byte", "bpe"))
        check.integer("bpe_vocab_size", self.bpe_vocab_size, 257)
        check.integer("mqar_pairs", self.mqar_pairs, 1)
        check.integer("mqar_vocab", self.mqar_vocab, 2 * self.mqar_pairs + 1 if isinstance(self.mqar_pairs, int)
                      else 3)
        check.integer("listops_min_len", self.listops_min_len, 1)
        check.integer("listops_max_depth", self.listops_max_depth, 1)
        check.integer("listops_max_args", self.listops_max_args, 2)
        check.number("val_fraction", self.val_fraction, 0, 1, lo_open=True, hi_open=True)
        for name in ("steps", "batch_size", "eval_interval", "eval_batches", "ckpt_interval", "log_interval"):
            check.integer(name, getattr(self, name), 1)
        check.integer("stop_after", self.stop_after, 0, optional=True)
        check.number("time_limit", self.time_limit, 0, None, lo_open=True, optional=True)
        check.number("lr", self.lr, 0, None, lo_open=True)
        check.number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check.integer("warmup", self.warmup, 0)
        check.number("weight_decay", self.weight_decay, 0, None)
        check.number("grad_clip", self.grad_clip, 0, None)
        check.integer("grad_accum", self.grad_accum, 1)
        check.choice("distributed", self.distributed, ("ddp", "fsdp"))
        check.choice("autocast", self.autocast, ("auto", "bf16", "off"))
        check.integer("seed", self.seed, 0)
        check.integer("threads", self.threads, 1, optional=True)
        if not isinstance(self.device, str) or not self.device:
            raise UsageError(f"device (--device) must be a device name such as cpu or cuda, got {self.device!r}")
        if self.data is not None and not isinstance(self.data, str):
            raise UsageError(f"data (--data) must be a path to a text file, got {self.data!r}")


class _Checker:
    """Range checks with one message format: ``name (--flag) must be ..., got value``."""

    @staticmethod
    def _fail(name, what, value):
        raise UsageError(f"{name} (--{name.replace('_', '-')}) must be {what}, got {value!r}")

    def choice(self, name, value, choices):
        if value not in choices:
            self._fail(name, "one of " + ", ".join(choices), value)

    def integer(self, name, value, lo, optional=False):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            self._fail(name, f"an integer >= {lo}" + (" (or none)" if optional else ""), value)

    def number(self, name, value, lo, hi, lo_open=False, hi_open=False, optional=False):
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > lo if lo_open else value >= lo) if lo is not None else ok
        ok = ok and (value < hi if hi_open else value <= hi) if hi is not None else ok
        if not ok:
            rng = ("(" if lo_open else "[") + f"{lo}, " + (f"{hi}" if hi is not None else "inf") + \
                (")" if hi_open or hi is None else "]")
            self._fail(name, f"a finite number in {rng}" + (" (or none)" if optional else ""), value)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``gpu`` means cuda. Raises ``UsageError`` (one
    line naming the devices that exist) for a device this machine does not have."""
    name = "cuda" if device == "gpu" else device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device name; devices here: {', '.join(available_devices())}") \
            from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {device}: no such CUDA device on this machine; devices here: "
                         f"{', '.join(available_devices())}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available on this machine; devices here: "
                         f"{', '.join(available_devices())}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device} is not supported; devices here: {', '.join(available_devices())}")
    return dev


def available_devices():
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


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
        return backends.select("leap_attention", None, torch.device(device), torch.float32)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at cfg.steps."""
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def data_name(cfg: TrainConfig) -> Optional[str]:
    """The text file or task name a run trains on (the model's ``default_data`` when --data is none)."""
    return cfg.data if cfg.data is not None else getattr(get_model_class(cfg.model), "default_data", None)


def task_of(cfg: TrainConfig) -> Optional[str]:
    from .tasks import TASKS
    name = data_name(cfg)
    return name if name in TASKS else None


def prepare_data(cfg: TrainConfig, tokenizer=None):
    """(tokenizer, train data, validation data): token tensors of a text corpus, or the
    ``TaskData`` splits of a generated task (``--data mqar`` / ``listops``, for the models
    whose ``tasks`` name it)."""
    task = task_of(cfg)
    if task is not None:
        from .tasks import task_data
        cls = get_model_class(cfg.model)
        if task not in getattr(cls, "tasks", ()):
            able = sorted(n for n, c in _models().items() if task in getattr(c, "tasks", ()))
            raise UsageError(f"--data {task}: {cfg.model} does not train on {task}; models that do: {', '.join(able)}")
        params = ({"num_pairs": cfg.mqar_pairs, "vocab_size": cfg.mqar_vocab} if task == "mqar" else
                  {"min_len": cfg.listops_min_len, "max_depth": cfg.listops_max_depth,
                   "max_args": cfg.listops_max_args})
        return task_data(task, params)
    if getattr(get_model_class(cfg.model), "needs_task", False):
        raise UsageError(f"{cfg.model} trains on a generated task ({', '.join(get_model_class(cfg.model).tasks)}), "
                         f"not on text: drop --data or pass --data {get_model_class(cfg.model).tasks[0]}")
    train_text, val_text = split_text(load_text(data_name(cfg)), cfg.val_fraction)
    if tokenizer is None:
        tokenizer = make_tokenizer(cfg.tokenizer, train_text, cfg.bpe_vocab_size)
    return tokenizer, encode_corpus(tokenizer, train_text), encode_corpus(tokenizer, val_text)


def _models():
    from . import MODELS
    return MODELS


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


@torch.no_grad()
def evaluate_terms(model, data, batches: int, batch_size: int, seed: int = 0) -> dict:
    """Like ``evaluate`` but per loss term (``model.loss_terms``: LEAP's target / gap / distance
    cross-entropies, the LM's next-token one): {term: mean loss in nats per predicted token}."""
    if not hasattr(model, "loss_terms"):
        return {"loss": evaluate(model, data, batches, batch_size, seed)}
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    totals: dict = {}
    for _ in range(batches):
        for k, v in model.loss_terms(_to_device(model.get_batch(data, batch_size, gen), dev)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    model.train(was_training)
    return {k: v / batches for k, v in totals.items()}


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


def package_version() -> str:
    import leapformer_kernels
    return leapformer_kernels.__version__


_CKPT_KEYS = ("model_name", "model_config", "model", "tokenizer")


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint dict; ``CheckpointError`` (one line) if ``path`` is missing, a folder,
    empty, truncated or another kind of file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, CKPT_NAME)
        hint = f" (did you mean {inside}?)" if os.path.isfile(inside) else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist (leapformer train writes <out>/{CKPT_NAME})")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the run that wrote it did not finish")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        import zipfile
        kind = "truncated or corrupt" if zipfile.is_zipfile(path) or "zip" in str(e).lower() else \
            "not a PyTorch checkpoint"
        raise CheckpointError(f"checkpoint {path} cannot be read ({kind}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in _CKPT_KEYS):
        raise CheckpointError(f"{path} is a PyTorch file but not a leapformer checkpoint "
                              f"(it lacks {', '.join(k for k in _CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt)})")
    return ckpt


def load_model(path: str, map_location="cpu"):
    """-> (model in eval mode, tokenizer, checkpoint dict). Raises ``CheckpointError`` (one line,
    naming the version that wrote it) for a checkpoint this version cannot load."""
    ckpt = read_checkpoint(path, map_location)
    written = ckpt.get("package_version", "an unknown version (before 0.2.0)")
    try:
        cls = get_model_class(ckpt["model_name"])
        model = cls(cls.Config(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        tokenizer = tokenizer_from_state(ckpt["tokenizer"])
    except ImportError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} was written by leapformer-kernels {written} and cannot be loaded "
                              f"by {package_version()}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    model.to(map_location).eval()
    return model, tokenizer, ckpt


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
_RUN_CONTROL = ("steps", "stop_after", "time_limit", "eval_interval", "ckpt_interval", "log_interval", "device",
                "out", "progress", "grad_accum", "distributed", "autocast")


def default_out(cfg: TrainConfig, model_overrides: Optional[dict] = None) -> str:
    att = (model_overrides or {}).get("attention", getattr(get_model_class(cfg.model).Config, "attention", None))
    return cfg.out or os.path.join("runs", f"{cfg.model}-{att}" if att else cfg.model)


def _new_dirs(path: str) -> list:
    """The folders that ``os.makedirs(path)`` would create, deepest first."""
    out, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        out.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return out


def train(cfg: TrainConfig, model_overrides: Optional[dict] = None, resume: bool = False,
          return_model: bool = False, overwrite: bool = False):
    """Train (or resume with ``resume=True`` from <out>/ckpt.pt) and return the run summary
    (and the trained model with ``return_model=True``).

    Writes <out>/ckpt.pt, metrics.csv, metrics.json and loss.png. An existing checkpoint in <out>
    needs ``resume=True`` or ``overwrite=True`` (else ``RunExistsError``). Ctrl-C or SIGTERM
    saves a checkpoint of the last finished step and raises ``TrainingInterrupted``; a failed run
    removes the folders it created while they are still empty.
    """
    model_overrides = dict(model_overrides or {})
    require("leapformer train", "matplotlib", *(["tqdm"] if cfg.progress else []))
    cls = get_model_class(cfg.model)
    out = default_out(cfg, model_overrides)
    ckpt_path = os.path.join(out, CKPT_NAME)
    ckpt = None
    if resume:
        if not os.path.exists(ckpt_path):
            raise CheckpointError(f"--resume: no checkpoint at {ckpt_path} (start a new run without --resume)")
        ckpt = read_checkpoint(ckpt_path)
        if ckpt["model_name"] != cfg.model:
            raise UsageError(f"--resume: {ckpt_path} holds a {ckpt['model_name']} run, not {cfg.model} "
                             f"(pass --model {ckpt['model_name']})")
        differ = {k: v for k, v in model_overrides.items() if ckpt["model_config"].get(k, v) != v}
        if differ:
            k, v = next(iter(differ.items()))
            raise UsageError(f"--resume continues the saved model, whose {k} is {ckpt['model_config'][k]!r}, "
                             f"not {v!r}: drop --{k.replace('_', '-')} or start a new run")
        saved = TrainConfig(**{k: v for k, v in ckpt["train_config"].items()
                               if k in TrainConfig.__dataclass_fields__})
        threads = cfg.threads or saved.threads
        for k in _RUN_CONTROL:  # the new invocation controls how far and where the run goes
            setattr(saved, k, getattr(cfg, k))
        saved.threads = threads  # the thread count of the run (reductions depend on it)
        cfg = saved
    elif os.path.exists(ckpt_path) and not overwrite:
        step = _peek_step(ckpt_path)
        raise RunExistsError(f"{out} already holds a checkpoint{step}: pass --resume to continue it, "
                             f"--overwrite to start over, or --out DIR for a new run")
    cfg.out = out
    ctx, device = distributed.setup(resolve_device(cfg.device), cfg.distributed)
    cfg.threads = cfg.threads or auto_threads()
    created = []
    finished = False
    try:
        distributed.check_batch(ctx, cfg.batch_size, cfg.grad_accum)
        created = _new_dirs(out) if ctx.main else []
        distributed.barrier(ctx)
        result = _train(cfg, cls, model_overrides, ckpt, ckpt_path, device, return_model, ctx)
        finished = True
        return result
    finally:
        if not finished:
            for d in created:  # deepest first; only folders that are still empty
                try:
                    os.rmdir(d)
                except OSError:
                    break
        distributed.teardown(ctx)


def _peek_step(path: str) -> str:
    try:
        return f" (step {read_checkpoint(path)['step']})"
    except Exception:
        return ""


def _autocast(cfg, device):
    on = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _train(cfg, cls, model_overrides, ckpt, ckpt_path, device, return_model, ctx=None):
    ctx = ctx or distributed.Context()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else None
    tokenizer, train_ids, val_ids = prepare_data(cfg, tokenizer)

    if ckpt:
        mcfg = cls.Config(**ckpt["model_config"])
    else:
        mcfg = cls.Config(**{**model_overrides, "vocab_size": tokenizer.vocab_size})
    model = cls(mcfg).to(device)
    _check_corpus(model, cfg, train_ids, val_ids)
    if ckpt:  # the full state, before DDP / FSDP wrap (and shard) the model
        model.load_state_dict(ckpt["model"])
    if ctx.distributed:
        probe = model.get_batch(train_ids, cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 2))
        unused = distributed.unused_parameters(model, _to_device(distributed.shard(probe, ctx, cfg.grad_accum)[0],
                                                                  device))
        if unused:
            raise UsageError(f"{cfg.model} has parameters that get no gradient in a training step "
                             f"({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}): DDP / FSDP need every "
                             "parameter used; remove them from the model")
    wrapped = distributed.wrap(model, ctx, device)
    opt = make_optimizer(model, cfg)  # after wrapping: under FSDP the parameters are the sharded ones
    step, history, train_time, tokens_seen = 0, [], 0.0, 0
    if ckpt:
        distributed.load_optimizer(model, opt, ckpt["optimizer"], ctx)
        step, history = ckpt["step"], ckpt["history"]
        train_time, tokens_seen = ckpt.get("train_time", 0.0), ckpt.get("tokens_seen", 0)
        _set_rng_states(ckpt["rng"], gen)
    n_params = sum(p.numel() for p in model.parameters())
    attention = getattr(mcfg, "attention", "n/a")
    out = cfg.out

    saved_step = [None]

    def checkpoint():
        saved_step[0] = step
        model_state, opt_state = distributed.full_state(model, opt, ctx)  # every rank (FSDP gathers)
        if ctx.main:
            save_checkpoint(ckpt_path, {
                "model_name": cfg.model, "model_config": asdict(mcfg), "train_config": asdict(cfg),
                "tokenizer": tokenizer.state(), "model": model_state, "optimizer": opt_state,
                "step": step, "history": history, "train_time": train_time, "tokens_seen": tokens_seen,
                "rng": _rng_states(gen), "version": 1, "package_version": package_version()})
        distributed.barrier(ctx)

    def val_loss():  # every rank evaluates the same batches (FSDP needs all of them in each forward)
        return evaluate(distributed.evaluator(wrapped), val_ids, cfg.eval_batches, cfg.batch_size, seed=cfg.seed + 1)

    def finish(interrupted: bool):
        vals = [r["val_loss"] for r in history if r["val_loss"] is not None]
        extra = {}
        if isinstance(val_ids, TaskData):
            with distributed.eval_context(wrapped, ctx):
                extra["val_accuracy"] = task_accuracy(model, val_ids, cfg.eval_batches, cfg.batch_size,
                                                      seed=cfg.seed + 1)
        summary = {**extra, "model": cfg.model, "attention": attention, "params": n_params, "steps": step,
                   "final_val_loss": vals[-1] if vals else None, "best_val_loss": min(vals) if vals else None,
                   "train_time_s": train_time, "tokens_seen": tokens_seen,
                   "tokens_per_s": tokens_seen / train_time if train_time else None,
                   "device": str(device), "attention_backend": attention_backend(device),
                   "threads": torch.get_num_threads(), "checkpoint": ckpt_path, "interrupted": interrupted,
                   "model_config": asdict(mcfg), "train_config": asdict(cfg), "processes": ctx.world}
        if ctx.main:  # one writer
            write_metrics(out, history, summary)
            plot_losses({f"{cfg.model} ({attention})": history}, os.path.join(out, "loss.png"),
                        f"{cfg.model}, {attention} attention")
        distributed.barrier(ctx)
        return summary

    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    bar = None
    with StopRequest() as stop:
        if step == 0:
            history.append({"step": 0, "train_loss": None, "val_loss": val_loss(), "lr": None,
                            "tokens_per_s": None, "elapsed_s": 0.0})
        if cfg.progress and ctx.main:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.model} ({attention})", dynamic_ncols=True)
        model.train()
        rate = None
        try:
            while step < last and not distributed.any_rank(stop.signal is not None, ctx, device):
                t0 = time.perf_counter()
                lr = lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                batch = model.get_batch(train_ids, cfg.batch_size, gen)  # the global batch, on every rank
                micro = distributed.shard(batch, ctx, cfg.grad_accum)  # this rank's micro-batches
                opt.zero_grad(set_to_none=True)
                loss_v = 0.0
                for i, mb in enumerate(micro):
                    with distributed.sync_context(wrapped, ctx, last=i == len(micro) - 1), _autocast(cfg, device):
                        loss = wrapped(_to_device(mb, device))
                        if cfg.grad_accum > 1:
                            loss = loss / cfg.grad_accum
                        loss.backward()
                    loss_v += loss.item()
                loss_v = distributed.mean(loss_v, ctx, device)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                dt = time.perf_counter() - t0
                ntok = model.batch_tokens(batch)
                step += 1
                train_time += dt
                tokens_seen += ntok
                rate = ntok / dt if rate is None else 0.9 * rate + 0.1 * ntok / dt
                row = {"step": step, "train_loss": loss_v, "val_loss": None, "lr": lr, "tokens_per_s": ntok / dt,
                       "elapsed_s": train_time}
                out_of_time = distributed.any_rank(cfg.time_limit is not None and train_time >= cfg.time_limit,
                                                   ctx, device)
                if step % cfg.eval_interval == 0 or step == last or out_of_time:
                    row["val_loss"] = val_loss()
                history.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{rate:,.0f}",
                                    val=f"{row['val_loss']:.3f}" if row["val_loss"] is not None else None,
                                    refresh=False)
                elif ctx.main and (step % cfg.log_interval == 0 or step == last or row["val_loss"] is not None):
                    val = f" val {row['val_loss']:.4f}" if row["val_loss"] is not None else ""
                    print(f"step {step}/{cfg.steps} loss {loss_v:.4f}{val} ({rate:,.0f} tok/s)", flush=True)
                if step % cfg.ckpt_interval == 0 or step == last or out_of_time or \
                        distributed.any_rank(stop.signal is not None, ctx, device):
                    checkpoint()
                if out_of_time:
                    break
        finally:
            if bar is not None:
                bar.close()
        stopped = distributed.any_rank(stop.signal is not None, ctx, device)  # every rank takes the same path
        if stopped and step < last:
            if saved_step[0] != step:
                checkpoint()
            finish(interrupted=True)
            raise TrainingInterrupted(step, ckpt_path)
    if history[-1]["val_loss"] is None:  # e.g. resumed at the end
        history[-1]["val_loss"] = val_loss()
        checkpoint()
    summary = finish(interrupted=False)
    return (summary, model.eval()) if return_model else summary


def _check_corpus(model, cfg, train_ids, val_ids):
    """One batch from each split before any training: a corpus too small for the model says so."""
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        try:
            model.get_batch(ids, 1, torch.Generator().manual_seed(0))
        except (RuntimeError, ValueError, IndexError) as e:
            if isinstance(ids, TaskData):
                raise UsageError(f"--data {ids.task}: {str(e).splitlines()[0][:200]}") from None
            raise UsageError(f"the {split} text ({len(ids)} tokens) is too small for this model "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:100]}); use a longer --data, a smaller "
                             "--seq-len or a different --val-fraction") from None

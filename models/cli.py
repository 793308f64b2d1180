"""The ``leapformer`` console command: train, generate, eval, compare, linearize, list, build.

    leapformer list
    leapformer train --model leapformer-lm [--attention leap|softmax] [--data FILE] [--steps N]
                     [--device auto] [--out DIR] [--resume | --overwrite] [--<any config field> VALUE ...]
    leapformer generate --ckpt runs/leapformer-lm-leap/ckpt.pt --prompt "The " [--prompt ...]
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    leapformer eval --ckpt runs/leapformer-lm-leap/ckpt.pt [--window W] [--stride S] [--carry-state]
    leapformer compare RUN_DIR [RUN_DIR ...] [--out DIR] [--data FILE] [--topk 1 5] [--log]
    leapformer linearize --model HF_DIR --data FILE --out DIR [--layers I ...] [--transfer-steps N]
                     [--finetune-steps N] [--lora | --no-lora] [--train-qk] [--seq-len T] [--batch-size B]
    leapformer build                      # build the C++ CPU kernels ahead of time
    leapformer --version

Every field of ``TrainConfig`` and of the chosen model's config dataclass is a flag
(``seq_len`` -> ``--seq-len``; booleans as ``--flag`` / ``--no-flag``; ``none`` for optional ones).
``leapformer train --model NAME --help`` lists them with one line of help each.

A user's mistake (a bad flag value, a missing or broken file, an unavailable device, an existing
run) ends with exit code 2 (usage) or 1 and one line on stderr; ``--debug`` (or
``LEAPFORMER_DEBUG=1``) shows the Python traceback instead. Ctrl-C or SIGTERM during training
saves a checkpoint of the last finished step, prints the command that resumes it and exits 130.
"""
import argparse
import itertools
import json
import math
import os
import shlex
import sys
import typing
from dataclasses import MISSING, fields

from .errors import UsageError, UserError

COMMANDS = ("train", "generate", "eval", "compare", "linearize", "list", "build")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parse_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        base = _parse_type(inner)

        def optional(s):
            return None if s.lower() == "none" else base(s)
        optional.__name__ = getattr(base, "__name__", "value")
        return optional
    return tp


def add_dataclass_args(parser, cls, skip=(), choices=None, defaults=None):
    """One flag per field of dataclass ``cls``; ``defaults`` replaces the defaults that the help shows."""
    helps = getattr(cls, "HELP", {})
    choices = choices or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        default = (defaults or {}).get(f.name, default)
        text = helps.get(f.name, f.name.replace("_", " "))
        text = f"{text} (default: {'none' if default is None else default})".replace("%", "%%")
        if f.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=text)
        else:
            ch = choices.get(f.name)
            parser.add_argument(flag, dest=f.name, type=_parse_type(f.type), default=argparse.SUPPRESS,
                                choices=ch, metavar=None if ch else f.name.upper(), help=text)


def _add_debug(p):
    p.add_argument("--debug", action="store_true", help="show Python tracebacks (also LEAPFORMER_DEBUG=1)")


def _train_parser(model_cls=None):
    from . import MODELS
    from .train import TrainConfig
    p = Parser(prog="leapformer train", description="train a model of the zoo on a text corpus")
    add_dataclass_args(p, TrainConfig, choices={"model": sorted(MODELS), "tokenizer": ["byte", "bpe"]},
                       defaults=getattr(model_cls, "train_defaults", None))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="start over, replacing the checkpoint in --out")
    _add_debug(p)
    if model_cls is not None:
        g = p.add_argument_group(f"{model_cls.name} config")
        add_dataclass_args(g, model_cls.Config, skip=("vocab_size",), choices=_config_choices(model_cls.Config))
    return p


def _config_choices(cls):
    """Choices of string config fields, read from the "a | b | c" form of their help line."""
    out = {}
    for f in fields(cls):
        text = getattr(cls, "HELP", {}).get(f.name, "")
        if f.type is str and "|" in text:
            head = text.split("(")[0].split(":")[-1]
            opts = [o.strip() for o in head.split("|")]
            if all(o and " " not in o for o in opts):
                out[f.name] = opts
    return out


def _resume_command(argv):
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["leapformer", "train", *args, "--resume"])


def cmd_train(argv):
    from . import get_model_class
    from .train import TrainConfig, train
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=TrainConfig.model)
    known, _ = pre.parse_known_args(argv)
    try:
        cls = get_model_class(known.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    args = vars(_train_parser(cls).parse_args(argv))
    resume, overwrite = args.pop("resume"), args.pop("overwrite")
    args.pop("debug")
    tnames = {f.name for f in fields(TrainConfig)}
    tcfg = TrainConfig.for_model(**{k: v for k, v in args.items() if k in tnames})  # + the model's train_defaults
    overrides = {k: v for k, v in args.items() if k not in tnames}
    if not resume:  # every model config field is checked before any work
        try:
            cls.Config(**overrides)
        except ValueError as e:
            raise UsageError(str(e)) from None
    from .errors import TrainingInterrupted
    try:
        summary = train(tcfg, overrides, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
            print(f"\ninterrupted: checkpoint of step {e.step} saved to {e.checkpoint}; resume with:\n"
                  f"  {_resume_command(argv)}", file=sys.stderr)
        return 130
    keep = ("model", "attention", "params", "steps", "final_val_loss", "best_val_loss", "val_accuracy",
            "train_time_s", "tokens_per_s", "device", "threads", "processes", "checkpoint")
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in keep if k in summary}, indent=1))
    return 0


def _gen_parser():
    p = Parser(prog="leapformer generate", description="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint file written by leapformer train (<out>/ckpt.pt)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a batch of prompts (left-padded, generated together)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt (>= 0)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (>= 0; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (>= 1)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass p, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler (>= 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--distance", type=int, default=None, help="LEAP models only: leap distance (default: the "
                   "distance head if trained with one, else the config's gen_distance)")
    p.add_argument("--no-cache", action="store_true",
                   help="causal LMs only: recompute the whole sequence each step (the reference)")
    p.add_argument("--collapse", choices=["never", "always", "threshold"], default=None,
                   help="softar only: which fed-back soft vectors become their nearest token's embedding: never, "
                        "always, or where the cosine distance to it exceeds --collapse-threshold (default: never; "
                        "the text is always the nearest tokens, so --temperature/--top-k/--top-p do not apply)")
    p.add_argument("--collapse-threshold", type=float, default=None,
                   help="softar only: cosine distance (1 - cos, >= 0) above which --collapse threshold collapses "
                        "(default 0.5; given alone it implies --collapse threshold)")
    _add_debug(p)
    return p


def _check_gen_args(a):
    if a.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {a.top_k}")
    if a.top_p is not None and not (0 < a.top_p <= 1):
        raise UsageError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {a.seed}")
    if a.collapse_threshold is not None and not (math.isfinite(a.collapse_threshold) and a.collapse_threshold >= 0):
        raise UsageError(f"--collapse-threshold must be a finite number >= 0 (a cosine distance), got "
                         f"{a.collapse_threshold}")
    if a.collapse_threshold is not None and a.collapse not in (None, "threshold"):
        raise UsageError(f"--collapse-threshold is for --collapse threshold, not --collapse {a.collapse}")


def cmd_generate(argv):
    import torch

    from .train import load_model, resolve_device
    a = _gen_parser().parse_args(argv)
    _check_gen_args(a)
    dev = resolve_device(a.device)
    model, tok, ckpt = load_model(a.ckpt, map_location=dev)
    causal = getattr(model, "causal", False)
    name = ckpt["model_name"]
    if causal and a.distance is not None:
        raise UsageError(f"--distance is for LEAP models; {name} is a causal LM (drop --distance)")
    if not causal and a.no_cache:
        raise UsageError(f"--no-cache is for causal LMs; {name} generates leap by leap (drop --no-cache)")
    if a.distance is not None:
        c = model.config
        if not c.min_distance <= a.distance <= c.max_distance:
            raise UsageError(f"--distance must be in [{c.min_distance}, {c.max_distance}] for this model, "
                             f"got {a.distance}")
    prompts = a.prompt or ["\n"]
    ids = [tok.encode(s) for s in prompts]
    n_new, note = a.max_new_tokens, None
    fit = model.max_new_tokens_that_fit(ids) if hasattr(model, "max_new_tokens_that_fit") else None
    if fit is not None and n_new > fit:
        pos, limit_name = model._position_limit()
        if fit <= 0:
            raise UserError(f"the prompt is {max(len(i) for i in ids)} tokens; this model holds at most "
                            f"{pos} positions ({limit_name}): shorten --prompt")
        n_new, note = fit, (f"stopped after {fit} of {a.max_new_tokens} new tokens: the model holds at most "
                            f"{pos} positions ({limit_name})")
    kw = dict(max_new_tokens=n_new, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              generator=torch.Generator(device=dev).manual_seed(a.seed))
    if causal:
        kw["use_cache"] = not a.no_cache
    elif a.distance is not None:
        kw["distance"] = a.distance
    if getattr(model, "collapse_policies", None):  # softar: the collapse policy
        kw["collapse"] = a.collapse or ("threshold" if a.collapse_threshold is not None else model.default_collapse)
        kw["threshold"] = model.default_threshold if a.collapse_threshold is None else a.collapse_threshold
    elif a.collapse is not None or a.collapse_threshold is not None:
        flag = "--collapse" if a.collapse is not None else "--collapse-threshold"
        raise UsageError(f"{flag} is for softar; {name} generates tokens, not soft vectors (drop {flag})")
    outs = model.generate(ids, **kw)
    for s, o in zip(prompts, outs):
        print(s + tok.decode(o))
        if len(prompts) > 1:
            print("-" * 60)
    if note:
        print(note, file=sys.stderr)
    return 0


EVAL_DESCRIPTION = """held-out loss of a checkpoint.

Causal LMs on text (leapformer-lm, leapformer-lm-long and the other models that predict the next
token causally: deepsight, futureformer, softar): one full pass over the validation text (or
--data), every next-token prediction scored exactly once; the loss is their mean next-token
cross-entropy (nats per token; auxiliary training losses are not in it). Window j reads tokens [j*stride, j*stride + window) and scores the predictions of the
tokens no earlier window scored: all of the first window, the last `stride` of each later one
(so stride < window gives each scored token at least window - stride tokens of context).
--carry-state (the default where possible: LeaP or linear attention without learned positions)
makes the windows disjoint and starts each from the recurrent state (S, z and the position
counter of every layer) that the previous window left: every token is then predicted from all
the text before it, exactly one forward pass over the whole text, and --window only bounds the
tokens per forward call. --no-carry-state (always for softmax) starts every window fresh, as in
training. Writes <out>/eval.json (everything printed, plus the loss by context length) and
<out>/eval_position_loss.png (loss against context length: the position in the window plus one,
or in the whole text with the state carried).

--batches N instead gives the mean loss of N random batches of the run's training length (the
estimate used during training; the only mode of the LEAP and LRA models and of generated tasks,
which also report accuracy).
"""


def cmd_eval(argv):
    from .train import TrainConfig, evaluate_terms, load_model, prepare_data, resolve_device
    p = Parser(prog="leapformer eval", description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file written by leapformer train")
    p.add_argument("--data", default=argparse.SUPPRESS,
                   help="text file or task (mqar | listops) (default: the training run's data)")
    p.add_argument("--window", type=int, default=None,
                   help="causal LMs: tokens per window of the full pass (default: the model's seq_len)")
    p.add_argument("--stride", type=int, default=None,
                   help="causal LMs: tokens between window starts, in [1, window] (default: the window)")
    p.add_argument("--carry-state", action=argparse.BooleanOptionalAction, default=None,
                   help="causal LMs: carry the recurrent state across windows (default: yes for LeaP and linear "
                        "attention without learned positions, else no)")
    p.add_argument("--batches", type=int, default=None,
                   help="mean of this many random batches instead of the full pass (>= 1; the only mode, "
                        "default 50, of non-LM models and generated tasks)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences (windows) per forward call (default: the run's)")
    p.add_argument("--out", default=None, help="full pass: folder for eval.json and eval_position_loss.png "
                   "(default: the checkpoint's folder)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="full pass: show a progress bar")
    _add_debug(p)
    a = p.parse_args(argv)
    for name in ("batches", "batch_size", "window", "stride"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if a.window is not None and a.stride is not None and a.stride > a.window:
        raise UsageError(f"--stride must be <= --window ({a.window}), got {a.stride}: tokens between windows would "
                         "go unscored")
    sliding_flags = [f for f, v in (("--window", a.window), ("--stride", a.stride), ("--carry-state", a.carry_state),
                                    ("--out", a.out)) if v is not None]
    if a.batches is not None and sliding_flags:
        raise UsageError(f"--batches (random batches) and {sliding_flags[0]} (the full pass) exclude each other")
    dev = resolve_device(a.device)
    model, tok, ckpt = load_model(a.ckpt, map_location=dev)
    tcfg = TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in TrainConfig.__dataclass_fields__})
    if hasattr(a, "data"):
        tcfg.data = a.data
    _, _, val_ids = prepare_data(tcfg, tok)
    bs = a.batch_size or tcfg.batch_size
    from .tasks import TaskData, accuracy
    full_pass = getattr(model, "causal", False) and not isinstance(val_ids, TaskData) and a.batches is None
    if not full_pass and sliding_flags:
        what = "a generated task" if isinstance(val_ids, TaskData) else ckpt["model_name"]
        raise UsageError(f"{sliding_flags[0]} is for the full pass of causal LMs on text; {what} is evaluated on "
                         "random batches (--batches)")
    res = {"checkpoint": a.ckpt, "model": ckpt["model_name"], "step": ckpt["step"]}
    if full_pass:
        return _eval_full_pass(a, model, tok, ckpt, val_ids, bs, res)
    batches = a.batches or 50
    terms = evaluate_terms(model, val_ids, batches, bs, seed=12345)
    loss = sum(terms.values())
    res["val_loss"] = loss
    if isinstance(val_ids, TaskData):  # a generated task: the accuracy of the scored predictions
        res.update(task=val_ids.task, accuracy=accuracy(model, val_ids, batches, bs, seed=12345))
        if hasattr(model, "extra_eval"):  # leapformer-stream: the policy, average lagging, ceiling, chance
            res.update(model.extra_eval(val_ids, batches, bs, seed=12345))
    if len(terms) == 1:  # one prediction per token: perplexity and bits per token are meaningful
        res.update(perplexity=math.exp(loss), bits_per_token=loss / math.log(2))
    else:  # LEAP: target + gap (+ distance) cross-entropies, each per predicted token
        res["val_loss_is"] = "the sum of the terms below (the training objective)"
        res["terms"] = {k: {"loss": v, "perplexity": math.exp(v), "bits_per_token": v / math.log(2)}
                        for k, v in terms.items()}
    res.update(tokenizer=tok.kind, batches=batches, batch_size=bs)
    print(json.dumps(res, indent=1))
    return 0


def _eval_full_pass(a, model, tok, ckpt, val_ids, bs, res):
    """``leapformer eval`` on a causal LM: the sliding-window full pass (models/sliding_eval.py)."""
    from .errors import require
    from .sliding_eval import carry_supported, plot_position_loss, sliding_window_loss
    require("leapformer eval", "matplotlib", *(["tqdm"] if a.progress else []))
    c = model.config
    window = a.window or c.seq_len
    why_not = carry_supported(model)
    if a.carry_state and why_not:
        raise UsageError(f"--carry-state: {why_not}; pass --no-carry-state (fresh windows)")
    carry = why_not is None if a.carry_state is None else a.carry_state
    stride = a.stride or window
    if carry and stride != window:
        if a.carry_state:
            raise UsageError(f"--stride {stride} < --window {window} with --carry-state: the carried state already "
                             "holds everything before a window, so windows are disjoint; drop --stride or pass "
                             "--no-carry-state")
        carry = False  # overlapping windows asked for: fresh windows
    limit = model._position_limit()
    if limit is not None and window > limit[0]:
        raise UsageError(f"--window {window} is longer than this model's {limit[1]} = {limit[0]} positions; "
                         f"pass --window {limit[0]} or less")
    if len(val_ids) < 2:
        raise UsageError(f"the validation text has {len(val_ids)} token(s): at least 2 are needed to score a "
                         "prediction (use a longer --data)")
    out = a.out or os.path.dirname(os.path.abspath(a.ckpt))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"{out} is not writable: pass --out DIR for eval.json and eval_position_loss.png")
    r = sliding_window_loss(model, val_ids, window, stride, carry_state=carry, batch_size=bs, progress=a.progress)
    loss = r["loss"]
    res.update(val_loss=loss, val_loss_is="next-token cross-entropy in nats per token, every prediction of the "
               "text scored once", perplexity=math.exp(loss), bits_per_token=loss / math.log(2), mode="full pass",
               tokens_scored=r["tokens"], window=r["window"], stride=r["stride"], windows=r["windows"],
               carry_state=carry, attention=c.attention,
               context=("all the text before each token (recurrent state carried across windows)" if carry else
                        f"the tokens before it in its window (fresh windows of {r['window']}, stride {r['stride']})"),
               tokenizer=tok.kind, batch_size=1 if carry else bs)
    json_path = os.path.join(out, "eval.json")
    png_path = os.path.join(out, "eval_position_loss.png")
    res.update(json=json_path, png=png_path)
    print(json.dumps(res, indent=1))
    plot_position_loss(r, png_path, f"{ckpt['model_name']} ({c.attention}), step {ckpt['step']}")
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**res, "loss_by_position": r["by_position"]}, f, indent=1)
    os.replace(tmp, json_path)
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


def cmd_compare(argv):
    from .errors import require
    p = Parser(prog="leapformer compare", description="several runs side by side: loss curves (compare.png) and a "
               "table (compare.md / compare.json) of size, speed, validation loss and top-k accuracy")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by leapformer train (--out)")
    p.add_argument("--out", default=os.path.join("runs", "compare"), help="folder for compare.png/.md/.json "
                   "(default: runs/compare)")
    p.add_argument("--data", default=None, help="score every run's top-k accuracy on all of this text file "
                   "(default: each run's own validation split)")
    p.add_argument("--topk", type=int, nargs="+", default=[1, 5], metavar="K", help="top-k accuracies (default: 1 5)")
    p.add_argument("--batches", type=int, default=20, help="batches of held-out text per run (>= 1)")
    p.add_argument("--log", action="store_true", help="log-scale loss and step / token axes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    _add_debug(p)
    a = p.parse_args(argv)
    if any(k < 1 for k in a.topk):
        raise UsageError(f"--topk values must be >= 1, got {' '.join(map(str, a.topk))}")
    if a.batches < 1:
        raise UsageError(f"--batches must be >= 1, got {a.batches}")
    require("leapformer compare", "matplotlib", *(["tqdm"] if a.progress else []))
    from .compare import compare
    from .data import load_text
    from .train import resolve_device
    if a.data is not None:
        load_text(a.data)  # a missing or binary --data: one line before any work
    dev = resolve_device(a.device)
    res = compare(a.runs, a.out, data=a.data, ks=sorted(set(a.topk)), batches=a.batches, device=dev, log=a.log,
                  progress=a.progress, warn=lambda m: print(f"leapformer compare: {m}", file=sys.stderr))
    print(open(res["md"]).read().rstrip())
    print(f"\nwrote {res['png']}, {res['md']}, {res['json']}")
    return 0


LINEARIZE_DESCRIPTION = """linearise a Hugging Face causal LM (a save_pretrained folder of GPT-2, Llama, Mistral or
Qwen2) with LeaP attention and train it back, LoLCATs-style, on a text file:

  1. lk.hf.linearize: the chosen layers' self-attention becomes LeaP attention (same projections,
     new LeaP predictors);
  2. attention transfer (--transfer-steps): only the LeaP predictors train (and the q, k
     projections with --train-qk), so that each layer's LeaP output matches the softmax output of
     the same layer on the same q, k, v (MSE); the softmax output flows downstream meanwhile;
  3. fine-tuning (--finetune-steps) on next-token loss: LoRA adapters on the LeaP layers' q, k, v, o
     projections plus the LeaP predictors (merged into the weights at the end), or every
     parameter with --no-lora.

The held-out loss (the last --val-fraction of the text) is measured for the softmax model, then
after each stage. Writes to --out: the linearised model (save_pretrained; load it with
lk.hf.load), linearize.json (losses, per-layer transfer MSE, timings) and linearize_loss.png.
Ctrl-C saves what was trained so far and exits 130.
"""


def _linearize_parser():
    p = Parser(prog="leapformer linearize", description=LINEARIZE_DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by save_pretrained (config.json + weights)")
    p.add_argument("--data", required=True, help="UTF-8 text file to train and evaluate on")
    p.add_argument("--out", required=True, help="folder for the linearised model, linearize.json and .png")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--attention", choices=["leap", "linear"], default="leap", help="the attention that replaces "
                   "softmax (default: leap)")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="I",
                   help="layer indices to linearise (default: all; negative from the end)")
    p.add_argument("--leap-hidden", type=int, default=None, help="hidden width of the LeaP predictors "
                   "(default: head_dim // 4)")
    p.add_argument("--transfer-steps", type=int, default=200, help="attention-transfer steps (>= 0; default 200)")
    p.add_argument("--transfer-lr", type=float, default=1e-2, help="attention-transfer learning rate (default 1e-2)")
    p.add_argument("--train-qk", action="store_true", help="attention transfer also trains the q and k projections")
    p.add_argument("--finetune-steps", type=int, default=200, help="fine-tuning steps (>= 0; default 200)")
    p.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default: 1e-3 "
                   "with LoRA, 1e-4 full)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune LoRA adapters + the LeaP predictors (--no-lora: every parameter; default: lora)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training / evaluation sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per loss (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the text, from its end, "
                   "in (0, 1) (default 0.1)")
    p.add_argument("--tokenizer", choices=["auto", "byte"], default="auto", help="auto: the model folder's "
                   "tokenizer, else UTF-8 bytes (ids 0-255); byte: UTF-8 bytes (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the batches (>= 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the idle cores)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    _add_debug(p)
    return p


def _check_linearize_args(a):
    for name, lo in (("transfer_steps", 0), ("finetune_steps", 0), ("lora_r", 1), ("seq_len", 2), ("batch_size", 1),
                     ("eval_batches", 1), ("seed", 0)):
        if getattr(a, name) < lo:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(a, name)}")
    for name in ("leap_hidden", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("transfer_lr", "finetune_lr"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
    if not 0 < a.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {a.val_fraction}")


class _Bytes:
    """UTF-8 bytes as token ids (for models trained on bytes, e.g. the linearize demo's teacher)."""
    kind = "byte"

    def encode(self, text):
        return list(text.encode("utf-8"))


def _linearize_tokenizer(a, config):
    names = set(os.listdir(a.model))
    if a.tokenizer == "auto" and names & {"tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"}:
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(a.model)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {a.model}: its tokenizer does not load ({str(e).splitlines()[0][:160]}); "
                            "pass --tokenizer byte for a byte-level model") from None
    vocab = getattr(config, "vocab_size", 0) or 0
    if vocab < 256:
        raise UsageError(f"--model {a.model} has no tokenizer files and a vocabulary of {vocab} < 256: UTF-8 bytes "
                         "do not fit; save the tokenizer into the folder (tokenizer.save_pretrained)")
    if a.tokenizer == "auto":
        print(f"leapformer linearize: no tokenizer in {a.model}: UTF-8 bytes as token ids", file=sys.stderr)
    return _Bytes()


def plot_linearize(res, path, title="", teacher_history=None):
    """PNG: (teacher training,) attention-transfer MSE per layer, fine-tuning loss with the held-out losses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    panels = (["teacher"] if teacher_history else []) + ["transfer", "finetune"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4))
    axes = dict(zip(panels, np.atleast_1d(axes)))
    held = res["held_out_loss"]
    if teacher_history:
        ax = axes["teacher"]
        tr = [(r["step"], r["train_loss"]) for r in teacher_history if r.get("train_loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in teacher_history if r.get("val_loss") is not None]
        if tr:
            s, l = zip(*tr)
            k = max(1, len(l) // 50)
            ax.plot(s[k - 1:], np.convolve(l, np.ones(k) / k, mode="valid"), lw=1, alpha=0.7, label="train")
        if va:
            ax.plot(*zip(*va), "o-", ms=3, label="held out")
        ax.set(title="softmax teacher", xlabel="step", ylabel="loss (nats / token)")
        ax.legend()
    ax = axes["transfer"]
    rows = [r for r in res["transfer"]["history"] if "layers" in r]
    if rows:
        for layer in sorted({int(i) for r in rows for i in r["layers"]}):
            pts = [(r["step"], r["layers"].get(layer, r["layers"].get(str(layer)))) for r in rows]
            ax.plot(*zip(*[p for p in pts if p[1] is not None]), lw=1, label=f"layer {layer}")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set(title="attention transfer: MSE(LeaP, softmax)", xlabel="step", ylabel="MSE")
    ax = axes["finetune"]
    hist = res["finetune"]["history"]
    if hist:
        s, l = zip(*[(r["step"], r["loss"]) for r in hist])
        k = max(1, len(l) // 50)
        ax.plot(s[k - 1:], np.convolve(l, np.ones(k) / k, mode="valid"), lw=1, label="train (smoothed)")
    for (key, label), col in zip((("softmax", "softmax model"), ("before_transfer", "before transfer"),
                                  ("after_transfer", "after transfer"), ("after_finetune", "after fine-tuning")),
                                 ("k", "C3", "C2", "C1")):
        if held.get(key) is not None:
            ax.axhline(held[key], color=col, ls="--", lw=1, label=f"held out: {label} {held[key]:.3f}")
    ax.set(title="fine-tuning (next-token loss)", xlabel="step", ylabel="loss (nats / token)")
    ax.legend(fontsize=8)
    for a in axes.values():
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_linearize(argv, teacher_history=None):
    """``leapformer linearize`` (``teacher_history``: the demo's teacher curve, for the plot); returns
    (exit code, the result dict)."""
    from .errors import require
    a = _linearize_parser().parse_args(argv)
    _check_linearize_args(a)
    require("leapformer linearize", "transformers", "peft", extra="hf")
    require("leapformer linearize", "matplotlib", *(["tqdm"] if a.progress else []))
    import torch
    import transformers

    from .data import load_text
    from .train import auto_threads, resolve_device
    if not os.path.isdir(a.model) or not os.path.isfile(os.path.join(a.model, "config.json")):
        raise UserError(f"--model {a.model} is not a save_pretrained folder (no config.json in it)")
    load_text(a.data)  # a missing or binary --data: one line before any work
    if os.path.exists(os.path.join(a.out, "config.json")) and not a.overwrite:
        raise UsageError(f"--out {a.out} already holds a model: pass --overwrite to replace it, or another --out")
    dev = resolve_device(a.device)
    torch.set_num_threads(a.threads or auto_threads())
    try:
        config = transformers.AutoConfig.from_pretrained(a.model)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {a.model}: its config.json does not load ({str(e).splitlines()[0][:160]})") from None
    if getattr(config, "leapformer", None):
        raise UsageError(f"--model {a.model} is already linearised (config.json has 'leapformer'): load it with "
                         "lk.hf.load, or start from the softmax model")
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit and a.seq_len > limit:
        raise UsageError(f"--seq-len {a.seq_len} is longer than the model's {limit} positions")
    from leapformer_kernels.hf.linearize import FAMILIES
    if getattr(config, "model_type", None) not in FAMILIES:
        raise UsageError(f"--model {a.model} is a {getattr(config, 'model_type', None)!r} model: leapformer linearize "
                         f"supports model_type {', '.join(map(repr, FAMILIES))}")
    n = getattr(config, "num_hidden_layers", None)
    bad = [i for i in a.layers or [] if n is not None and not -n <= i < n]
    if bad:
        raise UsageError(f"--layers {' '.join(map(str, bad))}: not layer indices of this model (it has {n} layers: "
                         f"0..{n - 1}, or negative from the end)")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its loading / writing bars: our own bars only
    try:
        return _run_linearize(a, config, dev, teacher_history)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _run_linearize(a, config, dev, teacher_history):
    import time

    import torch
    import transformers

    import leapformer_kernels as lk
    from .data import load_text, split_text
    text = load_text(a.data)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model).to(dev)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {a.model} does not load as a causal LM ({str(e).splitlines()[0][:160]})") from None
    tok = _linearize_tokenizer(a, config)
    train_text, val_text = split_text(text, a.val_fraction)
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tok.encode(val_text), dtype=torch.long)
    for split, ids in (("training", train_ids), ("held-out", val_ids)):
        if len(ids) <= a.seq_len:
            raise UsageError(f"the {split} part of --data has {len(ids)} tokens, not more than --seq-len {a.seq_len}: "
                             "use a longer text or a smaller --seq-len")
    vocab = model.get_input_embeddings().num_embeddings
    if int(train_ids.max()) >= vocab or int(val_ids.max()) >= vocab:
        raise UsageError(f"the tokenizer's ids go past the model's vocabulary of {vocab}")
    val_batches = list(itertools.islice(lk.hf.token_batches(val_ids, a.seq_len, a.batch_size, seed=a.seed + 1),
                                        a.eval_batches))
    os.makedirs(a.out, exist_ok=True)
    res = {"model": os.path.abspath(a.model), "data": os.path.abspath(a.data), "out": os.path.abspath(a.out),
           "architecture": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
           "attention": a.attention, "tokenizer": getattr(tok, "kind", type(tok).__name__), "seq_len": a.seq_len,
           "batch_size": a.batch_size, "eval_batches": a.eval_batches, "device": str(dev),
           "threads": torch.get_num_threads(), "held_out_loss": {}, "seconds": {},
           "transfer": {"steps": a.transfer_steps, "history": []}, "finetune": {"steps": a.finetune_steps,
                                                                               "lora": a.lora, "history": []},
           "interrupted": None}
    held = res["held_out_loss"]
    json_path, png_path = os.path.join(a.out, "linearize.json"), os.path.join(a.out, "linearize_loss.png")

    def write():
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, json_path)
        plot_linearize(res, png_path, f"{res['architecture']} linearised ({a.attention})", teacher_history)

    def save(model):
        model.save_pretrained(a.out)
        if hasattr(tok, "save_pretrained"):
            tok.save_pretrained(a.out)

    def record(key, stage, what, log, steps):
        """Record a stage's log and save the model (nothing trained is lost from here on); True
        (after saying so) when Ctrl-C stopped the stage."""
        res[key].update(history=log.history, steps_done=log.steps_done, seconds=log.seconds)
        res["trainable"][key] = log.trainable
        save(model)
        if not log.interrupted:
            return False
        res["interrupted"] = f"{stage}, after step {log.steps_done}"
        write()
        print(f"\ninterrupted: {stage} stopped after step {log.steps_done} of {steps}; {what} is saved in "
              f"{a.out} (lk.hf.load)", file=sys.stderr)
        return True

    def timed(key, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        res["seconds"][key] = time.perf_counter() - t0
        return out

    held["softmax"] = timed("eval_softmax", lk.hf.evaluate_loss, model, val_batches)
    try:
        lk.hf.linearize(model, attention=a.attention, layers=a.layers, leap_hidden=a.leap_hidden)
    except ValueError as e:
        raise UsageError(str(e)) from None
    res["layers"] = model.config.leapformer["layers"]
    res["trainable"] = {}
    held["before_transfer"] = timed("eval_before_transfer", lk.hf.evaluate_loss, model, val_batches)
    batches = lk.hf.token_batches(train_ids, a.seq_len, a.batch_size, seed=a.seed)
    if a.transfer_steps:
        try:
            log = lk.hf.transfer_attention(model, batches, a.transfer_steps, lr=a.transfer_lr, train_qk=a.train_qk,
                                           progress=a.progress)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if record("transfer", "attention transfer", "the model so far", log, a.transfer_steps):
            return 130, res
        held["after_transfer"] = timed("eval_after_transfer", lk.hf.evaluate_loss, model, val_batches)
    if a.finetune_steps:
        log = lk.hf.finetune(model, batches, a.finetune_steps, lora=a.lora, lr=a.finetune_lr, lora_r=a.lora_r,
                             progress=a.progress)
        model = log.model
        if record("finetune", "fine-tuning", "the model so far (LoRA merged)", log, a.finetune_steps):
            return 130, res
        held["after_finetune"] = timed("eval_after_finetune", lk.hf.evaluate_loss, model, val_batches)
    if not (a.transfer_steps or a.finetune_steps):
        save(model)
    write()
    return 0, res


def cmd_linearize(argv):
    code, res = run_linearize(argv)
    if code == 0:
        summary = {k: res[k] for k in ("architecture", "params", "layers", "attention", "held_out_loss", "seconds",
                                       "out")}
        print(json.dumps(summary, indent=1))
        print(f"wrote {res['out']} (lk.hf.load), linearize.json and linearize_loss.png", file=sys.stderr)
    return code


def cmd_list(argv):
    from . import list_models
    p = Parser(prog="leapformer list", description="the models of the zoo")
    _add_debug(p)
    p.parse_args(argv)
    for name, desc in list_models():
        print(f"{name:18s} {desc}")
    return 0


def cmd_build(argv):
    import time

    import leapformer_kernels as lk
    from leapformer_kernels import _build
    p = Parser(prog="leapformer build", description="build the C++ CPU kernels ahead of time (cached)")
    _add_debug(p)
    p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        names = lk.build()
    except _build.BuildError as e:
        tail = str(e).strip().splitlines()
        raise UserError(f"the C++ build failed ({tail[-1][:200] if tail else 'no log'}); "
                        "run with --debug for the log; the torch backend still works") from None
    print(f"C++ CPU kernels ready ({', '.join(names)}) in {time.perf_counter() - t0:.1f} s; cache: "
          f"{_build.cache_root()}")
    return 0


HANDLERS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "compare": cmd_compare,
            "linearize": cmd_linearize, "list": cmd_list, "build": cmd_build}


def _version() -> str:
    import platform

    import leapformer_kernels as lk
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "absent"
    return f"leapformer-kernels {lk.__version__} (torch {tv}, Python {platform.python_version()})"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LEAPFORMER_DEBUG", "0") not in ("", "0")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    if argv[0] not in HANDLERS:
        print(f"leapformer: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (see leapformer --help)",
              file=sys.stderr)
        return 2
    prog = f"leapformer {argv[0]}"
    try:
        return HANDLERS[argv[0]](argv[1:])
    except UserError as e:
        if debug:
            raise
        msg = str(e) if str(e).startswith("leapformer") else f"{prog}: {e}"
        print(msg, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. leapformer generate ... | head
        return 0


if __name__ == "__main__":
    sys.exit(main())

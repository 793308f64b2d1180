"""The ``leapformer`` console command: train, generate, eval, list.

    leapformer list
    leapformer train --model leapformer-lm [--attention leap|softmax] [--data FILE] [--steps N]
                     [--device auto] [--out DIR] [--resume] [--<any config field> VALUE ...]
    leapformer generate --ckpt runs/leapformer-lm-leap/ckpt.pt --prompt "The " [--prompt ...]
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    leapformer eval --ckpt runs/leapformer-lm-leap/ckpt.pt

Every field of ``TrainConfig`` and of the chosen model's config dataclass is a flag
(``seq_len`` -> ``--seq-len``; booleans as ``--flag`` / ``--no-flag``; ``none`` for optional ones).
"""
import argparse
import json
import math
import sys
import typing
from dataclasses import MISSING, fields

import torch


def _parse_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        base = _parse_type(inner)
        return lambda s: None if s.lower() == "none" else base(s)
    return tp


def add_dataclass_args(parser, cls, skip=()):
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"(default {default})")
        else:
            parser.add_argument(flag, dest=f.name, type=_parse_type(f.type), default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=f"(default {default})")


def _train_parser(model_cls=None):
    from .train import TrainConfig
    p = argparse.ArgumentParser(prog="leapformer train", description="train a model of the zoo")
    add_dataclass_args(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    if model_cls is not None:
        g = p.add_argument_group(f"{model_cls.name} config")
        add_dataclass_args(g, model_cls.Config, skip=("vocab_size",))
    return p


def cmd_train(argv):
    from . import get_model_class
    from .train import TrainConfig, train
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=TrainConfig.model)
    known, _ = pre.parse_known_args(argv)
    cls = get_model_class(known.model)
    args = vars(_train_parser(cls).parse_args(argv))
    resume = args.pop("resume")
    tnames = {f.name for f in fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in args.items() if k in tnames})
    overrides = {k: v for k, v in args.items() if k not in tnames}
    summary = train(tcfg, overrides, resume=resume)
    keep = ("model", "attention", "params", "steps", "final_val_loss", "best_val_loss", "train_time_s",
            "tokens_per_s", "device", "checkpoint")
    print(json.dumps({k: summary[k] for k in keep}, indent=1))
    return 0


def cmd_generate(argv):
    from .train import load_model, resolve_device
    p = argparse.ArgumentParser(prog="leapformer generate", description="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a batch of prompts (left-padded, generated together)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--distance", type=int, default=None, help="LEAP models: leap distance (default: the "
                   "distance head if trained with one, else the config's gen_distance)")
    p.add_argument("--no-cache", action="store_true", help="causal LMs: recompute the whole sequence each step")
    a = p.parse_args(argv)
    dev = resolve_device(a.device)
    model, tok, _ = load_model(a.ckpt, map_location=dev)
    prompts = a.prompt or ["\n"]
    ids = [tok.encode(s) for s in prompts]
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              generator=torch.Generator(device=dev).manual_seed(a.seed))
    if getattr(model, "causal", False):
        kw["use_cache"] = not a.no_cache
    elif a.distance is not None:
        kw["distance"] = a.distance
    outs = model.generate(ids, **kw)
    for s, o in zip(prompts, outs):
        print(s + tok.decode(o))
        if len(prompts) > 1:
            print("-" * 60)
    return 0


def cmd_eval(argv):
    from .train import TrainConfig, evaluate, load_model, prepare_data, resolve_device
    p = argparse.ArgumentParser(prog="leapformer eval", description="validation loss of a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default=argparse.SUPPRESS, help="text file (default: the training run's corpus)")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    dev = resolve_device(a.device)
    model, tok, ckpt = load_model(a.ckpt, map_location=dev)
    tcfg = TrainConfig(**ckpt["train_config"])
    if hasattr(a, "data"):
        tcfg.data = a.data
    _, _, val_ids = prepare_data(tcfg, tok)
    bs = a.batch_size or tcfg.batch_size
    loss = evaluate(model, val_ids, a.batches, bs, seed=12345)
    res = {"checkpoint": a.ckpt, "model": ckpt["model_name"], "step": ckpt["step"], "val_loss": loss,
           "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2), "tokenizer": tok.kind,
           "batches": a.batches, "batch_size": bs}
    print(json.dumps(res, indent=1))
    return 0


def cmd_list(argv):
    from . import list_models
    argparse.ArgumentParser(prog="leapformer list", description="the models of the zoo").parse_args(argv)
    for name, desc in list_models():
        print(f"{name:18s} {desc}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "list": cmd_list}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

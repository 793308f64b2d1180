"""``leapformer train`` under ``torchrun``: DDP (default) or FSDP2 over PyTorch's own engine.

The training loop (``train.py``) calls into this module only; one process, no launcher, is the
same code with a world of 1 (nothing is wrapped, nothing communicated).

- **Launch**: ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT``; when some are set and others missing, ``setup`` stops with one line naming them.
  Process group: NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU; created here and
  destroyed by ``teardown`` (a group that already exists is used and left alone).
- **Data**: every rank draws the same *global* batch (``batch_size`` sequences) from the run's
  seeded generator and keeps its own contiguous slice (``shard``), cut again into
  ``grad_accum`` micro-batches; so the data order is the one-process run's for any world size,
  and a run resumes on any world size. ``batch_size`` must be divisible by world x grad_accum.
- **Loss**: each micro-batch's loss is divided by ``grad_accum``; DDP / FSDP average gradients
  over ranks; the logged loss is the mean over ranks and micro-batches. This equals the
  one-process loss on the global batch when every micro-batch scores the same number of tokens
  (text); with unscored positions (MQAR's labels) it is the mean of per-slice means.
- **Models**: wrapped as a ``LossModule`` (its forward is ``model.loss``), so DDP's and FSDP's
  hooks run whatever method computes the loss. FSDP2 (``fully_shard``) shards every block of
  the model's ``nn.ModuleList`` stacks, then the rest as the root.
- **Checkpoints**: always the full, unsharded state (model and optimizer, in the one-process
  format), gathered to rank 0, written by rank 0 atomically; read by every rank, so a run saved
  on N processes resumes on M (with several machines the run folder must be shared).
- **Unused parameters**: before wrapping, one micro-batch's backward finds parameters that get no
  gradient; a model with any stops with one line naming them (DDP would hang or fail later).
"""
import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import UsageError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STRATEGIES = ("ddp", "fsdp")
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False  # this module created the process group (and destroys it)
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launch_env(environ=None) -> Optional[dict]:
    """The launcher's variables as ints/strings, None when the process was not launched by
    torchrun (none of RANK, WORLD_SIZE, LOCAL_RANK set); UsageError when incomplete or malformed."""
    env = os.environ if environ is None else environ
    if not any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    missing = [k for k in LAUNCH_VARS if not env.get(k)]
    if missing:
        present = [k for k in LAUNCH_VARS if env.get(k)]
        raise UsageError(f"the launcher's environment is incomplete: {', '.join(present)} set but "
                         f"{', '.join(missing)} not; launch with torchrun (it sets all of {', '.join(LAUNCH_VARS)}), "
                         "or unset them for a one-process run")
    out = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            out[k] = int(env[k])
        except ValueError:
            raise UsageError(f"{k}={env[k]!r} is not an integer (set by the launcher)") from None
    if not (0 <= out["RANK"] < out["WORLD_SIZE"]):
        raise UsageError(f"RANK={out['RANK']} is outside [0, WORLD_SIZE={out['WORLD_SIZE']})")
    out["MASTER_ADDR"] = env["MASTER_ADDR"]
    return out


def setup(device: torch.device, strategy: str = "ddp") -> tuple:
    """(Context, device of this rank). Creates the process group when launched with WORLD_SIZE > 1."""
    env = launch_env()
    if env is None or env["WORLD_SIZE"] == 1:
        return Context(strategy=strategy), device
    if device.type == "cuda":
        device = torch.device("cuda", env["LOCAL_RANK"])
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"training on several processes needs CUDA or CPU devices, got {device}")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=TIMEOUT)
    if dist.get_world_size() != env["WORLD_SIZE"]:
        raise UsageError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={env['WORLD_SIZE']}")
    return Context(dist.get_rank(), dist.get_world_size(), env["LOCAL_RANK"], created, strategy), device


def teardown(ctx: Context) -> None:
    if ctx.created and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(ctx: Context, batch_size: int, grad_accum: int) -> None:
    parts = ctx.world * grad_accum
    if batch_size % parts:
        raise UsageError(f"--batch-size {batch_size} must be divisible by the number of processes x "
                         f"--grad-accum = {ctx.world} x {grad_accum} = {parts}")


def _slice(x, i: int, n: int):
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        size = x.shape[0] // n
        return x[i * size:(i + 1) * size]
    if isinstance(x, dict):
        return {k: _slice(v, i, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(v, i, n) for v in x)
    return x


def shard(batch, ctx: Context, grad_accum: int) -> list:
    """This rank's micro-batches of a global batch (every tensor split along its first dim)."""
    mine = _slice(batch, ctx.rank, ctx.world)
    return [_slice(mine, i, grad_accum) for i in range(grad_accum)]


class LossModule(nn.Module):
    """``forward(batch) = model.loss(batch)``: what DDP / FSDP wrap, so their hooks run for any
    model, whichever of its methods computes the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)

    # what ``train.evaluate`` calls: the loss goes through forward (under FSDP the root's hooks must
    # run first, before any block's), the batches come from the model
    def loss(self, batch):
        return self(batch)

    def get_batch(self, *args, **kwargs):
        return self.model.get_batch(*args, **kwargs)


def evaluator(wrapped: nn.Module) -> nn.Module:
    """The module ``evaluate`` runs: the ``LossModule`` (under DDP its inner module: no DDP hooks)."""
    return getattr(wrapped, "module", wrapped)


def unused_parameters(model: nn.Module, micro_batch) -> list:
    """Names of the parameters that get no gradient from one micro-batch's loss (grads cleared after)."""
    model.zero_grad(set_to_none=True)
    model.loss(micro_batch).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return names


def wrap(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """The module whose forward(batch) returns the loss: DDP or FSDP2 when distributed."""
    lm = LossModule(model)
    if not ctx.distributed:
        return lm
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(lm, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for stack in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
        for block in stack:
            fully_shard(block)
    fully_shard(lm)
    return lm


def sync_context(wrapped: nn.Module, ctx: Context, last: bool):
    """Gradient sync only on the last micro-batch of a step."""
    if not ctx.distributed or last:
        if ctx.distributed and ctx.strategy == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        return nullcontext()
    if ctx.strategy == "ddp":
        return wrapped.no_sync()
    wrapped.set_requires_gradient_sync(False)
    return nullcontext()


def mean(value: float, ctx: Context, device) -> float:
    """The mean of a float over ranks."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / ctx.world


def any_rank(flag: bool, ctx: Context, device) -> bool:
    """True on every rank when it is True on one (e.g. a Ctrl-C seen by one rank stops all)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def _fsdp(ctx: Context) -> bool:
    return ctx.distributed and ctx.strategy == "fsdp"


def _param_names(model: nn.Module, opt) -> list:
    """FQNs of the optimizer's parameters in its own order (the ids of ``opt.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_state(model: nn.Module, opt, ctx: Context):
    """(model state, optimizer state), unsharded, in the one-process format (optimizer keyed by
    position). A collective under FSDP: every rank calls it; the tensors are on the CPU there."""
    if not _fsdp(ctx):
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=o)
    osd = get_optimizer_state_dict(model, opt, options=o)
    if not ctx.main:  # full_state_dict with cpu_offload: only rank 0 receives the tensors
        return msd, osd
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    osd = {"state": {index[n]: s for n, s in osd["state"].items()},
           "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}
    return msd, osd


def load_optimizer(model: nn.Module, opt, osd: dict, ctx: Context) -> None:
    """Load a one-process-format optimizer state (after ``wrap``; FSDP: scattered to the shards)."""
    if not _fsdp(ctx):
        opt.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, opt)
    fqn = {"state": {names[i]: s for i, s in osd["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, opt, fqn, options=StateDictOptions(full_state_dict=True))


def eval_context(wrapped: nn.Module, ctx: Context):
    """Evaluation calls the model's own methods: under FSDP the root's parameters are gathered first
    (the blocks gather theirs in their forward hooks)."""
    if not _fsdp(ctx):
        return nullcontext()
    return _Unsharded(wrapped)


class _Unsharded:
    def __init__(self, m):
        self.m = m

    def __enter__(self):
        self.m.unshard()

    def __exit__(self, *exc):
        self.m.reshard()
        return False

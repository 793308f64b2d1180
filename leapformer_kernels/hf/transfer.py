"""Linearisation, part 2 (the LoLCATs recipe): attention transfer, then fine-tuning.

    lk.hf.linearize(model)                                        # part 1: LeaP layers, untrained predictors
    lk.hf.transfer_attention(model, batches, steps=200)           # (1) each LeaP output -> its softmax output
    model = lk.hf.finetune(model, batches, steps=200).model       # (2) next-token loss, LoRA (merged back)

``batches`` is an iterable of LongTensor [B, T] of token ids, or of dicts with ``input_ids`` [B, T]
and optionally ``attention_mask`` [B, T] (1 = token, 0 = padding) and ``labels`` [B, T] (-100 =
not scored); a list or tuple is cycled, an iterator is read until ``steps`` or its end, and
``lk.hf.token_batches`` makes an endless one of random windows of a token stream.

Ctrl-C (SIGINT) or SIGTERM during either loop finishes the step under way, stops, and returns
with ``interrupted=True``: the model keeps every finished step (save it); a second Ctrl-C stops at
once.
"""
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch

from .._training import StopRequest, warmup_cosine
from .attention import LeapSelfAttention


@dataclass
class TrainLog:
    """What a training call did. ``history``: one dict per step (``step``, ``loss``, ``lr``,
    ``seconds``; attention transfer adds ``layers``, {layer index: MSE}); ``trainable``: the names of
    the parameters that trained; ``steps_done``: the optimizer steps taken, fewer than ``steps`` when
    ``interrupted`` (Ctrl-C / SIGTERM) or ``exhausted`` (an iterator of batches ran out);
    ``seconds``: time in the training loop."""

    model: object
    steps: int
    steps_done: int = 0
    history: List[dict] = field(default_factory=list)
    trainable: List[str] = field(default_factory=list)
    interrupted: bool = False
    exhausted: bool = False
    seconds: float = 0.0

    @property
    def final_loss(self) -> Optional[float]:
        return self.history[-1]["loss"] if self.history else None




# --------------------------------------------------------------------------- checks and helpers
def leap_modules(model):
    """[(layer index, LeapSelfAttention)] of a linearised model (or a peft model around one)."""
    mods = [m for m in model.modules() if isinstance(m, LeapSelfAttention)]
    return [(m.layer_idx, m) for m in mods]


def _check_model(model, fn: str):
    from transformers import PreTrainedModel
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is part of the [hf] extra
        PeftModel = ()
    if not isinstance(model, PreTrainedModel) and not (PeftModel and isinstance(model, PeftModel)):
        raise TypeError(f"{fn}: model must be a transformers PreTrainedModel linearised with lk.hf.linearize, "
                        f"got {type(model).__name__}")
    mods = leap_modules(model)
    if not mods:
        raise ValueError(f"{fn}: model has no LeaP layers: call lk.hf.linearize(model) first")
    return mods


def _check_int(name, value, lo, fn):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {value!r}")


def _check_number(name, value, fn, lo=0.0, lo_open=False, optional=False):
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > lo if lo_open else value >= lo)
    if not ok:
        raise ValueError(f"{fn}: {name} must be a finite number {'>' if lo_open else '>='} {lo}"
                         f"{' or None' if optional else ''}, got {value!r}")


def _batch_source(batches, fn: str):
    """An iterator over the items of ``batches`` (lists and tuples cycled)."""
    if isinstance(batches, (torch.Tensor, dict, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"{fn}: batches must be an iterable (list, iterator) of LongTensor [B, T] or of dicts with "
                        f"'input_ids' [B, T], got {type(batches).__name__} (wrap a single batch in a list)")
    if isinstance(batches, (list, tuple)):
        if not batches:
            raise ValueError(f"{fn}: batches is empty")
        return itertools.cycle(batches)
    return iter(batches)


def _as_inputs(item, model, device, fn: str, n: int) -> dict:
    """One batch as model kwargs on ``device``, checked."""
    if isinstance(item, torch.Tensor):
        item = {"input_ids": item}
    if not isinstance(item, dict) or "input_ids" not in item:
        raise TypeError(f"{fn}: batches item {n} must be a LongTensor [B, T] or a dict with 'input_ids', got "
                        f"{type(item).__name__}")
    unknown = set(item) - {"input_ids", "attention_mask", "labels"}
    if unknown:
        raise ValueError(f"{fn}: batches item {n} has keys {sorted(unknown)}; expected input_ids, attention_mask, "
                         f"labels")
    ids = item["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32) \
            or ids.shape[1] < 2 or ids.shape[0] < 1:
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{fn}: batches item {n}: input_ids must be an integer tensor [B, T] with T >= 2, got {got}")
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"{fn}: batches item {n}: token ids must be in [0, {vocab}) (the model's vocabulary), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    out = {"input_ids": ids.long().to(device)}
    for key in ("attention_mask", "labels"):
        t = item.get(key)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ids.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: batches item {n}: {key} must be a tensor of input_ids' shape "
                             f"{tuple(ids.shape)}, got {got}")
        out[key] = t.long().to(device)
    return out


def _labels(inputs: dict) -> torch.Tensor:
    labels = inputs.get("labels")
    if labels is None:
        labels = inputs["input_ids"].clone()
        if "attention_mask" in inputs:
            labels[inputs["attention_mask"] == 0] = -100
    return labels


def _device(model):
    return next(model.parameters()).device


def token_batches(ids, seq_len: int, batch_size: int, seed: int = 0):
    """An endless iterator of LongTensor [batch_size, seq_len]: random windows of the 1-D token
    tensor ``ids`` [N] (N > seq_len), drawn with its own seeded generator."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.long, torch.int32):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"token_batches: ids must be a 1-D integer tensor of token ids, got {got}")
    _check_int("seq_len", seq_len, 2, "token_batches")
    _check_int("batch_size", batch_size, 1, "token_batches")
    if len(ids) <= seq_len:
        raise ValueError(f"token_batches: ids has {len(ids)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)

    def windows():
        while True:
            ix = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=gen)
            yield torch.stack([ids[i:i + seq_len] for i in ix.tolist()]).long()
    return windows()


@torch.no_grad()
def evaluate_loss(model, batches) -> float:
    """Mean next-token cross-entropy (nats per scored token) of ``model`` over every item of the
    finite iterable ``batches`` (items as for ``transfer_attention``), in eval mode, no cache."""
    if isinstance(batches, (torch.Tensor, dict)) or not isinstance(batches, Iterable):
        raise TypeError(f"evaluate_loss: batches must be a finite iterable of batches, got {type(batches).__name__}")
    device, total, count = _device(model), 0.0, 0
    was = model.training
    model.eval()
    try:
        for n, item in enumerate(batches):
            inputs = _as_inputs(item, model, device, "evaluate_loss", n)
            labels = _labels(inputs)
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                           use_cache=False).logits
            logits, target = logits[:, :-1].float(), labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("evaluate_loss: batches holds no scored token")
    return total / count


def _progress(enabled, total, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, dynamic_ncols=True)


# --------------------------------------------------------------------------- (1) attention transfer
def _steps(stop, source, log, opt, steps, lr, warmup, model, device, fn):
    """Yield (step, model inputs, learning rate) for each step that runs (see ``_begin_step``)."""
    for step in range(steps):
        inputs, cur = _begin_step(stop, source, log, opt, step, steps, lr, warmup, model, device, fn)
        if inputs is None:
            return
        yield step, inputs, cur


def _begin_step(stop, source, log, opt, step, steps, lr, warmup, model, device, fn):
    """(model inputs of the next batch, the learning rate set for ``step``), gradients cleared; (None,
    None) when a stop was requested (``log.interrupted``) or the batches ran out (``log.exhausted``)."""
    if stop.signal is not None:
        log.interrupted = True
        return None, None
    try:
        item = next(source)
    except StopIteration:
        log.exhausted = True
        return None, None
    inputs = _as_inputs(item, model, device, fn, step)
    cur = warmup_cosine(step, steps, lr, warmup, 0.1)  # decay to lr / 10
    for g in opt.param_groups:
        g["lr"] = cur
    opt.zero_grad(set_to_none=True)
    return inputs, cur


def transfer_attention(model, batches, steps: int, *, lr: float = 1e-2, train_qk: bool = False,
                       warmup: Optional[int] = None, grad_clip: float = 1.0, progress: bool = True,
                       log_every: int = 1) -> TrainLog:
    """Attention transfer: train each LeaP layer so that its output matches, on the same q, k, v,
    the softmax attention it replaced; the model is changed in place.

    Each step runs the model (eval mode: no dropout; no cache) on one batch with every LeaP layer
    in transfer mode: a layer computes its LeaP output and, without gradient, the softmax output
    of the original attention (causal, the model's scaling, RoPE, GQA, padding and sliding window)
    from the same q, k, v; its loss is the MSE of the two after the output projection (``[B, T,
    hidden]``, over unpadded positions), and the softmax output is what flows on to the next layer,
    so every layer learns from the pretrained model's own activations and no second model is held.
    The step minimises the sum of the layer losses (AdamW, no weight decay; linear warm-up, then
    cosine decay to lr / 10).

    Trains: the LeaP predictors (``leap_q``, ``leap_k`` of every LeaP layer), and with
    ``train_qk=True`` also the q and k projections of the LeaP layers (``q_proj``, ``k_proj`` and
    their biases; GPT-2: the q and k columns of ``c_attn``, whose v columns stay as they were).
    Nothing else changes; ``requires_grad`` flags are restored afterwards. Note that trained q, k
    move the softmax target too.

    Args:
        model: a linearised ``PreTrainedModel`` (``lk.hf.linearize``) with attention="leap", or
            "linear" with ``train_qk=True`` (it has no predictors).
        batches: iterable of LongTensor [B, T] or dicts (see the module docstring).
        steps: optimizer steps (>= 1).
        lr: peak learning rate. warmup: warm-up steps (None = steps // 10).
        grad_clip: clip the gradient norm (0 = off). progress: tqdm bar (loss, worst layer).
        log_every: keep the per-layer losses of every this many steps in ``history`` (the first
            and the last step's always).

    Returns a ``TrainLog`` (``history[i]["layers"]``: {layer index: MSE}).
    """
    fn = "transfer_attention"
    mods = _check_model(model, fn)
    _check_int("steps", steps, 1, fn)
    _check_number("lr", lr, fn, lo_open=True)
    _check_number("grad_clip", grad_clip, fn)
    _check_int("log_every", log_every, 1, fn)
    if warmup is not None:
        _check_int("warmup", warmup, 0, fn)
    if not isinstance(train_qk, bool):
        raise TypeError(f"{fn}: train_qk must be a bool, got {type(train_qk).__name__}")
    source = _batch_source(batches, fn)
    params, masks = [], {}
    for _, m in mods:
        if m.leap_q is not None:
            params += [("leap", p) for p in list(m.leap_q.parameters()) + list(m.leap_k.parameters())]
        if train_qk:
            if m.family == "gpt2":
                for p in m.c_attn.parameters():  # Conv1D: weight [in, 3 * out], bias [3 * out]: q | k | v
                    keep = torch.ones_like(p)
                    keep[..., 2 * m.split_size:] = 0
                    masks[id(p)] = keep
                    params.append(("qk", p))
            else:
                params += [("qk", p) for p in list(m.q_proj.parameters()) + list(m.k_proj.parameters())]
    if not params:
        raise ValueError(f"{fn}: nothing to train: attention='linear' layers have no LeaP predictors (pass "
                         "train_qk=True to train their q and k projections)")
    names = {id(p): n for n, p in model.named_parameters()}
    log = TrainLog(model=model, steps=steps, trainable=[names[id(p)] for _, p in params])
    flags = {id(p): p.requires_grad for p in model.parameters()}
    warmup = steps // 10 if warmup is None else warmup
    device = _device(model)
    was_training = model.training
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in params:
            p.requires_grad_(True)
            if id(p) in masks:  # GPT-2's v columns of c_attn get no gradient (no weight decay either)
                handles.append(p.register_hook(lambda g, keep=masks[id(p)]: g * keep))
        opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
        for _, m in mods:
            m.transfer = True
        model.eval()
        bar = _progress(progress, steps, "attention transfer")
        t_start = time.perf_counter()
        with StopRequest() as stop:
            try:
                for step, inputs, cur in _steps(stop, source, log, opt, steps, lr, warmup, model, device, fn):
                    for _, m in mods:
                        m.transfer_loss = None
                    model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
                    losses = {i: m.transfer_loss for i, m in mods}
                    loss = sum(losses.values())
                    loss.backward()
                    loss, losses = loss.item(), {i: v.item() for i, v in losses.items()}
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_([p for _, p in params], grad_clip)
                    opt.step()
                    log.steps_done = step + 1
                    row = {"step": step + 1, "loss": loss, "lr": cur, "seconds": time.perf_counter() - t_start}
                    if (step + 1) % log_every == 0 or step + 1 == steps or step == 0:
                        row["layers"] = dict(losses)
                    log.history.append(row)
                    if bar is not None:
                        worst = max(losses, key=losses.get)
                        bar.update(1)
                        bar.set_postfix(mse=f"{loss:.4g}", worst=f"L{worst} {losses[worst]:.3g}",
                                        refresh=False)
            finally:
                if bar is not None:
                    bar.close()
            if stop.signal is not None and log.steps_done < steps:
                log.interrupted = True
        if log.history and "layers" not in log.history[-1]:
            log.history[-1]["layers"] = dict(losses)
        log.seconds = time.perf_counter() - t_start
    finally:
        for h in handles:
            h.remove()
        for _, m in mods:
            m.transfer, m.transfer_loss = False, None
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)
    return log


# --------------------------------------------------------------------------- (2) fine-tuning
def _lora_targets(model, mods):
    """The full names of the q, k, v, o projections of the LeaP layers (peft matches full names)."""
    ids = {id(m) for _, m in mods}
    out = []
    for name, mod in model.named_modules():
        if id(mod) in ids:
            out += [f"{name}.{p}" for p in (("c_attn", "c_proj") if mod.family == "gpt2" else
                                            ("q_proj", "k_proj", "v_proj", "o_proj"))]
    return out


def finetune(model, batches, steps: int, lora: bool = True, *, lr: Optional[float] = None, lora_r: int = 8,
             lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, target_modules=None,
             train_leap: bool = True, merge: bool = True, weight_decay: float = 0.0, warmup: Optional[int] = None,
             grad_clip: float = 1.0, progress: bool = True) -> TrainLog:
    """Fine-tune a linearised model on next-token cross-entropy (labels = input_ids, padding
    unscored; or the batches' ``labels``), model in train mode, no cache.

    Trains, with ``lora=True`` (LoRA through ``peft``): rank-``lora_r`` adapters (A, B) on the
    attention projections of the LeaP layers (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``;
    GPT-2: ``c_attn``, ``c_proj``), or on ``target_modules`` (peft's names), plus the LeaP
    predictors with ``train_leap=True``; every pretrained weight stays frozen. With ``merge=True``
    the adapters are merged into the weights afterwards (``merge_and_unload``), leaving the
    linearised ``transformers`` model (the same object) that ``save_pretrained`` / ``lk.hf.load``
    handle; ``merge=False`` leaves the ``PeftModel`` in ``TrainLog.model``. With ``lora=False``:
    every parameter trains (full fine-tuning). ``requires_grad`` flags are restored afterwards
    (a ``PeftModel`` left with ``merge=False`` keeps only the trained ones trainable).

    Args:
        model: a linearised ``PreTrainedModel``; batches: as for ``transfer_attention``.
        steps: optimizer steps (>= 1). lora: LoRA (True) or full fine-tuning (False).
        lr: peak learning rate (None = 1e-3 with LoRA, 1e-4 full). warmup: None = steps // 10.
        lora_r, lora_alpha (None = 2 * lora_r), lora_dropout: the LoRA adapters.
        weight_decay: AdamW on matrices. grad_clip: 0 = off. progress: tqdm bar.

    Returns a ``TrainLog``; ``TrainLog.model`` is the model to use (the merged model, or the
    ``PeftModel`` with ``merge=False``).
    """
    fn = "finetune"
    mods = _check_model(model, fn)
    _check_int("steps", steps, 1, fn)
    for name, value in (("lora", lora), ("train_leap", train_leap), ("merge", merge)):
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    lr = (1e-3 if lora else 1e-4) if lr is None else lr
    _check_number("lr", lr, fn, lo_open=True)
    _check_number("weight_decay", weight_decay, fn)
    _check_number("grad_clip", grad_clip, fn)
    _check_number("lora_dropout", lora_dropout, fn)
    if warmup is not None:
        _check_int("warmup", warmup, 0, fn)
    source = _batch_source(batches, fn)
    base = model
    flags = {id(p): p.requires_grad for p in model.parameters()}
    if lora:
        _check_int("lora_r", lora_r, 1, fn)
        _check_number("lora_alpha", lora_alpha, fn, lo_open=True, optional=True)
        try:
            import peft
        except ImportError:
            raise ImportError('lk.hf.finetune(lora=True) needs peft: pip install "leapformer-kernels[hf]"') from None
        if isinstance(model, peft.PeftModel):
            raise ValueError(f"{fn}: model is already a PeftModel: pass its base model, or lora=False to train the "
                             "PeftModel's trainable parameters as they are")
        if target_modules is None:
            target_modules = _lora_targets(model, mods)
        elif isinstance(target_modules, str) or not isinstance(target_modules, Iterable) or \
                not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"{fn}: target_modules must be None or a list of module names, got {target_modules!r}")
        else:
            target_modules = list(target_modules)
        fan_in_fan_out = any(m.family == "gpt2" for _, m in mods)  # GPT-2's Conv1D stores weights transposed
        cfg = peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r if lora_alpha is None else lora_alpha,
                              lora_dropout=lora_dropout, target_modules=target_modules, fan_in_fan_out=fan_in_fan_out,
                              bias="none")
        try:
            with warnings.catch_warnings():  # peft's own deprecation notes about transformers
                warnings.simplefilter("ignore", FutureWarning)
                model = peft.get_peft_model(model, cfg)
        except ValueError as e:
            raise ValueError(f"{fn}: target_modules {target_modules!r}: {str(e).splitlines()[0]}") from None
        for _, m in mods:
            for p in (list(m.leap_q.parameters()) + list(m.leap_k.parameters())) if m.leap_q is not None else []:
                p.requires_grad_(train_leap)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log = TrainLog(model=model, steps=steps, trainable=[n for n, _ in named])
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = steps // 10 if warmup is None else warmup
    device = _device(model)
    was_training = base.training
    t_start = time.perf_counter()
    try:
        model.train()
        bar = _progress(progress, steps, "fine-tuning (LoRA)" if lora else "fine-tuning (full)")
        with StopRequest() as stop:
            try:
                for step, inputs, cur in _steps(stop, source, log, opt, steps, lr, warmup, base, device, fn):
                    loss = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                 labels=_labels(inputs), use_cache=False).loss
                    loss.backward()
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_([p for _, p in named], grad_clip)
                    opt.step()
                    loss = loss.item()
                    log.steps_done = step + 1
                    log.history.append({"step": step + 1, "loss": loss, "lr": cur,
                                        "seconds": time.perf_counter() - t_start})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            finally:
                if bar is not None:
                    bar.close()
            log.interrupted = stop.signal is not None and log.steps_done < steps
    finally:
        log.seconds = time.perf_counter() - t_start
        if lora and merge and model is not base:
            model = model.merge_and_unload()  # the base model object, adapters folded into its weights
            log.model = model
        if model is base:  # a PeftModel (merge=False) keeps what peft made trainable
            for p in base.parameters():
                p.requires_grad_(flags.get(id(p), True))
        base.train(was_training)
    return log

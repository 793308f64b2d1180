"""LeaP attention as ``torch.library`` custom ops, with registered autograd and fake tensors.

One op per function, one implementation per backend (the ``backend`` string argument):

    leapformer::leap_attention_fwd   -> (o, S, z, den)     (S, z empty unless requested; den below)
    leapformer::leap_attention_bwd   -> (dq, dk, dv, dpq, dpk, dS0, dz0)   (dS0, dz0 empty without S0)
    leapformer::leap_attention_step  -> (o, S, z)

so ``torch.compile(fullgraph=True)`` traces models through them and ``opcheck`` tests them.
A backend provides a kernel module (``backends.kernels("attention", <name>)``) with, for
contiguous inputs:

    fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal,
        block_size, eps, normalize, output_final_state) -> (o, S, z)   # S, z None unless requested
    bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys,
        causal, block_size, eps, normalize) -> (dq, dk, dv, dpq, dpk, dS0, dz0)
    step(q, k, v, pq, pk, S0, z0, eps, normalize) -> (o, S, z)

A kernel module that sets ``SAVES_DEN = True`` (the triton backend) keeps forward residuals for
its backward, as flash-attention keeps ``lse``: its ``fwd`` returns ``(o, S, z, den)`` with ``den``
the normaliser ``q~ . z`` per query row and head and its derivative ``d den / d(pi/2 pq)``
(state dtype ``[2, B, T, H]``: ``den[0]``, ``den[1]``; None when not normalised; the backward's
r correction reads ``den[1]``), and its ``bwd`` takes ``o=`` and ``den=`` (the
forward's outputs, or None: it then recomputes them). The op saves ``o`` and ``den`` for such a
backend only; for the others ``den`` is an empty placeholder and nothing more is saved.

with q, k, v in one dtype; pq, pk, S0, z0, dS, dz in the state dtype (float32, or float64 for
float64 inputs); S0, z0, dS, dz may be None; block_size 0 = not block-causal; cu_seqlens int64
or None; num_visible_keys None or int64 [B, T], contiguous, already clamped into [0, S] and
non-decreasing along t (``leap_attention`` below makes it so, also where the eager value checks
are skipped), only with causal=False and no cu_seqlens; dk, dv, dpk with Hkv heads. ``leap_attention`` below adapts dtypes and contiguity
(differentiably), so kernels see one layout only.

Numerics every kernel follows: the cosine half of the features is ``sin(pi/2 * (1 - p))``
(exactly 0 at p = 1), see ``attention/features.py``.

Rules every kernel follows (DESIGN section 6): ``block_size`` is any int64 and any value >= the
sequence length is one block (``leap_attention`` clamps larger Python ints to 2**63 - 1, which
means the same); relu keeps NaN; a padded key is selected to 0 where loaded (so NaN / Inf there
reach nothing, and its dk, dv, dpk are exactly 0); a ``cu_seqlens`` that reaches a kernel
unchecked (value checks are skipped under torch.compile) never makes it read or write out of
bounds: the C++ and torch kernels raise, the Triton kernels clamp (see ``triton_chunk.py``).
Every op returns fresh tensors: an output that would share memory with an input is copied.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._functorch import backward_function, functorch_active
from .._guard import contiguous_as, on_device
from .._validate import state_dtype

_EMPTY = 0  # size of the placeholder returned for an absent optional tensor


def _kernels(backend: str):
    return backends.kernels("attention", backend)


_I64_MAX = 2 ** 63 - 1


def _saves_den(kern) -> bool:
    """Whether the kernel module's ``fwd`` returns ``den`` (and its ``bwd`` reads it with ``o``)."""
    return getattr(kern, "SAVES_DEN", False)


def _opt(t: Optional[Tensor], like: Tensor, dtype) -> Tensor:
    return like.new_empty(_EMPTY, dtype=dtype) if t is None else t


def _fresh(outs, ins):
    """``outs`` contiguous, each copied if it shares memory with one of ``ins`` (a custom op may
    not return an alias of an input; e.g. an identity VJP hands the incoming gradient back)."""
    taken = {t.untyped_storage().data_ptr() for t in ins if isinstance(t, Tensor) and t.numel()}
    res = []
    for t in outs:
        t = t.contiguous()
        if t.storage_offset():  # a view into a larger buffer: fake tensors would disagree on the offset
            t = t.clone()
        if t.numel():
            if t.untyped_storage().data_ptr() in taken:
                t = t.clone()
            taken.add(t.untyped_storage().data_ptr())  # nor may two outputs share memory
        res.append(t)
    return tuple(res)


@torch.library.custom_op("leapformer::leap_attention_fwd", mutates_args=())
def leap_attention_fwd(q: Tensor, k: Tensor, v: Tensor, pq: Tensor, pk: Tensor, S0: Optional[Tensor],
                       z0: Optional[Tensor], key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                       num_visible_keys: Optional[Tensor], causal: bool, block_size: int, eps: float,
                       normalize: bool, output_final_state: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    kern = _kernels(backend)
    with on_device(q):
        out = kern.fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys,
                       causal, block_size, eps, normalize, output_final_state)
    o, S, z, den = out if _saves_den(kern) else (*out, None)
    acc = state_dtype(q.dtype)
    return _fresh((o, _opt(S, q, acc), _opt(z, q, acc), _opt(den, q, acc)), (q, k, v, pq, pk, S0, z0))


@leap_attention_fwd.register_fake
def _(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal, block_size, eps,
      normalize, output_final_state, backend):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    o = q.new_empty(B, T, H, Dv)
    den = q.new_empty((2, B, T, H) if normalize and _saves_den(_kernels(backend)) else (_EMPTY,), dtype=acc)
    if not output_final_state:
        return o, q.new_empty(_EMPTY, dtype=acc), q.new_empty(_EMPTY, dtype=acc), den
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return o, q.new_empty(n, H, 2 * Dk, Dv, dtype=acc), q.new_empty(n, H, 2 * Dk, dtype=acc), den


@torch.library.custom_op("leapformer::leap_attention_bwd", mutates_args=())
def leap_attention_bwd(do: Tensor, dS: Optional[Tensor], dz: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                       pq: Tensor, pk: Tensor, S0: Optional[Tensor], z0: Optional[Tensor],
                       key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                       num_visible_keys: Optional[Tensor], o: Optional[Tensor], den: Optional[Tensor],
                       causal: bool, block_size: int, eps: float, normalize: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``o``, ``den``: the forward's output and normaliser where the backend saves them
    (``SAVES_DEN``), else None (or empty)."""
    kern = _kernels(backend)
    args = (do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal, block_size,
            eps, normalize)
    saved = {}
    if _saves_den(kern) and o is not None and den is not None and den.numel():
        saved = dict(o=o, den=den)
    with on_device(q):
        dq, dk, dv, dpq, dpk, dS0, dz0 = kern.bwd(*args, **saved)
    out = (dq, dk, dv, dpq, dpk, _opt(dS0, pq, pq.dtype), _opt(dz0, pq, pq.dtype))
    return _fresh(out, (do, dS, dz, q, k, v, pq, pk, S0, z0, o, den))


@leap_attention_bwd.register_fake
def _(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, o, den, causal,
      block_size, eps, normalize, backend):
    dS0 = pq.new_empty(_EMPTY) if S0 is None else torch.empty_like(S0)
    dz0 = pq.new_empty(_EMPTY) if z0 is None else torch.empty_like(z0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(pq),
            torch.empty_like(pk), dS0, dz0)


def _residuals(output):
    """(o, den) to save for the backward: both where the backend returned ``den``, else (None, None)
    (its backward recomputes; o is not kept alive)."""
    o, den = output[0], output[3]
    return (o, den) if den.numel() else (None, None)


def _setup_context(ctx, inputs, output):
    q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps, normalize, ofs, backend = inputs
    ctx.save_for_backward(q, k, v, pq, pk, S0, z0, kpm, cu, nvk, *_residuals(output))
    ctx.flags = (causal, block_size, eps, normalize, backend)
    ctx.output_final_state = ofs


def _backward(ctx, do, dS, dz, dden):
    q, k, v, pq, pk, S0, z0, kpm, cu, nvk, o, den = ctx.saved_tensors
    if not ctx.output_final_state:
        dS = dz = None
    else:  # e.g. S.sum() gives a stride-0 expanded gradient
        dS = None if dS is None else dS.contiguous()
        dz = None if dz is None else dz.contiguous()
    causal, block_size, eps, normalize, backend = ctx.flags
    dq, dk, dv, dpq, dpk, dS0, dz0 = leap_attention_bwd(do.contiguous(), dS, dz, q, k, v, pq, pk, S0, z0, kpm,
                                                        cu, nvk, o, den, causal, block_size, eps, normalize, backend)
    if S0 is None:
        dS0 = dz0 = None
    return dq, dk, dv, dpq, dpk, dS0, dz0, None, None, None, None, None, None, None, None, None


leap_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("leapformer::leap_attention_step", mutates_args=())
def leap_attention_step_op(q: Tensor, k: Tensor, v: Tensor, pq: Tensor, pk: Tensor, S0: Optional[Tensor],
                           z0: Optional[Tensor], eps: float, normalize: bool,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    with on_device(q):
        out = _kernels(backend).step(q, k, v, pq, pk, S0, z0, eps, normalize)
    return _fresh(out, (q, k, v, pq, pk, S0, z0))


@leap_attention_step_op.register_fake
def _(q, k, v, pq, pk, S0, z0, eps, normalize, backend):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    return q.new_empty(B, T, H, Dv), q.new_empty(B, H, 2 * Dk, Dv, dtype=acc), q.new_empty(B, H, 2 * Dk, dtype=acc)


def _prepare(q, k, v, pq, pk, S0, z0, p_any: bool = False):
    """Inputs as the kernels take them: contiguous, k, v in q's dtype, pq, pk and the state in the
    state dtype (``p_any``: pq, pk in their own dtype, for a kernel that converts them itself)."""
    dt = q.dtype
    acc = state_dtype(dt)
    pdt = (pq.dtype, pk.dtype) if p_any else (acc, acc)
    if (k.dtype is dt and v.dtype is dt and pq.dtype is pdt[0] and pk.dtype is pdt[1] and q.is_contiguous()
            and k.is_contiguous() and v.is_contiguous() and pq.is_contiguous() and pk.is_contiguous()
            and (S0 is None or (S0.dtype is acc and S0.is_contiguous()))
            and (z0 is None or (z0.dtype is acc and z0.is_contiguous()))):
        return [q, k, v, pq, pk], S0, z0  # already as the kernels take them (the decode step's case)
    c = [contiguous_as(q), contiguous_as(k, q.dtype), contiguous_as(v, q.dtype), contiguous_as(pq, pdt[0]),
         contiguous_as(pk, pdt[1])]
    return c, contiguous_as(S0, acc), contiguous_as(z0, acc)


def _visible_keys(n: Optional[Tensor], B: int, T: int, S: int) -> Optional[Tensor]:
    """``num_visible_keys`` as the kernels take it: int64 [B, T], contiguous, clamped into [0, S] and
    non-decreasing along t. A no-op on validated values; under torch.compile (where the value checks
    are skipped) it keeps every kernel inside the key range."""
    if n is None:
        return None
    n = n.to(torch.int64)
    if n.dim() == 1:
        n = n[None].expand(B, T)
    return torch.cummax(n.clamp(0, S), dim=1).values.contiguous()


def leap_attention(backend: str, q, k, v, pq, pk, *, causal, block_size, key_padding_mask, cu_seqlens,
                   initial_state, output_final_state, eps, normalize, num_visible_keys=None):
    """Validated arguments -> the custom op of ``backend``; returns o or (o, (S, z))."""
    S0, z0 = (None, None) if initial_state is None else initial_state
    c, S0, z0 = _prepare(q, k, v, pq, pk, S0, z0)
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    # any block_size >= T is one block: a Python int beyond int64 means the same as 2**63 - 1
    # (no comparison with T here: T may be symbolic under torch.compile)
    bs = min(int(block_size), _I64_MAX) if block_size else 0
    nvk = _visible_keys(num_visible_keys, q.shape[0], q.shape[1], k.shape[1])
    fwd = _AttentionFunction.apply if functorch_active() else leap_attention_fwd
    o, S, z, _ = fwd(*c, S0, z0, kpm, cu, nvk, causal, bs, float(eps), normalize, output_final_state, backend)
    return (o, (S, z)) if output_final_state else o


def leap_attention_step(backend: str, q, k, v, pq, pk, state, *, eps, normalize):
    S0, z0 = (None, None) if state is None else state
    c, S0, z0 = _prepare(q, k, v, pq, pk, S0, z0, getattr(_kernels(backend), "STEP_READS_ANY_P", False))
    if torch.compiler.is_compiling():
        o, S, z = leap_attention_step_op(*c, S0, z0, float(eps), normalize, backend)
    else:  # eager decoding: skip the dispatcher round trip (the step has no autograd to record)
        with on_device(q):
            o, S, z = _kernels(backend).step(*c, S0, z0, float(eps), normalize)
    return o, (S, z)


class _AttentionFunction(torch.autograd.Function):
    """``leapformer::leap_attention_fwd`` / ``_bwd`` as an ``autograd.Function`` with a separate
    ``setup_context``, as ``torch.func`` transforms require. The autograd that ``torch.library``
    generates for a custom op lacks it, so ``torch.func.grad`` through the plain op raises
    (pytorch/pytorch#168393); everywhere else (eager autograd, torch.compile) the op is used."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps, normalize, ofs, backend):
        return leap_attention_fwd(q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps,
                                  normalize, ofs, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:10], *_residuals(output))
        ctx.flags = inputs[10:]

    @staticmethod
    def backward(ctx, do, dS, dz, dden):
        q, k, v, pq, pk, S0, z0, kpm, cu, nvk, o, den = ctx.saved_tensors
        causal, block_size, eps, normalize, ofs, backend = ctx.flags
        if ofs:  # e.g. S.sum() gives a stride-0 expanded gradient
            dS = None if dS is None else dS.contiguous()
            dz = None if dz is None else dz.contiguous()
        else:
            dS = dz = None
        dq, dk, dv, dpq, dpk, dS0, dz0 = _AttentionBackward.apply(
            do.contiguous(), dS, dz, q, k, v, pq, pk, S0, z0, kpm, cu, nvk, o, den, causal, block_size, eps,
            normalize, backend)
        if S0 is None:
            dS0 = dz0 = None
        return dq, dk, dv, dpq, dpk, dS0, dz0, None, None, None, None, None, None, None, None, None


_AttentionBackward = backward_function(
    leap_attention_bwd, "_AttentionBackward",
    "leap_attention: double backward (second derivatives, e.g. nested torch.func.grad or hessian) is not supported")

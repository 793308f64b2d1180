"""Public functional ops: validate, pick a backend, run it (DESIGN section 6)."""
from typing import Optional, Sequence, Tuple

import torch

from . import backends
from ._validate import check_attention, check_step, check_window_pool, effective_eps
from .attention import op as attention_op
from .pooling import op as pooling_op

State = Tuple[torch.Tensor, torch.Tensor]


def leap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor, *,
                   causal: bool = True, block_size: Optional[int] = None,
                   key_padding_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                   initial_state: Optional[State] = None, output_final_state: bool = False,
                   eps: float = 1e-6, normalize: bool = True, backend: Optional[str] = None):
    """LeaPformer attention with learned proportions.

    Args:
        q: [B, T, H, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv] (Hkv divides H: MQA / GQA).
        pq: [B, T, H], pk: [B, S, Hkv]: proportions (in [0, 1] normally), q's dtype or float32.
        causal: key s visible from query t iff s <= t (needs S == T). ``causal=False`` is
            non-causal / cross-attention (S may differ from T).
        block_size: with causal=True, block-causal: s visible iff s // W <= t // W.
        key_padding_mask: [B, S] bool, True = padded key (ignored), any mode.
        cu_seqlens: [N + 1] int32/int64 offsets of N packed sequences (B == 1, S == T).
        initial_state: (S0 [B or N, H, 2Dk, Dv], z0 [B or N, H, 2Dk]).
        output_final_state: also return the final state (S, z), float32 (float64 for float64 inputs).
        eps: clamp of the denominator, ``o = num / max(den, eps)`` (eps >= 0; at least the smallest
            normal float of the state dtype is used, so eps=0 gives 0 where nothing is visible;
            its gradient there is unbounded, so train with eps > 0).
        normalize: False returns ``num`` (no denominator).
        backend: "torch", "cpu", "triton" or None (automatic).

    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, (S, z)) with output_final_state.

    Autograd: ``torch.autograd`` and the reverse-mode ``torch.func`` transforms (``grad``, ``vjp``,
    ``jacrev``, and ``vmap`` around them) differentiate to first order. Second derivatives raise
    ``RuntimeError`` ("leap_attention: double backward ... not supported"), and forward-mode AD
    (``torch.func.jvp``, ``jacfwd``) raises torch's ``RuntimeError`` asking for a ``jvp`` method.
    """
    check_attention(q, k, v, pq, pk, causal=causal, block_size=block_size, key_padding_mask=key_padding_mask,
                    cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                    eps=eps, normalize=normalize, backend=backend)
    q, k, v = _autocast(q, k, v)
    name = backends.choose("leap_attention", backend, q.device, q.dtype)
    return _attention(name, q, k, v, pq, pk, causal=causal, block_size=block_size,
                      key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, initial_state=initial_state,
                      output_final_state=output_final_state, eps=effective_eps(eps, q.dtype), normalize=normalize)


def leap_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
                        state: Optional[State] = None, *, eps: float = 1e-6, normalize: bool = True,
                        backend: Optional[str] = None):
    """Decode t >= 1 new tokens against a carried state (causal among the new tokens).

    q [B, t, H, Dk], k [B, t, Hkv, Dk], v [B, t, Hkv, Dv], pq [B, t, H], pk [B, t, Hkv];
    state (S [B, H, 2Dk, Dv], z [B, H, 2Dk]) or None (zeros).
    Returns (o [B, t, H, Dv], (S, z)) as fresh tensors; the input state is not modified.
    Equals ``leap_attention`` on the concatenation of everything decoded so far.
    """
    check_step(q, k, v, pq, pk, state, eps=eps, normalize=normalize, backend=backend)
    q, k, v = _autocast(q, k, v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, pq, pk) + tuple(state or ())):
        # the step kernel is inference-only; with autograd on, the same result comes from the
        # differentiable op (DESIGN: the step equals leap_attention on the concatenation)
        name = backends.choose("leap_attention", backend, q.device, q.dtype)
        return _attention(name, q, k, v, pq, pk, causal=True, block_size=None, key_padding_mask=None,
                          cu_seqlens=None, initial_state=state, output_final_state=True,
                          eps=effective_eps(eps, q.dtype), normalize=normalize)
    name = backends.choose("leap_attention_step", backend, q.device, q.dtype)
    return attention_op.leap_attention_step(name, q, k, v, pq, pk, state, eps=effective_eps(eps, q.dtype),
                                            normalize=normalize)


def window_pool(x: torch.Tensor, windows: Sequence[Tuple[int, int]], reduce: str = "mean",
                backend: Optional[str] = None):
    """Pool x [B, T, D] over windows (a, b) of offsets relative to each position t.

    ``pooled[b, t, w] = reduce(x[b, t+a .. t+b])`` over the part inside [0, T) (mean divides
    by that part's length; wholly outside gives 0); reduce is "sum", "mean" or "max" (ties
    send the gradient to the first maximal element).
    Returns pooled [B, T, len(windows), D] in x's dtype and valid [B, T, len(windows)] bool
    (True where the window lies wholly inside [0, T)).

    Offsets are ints (numpy integers too) in the int64 range; one beyond +-T acts as +-T, so
    ``(0, sys.maxsize)`` reads "from t to the end" and ``(-sys.maxsize, 0)`` "from the start".

    Non-finite values. max: a window that holds NaN gives NaN (as ``torch.amax``); its
    gradient goes to the window's first NaN (as ties go to the first maximal element), so the
    gradient stays finite. sum / mean: a window that holds NaN or +-inf gives a non-finite
    result; they work by prefix sums along T (O(T * D) per window whatever its length), so a
    non-finite value can also make windows after it NaN, in the same sequence and feature
    only; windows that end before it are exact. The backward is the same computation on the
    incoming gradient: a NaN or inf there can reach other positions of the same sequence and
    feature. Finite data is safe: the prefixes accumulate in float64 (the Triton kernel keeps
    a float32 in-block prefix, scaled by a power of two in blocks holding values above 2^120),
    so float32 / bfloat16 inputs up to the top of their range give finite, accurate sums
    wherever the true sum fits the dtype, and means always (float64 inputs: while T * max|x|
    stays below 1.8e308).

    Autograd as ``leap_attention``: first order under ``torch.autograd`` and the reverse-mode
    ``torch.func`` transforms; no double backward, no forward-mode AD.
    """
    windows = check_window_pool(x, windows, reduce, backend)
    (x,) = _autocast(x)
    if x.shape[0] == 0:  # an empty batch: empty outputs (still attached to x's graph), no kernel
        B, T, D = x.shape
        valid = torch.zeros(0, T, len(windows), dtype=torch.bool, device=x.device)
        return x.new_zeros(0, T, len(windows), D) + x.sum() * 0, valid
    name = backends.choose("window_pool", backend, x.device, x.dtype)
    if not _functorch_active():
        return pooling_op.window_pool(name, x, windows, reduce)
    need_argmax = reduce == "max" and torch.is_grad_enabled() and x.requires_grad
    pooled, valid, _ = _PoolFunction.apply(x.contiguous(), [w[0] for w in windows], [w[1] for w in windows],
                                           reduce, need_argmax, name)
    return pooled, valid


def _functorch_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...); False while
    ``torch.compile`` traces (dynamo handles the transforms itself)."""
    if torch.compiler.is_compiling():
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _attention(name, q, k, v, pq, pk, **kw):
    """The differentiable attention op; inside a ``torch.func`` transform, through
    ``_AttentionFunction`` (see there)."""
    if not _functorch_active():
        return attention_op.leap_attention(name, q, k, v, pq, pk, **kw)
    initial_state, ofs = kw["initial_state"], kw["output_final_state"]
    S0, z0 = (None, None) if initial_state is None else initial_state
    c, S0, z0 = attention_op._prepare(q, k, v, pq, pk, S0, z0)
    kpm = kw["key_padding_mask"]
    kpm = None if kpm is None else kpm.contiguous()
    cu = kw["cu_seqlens"]
    cu = None if cu is None else cu.to(torch.int64).contiguous()
    bs = kw["block_size"]
    bs = min(int(bs), 2 ** 63 - 1) if bs else 0  # as attention_op.leap_attention: any bs >= T is one block
    o, S, z = _AttentionFunction.apply(*c, S0, z0, kpm, cu, kw["causal"], bs, float(kw["eps"]), kw["normalize"],
                                       ofs, name)
    return (o, (S, z)) if ofs else o


class _AttentionFunction(torch.autograd.Function):
    """``leapformer::leap_attention_fwd`` / ``_bwd`` as an ``autograd.Function`` with a separate
    ``setup_context``, as ``torch.func`` transforms require. The autograd that ``torch.library``
    generates for a custom op lacks it, so ``torch.func.grad`` through the plain op raises
    (pytorch/pytorch#168393); everywhere else (eager autograd, torch.compile) the op is used."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, pq, pk, S0, z0, kpm, cu, causal, block_size, eps, normalize, ofs, backend):
        return attention_op.leap_attention_fwd(q, k, v, pq, pk, S0, z0, kpm, cu, causal, block_size, eps,
                                               normalize, ofs, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9])
        ctx.flags = inputs[9:]

    @staticmethod
    def backward(ctx, do, dS, dz):
        q, k, v, pq, pk, S0, z0, kpm, cu = ctx.saved_tensors
        causal, block_size, eps, normalize, ofs, backend = ctx.flags
        if ofs:  # e.g. S.sum() gives a stride-0 expanded gradient
            dS = None if dS is None else dS.contiguous()
            dz = None if dz is None else dz.contiguous()
        else:
            dS = dz = None
        dq, dk, dv, dpq, dpk, dS0, dz0 = _AttentionBackward.apply(
            do.contiguous(), dS, dz, q, k, v, pq, pk, S0, z0, kpm, cu, causal, block_size, eps, normalize,
            backend)
        if S0 is None:
            dS0 = dz0 = None
        return dq, dk, dv, dpq, dpk, dS0, dz0, None, None, None, None, None, None, None, None


class _AttentionBackward(torch.autograd.Function):
    """The backward op, called below the transform's autograd level; not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return attention_op.leap_attention_bwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("leap_attention: double backward (second derivatives, e.g. nested torch.func.grad "
                           "or hessian) is not supported")


class _PoolFunction(torch.autograd.Function):
    """``leapformer::window_pool_fwd`` / ``_bwd`` for ``torch.func`` transforms (see
    ``_AttentionFunction``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, starts, ends, reduce, need_argmax, backend):
        return pooling_op.window_pool_fwd(x, starts, ends, reduce, need_argmax, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, starts, ends, reduce, need_argmax, backend = inputs
        ctx.save_for_backward(output[2])
        ctx.args = (x.shape[1], starts, ends, reduce, backend)
        ctx.need_argmax = need_argmax

    @staticmethod
    def backward(ctx, grad, _gvalid, _gargmax):
        (argmax,) = ctx.saved_tensors
        if ctx.args[3] == "max" and not ctx.need_argmax:
            raise RuntimeError("window_pool: the max forward saved no argmax (its input did not require grad)")
        return _PoolBackward.apply(grad.contiguous(), argmax, *ctx.args), None, None, None, None, None


class _PoolBackward(torch.autograd.Function):
    """The window_pool backward op, called below the transform's autograd level; not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return pooling_op.window_pool_bwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("window_pool: double backward (second derivatives) is not supported")


def _autocast(*tensors):
    """Under ``torch.autocast`` for the tensors' device, run in the autocast dtype (as matmuls do)."""
    dev = tensors[0].device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and tensors[0].dtype != torch.float64:
        dtype = torch.get_autocast_dtype(dev)
        return tuple(t.to(dtype) for t in tensors)
    return tensors

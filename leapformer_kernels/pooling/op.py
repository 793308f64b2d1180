"""Window pooling as ``torch.library`` custom ops, with registered autograd and fake tensors.

    leapformer::window_pool_fwd(x, starts, ends, reduce, with_argmax, backend) -> (pooled, valid, argmax)
    leapformer::window_pool_bwd(grad, argmax, T, starts, ends, reduce, backend) -> dx

A backend provides a kernel module (``backends.kernels("pooling", <name>)``) with, for a contiguous
x [B, T, D] and windows as a tuple of (a, b):

    fwd(x, windows, reduce, with_argmax) -> (pooled [B, T, NW, D] in x's dtype, valid [B, T, NW] bool,
                                             argmax [B, T, NW, D] for "max" with with_argmax (any
                                             integer form), else None)
    bwd(grad [B, T, NW, D], T, windows, reduce, argmax) -> dx [B, T, D] in grad's dtype
    argmax_dtype(windows) -> the integer dtype of argmax (for fake tensors)

The max forward saves its argmax only when a gradient will be needed (``x.requires_grad`` with
grad mode on): in inference max runs on values alone, without writing an index per output.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from .. import backends
from .._functorch import backward_function, functorch_active
from .._guard import contiguous_as, on_device


def _kernels(backend: str):
    return backends.kernels("pooling", backend)


def _windows(starts, ends):
    return tuple(zip(starts, ends))


@torch.library.custom_op("leapformer::window_pool_fwd", mutates_args=())
def window_pool_fwd(x: Tensor, starts: List[int], ends: List[int], reduce: str, with_argmax: bool,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    kern = _kernels(backend)
    with on_device(x):
        pooled, valid, argmax = kern.fwd(x, _windows(starts, ends), reduce, with_argmax)
    if argmax is None:
        argmax = x.new_empty(0, dtype=kern.argmax_dtype(_windows(starts, ends)))
    return pooled.contiguous(), valid.contiguous(), argmax.contiguous()


@window_pool_fwd.register_fake
def _(x, starts, ends, reduce, with_argmax, backend):
    B, T, D = x.shape
    NW = len(starts)
    adt = _kernels(backend).argmax_dtype(_windows(starts, ends))
    has = reduce == "max" and with_argmax
    argmax = x.new_empty(B, T, NW, D, dtype=adt) if has else x.new_empty(0, dtype=adt)
    return x.new_empty(B, T, NW, D), x.new_empty(B, T, NW, dtype=torch.bool), argmax


@torch.library.custom_op("leapformer::window_pool_bwd", mutates_args=())
def window_pool_bwd(grad: Tensor, argmax: Tensor, T: int, starts: List[int], ends: List[int], reduce: str,
                    backend: str) -> Tensor:
    with on_device(grad):
        dx = _kernels(backend).bwd(grad, T, _windows(starts, ends), reduce, argmax if reduce == "max" else None)
    return dx.contiguous()


@window_pool_bwd.register_fake
def _(grad, argmax, T, starts, ends, reduce, backend):
    B, _, NW, D = grad.shape
    return grad.new_empty(B, T, D)


def _setup_context(ctx, inputs, output):
    x, starts, ends, reduce, with_argmax, backend = inputs
    ctx.save_for_backward(output[2])
    ctx.args = (x.shape[1], starts, ends, reduce, backend)
    ctx.with_argmax = with_argmax


def _backward(ctx, grad, _gvalid, _gargmax):
    (argmax,) = ctx.saved_tensors
    if ctx.args[3] == "max" and not ctx.with_argmax:
        raise RuntimeError("window_pool: the max forward ran with with_argmax=False, so it saved no argmax "
                           "to differentiate through (window_pool sets it from x.requires_grad)")
    return window_pool_bwd(grad.contiguous(), argmax, *ctx.args), None, None, None, None, None


window_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_pool(backend: str, x, windows, reduce):
    with_argmax = reduce == "max" and torch.is_grad_enabled() and x.requires_grad
    fwd = _PoolFunction.apply if functorch_active() else window_pool_fwd
    pooled, valid, _ = fwd(contiguous_as(x), [w[0] for w in windows], [w[1] for w in windows], reduce, with_argmax,
                           backend)
    return pooled, valid


class _PoolFunction(torch.autograd.Function):
    """``leapformer::window_pool_fwd`` / ``_bwd`` for ``torch.func`` transforms (see
    ``_AttentionFunction``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, starts, ends, reduce, with_argmax, backend):
        return window_pool_fwd(x, starts, ends, reduce, with_argmax, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, starts, ends, reduce, with_argmax, backend = inputs
        ctx.save_for_backward(output[2])
        ctx.args = (x.shape[1], starts, ends, reduce, backend)
        ctx.with_argmax = with_argmax

    @staticmethod
    def backward(ctx, grad, _gvalid, _gargmax):
        (argmax,) = ctx.saved_tensors
        if ctx.args[3] == "max" and not ctx.with_argmax:
            raise RuntimeError("window_pool: the max forward saved no argmax (its input did not require grad)")
        return _PoolBackward.apply(grad.contiguous(), argmax, *ctx.args), None, None, None, None, None


_PoolBackward = backward_function(window_pool_bwd, "_PoolBackward",
                                  "window_pool: double backward (second derivatives) is not supported")

"""Autograd glue for window-pooling kernels.

A kernel backend provides, for a contiguous x [B, T, D] and windows as a tuple of (a, b):

    pool_fwd(x, windows, reduce) -> (pooled [B, T, W, D] in x's dtype, valid [B, T, W] bool,
                                     argmax [B, T, W, D] integer tensor for "max", else None)
    pool_bwd(grad [B, T, W, D], T, windows, reduce, argmax) -> dx [B, T, D] in grad's dtype

where argmax holds, for max, whatever index form the kernel chose (absolute or offset).
"""
import torch


class KernelWindowPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, windows, reduce):
        pooled, valid, argmax = kernels.pool_fwd(x.contiguous(), windows, reduce)
        ctx.kernels, ctx.windows, ctx.reduce, ctx.T = kernels, windows, reduce, x.shape[1]
        ctx.save_for_backward(argmax) if argmax is not None else ctx.save_for_backward()
        ctx.mark_non_differentiable(valid)
        return pooled, valid

    @staticmethod
    def backward(ctx, grad, _gvalid=None):
        argmax = ctx.saved_tensors[0] if ctx.saved_tensors else None
        dx = ctx.kernels.pool_bwd(grad.contiguous(), ctx.T, ctx.windows, ctx.reduce, argmax)
        return None, dx, None, None


def kernel_window_pool(kernels, x, windows, reduce):
    return KernelWindowPool.apply(kernels, x, windows, reduce)

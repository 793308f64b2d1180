"""Autograd glue between the public op and a kernel backend's forward / backward functions.

A kernel backend (``cpu``, ``triton``) provides, for contiguous inputs:

    fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, causal, block_size, eps,
        normalize, output_final_state) -> (o, S, z)        # S, z None unless requested
    bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, causal,
        block_size, eps, normalize) -> (dq, dk, dv, dpq, dpk, dS0, dz0)
    step(q, k, v, pq, pk, S0, z0, eps, normalize) -> (o, S, z)

with q, k, v in one dtype; pq, pk, S0, z0 (and dS, dz) in the state dtype (float32, or
float64 for float64 inputs); S0, z0, dS, dz may be None; block_size 0 = not block-causal;
cu_seqlens int64 or None; dk, dv, dpk have Hkv heads. This module adapts dtypes and
contiguity around them, so kernels see one layout only.

NUMERICS every kernel must follow: build the cosine half as ``sin(pi/2 * (1 - p))`` (exact 0 at
p = 1), never ``cos(pi/2 * p)`` (float32 gives -4.4e-8 there): see attention/features.py.
"""
import torch

from .._validate import state_dtype


class KernelLeapAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, q, k, v, pq, pk, S0, z0, kpm, cu_seqlens, causal, block_size, eps,
                normalize, output_final_state):
        acc = state_dtype(q.dtype)
        args = [t.contiguous() for t in (q, k, v)] + [pq.to(acc).contiguous(), pk.to(acc).contiguous()]
        S0c = None if S0 is None else S0.to(acc).contiguous()
        z0c = None if z0 is None else z0.to(acc).contiguous()
        kpmc = None if kpm is None else kpm.contiguous()
        cuc = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
        o, S, z = kernels.fwd(*args, S0c, z0c, kpmc, cuc, causal, block_size or 0, eps, normalize,
                              output_final_state)
        ctx.save_for_backward(*args, S0c, z0c, kpmc, cuc)
        ctx.kernels = kernels
        ctx.flags = (causal, block_size or 0, eps, normalize)
        ctx.dtypes = (pq.dtype, pk.dtype, None if S0 is None else S0.dtype, None if z0 is None else z0.dtype)
        if S is None:
            return o
        return o, S, z

    @staticmethod
    def backward(ctx, do, dS=None, dz=None):
        q, k, v, pq, pk, S0, z0, kpm, cu = ctx.saved_tensors
        acc = state_dtype(q.dtype)
        dS = None if dS is None else dS.to(acc).contiguous()
        dz = None if dz is None else dz.to(acc).contiguous()
        dq, dk, dv, dpq, dpk, dS0, dz0 = ctx.kernels.bwd(do.contiguous(), dS, dz, q, k, v, pq, pk, S0, z0,
                                                         kpm, cu, *ctx.flags)
        tpq, tpk, tS, tz = ctx.dtypes
        dS0 = None if dS0 is None else dS0.to(tS)
        dz0 = None if dz0 is None else dz0.to(tz)
        return (None, dq, dk, dv, dpq.to(tpq), dpk.to(tpk), dS0, dz0, None, None, None, None, None, None, None)


def kernel_leap_attention(kernels, q, k, v, pq, pk, *, causal, block_size, key_padding_mask, cu_seqlens,
                          initial_state, output_final_state, eps, normalize):
    S0, z0 = (None, None) if initial_state is None else initial_state
    out = KernelLeapAttention.apply(kernels, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, causal,
                                    block_size, float(eps), normalize, output_final_state)
    if output_final_state:
        o, S, z = out
        return o, (S, z)
    return out


def kernel_leap_attention_step(kernels, q, k, v, pq, pk, state, *, eps, normalize):
    acc = state_dtype(q.dtype)
    S0, z0 = (None, None) if state is None else (state[0].to(acc).contiguous(), state[1].to(acc).contiguous())
    with torch.no_grad():
        o, S, z = kernels.step(q.contiguous(), k.contiguous(), v.contiguous(), pq.to(acc).contiguous(),
                               pk.to(acc).contiguous(), S0, z0, float(eps), normalize)
    return o, (S, z)

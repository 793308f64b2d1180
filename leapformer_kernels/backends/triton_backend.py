"""The ``triton`` backend: fused Triton kernels for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``, which is how CI tests them).

Kernel modules: ``leapformer_kernels.attention.triton_chunk`` (fwd / bwd / step, see
``attention/autograd.py``) and ``leapformer_kernels.pooling.triton_pool`` (pool_fwd /
pool_bwd). float64 is refused (Triton dots have no float64 path worth having).
"""
import importlib
import os

import torch

from ..attention.autograd import kernel_leap_attention, kernel_leap_attention_step
from ..pooling.autograd import kernel_window_pool

NOT_BUILT = "not built into this package"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels(op):
    mod = "..attention.triton_chunk" if op != "window_pool" else "..pooling.triton_pool"
    try:
        return importlib.import_module(mod, __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(mod.lstrip(".")):
            return None
        raise


def unavailable(op, device, dtype):
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if device.type not in ("cuda", "cpu"):
        return f"the triton backend serves CUDA tensors, got {device}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if dtype == torch.float64:
        return "float64 is not supported by the Triton kernels (use backend='torch' or 'cpu')"
    if _kernels(op) is None:
        return f"{NOT_BUILT} ({op} has no Triton kernel yet)"
    return None


def leap_attention(q, k, v, pq, pk, **kw):
    return kernel_leap_attention(_kernels("leap_attention"), q, k, v, pq, pk, **kw)


def leap_attention_step(q, k, v, pq, pk, state, *, eps, normalize):
    return kernel_leap_attention_step(_kernels("leap_attention_step"), q, k, v, pq, pk, state, eps=eps,
                                      normalize=normalize)


def window_pool(x, windows, reduce):
    return kernel_window_pool(_kernels("window_pool"), x, windows, reduce)

"""The ``cpu`` backend: C++/OpenMP kernels from ``csrc/`` for CPU tensors.

Kernel modules: ``leapformer_kernels.attention.cpu`` (fwd / bwd / step, see
``attention/autograd.py``) and ``leapformer_kernels.pooling.cpu`` (pool_fwd / pool_bwd).
Both load the extension through ``leapformer_kernels._build``.
"""
import importlib

from ..attention.autograd import kernel_leap_attention, kernel_leap_attention_step
from ..pooling.autograd import kernel_window_pool

NOT_BUILT = "not built into this package"


def _kernels(op):
    mod = "..attention.cpu" if op != "window_pool" else "..pooling.cpu"
    try:
        return importlib.import_module(mod, __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(mod.lstrip(".")):
            return None
        raise


def unavailable(op, device, dtype):
    if device.type != "cpu":
        return f"the cpu backend serves CPU tensors only, got {device}"
    kernels = _kernels(op)
    if kernels is None:
        return f"{NOT_BUILT} ({op} has no C++ kernel yet)"
    return kernels.unavailable(dtype)


def leap_attention(q, k, v, pq, pk, **kw):
    return kernel_leap_attention(_kernels("leap_attention"), q, k, v, pq, pk, **kw)


def leap_attention_step(q, k, v, pq, pk, state, *, eps, normalize):
    return kernel_leap_attention_step(_kernels("leap_attention_step"), q, k, v, pq, pk, state, eps=eps,
                                      normalize=normalize)


def window_pool(x, windows, reduce):
    return kernel_window_pool(_kernels("window_pool"), x, windows, reduce)

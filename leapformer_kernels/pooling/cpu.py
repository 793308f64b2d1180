"""Window-pooling kernels of the ``cpu`` backend: ``csrc/window_pool.cpp`` (C++, at::parallel_for).

Implements the kernel interface of ``pooling/op.py``:

    pool_fwd(x, windows, reduce, need_argmax) -> (pooled [B, T, W, D], valid [B, T, W] bool, argmax or None)
    pool_bwd(grad [B, T, W, D], T, windows, reduce, argmax) -> dx [B, T, D]
    argmax_dtype(windows) -> torch.int16 or torch.int32

sum / mean: one blocked two-level prefix sum along T (float64 inside blocks of 256 rows and for
the block carries, for every input dtype: finite float32 data up to the top of its range cannot
overflow it), O(T * D) per window whatever its length.
max: a tiled sparse table, O(T * D * log Lmax) for all windows together (NaN ranks above every
number: a window holding NaN gives NaN, its argmax is its first NaN); the argmax (only
when asked for) is saved as int16 offsets within the window where the longest window fits,
else int32.
Backward deterministic (per (b, D-block) task, sequential). The extension is built on first use
by ``leapformer_kernels._build.load("window_pool")``.
"""
import torch

from .._build import BuildError, load
from .naive import clamp_windows

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _ext():
    return load("window_pool")


def _clamp(windows, T):
    """Offsets a, b (two lists) of the windows clamped to [-T, T] (``naive.clamp_windows``)."""
    wins = clamp_windows(windows, T)
    return [w[0] for w in wins], [w[1] for w in wins]


def argmax_dtype(windows):
    """int16 offsets within the window where the longest window fits, else int32."""
    return torch.int16 if max(int(b) - int(a) for a, b in windows) <= 32767 else torch.int32


def unavailable(dtype):
    """None if the C++ kernels can run ``dtype``, else the reason (a failed build's log tail)."""
    if dtype not in DTYPES:
        return f"the cpu window_pool kernels take {DTYPES}, got {dtype}"
    try:
        _ext()
    except BuildError as e:
        return str(e)
    return None


def pool_fwd(x, windows, reduce, need_argmax=True):
    T = x.shape[1]
    a, b = _clamp(windows, T)
    with_arg = reduce == "max" and need_argmax
    res = _ext().pool_fwd(x.contiguous(), a, b, reduce, argmax_dtype(windows) == torch.int32, with_arg)
    return res[0], res[1], (res[2] if with_arg else None)


def pool_bwd(grad, T, windows, reduce, argmax):
    a, b = _clamp(windows, T)
    return _ext().pool_bwd(grad.contiguous(), int(T), a, b, reduce, argmax)

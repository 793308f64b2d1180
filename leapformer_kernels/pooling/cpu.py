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
by ``leapformer_kernels._build.load("window_pool")``. Outputs (pooled, valid, argmax; dx) are
allocated here with ``torch.empty`` and handed to the C++, which checks them and writes every
element (so the tests' NaN poisoning of fresh buffers covers them).
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


def unavailable(device, dtype):
    """None if the C++ kernels can run ``device`` / ``dtype`` inputs, else the reason (a failed
    build's log tail)."""
    if device.type != "cpu":
        return f"the cpu backend serves CPU tensors only, got {device}"
    if dtype not in DTYPES:
        return f"the cpu window_pool kernels take {DTYPES}, got {dtype}"
    try:
        _ext()
    except BuildError as e:
        return str(e)
    return None


def pool_fwd(x, windows, reduce, need_argmax=True):
    B, T, D = x.shape
    W = len(windows)
    a, b = _clamp(windows, T)
    # outputs from torch.empty (looked up at call time: the tests' NaN poisoning reaches them);
    # the C++ checks them and writes every element
    pooled = torch.empty(B, T, W, D, dtype=x.dtype, device=x.device)
    valid = torch.empty(B, T, W, dtype=torch.bool, device=x.device)
    argmax = None
    if reduce == "max" and need_argmax:
        argmax = torch.empty(B, T, W, D, dtype=argmax_dtype(windows), device=x.device)
    _ext().pool_fwd(x.contiguous(), a, b, reduce, pooled, valid, argmax)
    return pooled, valid, argmax


def pool_bwd(grad, T, windows, reduce, argmax):
    B, _, _, D = grad.shape
    a, b = _clamp(windows, T)
    dx = torch.empty(B, int(T), D, dtype=grad.dtype, device=grad.device)
    _ext().pool_bwd(grad.contiguous(), int(T), a, b, reduce, argmax, dx)
    return dx

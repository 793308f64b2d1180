"""Window-pooling kernels of the ``cpu`` backend: ``csrc/window_pool.cpp`` (C++, at::parallel_for).

Implements the kernel interface of ``pooling/op.py``:

    fwd(x, windows, reduce, with_argmax) -> (pooled [B, T, NW, D], valid [B, T, NW] bool, argmax or None)
    bwd(grad [B, T, NW, D], T, windows, reduce, argmax) -> dx [B, T, D]
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

from .._build import cpu_unavailable, load
from .naive import clamp_windows
from .naive import offset_argmax_dtype as argmax_dtype  # noqa: F401  (the interface of pooling/op.py)

def _ext():
    return load("window_pool")


def _clamp(windows, T):
    """Offsets a, b (two lists) of the windows clamped to [-T, T] (``naive.clamp_windows``)."""
    wins = clamp_windows(windows, T)
    return [w[0] for w in wins], [w[1] for w in wins]


def unavailable(device, dtype):
    """None if the C++ kernels can run ``device`` / ``dtype`` inputs, else the reason."""
    return cpu_unavailable(device, dtype, "window_pool")


def fwd(x, windows, reduce, with_argmax=True):
    B, T, D = x.shape
    NW = len(windows)
    a, b = _clamp(windows, T)
    # outputs from torch.empty (looked up at call time: the tests' NaN poisoning reaches them);
    # the C++ checks them and writes every element
    pooled = torch.empty(B, T, NW, D, dtype=x.dtype, device=x.device)
    valid = torch.empty(B, T, NW, dtype=torch.bool, device=x.device)
    argmax = None
    if reduce == "max" and with_argmax:
        argmax = torch.empty(B, T, NW, D, dtype=argmax_dtype(windows), device=x.device)
    _ext().pool_fwd(x.contiguous(), a, b, reduce, pooled, valid, argmax)
    return pooled, valid, argmax


def bwd(grad, T, windows, reduce, argmax):
    B, _, _, D = grad.shape
    a, b = _clamp(windows, T)
    dx = torch.empty(B, int(T), D, dtype=grad.dtype, device=grad.device)
    _ext().pool_bwd(grad.contiguous(), int(T), a, b, reduce, argmax, dx)
    return dx

"""The one input guard of every op (attention and pooling): launch on the tensors' own device and
hand kernels contiguous tensors of the dtype they take. The ops (``attention/op.py``,
``pooling/op.py``) adapt their inputs here, differentiably, before any kernel runs; the Triton
launchers, which tests and benchmarks also call directly, use the same two functions."""
import contextlib
from typing import Optional

import torch
from torch import Tensor


_NO_DEVICE = contextlib.nullcontext()  # reusable: off CUDA no context object is built per call


def on_device(t: Tensor):
    """A context that launches on ``t``'s own GPU (a no-op off CUDA; a ``torch.device`` context
    would install a TorchFunctionMode that taxes every op inside)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return _NO_DEVICE


def contiguous_as(t: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """``t`` contiguous and in ``dtype`` (``t`` itself when it already is: no dispatch on the decode
    path); None stays None."""
    if t is None or ((dtype is None or t.dtype == dtype) and t.is_contiguous()):
        return t
    return (t if dtype is None else t.to(dtype)).contiguous()

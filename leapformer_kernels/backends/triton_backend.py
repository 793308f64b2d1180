"""The ``triton`` backend: fused Triton kernels for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``, which is how CI tests them).

Kernel modules: ``attention/triton_chunk.py`` (fwd / bwd / step, see ``attention/op.py``) and
``pooling/triton_pool.py`` (pool_fwd / pool_bwd, see ``pooling/op.py``). float64 is refused.
"""
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def attention_kernels():
    from ..attention import triton_chunk

    return triton_chunk


def pool_kernels():
    from ..pooling import triton_pool

    return triton_pool


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
    return None

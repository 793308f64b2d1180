"""The ``torch`` backend: pure PyTorch, any device, any float dtype.

Kernel modules: ``attention/chunk.py`` (chunked O(T)-memory form; its backward recomputes the
forward and differentiates it) and ``pooling/prefix.py`` (prefix sums, sparse-table max).
"""
from ..attention import chunk
from ..pooling import prefix


def unavailable(op, device, dtype):
    return None


def attention_kernels():
    return chunk


def pool_kernels():
    return prefix

"""The ``cpu`` backend's LeaP attention kernels: ``csrc/leap_attention.cpp`` (C++, OpenMP).

Implements the kernel interface of ``attention/op.py`` (fwd / bwd / step on contiguous
inputs; pq, pk and states in the state dtype). The extension is built on first use through
``leapformer_kernels._build`` (JIT, ninja, cached); a failed build makes ``unavailable``
return the build error (with the log's tail), which the dispatch turns into a fallback
warning or, for an explicit ``backend="cpu"``, a ``ValueError``.

Kernels: chunkwise (64 keys), features built per chunk in thread-local buffers, states in
float32 (float64 for float64 inputs), templated on the input dtype (float32, float64,
bfloat16, float16), deterministic. ``set_mode(1)`` forces the sequential-over-chunks driver,
``set_mode(2)`` the across-chunks (two-pass) one, ``set_mode(0)`` chooses automatically.
"""
import torch

from .. import _build

NAME = "leap_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _ext():
    return _build.load(NAME)


def unavailable(dtype):
    """None if the C++ kernels can run ``dtype`` inputs, else the reason (a string)."""
    if dtype not in _DTYPES:
        return f"the C++ kernels take float16, bfloat16, float32 or float64, not {dtype}"
    try:
        _ext()
    except _build.BuildError as e:
        return f"the C++ extension could not be built: {e}"
    return None


def fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, causal, block_size, eps, normalize,
        output_final_state):
    return tuple(_ext().fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, bool(causal),
                            int(block_size or 0), float(eps), bool(normalize), bool(output_final_state)))


def bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, causal, block_size, eps, normalize):
    return tuple(_ext().bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, bool(causal),
                            int(block_size or 0), float(eps), bool(normalize)))


def step(q, k, v, pq, pk, S0, z0, eps, normalize):
    return tuple(_ext().step(q, k, v, pq, pk, S0, z0, float(eps), bool(normalize)))


def set_mode(mode: int) -> None:
    """0: automatic; 1: sequential over chunks per (sequence, head); 2: across chunks."""
    _ext().set_mode(int(mode))


def get_mode() -> int:
    return int(_ext().get_mode())

"""The ``cpu`` backend: C++/OpenMP kernels from ``csrc/`` for CPU tensors.

Kernel modules: ``attention/cpu.py`` (fwd / bwd / step, see ``attention/op.py``) and
``pooling/cpu.py`` (pool_fwd / pool_bwd, see ``pooling/op.py``); both load their extension
through ``leapformer_kernels._build`` and report a failed build as the reason.
"""


def attention_kernels():
    from ..attention import cpu

    return cpu


def pool_kernels():
    from ..pooling import cpu

    return cpu


def unavailable(op, device, dtype):
    if device.type != "cpu":
        return f"the cpu backend serves CPU tensors only, got {device}"
    kernels = pool_kernels() if op == "window_pool" else attention_kernels()
    return kernels.unavailable(dtype)

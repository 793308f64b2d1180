"""leapformer_kernels: fast, exact kernels for LeaPformer attention (arXiv 2405.13046).

    import leapformer_kernels as lk
    o = lk.leap_attention(q, k, v, pq, pk, causal=True)

See DESIGN section 6 / the README for the API.
"""
from . import distributed, reference
from ._build import build
from .backends import available_backends
from .layers import LeaP, LeapAttention, WindowPool
from .ops import leap_attention, leap_attention_step, leap_attention_step_, wait_k, window_pool
from .pooling.naive import dyadic_windows

__version__ = "0.2.0"


def __getattr__(name):
    # lk.hf imports transformers: only on first use (the [hf] extra), never with the package
    if name == "hf":
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["leap_attention", "leap_attention_step", "leap_attention_step_", "wait_k", "window_pool", "dyadic_windows", "reference",
           "available_backends", "build", "distributed", "LeaP", "LeapAttention", "WindowPool"]

"""``lk.reference``: the float64-capable quadratic PyTorch reference of every op.

Obviously-correct forms (full score / membership matrices), used as the test oracle:
``leap_attention``, ``leap_attention_step``, ``window_pool``, ``dyadic_windows``.
"""
from .attention.naive import leap_attention, leap_attention_step  # noqa: F401
from .pooling.naive import dyadic_windows, window_pool  # noqa: F401

__all__ = ["leap_attention", "leap_attention_step", "window_pool", "dyadic_windows"]

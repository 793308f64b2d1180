"""``WindowPool``: the module form of ``lk.window_pool``."""
from torch import nn

from .._validate import REDUCES
from ..ops import window_pool


class WindowPool(nn.Module):
    """Pool x [B, T, D] over fixed windows of offsets: -> (pooled [B, T, W, D], valid [B, T, W])."""

    def __init__(self, windows, reduce: str = "mean", backend=None):
        super().__init__()
        if reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        self.windows = [tuple(w) for w in windows]
        self.reduce, self.backend = reduce, backend

    def forward(self, x):
        return window_pool(x, self.windows, self.reduce, backend=self.backend)

    def extra_repr(self) -> str:
        return f"windows={self.windows}, reduce={self.reduce!r}"

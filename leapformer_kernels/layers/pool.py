"""``WindowPool``: the module form of ``lk.window_pool``."""
from torch import nn

from .._validate import REDUCES, check_backend, check_windows
from ..ops import window_pool


class WindowPool(nn.Module):
    """Pool x [B, T, D] over fixed windows of offsets: -> (pooled [B, T, NW, D], valid [B, T, NW])."""

    def __init__(self, windows, reduce: str = "mean", backend=None):
        super().__init__()
        if not isinstance(reduce, str) or reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
        check_backend(backend)
        self.windows = [tuple(w) for w in check_windows(windows)]
        self.reduce, self.backend = reduce, backend

    def forward(self, x):
        return window_pool(x, self.windows, self.reduce, backend=self.backend)

    def extra_repr(self) -> str:
        return f"windows={self.windows}, reduce={self.reduce!r}"

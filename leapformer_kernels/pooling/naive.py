"""Quadratic reference of window pooling: a [T, T] membership matrix per window.

``pool[b, t, w] = reduce(x[b, t+a_w .. t+b_w])`` over the part of the window inside
``[0, T)``; a window wholly outside gives 0; ``valid[t, w]`` is True where the window lies
wholly inside. Max sends its gradient to the first (lowest index) maximal element.
Computes in float64 for float64 inputs (float32 otherwise) and returns x's dtype.
"""
import torch

from .._validate import check_window_pool, state_dtype


def window_bounds(T: int, windows, device):
    """lo, hi [T, W] int64: the clipped half-open range [lo, hi) of each window; valid [T, W]."""
    t = torch.arange(T, device=device)[:, None]
    a = torch.tensor([w[0] for w in windows], device=device)[None, :]
    b = torch.tensor([w[1] for w in windows], device=device)[None, :]
    lo = torch.clamp(t + a, 0, T)
    hi = torch.clamp(t + b + 1, 0, T)
    hi = torch.maximum(hi, lo)
    valid = (t + a >= 0) & (t + b < T)
    return lo, hi, valid


def window_pool(x, windows, reduce="mean", backend=None):
    """x [B, T, D] -> pooled [B, T, len(windows), D] (x's dtype), valid [B, T, len(windows)] bool."""
    windows = check_window_pool(x, windows, reduce, backend)
    B, T, D = x.shape
    acc = state_dtype(x.dtype)
    xa = x.to(acc)
    lo, hi, valid = window_bounds(T, windows, x.device)
    s = torch.arange(T, device=x.device)
    member = (s[None, None, :] >= lo[:, :, None]) & (s[None, None, :] < hi[:, :, None])  # [T, W, T]
    count = member.sum(-1)  # [T, W]
    if reduce in ("sum", "mean"):
        out = torch.einsum("tws,bsd->btwd", member.to(acc), xa)
        if reduce == "mean":
            out = out / count.clamp(min=1)[None, :, :, None].to(acc)
    else:
        vals = torch.where(member[None, :, :, :, None], xa[:, None, None, :, :],
                           torch.tensor(float("-inf"), dtype=acc, device=x.device))  # [B, T, W, S, D]
        best = vals.amax(dim=3, keepdim=True)
        first = ((vals == best) & member[None, :, :, :, None]).to(torch.int8).argmax(dim=3)  # [B, T, W, D]
        idx = first.reshape(B, -1, D)
        out = torch.gather(xa, 1, idx).reshape(B, T, len(windows), D)
        out = torch.where((count > 0)[None, :, :, None], out, torch.zeros((), dtype=acc, device=x.device))
    return out.to(x.dtype), valid[None].expand(B, T, len(windows)).clone()


def dyadic_windows(n: int):
    """The n dyadic future windows (1, 1), (2, 3), (4, 7), ... of FutureFormer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return [(2 ** i, 2 ** (i + 1) - 1) for i in range(n)]

"""Quadratic reference of window pooling: a [T, T] membership matrix per window.

``pool[b, t, w] = reduce(x[b, t+a_w .. t+b_w])`` over the part of the window inside
``[0, T)``; a window wholly outside gives 0; ``valid[t, w]`` is True where the window lies
wholly inside. Max sends its gradient to the first (lowest index) maximal element.

Non-finite values, exactly (the oracle the kernels are measured against): a window holding NaN
gives NaN (max as ``torch.amax``; its gradient goes to the window's first NaN); sum and mean of
a window holding +inf and -inf is NaN, of one holding only +inf (-inf) is +inf (-inf); windows
that do not hold a non-finite value are unaffected by it.

Offsets are clamped to ``[-T, T]`` (Python ints) before any tensor arithmetic: the same clipped
range and ``valid`` at every t in ``[0, T)``, and no int64 overflow for offsets such as
``sys.maxsize``. Sum and mean accumulate in float64 for every input dtype (exact for finite
float32 data up to the top of its range), max in x's precision (float32 for half inputs); the
result comes back in x's dtype.
"""
import numbers

import torch

from .._validate import check_window_pool, state_dtype

# The n-th dyadic window ends at offset 2**n - 1, which must fit the int64 offsets of the ops.
DYADIC_MAX_N = 63


def clamp_windows(windows, T: int):
    """Windows with their offsets clamped to [-T, T] (Python ints): at every t in [0, T) the same
    clipped range [max(t+a, 0), min(t+b+1, T)) and the same ``valid``, with |t + offset| <= 2T."""
    return [(max(-T, min(T, int(a))), max(-T, min(T, int(b)))) for a, b in windows]


def offset_argmax_dtype(windows):
    """The argmax dtype of kernels that store offsets within the window (cpu, triton): int16 where
    the longest window fits, else int32."""
    return torch.int16 if max(int(b) - int(a) for a, b in windows) <= 32767 else torch.int32


def window_bounds(T: int, windows, device):
    """lo, hi [T, NW] int64: the clipped half-open range [lo, hi) of each window; valid [T, NW]."""
    windows = clamp_windows(windows, T)
    t = torch.arange(T, device=device)[:, None]
    a = torch.tensor([w[0] for w in windows], dtype=torch.int64, device=device)[None, :]
    b = torch.tensor([w[1] for w in windows], dtype=torch.int64, device=device)[None, :]
    lo = torch.clamp(t + a, 0, T)
    hi = torch.clamp(t + b + 1, 0, T)
    hi = torch.maximum(hi, lo)
    valid = (t + a >= 0) & (t + b < T)
    return lo, hi, valid


def _exact_einsum(eq, m, y):
    """``einsum(eq, m, y)`` for a 0/1 matrix m with exact non-finite rules: a plain product would
    turn 0 * NaN into NaN in every output; here only the outputs that take a NaN (or both +inf and
    -inf) are NaN, and those that take only +inf (-inf) are +inf (-inf)."""
    finite = torch.isfinite(y)
    out = torch.einsum(eq, m, torch.where(finite, y, torch.zeros((), dtype=y.dtype)))
    takes = lambda mask: torch.einsum(eq, m, mask.to(m.dtype)) > 0  # noqa: E731
    has_nan, has_pos, has_neg = takes(torch.isnan(y)), takes(y == float("inf")), takes(y == float("-inf"))
    out = torch.where(has_pos, torch.full_like(out, float("inf")), out)
    out = torch.where(has_neg, torch.full_like(out, float("-inf")), out)
    return torch.where(has_nan | (has_pos & has_neg), torch.full_like(out, float("nan")), out)


class _WindowSum(torch.autograd.Function):
    """Sum over the members m [T, NW, S] of each window: [B, T, NW, D], exact for non-finite values
    in x and in the gradient (linear in x: the gradient is the membership's transpose)."""

    @staticmethod
    def forward(ctx, m, x):
        ctx.save_for_backward(m)
        return _exact_einsum("tws,bsd->btwd", m, x)

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        return None, _exact_einsum("tws,btwd->bsd", m, grad)


def window_pool(x, windows, reduce="mean", backend=None):
    """x [B, T, D] -> pooled [B, T, len(windows), D] (x's dtype), valid [B, T, len(windows)] bool."""
    windows = check_window_pool(x, windows, reduce, backend)
    B, T, D = x.shape
    lo, hi, valid = window_bounds(T, windows, x.device)
    s = torch.arange(T, device=x.device)
    member = (s[None, None, :] >= lo[:, :, None]) & (s[None, None, :] < hi[:, :, None])  # [T, NW, T]
    count = member.sum(-1)  # [T, NW]
    if reduce in ("sum", "mean"):
        out = _WindowSum.apply(member.to(torch.float64), x.to(torch.float64))
        if reduce == "mean":
            out = out / count.clamp(min=1)[None, :, :, None].to(torch.float64)
    else:
        acc = state_dtype(x.dtype)
        xa = x.to(acc)
        vals = torch.where(member[None, :, :, :, None], xa[:, None, None, :, :],
                           torch.tensor(float("-inf"), dtype=acc, device=x.device))  # [B, T, NW, S, D]
        best = vals.amax(dim=3, keepdim=True)  # NaN where the window holds one
        # the first maximal element; where the window holds NaN, its first NaN (as torch.max)
        hit = torch.where(torch.isnan(best), torch.isnan(vals), vals == best) & member[None, :, :, :, None]
        first = hit.to(torch.int8).argmax(dim=3)  # [B, T, NW, D]
        idx = first.reshape(B, -1, D)
        out = torch.gather(xa, 1, idx).reshape(B, T, len(windows), D)
        out = torch.where((count > 0)[None, :, :, None], out, torch.zeros((), dtype=acc, device=x.device))
    return out.to(x.dtype), valid[None].expand(B, T, len(windows)).clone()


def dyadic_windows(n: int):
    """The n dyadic future windows (1, 1), (2, 3), (4, 7), ... of FutureFormer.

    Window i (from 1) is (2**(i-1), 2**i - 1): its end must fit an int64 offset, so
    1 <= n <= 63 (far more than any sequence needs: a window starting at T or beyond is
    wholly outside at every position)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if n > DYADIC_MAX_N:
        raise ValueError(f"n = {n} is too large: dyadic window n ends at offset 2**n - 1, which must fit "
                         f"an int64, so n <= {DYADIC_MAX_N}")
    return [(2 ** i, 2 ** (i + 1) - 1) for i in range(int(n))]

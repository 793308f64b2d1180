"""Window pooling in PyTorch at O(T * D) per window: the ``torch`` backend.

Sum and mean take differences of one prefix sum along T (accumulated in float64, so the
difference of two large prefixes keeps float32 accuracy at any T), computed once for all
windows, whatever their lengths. Max uses a sparse table of (value, first index) pairs:
O(T * D * log W_max) memory and time, and a ``gather`` of the chosen element so that the
gradient goes to the first maximal element (NaN ranks above every number: a window holding NaN
gives NaN and sends its gradient to its first NaN). Offsets are clamped to [-T, T] first
(``naive.window_bounds``): no int64 overflow for offsets such as ``sys.maxsize``.
"""
import torch

from .naive import window_bounds


def unavailable(device, dtype):
    """The torch backend runs anywhere: None."""
    return None


def _first_max(va, ia, vb, ib):
    """Combine two (value, index) candidates; NaN ranks above every number (a window holding NaN
    gives NaN, as ``torch.amax``); ties (NaN with NaN included) keep the lower index."""
    na, nb = torch.isnan(va), torch.isnan(vb)
    take_b = (vb > va) | (nb & ~na) | (((vb == va) | (na & nb)) & (ib < ia))
    return torch.where(take_b, vb, va), torch.where(take_b, ib, ia)


def prefix_window_pool(x, windows, reduce="mean"):
    """x [B, T, D] -> pooled [B, T, NW, D] in x's dtype, valid [B, T, NW] bool (validated input)."""
    B, T, D = x.shape
    NW = len(windows)
    lo, hi, valid = window_bounds(T, windows, x.device)  # [T, NW]
    count = hi - lo
    if reduce in ("sum", "mean"):
        cs = torch.nn.functional.pad(torch.cumsum(x.to(torch.float64), dim=1), (0, 0, 1, 0))  # [B, T+1, D]
        out = cs[:, hi.reshape(-1)] - cs[:, lo.reshape(-1)]
        out = out.reshape(B, T, NW, D)
        if reduce == "mean":
            out = out / count.clamp(min=1)[None, :, :, None].to(out.dtype)
        return out.to(x.dtype), valid[None].expand(B, T, NW).clone()
    idx = max_index(x, lo, hi)
    out = torch.gather(x, 1, idx.reshape(B, T * NW, D)).reshape(B, T, NW, D)
    out = torch.where((count > 0)[None, :, :, None], out, torch.zeros((), dtype=x.dtype, device=x.device))
    return out, valid[None].expand(B, T, NW).clone()


def max_index(x, lo, hi):
    """Index [B, T, NW, D] (int64, into T) of the first maximum of x over [lo, hi) per window,
    by a sparse table of (value, first index) pairs; an empty range gives index 0."""
    B, T, D = x.shape
    count = hi - lo
    longest = int(count.max())
    x = x.detach()
    values = [x]
    index = [torch.arange(T, device=x.device)[None, :, None].expand(B, T, D)]
    j = 0
    while (2 << j) <= longest:
        step = 1 << j
        v_prev, i_prev = values[-1], index[-1]
        v_sh = torch.nn.functional.pad(v_prev[:, step:], (0, 0, 0, step), value=float("-inf"))
        i_sh = torch.nn.functional.pad(i_prev[:, step:], (0, 0, 0, step), value=T)
        v_new, i_new = _first_max(v_prev, i_prev, v_sh, i_sh)
        values.append(v_new)
        index.append(i_new)
        j += 1
    level = torch.floor(torch.log2(count.clamp(min=1).to(torch.float64))).to(torch.int64)  # [T, NW]
    stacked_i = torch.stack(index, 0)  # [L, B, T, D]
    stacked_v = torch.stack(values, 0)
    first = lo.clamp(max=T - 1)  # empty ranges (lo == hi == T) are masked by the caller
    second = (hi - (1 << level)).clamp(min=0)
    va, ia = stacked_v[level, :, first], stacked_i[level, :, first]  # [T, NW, B, D]
    vb, ib = stacked_v[level, :, second], stacked_i[level, :, second]
    _, idx = _first_max(va, ia, vb, ib)
    return idx.clamp(max=T - 1).permute(2, 0, 1, 3).contiguous()


# The kernel interface (see pooling/op.py) for the torch backend.
def argmax_dtype(windows):
    return torch.int64


def fwd(x, windows, reduce, with_argmax=True):
    """-> pooled, valid, argmax (absolute int64 indices into T for "max" with with_argmax, else None)."""
    B, T, D = x.shape
    with torch.no_grad():
        if reduce != "max":
            pooled, valid = prefix_window_pool(x, windows, reduce)
            return pooled, valid, None
        lo, hi, valid = window_bounds(T, windows, x.device)
        idx = max_index(x, lo, hi)
        out = torch.gather(x, 1, idx.reshape(B, -1, D)).reshape(idx.shape)
        out = torch.where((hi > lo)[None, :, :, None], out, torch.zeros((), dtype=x.dtype, device=x.device))
        return out, valid[None].expand(B, T, len(windows)).clone(), (idx if with_argmax else None)


def bwd(grad, T, windows, reduce, argmax):
    """dx [B, T, D]: sum / mean are linear (differentiate the prefix form at x = 0); max scatters
    to the saved first-maximum indices."""
    B, _, NW, D = grad.shape
    if reduce == "max":
        lo, hi, _ = window_bounds(T, windows, grad.device)
        g = grad * (hi > lo)[None, :, :, None].to(grad.dtype)
        dx = torch.zeros(B, T, D, dtype=torch.float32 if grad.dtype != torch.float64 else grad.dtype,
                         device=grad.device)
        dx.scatter_add_(1, argmax.reshape(B, T * NW, D), g.reshape(B, T * NW, D).to(dx.dtype))
        return dx.to(grad.dtype)
    x0 = torch.zeros(B, T, D, dtype=grad.dtype, device=grad.device)
    _, vjp = torch.func.vjp(lambda x: prefix_window_pool(x, windows, reduce)[0], x0)  # runs below autograd
    return vjp(grad)[0]

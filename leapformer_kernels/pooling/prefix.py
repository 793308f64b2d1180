"""Window pooling in PyTorch at O(T * D) per window: the ``torch`` backend.

Sum and mean take differences of one prefix sum along T (accumulated in float64, so the
difference of two large prefixes keeps float32 accuracy at any T), computed once for all
windows, whatever their lengths. Max uses a sparse table of (value, first index) pairs:
O(T * D * log W_max) memory and time, and a ``gather`` of the chosen element so that the
gradient goes to the first maximal element.
"""
import torch

from .naive import window_bounds


def _first_max(va, ia, vb, ib):
    """Combine two (value, index) candidates; ties keep the lower index."""
    take_b = (vb > va) | ((vb == va) & (ib < ia))
    return torch.where(take_b, vb, va), torch.where(take_b, ib, ia)


def prefix_window_pool(x, windows, reduce="mean"):
    """x [B, T, D] -> pooled [B, T, W, D] in x's dtype, valid [B, T, W] bool (validated input)."""
    B, T, D = x.shape
    W = len(windows)
    lo, hi, valid = window_bounds(T, windows, x.device)  # [T, W]
    count = hi - lo
    if reduce in ("sum", "mean"):
        cs = torch.nn.functional.pad(torch.cumsum(x.to(torch.float64), dim=1), (0, 0, 1, 0))  # [B, T+1, D]
        out = cs[:, hi.reshape(-1)] - cs[:, lo.reshape(-1)]
        out = out.reshape(B, T, W, D)
        if reduce == "mean":
            out = out / count.clamp(min=1)[None, :, :, None].to(out.dtype)
        return out.to(x.dtype), valid[None].expand(B, T, W).clone()
    # max: sparse table over levels 2^j covering the longest clipped window
    longest = int(count.max())
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
    level = torch.floor(torch.log2(count.clamp(min=1).to(torch.float64))).to(torch.int64)  # [T, W]
    stacked_i = torch.stack(index, 0)  # [L, B, T, D]
    stacked_v = torch.stack(values, 0).detach()
    first = lo
    second = (hi - (1 << level)).clamp(min=0)
    va = stacked_v[level, :, first]  # [T, W, B, D]
    ia = stacked_i[level, :, first]
    vb = stacked_v[level, :, second]
    ib = stacked_i[level, :, second]
    _, idx = _first_max(va, ia, vb, ib)
    idx = idx.clamp(max=T - 1).permute(2, 0, 1, 3).reshape(B, T * W, D)
    out = torch.gather(x, 1, idx).reshape(B, T, W, D)
    out = torch.where((count > 0)[None, :, :, None], out, torch.zeros((), dtype=x.dtype, device=x.device))
    return out, valid[None].expand(B, T, W).clone()

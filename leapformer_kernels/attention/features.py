"""The LeaP re-weighted feature map, in PyTorch (used by the reference and the torch backend).

``x~ = [relu(x) * sin(pi/2 * p), relu(x) * cos(pi/2 * p)]`` so that
``q~_t . k~_s = relu(q_t) . relu(k_s) * cos(pi/2 * (pq_t - pk_s))``.
Kernels never materialise these features; the reference does.

Numerics: the cosine half is computed as ``sin(pi/2 * (1 - p))``, not ``cos(pi/2 * p)``.
Both are exact at p = 0 and p = 1 only in this form: float32 ``cos(float32(pi/2))`` is
-4.4e-8, not 0, so with pq = 1, pk = 0 (orthogonal features, den = 0) the naive form gives
a spurious den of ~1e-8 that the eps clamp then amplifies into an O(1e-2) output error.
Every backend (C++, Triton) uses the same form.
"""
import math

import torch

HALF_PI = math.pi / 2


def reweight(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x [..., D], p [...] -> [..., 2*D], ordered [sin half, cos half], in x's dtype."""
    p = p.to(x.dtype).unsqueeze(-1)
    a = torch.relu(x)
    return torch.cat([a * torch.sin(HALF_PI * p), a * torch.sin(HALF_PI * (1 - p))], dim=-1)


def expand_kv_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, S, Hkv, ...] -> [B, S, H, ...]: query head h reads key/value head h // (H // Hkv)."""
    Hkv = x.shape[2]
    return x if Hkv == H else x.repeat_interleave(H // Hkv, dim=2)


def visible_mask(T: int, S: int, causal: bool, block_size, device) -> torch.Tensor:
    """Bool [T, S]: True where key s is visible from query t (DESIGN section 2, visibility)."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    if not causal:
        return torch.ones(T, S, dtype=torch.bool, device=device)
    if block_size is None:
        return s <= t
    return (s // block_size) <= (t // block_size)

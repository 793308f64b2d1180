"""Quadratic reference of LeaP attention: obviously correct, float64-capable, O(T*S) memory.

This is the oracle of the test suite (``lk.reference.leap_attention``). It builds the full
score matrix ``A = q~ k~^T`` with the visibility mask and applies
``o = (A v + q~ S0) / max(A 1 + q~ z0, eps)``. It computes in the state dtype (float64 for
float64 inputs, float32 otherwise) and returns ``o`` in q's dtype. Padded keys are selected to
0 (``torch.where``) in k, pk and v, so NaN / Inf there reach nothing; relu keeps NaN. Any
``block_size`` >= the sequence length is one block.
"""
from typing import Optional, Tuple

import torch

from .._validate import check_attention, check_step, effective_eps, state_dtype
from .features import expand_kv_heads, reweight, visible_mask

State = Tuple[torch.Tensor, torch.Tensor]


def _one_sequence(q, k, v, pq, pk, kpm, causal, block_size, S0, z0, eps, normalize, limit=None):
    """q [T, H, Dk], k [S, H, Dk], v [S, H, Dv], pq [T, H], pk [S, H], kpm [S] or None,
    limit [T] or None (query t sees keys s < limit[t]: ``num_visible_keys``),
    S0 [H, 2Dk, Dv], z0 [H, 2Dk] -> o [T, H, Dv], S [H, 2Dk, Dv], z [H, 2Dk] (all in acc dtype)."""
    if kpm is not None:  # selected where loaded, not multiplied: NaN / Inf in a padded key reach nothing
        k = torch.where(kpm[:, None, None], 0., k)
        v = torch.where(kpm[:, None, None], 0., v)
        pk = torch.where(kpm[:, None], 0., pk)
    qf = reweight(q, pq)  # [T, H, 2Dk]
    kf = reweight(k, pk)  # [S, H, 2Dk]
    T, S = q.shape[0], k.shape[0]
    if block_size is not None:
        block_size = min(block_size, max(T, S, 1))  # any block_size >= T is one block
    mask = visible_mask(T, S, causal, block_size, q.device)
    if limit is not None:
        mask = torch.arange(S, device=q.device)[None, :] < limit[:, None]
    A = torch.where(mask, torch.einsum("thd,shd->hts", qf, kf), 0.)  # [H, T, S]; a key never seen reaches nothing
    num = torch.einsum("hts,she->the", A, v) + torch.einsum("thd,hde->the", qf, S0)
    den = A.sum(-1).transpose(0, 1) + torch.einsum("thd,hd->th", qf, z0)  # [T, H]
    o = num / torch.clamp(den, min=eps)[..., None] if normalize else num
    S_fin = S0 + torch.einsum("shd,she->hde", kf, v)
    z_fin = z0 + kf.sum(0)
    return o, S_fin, z_fin


def leap_attention(q, k, v, pq, pk, *, causal: bool = True, block_size: Optional[int] = None,
                   key_padding_mask: Optional[torch.Tensor] = None,
                   cu_seqlens: Optional[torch.Tensor] = None,
                   initial_state: Optional[State] = None, output_final_state: bool = False,
                   eps: float = 1e-6, normalize: bool = True, backend=None,
                   num_visible_keys: Optional[torch.Tensor] = None):
    """Quadratic-form LeaP attention. Shapes as ``lk.leap_attention``:
    q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv], pq [B, T, H], pk [B, S, Hkv]
    -> o [B, T, H, Dv] (and (S [B|N, H, 2Dk, Dv], z [B|N, H, 2Dk]) with output_final_state)."""
    dims = check_attention(q, k, v, pq, pk, causal=causal, block_size=block_size,
                           key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                           initial_state=initial_state, output_final_state=output_final_state,
                           eps=eps, normalize=normalize, backend=backend, num_visible_keys=num_visible_keys)
    acc = state_dtype(q.dtype)
    limits = None if num_visible_keys is None else num_visible_keys.to(q.device).expand(dims.B, dims.T)
    eps = effective_eps(eps, q.dtype)
    H = dims.H
    qa, ka, va = q.to(acc), expand_kv_heads(k.to(acc), H), expand_kv_heads(v.to(acc), H)
    pqa, pka = pq.to(acc), expand_kv_heads(pk.to(acc), H)
    n = dims.num_seqs
    if initial_state is None:
        S0 = q.new_zeros(n, H, 2 * dims.Dk, dims.Dv, dtype=acc)
        z0 = q.new_zeros(n, H, 2 * dims.Dk, dtype=acc)
    else:
        S0, z0 = initial_state[0].to(acc), initial_state[1].to(acc)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pieces = [(0, bounds[i], bounds[i + 1], i) for i in range(n)]
    else:
        pieces = [(b, 0, dims.T, b) for b in range(dims.B)]
    outs, Ss, zs = [], [], []
    for b, lo, hi, si in pieces:
        sk = slice(lo, hi) if cu_seqlens is not None else slice(0, dims.S)
        kpm = None if key_padding_mask is None else key_padding_mask[b, sk]
        o, S_, z_ = _one_sequence(qa[b, lo:hi], ka[b, sk], va[b, sk], pqa[b, lo:hi], pka[b, sk], kpm,
                                  causal, block_size, S0[si], z0[si], eps, normalize,
                                  None if limits is None else limits[b])
        outs.append(o)
        Ss.append(S_)
        zs.append(z_)
    if cu_seqlens is not None:
        o = torch.cat(outs, 0)[None]
    else:
        o = torch.stack(outs, 0)
    o = o.to(q.dtype)
    if output_final_state:
        return o, (torch.stack(Ss, 0), torch.stack(zs, 0))
    return o


def leap_attention_step(q, k, v, pq, pk, state=None, *, eps: float = 1e-6, normalize: bool = True,
                        backend=None):
    """Decode t >= 1 new tokens against a carried state: causal attention over the new tokens
    on top of ``state``. Returns (o [B, t, H, Dv], (S, z)) as fresh tensors."""
    check_step(q, k, v, pq, pk, state, eps=eps, normalize=normalize, backend=backend)
    return leap_attention(q, k, v, pq, pk, causal=True, initial_state=state,
                          output_final_state=True, eps=eps, normalize=normalize)

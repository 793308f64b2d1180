"""``LeapAttention``: multi-head LeaPformer attention layer (or softmax, for comparison)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import leap_attention, leap_attention_step
from .leap import LeaP


class LeapAttention(nn.Module):
    """Multi-head attention with LeaP re-weighted linear attention.

    Args:
        embed_dim: E, the model width; num_heads: H (E % H == 0, head_dim = E // H).
        num_kv_heads: Hkv dividing H (MQA / GQA); None = H.
        causal: causal self-attention (or position-aligned causal cross-attention with
            ``cross=True``, where query i sees context positions <= i).
        block_size: block-causal attention with blocks of this many positions (streaming encoders).
        cross: keys and values come from ``context`` (``kdim`` / ``vdim`` wide).
        leap_hidden: hidden width of the two LeaP predictors (None = head_dim // 4).
        eps: denominator clamp (0.1 as in the official fairseq code).
        normalize: divide by the denominator (False: leave normalisation to a norm layer).
        attention: "leap", or "softmax" to run the same projections through SDPA.
        backend: forwarded to the functional ops.

    forward(x [B, T, E], context [B, S, kdim] or None, key_padding_mask [B, S] bool (True = pad),
    state, use_cache) -> y [B, T, E], or (y, state) with use_cache.

    The state is what streaming needs: for "leap" the pair (S [B, H, 2*hd, hd], z [B, H, 2*hd])
    (O(1) in the context length); for "softmax" a KV cache (k [B, S, Hkv, hd], v, pad [B, S]).
    Self-attention (and causal cross-attention) extend it with the new tokens. A non-causal
    cross-attention layer computes it once from ``context`` and afterwards may be called with
    ``context=None`` and the state. Batched prompts of different lengths: left-pad them and
    pass ``key_padding_mask``; padded keys never enter the state.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, causal: bool = True,
                 block_size: Optional[int] = None, cross: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, leap_hidden: Optional[int] = None, eps: float = 0.1,
                 normalize: bool = True, bias: bool = True, attention: str = "leap", backend: Optional[str] = None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if attention not in ("leap", "softmax"):
            raise ValueError(f"attention must be 'leap' or 'softmax', got {attention!r}")
        if block_size is not None and not causal:
            raise ValueError("block_size needs causal=True (block-causal attention)")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.block_size, self.cross = causal, block_size, cross
        self.eps, self.normalize, self.attention, self.backend = eps, normalize, attention, backend
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim if cross else embed_dim, kv_width, bias=bias)
        self.v_proj = nn.Linear(vdim if cross else embed_dim, kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.leap_q = LeaP(self.head_dim, leap_hidden)
        self.leap_k = LeaP(self.head_dim, leap_hidden)

    # ---------------------------------------------------------------- helpers
    def _heads(self, x, proj, heads):
        B, T, _ = x.shape
        return proj(x).view(B, T, heads, self.head_dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, state=None, use_cache: bool = False):
        if self.cross and context is None and (state is None or self.causal):
            raise ValueError("context is required for cross-attention (except non-causal cross-attention "
                             "with a state computed before)")
        if not self.cross and context is not None:
            raise ValueError("context is given but this layer was built with cross=False")
        source = context if self.cross else x
        B, T, _ = x.shape
        q = self._heads(x, self.q_proj, self.num_heads)
        if self.attention == "softmax":
            y, new_state = self._softmax(q, source, key_padding_mask, state)
        else:
            y, new_state = self._leap(q, source, key_padding_mask, state)
        y = self.out_proj(y.reshape(B, T, self.embed_dim))
        return (y, new_state) if use_cache else y

    # ---------------------------------------------------------------- leap
    def _leap(self, q, source, key_padding_mask, state):
        q = q * self.head_dim ** -0.5
        pq = self.leap_q(torch.relu(q))
        kw = dict(eps=self.eps, normalize=self.normalize, backend=self.backend)
        if source is None:  # non-causal cross-attention against a precomputed context state
            B = q.shape[0]
            k = q.new_zeros(B, 1, self.num_kv_heads, self.head_dim)
            pad = torch.ones(B, 1, dtype=torch.bool, device=q.device)
            o = leap_attention(q, k, k, pq, k[..., 0], causal=False, key_padding_mask=pad,
                               initial_state=state, **kw)
            return o, state
        k = self._heads(source, self.k_proj, self.num_kv_heads)
        v = self._heads(source, self.v_proj, self.num_kv_heads)
        pk = self.leap_k(torch.relu(k))
        if state is not None and self.causal and key_padding_mask is None and self.block_size is None:
            return leap_attention_step(q, k, v, pq, pk, state, **kw)
        return leap_attention(q, k, v, pq, pk, causal=self.causal, block_size=self.block_size,
                              key_padding_mask=key_padding_mask, initial_state=state, output_final_state=True,
                              **kw)

    # ---------------------------------------------------------------- softmax
    def _softmax(self, q, source, key_padding_mask, state):
        B, T = q.shape[:2]
        if source is None:
            k, v, pad = state
        else:
            k = self._heads(source, self.k_proj, self.num_kv_heads)
            v = self._heads(source, self.v_proj, self.num_kv_heads)
            pad = key_padding_mask if key_padding_mask is not None else torch.zeros(
                k.shape[:2], dtype=torch.bool, device=k.device)
            if state is not None and (self.causal or not self.cross):
                k = torch.cat([state[0], k], 1)
                v = torch.cat([state[1], v], 1)
                pad = torch.cat([state[2], pad], 1)
        S = k.shape[1]
        new_state = (k, v, pad)
        g = self.num_heads // self.num_kv_heads
        kh, vh = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        allowed = ~pad[:, None, None, :]  # [B, 1, 1, S]
        if self.causal:
            past = S - T  # absolute position of the first query
            t = torch.arange(T, device=q.device)[:, None] + past
            s = torch.arange(S, device=q.device)[None, :]
            vis = s <= t if self.block_size is None else (s // self.block_size) <= (t // self.block_size)
            allowed = allowed & vis
        allowed = allowed.expand(B, 1, T, S)
        any_key = allowed.any(-1, keepdim=True)  # rows with no visible key give 0, not NaN
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2),
                                           attn_mask=allowed | ~any_key)
        o = o * any_key.to(o.dtype)
        return o.transpose(1, 2), new_state

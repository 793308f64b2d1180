"""``LeapAttention``: multi-head LeaPformer attention layer (or a baseline: softmax, plain relu
linear attention, cosFormer)."""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import AttnDims, check_num_visible_keys
from ..ops import leap_attention, leap_attention_step
from .leap import LeaP


def _positive_int(value, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}")


ATTENTIONS = ("leap", "softmax", "linear", "cosformer")


class CosformerState(NamedTuple):
    """State of a ``attention="cosformer"`` layer: the linear-attention state (S, z) plus the
    number of real positions seen per batch row (``pos`` [B] long: keys; ``qpos`` [B] long:
    queries, which differ from the keys only in cross-attention). Left-padded prompts start at
    different positions, hence one count per row."""
    S: torch.Tensor
    z: torch.Tensor
    pos: torch.Tensor
    qpos: torch.Tensor


class RotaryState(NamedTuple):
    """State of a ``rope=True`` layer: the attention's own state (``inner``: the pair (S, z), a
    ``CosformerState`` or a softmax KV cache; None = nothing seen yet) plus the rotary positions
    already used per batch row (``pos`` [B] long: keys; ``qpos`` [B] long: queries). Left-padded
    prompts start at different positions, hence one offset per row. ``RotaryState(None, p, p)``
    starts a sequence at position ``p`` (softmax outputs do not change: RoPE scores depend only
    on t - s; LeaP outputs do: for LeaP the rotation is an absolute position signal)."""
    inner: object
    pos: torch.Tensor
    qpos: torch.Tensor


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
        attention: "leap"; or a baseline with the same projections and no LeaP predictors (no dead
            parameters): "softmax" (SDPA), "linear" (plain relu linear attention: the same kernels
            with the proportions fixed at 0, features [0, relu(x)]) or "cosformer" (cosFormer's
            re-weighting: the proportion of the token at position t is t / cosformer_max_len).
        cosformer_max_len: M of "cosformer", the longest sequence in tokens: positions count real
            (unpadded) tokens from 0, per sequence, across calls with a state; a position >= M
            raises ValueError. Unused by the other attentions.
        backend: forwarded to the functional ops.
        rope: rotary position embedding (RoPE, rotate-half pairing as GPT-NeoX / Llama) of q and k
            after their projections, at the positions of real tokens (counted per row from 0,
            across calls with a state: the state becomes a ``RotaryState``; packed sequences count
            from each sequence's start). Softmax: standard RoPE, scores depend only on t - s.
            LeaP (and linear, cosformer): the proportions are predicted from the *unrotated*
            relu(q), relu(k); the rotated q, k then go through the feature map relu(.) and the
            re-weighting, so the rotation is an absolute position signal there, not a relative one.
            Needs an even head_dim. ``rope_base``: the wavelength base (10000).

    forward(x [B, T, E], context [B, S, kdim] or None, key_padding_mask [B, S] bool (True = pad),
    state, use_cache, cu_seqlens) -> y [B, T, E], or (y, state) with use_cache.

    The state is what streaming needs: for "leap" and "linear" the pair (S [B, H, 2*hd, hd],
    z [B, H, 2*hd]) (O(1) in the context length); for "cosformer" a ``CosformerState`` (S, z and
    the positions seen per row); for "softmax" a KV cache (k [B, S, Hkv, hd], v, pad [B, S]).
    One rule for every attention: a call with a state extends it with the keys it is given, and
    its output equals attention over everything seen so far. Self-attention (and causal cross-
    attention) extend it with the new tokens. For non-causal cross-attention, ``context`` holds
    only the source tokens that are not yet in the state: the first call builds the state from
    the context, later calls pass new source tokens (the state then equals one built from the
    concatenated source) or ``context=None`` when no new source arrived. Batched prompts of
    different lengths: left-pad them and pass ``key_padding_mask``; padded keys never enter the
    state (their values are zeroed before softmax too, so NaN in a padded key reaches nothing).

    Monotone cross-attention (wait-k / simultaneous decoders; non-causal cross layers only):
    ``num_visible_keys`` int [B, T] or [T] (see ``lk.wait_k``): query t sees the keys of the state
    and the first ``n[t]`` keys of ``context`` (for softmax a mask over the KV cache and the new
    keys). Training passes the whole source with its limits; decoding passes, at each step, the
    source tokens that arrived since the last call as ``context`` with the state, and every key
    the state then holds is visible: a decoder step that advances the limit by one source block
    is ``layer(x_t, context=new_block, state=state, use_cache=True)``, and equals the training
    forward with ``num_visible_keys`` (a test proves it for every attention).

    Packed sequences (training): ``cu_seqlens`` [N+1] int with B = 1, as in ``leap_attention``;
    each sequence attends only within itself (softmax: through a block-diagonal mask). With
    ``use_cache`` the LeaP state has one row per sequence; softmax takes no state with packing.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, causal: bool = True,
                 block_size: Optional[int] = None, cross: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, leap_hidden: Optional[int] = None, eps: float = 0.1,
                 normalize: bool = True, bias: bool = True, attention: str = "leap", backend: Optional[str] = None,
                 cosformer_max_len: int = 1024, rope: bool = False, rope_base: float = 10000.0):
        super().__init__()
        _positive_int(embed_dim, "embed_dim")
        _positive_int(num_heads, "num_heads")
        _positive_int(num_kv_heads, "num_kv_heads", optional=True)
        _positive_int(block_size, "block_size", optional=True)
        _positive_int(kdim, "kdim", optional=True)
        _positive_int(vdim, "vdim", optional=True)
        _positive_int(cosformer_max_len, "cosformer_max_len")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTIONS))}, got {attention!r}")
        if block_size is not None and not causal:
            raise ValueError("block_size needs causal=True (block-causal attention)")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.block_size, self.cross = causal, block_size, cross
        self.eps, self.normalize, self.attention, self.backend = float(eps), normalize, attention, backend
        self.cosformer_max_len = cosformer_max_len
        if not isinstance(rope, bool):
            raise ValueError(f"rope must be a bool, got {rope!r}")
        if rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got embed_dim / num_heads = {self.head_dim}")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not (1 < rope_base < math.inf):
            raise ValueError(f"rope_base must be a finite number > 1, got {rope_base!r}")
        self.rope, self.rope_base = rope, float(rope_base)
        self.kdim = (kdim or embed_dim) if cross else embed_dim
        self.vdim = (vdim or embed_dim) if cross else embed_dim
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias)
        self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if attention == "leap":
            self.leap_q = LeaP(self.head_dim, leap_hidden)
            self.leap_k = LeaP(self.head_dim, leap_hidden)
        else:
            self.leap_q = self.leap_k = None
            # checkpoints from before 0.2.0 held (unused) LeaP predictors in softmax layers; a leap
            # checkpoint also loads into a linear / cosformer layer (the predictors are dropped)
            self.register_load_state_dict_pre_hook(_drop_leap_predictors)

    # ---------------------------------------------------------------- helpers
    def _heads(self, x, proj, heads):
        B, T, _ = x.shape
        return proj(x).view(B, T, heads, self.head_dim)

    def _check_inputs(self, x, context, key_padding_mask, state, cu_seqlens, num_visible_keys=None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, T, {self.embed_dim}] tensor (batch first), got {got}")
        if self.cross and context is None and (state is None or self.causal):
            raise ValueError("context is required for cross-attention (except non-causal cross-attention "
                             "with a state computed before)")
        if not self.cross and context is not None:
            raise ValueError("context is given but this layer was built with cross=False")
        if context is not None and (not isinstance(context, torch.Tensor) or context.dim() != 3
                                    or context.shape[0] != x.shape[0] or context.shape[-1] != self.kdim):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must be a [B, S, {self.kdim}] tensor with x's batch size {x.shape[0]}, "
                             f"got {got}")
        if key_padding_mask is not None:
            S = (context if self.cross else x).shape[1] if (context is not None or not self.cross) else 1
            if (not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool
                    or tuple(key_padding_mask.shape) != (x.shape[0], S)):
                got = (f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}"
                       if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__)
                raise ValueError(f"key_padding_mask must be a bool [B, S] = [{x.shape[0]}, {S}] tensor "
                                 f"(True = padded key), got {got}")
        if num_visible_keys is not None:
            if not self.cross or self.causal:
                raise ValueError("num_visible_keys needs a non-causal cross-attention layer "
                                 "(LeapAttention(..., cross=True, causal=False))")
            if context is None:
                raise ValueError("num_visible_keys counts keys of context: pass context with it")
            if cu_seqlens is not None:
                raise ValueError("num_visible_keys cannot be combined with cu_seqlens")
            B, T, S = x.shape[0], x.shape[1], context.shape[1]
            check_num_visible_keys(num_visible_keys, AttnDims(B, T, S, self.num_heads, self.num_kv_heads,
                                                              self.head_dim, self.head_dim, B),
                                   False, None, x.device)
        if cu_seqlens is not None:
            if x.shape[0] != 1:
                raise ValueError(f"cu_seqlens packs sequences along T with batch size 1, got x of batch {x.shape[0]}")
            if state is not None:
                raise ValueError("cu_seqlens is for packed training: pass no state with it")

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, state=None, use_cache: bool = False,
                cu_seqlens: Optional[torch.Tensor] = None, num_visible_keys: Optional[torch.Tensor] = None):
        self._check_inputs(x, context, key_padding_mask, state, cu_seqlens, num_visible_keys)
        source = context if self.cross else x
        B, T, _ = x.shape
        q = self._heads(x, self.q_proj, self.num_heads)
        rot = None
        if self.rope:
            state, rot, new_pos = self._rotary_positions(x, context, key_padding_mask, state, cu_seqlens)
        if self.attention == "softmax":
            if cu_seqlens is not None and use_cache:
                raise ValueError("use_cache with cu_seqlens needs attention='leap' (a softmax KV cache "
                                 "is per batch row, not per packed sequence)")
            y, new_state = self._softmax(q, source, key_padding_mask, state, cu_seqlens, num_visible_keys, rot)
        else:
            y, new_state = self._leap(q, source, key_padding_mask, state, cu_seqlens, num_visible_keys, rot)
        y = self.out_proj(y.reshape(B, T, self.embed_dim))
        if self.rope:
            new_state = RotaryState(new_state, *new_pos)
        return (y, new_state) if use_cache else y

    # ---------------------------------------------------------------- rotary positions
    def _rotary_positions(self, x, context, key_padding_mask, state, cu_seqlens):
        """(inner state, (query positions [B, T], key positions [B, S] or None), (new key count,
        new query count)) for a ``rope=True`` call."""
        B, T = x.shape[:2]
        start_k = start_q = None
        if state is not None:
            if not isinstance(state, RotaryState):
                raise ValueError(f"state of a rope=True layer must be the RotaryState it returned, got "
                                 f"{type(state).__name__}")
            state, start_k, start_q = state
        self_mask = None if self.cross else key_padding_mask
        qpos, new_q = self._positions(T, B, self_mask, start_q, cu_seqlens, x.device)
        if not self.cross:
            return state, (qpos, qpos), (new_q, new_q)
        if context is None:
            return state, (qpos, None), (start_k, new_q)
        kpos, new_k = self._positions(context.shape[1], B, key_padding_mask, start_k, None, x.device)
        return state, (qpos, kpos), (new_k, new_q)

    def _rotate(self, x, pos):
        """RoPE of x [B, n, heads, d] at positions pos [B, n] (rotate-half pairing)."""
        half = self.head_dim // 2
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv = self.rope_base ** (-torch.arange(half, device=x.device, dtype=dt) / half)
        ang = pos.to(dt)[..., None] * inv  # [B, n, half]
        cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
        x1, x2 = x[..., :half].to(dt), x[..., half:].to(dt)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)

    # ---------------------------------------------------------------- leap, linear, cosformer
    def _positions(self, n, B, mask, start, cu_seqlens, device):
        """Positions [B, n] of n new tokens (real tokens counted from ``start`` [B] or 0; padded
        ones get their row's last real position) and the new count [B]."""
        if start is None:
            start = torch.zeros(B, dtype=torch.long, device=device)
        if cu_seqlens is not None:  # packed: positions count from each sequence's start
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            t = torch.arange(n, device=device)
            pos = (t - cu[torch.searchsorted(cu[1:], t, right=True)])[None].expand(B, n)
            return pos, cu[1:] - cu[:-1]  # the state has one row per packed sequence
        real = (torch.ones(B, n, dtype=torch.long, device=device) if mask is None else (~mask).long())
        pos = start[:, None] + (real.cumsum(1) - 1).clamp_min(0)
        return pos, start + real.sum(1)

    def _ratio(self, pos, heads, dtype):
        """cosFormer proportions pos / M, [B, n] -> [B, n, heads]; ValueError beyond M."""
        M = self.cosformer_max_len
        if pos.numel() and int(pos.max()) >= M:
            raise ValueError(f"position {int(pos.max())} is beyond cosformer_max_len={M} (cosformer attention: "
                             f"at most {M} tokens per sequence; build the layer with a larger cosformer_max_len)")
        return (pos.to(dtype) / M)[..., None].expand(*pos.shape, heads).contiguous()

    def _leap(self, q, source, key_padding_mask, state, cu_seqlens, num_visible_keys=None, rot=None):
        q = q * self.head_dim ** -0.5
        B, T = q.shape[:2]
        kind = self.attention
        pdtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        pos = qpos = new_pos = new_qpos = None
        if kind == "cosformer":
            if state is not None:
                state, pos, qpos = (state.S, state.z), state.pos, state.qpos
            self_mask = None if self.cross else key_padding_mask
            q_positions, new_qpos = self._positions(T, B, self_mask, qpos, cu_seqlens, q.device)
            pq = self._ratio(q_positions, self.num_heads, pdtype)
        elif kind == "linear":
            pq = torch.zeros(B, T, self.num_heads, dtype=pdtype, device=q.device)
        else:
            pq = self.leap_q(torch.relu(q))
        if rot is not None:  # after the proportions: LeaP predicts from the unrotated q
            q = self._rotate(q, rot[0])

        def wrap(o, st):
            if kind != "cosformer":
                return o, st
            return o, CosformerState(st[0], st[1], new_pos if new_pos is not None else pos, new_qpos)

        kw = dict(eps=self.eps, normalize=self.normalize, backend=self.backend)
        if source is None:  # non-causal cross-attention against a precomputed context state
            k = q.new_zeros(B, 1, self.num_kv_heads, self.head_dim)
            pad = torch.ones(B, 1, dtype=torch.bool, device=q.device)
            o = leap_attention(q, k, k, pq, k[..., 0].to(pq.dtype), causal=False, key_padding_mask=pad,
                               initial_state=state, **kw)
            return wrap(o, state)
        k = self._heads(source, self.k_proj, self.num_kv_heads)
        v = self._heads(source, self.v_proj, self.num_kv_heads)
        S = k.shape[1]
        if kind == "cosformer":
            if self.cross:
                k_positions, new_pos = self._positions(S, B, key_padding_mask, pos, None, q.device)
            else:
                k_positions, new_pos = q_positions, new_qpos
            pk = self._ratio(k_positions, self.num_kv_heads, pdtype)
        elif kind == "linear":
            pk = torch.zeros(B, S, self.num_kv_heads, dtype=pdtype, device=q.device)
        else:
            pk = self.leap_k(torch.relu(k))
        if rot is not None:
            k = self._rotate(k, rot[1])
        if state is not None and self.causal and key_padding_mask is None and self.block_size is None:
            return wrap(*leap_attention_step(q, k, v, pq, pk, state, **kw))
        return wrap(*leap_attention(q, k, v, pq, pk, causal=self.causal, block_size=self.block_size,
                                    key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, initial_state=state,
                                    output_final_state=True, num_visible_keys=num_visible_keys, **kw))

    # ---------------------------------------------------------------- softmax
    def _softmax(self, q, source, key_padding_mask, state, cu_seqlens, num_visible_keys=None, rot=None):
        B, T = q.shape[:2]
        if rot is not None:
            q = self._rotate(q, rot[0])
        if source is None:
            k, v, pad = state
        else:
            k = self._heads(source, self.k_proj, self.num_kv_heads)
            v = self._heads(source, self.v_proj, self.num_kv_heads)
            if rot is not None:  # the cache holds rotated keys
                k = self._rotate(k, rot[1])
            pad = key_padding_mask if key_padding_mask is not None else torch.zeros(
                k.shape[:2], dtype=torch.bool, device=k.device)
            if key_padding_mask is not None:  # padded keys enter the cache as 0 (selected: NaN included), once
                zero = torch.zeros((), dtype=k.dtype, device=k.device)
                k = torch.where(key_padding_mask[:, :, None, None], zero, k)
                v = torch.where(key_padding_mask[:, :, None, None], zero, v)
            if state is not None:  # extend the cache (self, causal cross and non-causal cross alike)
                k = torch.cat([state[0], k], 1)
                v = torch.cat([state[1], v], 1)
                pad = torch.cat([state[2], pad], 1)
        new_state = (k, v, pad)  # padded keys are 0 in the cache (selected on entry)
        # GQA through SDPA's enable_gqa: no repeated copy of the keys and values (of the whole cache
        # at every decoding step)
        gqa = dict(enable_gqa=True) if self.num_heads != self.num_kv_heads else {}
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        plain = (state is None and key_padding_mask is None and cu_seqlens is None and self.block_size is None
                 and num_visible_keys is None)
        if plain and (not self.causal or k.shape[1] == T):  # no T x T mask: the flash / efficient kernels run
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=self.causal, **gqa)
            return o.transpose(1, 2), new_state
        allowed = ~pad[:, None, None, :]  # [B, 1, 1, S]
        S = k.shape[1]
        t = torch.arange(T, device=q.device)[:, None] + (S - T if self.causal else 0)  # absolute query positions
        s = torch.arange(S, device=q.device)[None, :]
        if cu_seqlens is not None:  # packed: positions count from each sequence's start
            cu = cu_seqlens.to(device=q.device, dtype=torch.long)
            seq_t = torch.searchsorted(cu[1:], t, right=True)
            seq_s = torch.searchsorted(cu[1:], s, right=True)
            allowed = allowed & (seq_t == seq_s)
            t, s = t - cu[seq_t], s - cu[seq_s]
        if self.causal:
            vis = s <= t if self.block_size is None else (s // self.block_size) <= (t // self.block_size)
            allowed = allowed & vis
        if num_visible_keys is not None:  # the cached keys, then the first n[t] keys of the context
            cached = S - source.shape[1]
            n = num_visible_keys.to(device=q.device, dtype=torch.long).expand(B, T)
            allowed = allowed & (s[None, None] < (cached + n)[:, None, :, None])
        allowed = allowed.expand(B, 1, T, S)
        any_key = allowed.any(-1, keepdim=True)  # rows with no visible key give 0, not NaN
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed | ~any_key, **gqa)
        o = o * any_key.to(o.dtype)
        return o.transpose(1, 2), new_state


def _drop_leap_predictors(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith((prefix + "leap_q.", prefix + "leap_k."))]:
        del state_dict[key]

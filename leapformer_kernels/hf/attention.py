"""``LeapSelfAttention``: the module that takes the place of a ``transformers`` self-attention."""
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.leap import LeaP
from ..ops import leap_attention, leap_attention_step
from .cache import leap_cache_layer


class PaddingMask:
    """Carries the model's 2D ``attention_mask`` from the base model's forward to its LeaP layers.

    The decoder layers only see the mask the model built for its softmax kernel (4D additive, 4D
    bool, 2D for flash, a BlockMask for flex, or None), and a sliding-window mask cannot be told
    apart from padding there; so a forward pre-hook on the base model keeps the 2D mask the user
    (or ``generate``) passed, and a forward hook drops it afterwards. An instance is the hook.
    """

    def __init__(self):
        self.mask = None

    def __call__(self, module, args, kwargs, *output):
        if output:  # the forward hook: the call is over
            self.mask = None
            return None
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            try:
                mask = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                mask = None
        self.mask = mask
        return None

    def key_padding(self, T: int, B: int) -> Optional[torch.Tensor]:
        """[B, T] bool, True for the padded ones of the T newest positions; None when none is padded."""
        mask = self.mask
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"LeaP layers need a 2D attention_mask [batch, length] (1 = token, 0 = padding), got {got}")
        if mask.shape[0] != B or mask.shape[1] < T:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not cover the batch of {B} x {T} new tokens")
        pad = mask[:, -T:] == 0
        return pad if bool(pad.any()) else None


class LeapSelfAttention(nn.Module):
    """LeaP (or plain relu linear) attention in place of a GPT-2 or Llama-family self-attention.

    It keeps the pretrained projections as they were (the same modules under the same names:
    ``c_attn``, ``c_proj`` for GPT-2; ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` for Llama,
    Mistral, Qwen2), so checkpoints, ``peft`` target names and tensor-parallel plans still find
    them, and its GQA heads (k, v with ``num_key_value_heads`` heads go to the kernels as they are).
    ``attention="leap"`` adds the two LeaP proportion predictors ``leap_q``, ``leap_k`` (shared
    across heads, as ``lk.LeapAttention``); ``"linear"`` has none (proportions 0).

    q is scaled by the model's own ``scaling`` (head_dim^-0.5), the proportions are predicted from
    the unrotated relu(q), relu(k); RoPE models then rotate q and k with the model's own cos / sin
    (its rotary embedding at its position ids) before the feature map, as ``LeapAttention(rope=True)``.

    Attention transfer (``lk.hf.transfer_attention``) sets ``transfer = True``: the layer then also
    computes the softmax attention it replaced on the same q, k, v (causal, the model's scaling,
    RoPE, GQA, padding and sliding window; without gradient), stores the MSE between the two
    outputs (after the output projection, [B, T, hidden] averaged over unpadded positions) in
    ``transfer_loss``, and returns the softmax output, which is what flows downstream.
    """

    def __init__(self, original: nn.Module, family: str, config, *, attention: str, leap_hidden: Optional[int],
                 eps: float, backend: Optional[str], padding: PaddingMask):
        super().__init__()
        self.family, self.attention, self.eps, self.backend = family, attention, float(eps), backend
        self.layer_idx = original.layer_idx
        self.is_causal = True
        self.transfer, self.transfer_loss = False, None  # attention transfer (see the class docstring)
        window = getattr(original, "sliding_window", None) if hasattr(original, "sliding_window") else \
            (getattr(config, "sliding_window", None) if getattr(config, "model_type", None) == "mistral" else None)
        self.sliding_window = int(window) if window else None  # of the softmax teacher in transfer mode only
        scaling = getattr(original, "scaling", None)
        if scaling is None:  # GPT-2 before transformers 5.2 kept the rule, not the factor
            scaling = original.head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
            if getattr(config, "scale_attn_by_inverse_layer_idx", False):
                scaling /= float(self.layer_idx + 1)
        self.scaling = float(scaling)
        if family == "gpt2":
            self.c_attn, self.c_proj = original.c_attn, original.c_proj
            self.resid_dropout = original.resid_dropout
            self.num_heads = self.num_kv_heads = original.num_heads
            self.head_dim = original.head_dim
            self.split_size = original.split_size
            weight = self.c_attn.weight
        else:
            self.q_proj, self.k_proj = original.q_proj, original.k_proj
            self.v_proj, self.o_proj = original.v_proj, original.o_proj
            self.head_dim = original.head_dim
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
            weight = self.q_proj.weight
        if attention == "leap":
            self.leap_q = LeaP(self.head_dim, leap_hidden).to(device=weight.device, dtype=weight.dtype)
            self.leap_k = LeaP(self.head_dim, leap_hidden).to(device=weight.device, dtype=weight.dtype)
        else:
            self.leap_q = self.leap_k = None
        # not a submodule (no parameters): shared with the base model's hooks
        self.__dict__["_padding"] = padding

    def extra_repr(self) -> str:
        return (f"layer_idx={self.layer_idx}, attention={self.attention!r}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, eps={self.eps}")

    def _project(self, x):
        B, T, _ = x.shape
        if self.family == "gpt2":
            q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(B, T, self.num_heads, self.head_dim), k.view(B, T, self.num_kv_heads, self.head_dim),
                v.view(B, T, self.num_kv_heads, self.head_dim))

    def _proportions(self, q, k):
        if self.attention == "leap":
            return self.leap_q(torch.relu(q)), self.leap_k(torch.relu(k))
        dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        return q.new_zeros(q.shape[:3], dtype=dt), k.new_zeros(k.shape[:3], dtype=dt)

    @staticmethod
    def _rotate(x, cos, sin):
        """RoPE, rotate-half pairing (Llama, Mistral, Qwen2), x [B, T, heads, D], cos / sin [B or 1, T, D]."""
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x * cos + rot * sin).to(x.dtype)

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
        position_embeddings = kwargs.get("position_embeddings")
        if args:  # GPT-2 takes the cache second, Llama the position embeddings
            if self.family == "gpt2" and cache is None:
                cache = args[0]
            elif self.family != "gpt2" and position_embeddings is None:
                position_embeddings = args[0]
        B, T, _ = hidden_states.shape
        q, k, v = self._project(hidden_states)
        q = q * self.scaling
        pq, pk = self._proportions(q, k)  # from the unrotated q, k
        if self.family != "gpt2":
            if position_embeddings is None:
                raise ValueError("a linearised RoPE layer needs the model's position_embeddings (cos, sin)")
            cos, sin = position_embeddings
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        pad = self._padding.key_padding(T, B)
        kw = dict(eps=self.eps, backend=self.backend)
        if self.transfer:
            if cache is not None:
                raise ValueError("attention transfer runs without a cache: call the model with use_cache=False")
            return self._transfer_forward(q, k, v, pq, pk, pad, kw)
        if cache is None:
            o = leap_attention(q, k, v, pq, pk, causal=True, key_padding_mask=pad, **kw)
        else:
            entry = leap_cache_layer(cache, self.layer_idx)
            state = entry.state
            if state is not None:
                state = tuple(t.to(q.device) for t in state)
            if state is not None and pad is None:
                o, state = leap_attention_step(q, k, v, pq, pk, state, **kw)
            else:
                o, state = leap_attention(q, k, v, pq, pk, causal=True, key_padding_mask=pad, initial_state=state,
                                          output_final_state=True, **kw)
            entry.state, entry.seen = state, entry.seen + T
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        if self.family == "gpt2":
            return self.resid_dropout(self.c_proj(o)), None
        return self.o_proj(o), None

    def _out(self, o):
        o = o.reshape(o.shape[0], o.shape[1], self.num_heads * self.head_dim)
        return self.c_proj(o) if self.family == "gpt2" else self.o_proj(o)

    def softmax_attention(self, q, k, v, pad=None):
        """The softmax attention this layer replaced, on q [B, T, H, D] (scaled, rotated), k, v
        [B, T, H_kv, D]: causal, the layer's sliding window if any, key padding [B, T] (True =
        padded); -> [B, T, H, D] in q's dtype."""
        B, T = q.shape[:2]
        rep = self.num_heads // self.num_kv_heads
        qh = q.transpose(1, 2)
        kh = k.transpose(1, 2).repeat_interleave(rep, dim=1)
        vh = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        i = torch.arange(T, device=q.device)
        allowed = i[:, None] >= i[None, :]
        if self.sliding_window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < self.sliding_window)
        mask = allowed[None, None]
        if pad is not None:  # a padded query row keeps its own key (its output is not scored)
            mask = (mask & ~pad[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=q.device)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=1.0)
        return o.transpose(1, 2)

    def _transfer_forward(self, q, k, v, pq, pk, pad, kw):
        o = leap_attention(q, k, v, pq, pk, causal=True, key_padding_mask=pad, **kw)
        y = self._out(o)
        with torch.no_grad():
            target = self._out(self.softmax_attention(q, k, v, pad))
        err = (y.float() - target.float()).pow(2).mean(-1)  # [B, T]
        if pad is not None:
            keep = (~pad).to(err.dtype)
            self.transfer_loss = (err * keep).sum() / keep.sum().clamp_min(1)
        else:
            self.transfer_loss = err.mean()
        if self.family == "gpt2":
            return self.resid_dropout(target), None
        return target, None

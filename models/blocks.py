"""Shared building blocks of the zoo. They only compose package layers: every attention is
``leapformer_kernels.LeapAttention`` (``attention="leap"``, or a baseline: ``"softmax"``,
``"linear"`` (relu linear attention) or ``"cosformer"`` (position-ratio re-weighting));
no model file holds attention math.

Position information: ``LeapAttention`` has no rotary (RoPE) hook (RoPE has to rotate q and k
inside the attention, after the projections), so the zoo uses absolute position embeddings
added to the token embeddings: sinusoidal (the default of fairseq's ``transformer_lm``, which the
LeaPformer paper's LM used) or learned. LeaP's learned proportions carry position-like
information on top of that.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import leapformer_kernels as lk

# the accepted values of the string options (the config checks use these lists)
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
POS_EMBS = ("learned", "sinusoidal", "none")
ATTENTIONS = ("leap", "softmax", "linear", "cosformer")  # what lk.LeapAttention accepts


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class MLP(nn.Module):
    """Feed-forward block: GELU (``Linear -> GELU -> Linear``) or SwiGLU (``W2 (silu(W1 x) * W3 x)``)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.activation = activation
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.gate = nn.Linear(dim, hidden, bias=bias) if activation == "swiglu" else None
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.proj.is_residual_proj = True
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = F.silu(self.fc(x)) * self.gate(x) if self.gate is not None else F.gelu(self.fc(x))
        return self.drop(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` [``+ cross(norm(x), context)``] ``+ mlp(norm(x))``.

    Self-attention is causal, block-causal (``block_size``) or non-causal (``causal=False``);
    the optional cross-attention sub-layer (``cross=True``) is non-causal, or position-aligned
    causal with ``cross_causal=True`` (query i sees context positions <= i).

    forward(x [B, T, E], context=None [B, S, kdim], key_padding_mask=None [B, T] (True = pad),
    context_padding_mask=None [B, S], state=None, use_cache=False) -> x, or (x, state) with
    use_cache. The state is a dict ``{"self": ..., "cross": ...}`` of ``LeapAttention`` states.
    With a state, ``context`` follows ``LeapAttention``'s rule: for non-causal cross-attention it
    holds only source tokens not yet in the state (``None`` at decoding steps where no new source
    arrived), for causal cross-attention the context positions aligned with the new queries.
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, activation: str = "gelu",
                 norm: str = "layernorm", attention: str = "leap", causal: bool = True,
                 block_size: Optional[int] = None, cross: bool = False, cross_causal: bool = False,
                 kdim: Optional[int] = None, num_kv_heads: Optional[int] = None, leap_hidden: Optional[int] = None,
                 eps: float = 0.1, bias: bool = True, dropout: float = 0.0, cosformer_max_len: int = 1024,
                 rope: bool = False):
        super().__init__()
        akw = dict(num_kv_heads=num_kv_heads, leap_hidden=leap_hidden, eps=eps, bias=bias, attention=attention,
                   cosformer_max_len=cosformer_max_len)
        self.norm1 = make_norm(norm, dim)
        # rope: rotary positions in the self-attention (``LeapAttention(rope=True)``), not in the cross-attention
        self.attn = lk.LeapAttention(dim, num_heads, causal=causal, block_size=block_size, rope=rope, **akw)
        self.attn.out_proj.is_residual_proj = True
        self.cross = None
        if cross:
            self.norm_c = make_norm(norm, dim)
            self.cross = lk.LeapAttention(dim, num_heads, causal=cross_causal, cross=True, kdim=kdim, vdim=kdim, **akw)
            self.cross.out_proj.is_residual_proj = True
        self.norm2 = make_norm(norm, dim)
        self.mlp = MLP(dim, int(mlp_ratio * dim), activation, bias=bias, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, context=None, key_padding_mask=None, context_padding_mask=None, state=None,
                use_cache: bool = False):
        state = state or {}
        h = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, state=state.get("self"), use_cache=use_cache)
        new_state = {}
        if use_cache:
            h, new_state["self"] = h
        x = x + self.drop(h)
        if self.cross is not None:
            h = self.cross(self.norm_c(x), context=context, key_padding_mask=context_padding_mask,
                           state=state.get("cross"), use_cache=use_cache)
            if use_cache:
                h, new_state["cross"] = h
            x = x + self.drop(h)
        x = x + self.mlp(self.norm2(x))
        return (x, new_state) if use_cache else x


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position embeddings (no length limit): positions [B, T] long -> [B, T, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(1, half - 1))
        self.register_buffer("freq", freq, persistent=False)
        self.dim = dim

    def forward(self, positions):
        ang = positions.to(torch.float32)[..., None] * self.freq
        emb = torch.cat([torch.sin(ang), torch.cos(ang)], -1)
        if emb.shape[-1] < self.dim:
            emb = F.pad(emb, (0, self.dim - emb.shape[-1]))
        return emb


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings for positions < max_positions."""

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(max_positions, dim)
        self.max_positions = max_positions

    def forward(self, positions):
        if int(positions.max()) >= self.max_positions:
            raise ValueError(f"position {int(positions.max())} is beyond max_positions={self.max_positions}")
        return self.emb(positions)


class NoPositions(nn.Module):
    """No position embedding (causal attention still tells positions apart through its prefix sums)."""

    def forward(self, positions):
        return positions.new_zeros(()).float()


def make_positions(kind: str, dim: int, max_positions: int) -> nn.Module:
    if kind == "none":
        return NoPositions()
    if kind == "sinusoidal":
        return SinusoidalPositions(dim)
    if kind == "learned":
        return LearnedPositions(max_positions, dim)
    raise ValueError(f"pos_emb must be 'learned', 'sinusoidal' or 'none', got {kind!r}")


class TiedHead(nn.Module):
    """Output head sharing its weight with an embedding: logits = x @ E^T."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, x):
        return F.linear(x, self.embedding.weight)


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """nanoGPT initialisation: N(0, 0.02) linears and embeddings, residual projections scaled by
    1/sqrt(2 n_layer); the LeaP predictors keep their default init (varied initial proportions)."""
    leap_params = {id(p) for m in model.modules() if isinstance(m, lk.LeaP) for p in m.parameters()}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in leap_params:
            s = std / math.sqrt(2 * n_layer) if getattr(m, "is_residual_proj", False) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)


def left_pad(seqs, pad_id: int = 0, length: Optional[int] = None, device=None):
    """Left-pad lists of token ids -> (tokens [B, T] long, key_padding_mask [B, T] bool, True = pad)."""
    T = max(len(s) for s in seqs) if length is None else length
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    pad = torch.ones(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        s = list(s)[-T:] if T > 0 else []
        if s:
            tokens[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            pad[i, T - len(s):] = False
    return tokens.to(device), pad.to(device)


def sample_logits(logits, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  generator: Optional[torch.Generator] = None):
    """Sample token ids [B] from logits [B, V]: temperature (0 = greedy), then top-k, then top-p
    (nucleus: the smallest set of most likely tokens whose probability reaches top_p)."""
    if temperature is None or temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        remove = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

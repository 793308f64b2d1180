"""LEAP ("leaping ahead", upstream JamesTrick/leap): predict a distant token, then in-fill the gap.

Data (``sample_leap_batch``): pick a position i, a distance d ~ U[2, max_distance] (clipped to
the text), context = the ``context_len`` tokens ending at i (left-padded near the start of the
text), gap = tokens i+1 .. i+d-1, target = token i+d. Loss = CE(target) + CE(gap tokens)
(+ CE(distance) with the optional distance head, the seed README's proposed improvement).

Two models:

- ``leap-lstm``: the LSTM baseline (embed 128, hidden 256). Target head on the last hidden state
  of the context; gap head on [lstm_out, last hidden].
- ``leap-transformer``: embed 384, 8 heads, 4 non-causal ``LeapAttention`` layers over the context
  with its padding mask; the target comes from an attention pooling of the hidden states; the
  gap head reads [gap hidden, target features].

Fixes against upstream (said here as DESIGN section 7 asks):

- Gap positions are ALIGNED. Upstream computed the gap logits on the *context* positions
  (``gap_head(cat(hidden_states, target))`` over the 12 context tokens) and scored them against
  the gap tokens, so gap token j was predicted from context token j: misaligned (and the lengths
  differ). Here gap token g (1 <= g < d) is predicted from its own gap-position query: in the LSTM
  the recurrence continues from the context's final state over the gap positions; in the
  transformer one query per gap position (a learned gap-position embedding) attends to the context.
- The gap is conditioned on the target token (teacher-forced in training, the sampled one in
  ``generate``), so "target first, then the gap" is what generation does; the transformer's
  target pooling query also sees the distance d (the target at distance 3 and at 30 are
  different questions; upstream asked both with one query).

``generate`` leaps repeatedly: from the last ``context_len`` tokens it samples the target
(temperature, top-k, top-p), then the gap given the target, appends gap + target, and repeats.
Each leap re-encodes a fixed-size window of ``context_len`` tokens, so there is no state that
grows or is carried between leaps.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import leapformer_kernels as lk

from . import config_checks as cc
from .blocks import ACTIVATIONS, ATTENTIONS, NORMS, Block, init_weights, left_pad, make_norm, sample_logits


def sample_leap_batch(data: torch.Tensor, batch_size: int, generator: torch.Generator, context_len: int = 12,
                      min_distance: int = 2, max_distance: int = 30, pad_id: int = 0):
    """LEAP examples from a 1-D token tensor.

    Returns a dict: context [B, C] (left-padded), context_pad [B, C] bool (True = pad),
    distance [B] (d), gap [B, max_distance - 1] (right-padded), gap_pad [B, max_distance - 1] bool,
    target [B].
    """
    N = len(data)
    if N < min_distance + 1:
        raise ValueError(f"the corpus has {N} tokens: LEAP needs at least {min_distance + 1}")
    G = max_distance - 1
    ctx, dist, gaps, targets = [], [], [], []
    ii = torch.randint(0, N - min_distance, (batch_size,), generator=generator).tolist()
    uu = torch.rand(batch_size, generator=generator).tolist()
    for i, u in zip(ii, uu):
        hi = min(max_distance, N - 1 - i)  # clip d to the text
        d = min_distance + int(u * (hi - min_distance + 1))
        d = min(d, hi)
        ctx.append(data[max(0, i - context_len + 1):i + 1].tolist())
        dist.append(d)
        gaps.append(data[i + 1:i + d].tolist())
        targets.append(int(data[i + d]))
    context, context_pad = left_pad(ctx, pad_id, length=context_len)
    gap = torch.full((batch_size, G), pad_id, dtype=torch.long)
    gap_pad = torch.ones(batch_size, G, dtype=torch.bool)
    for b, g in enumerate(gaps):
        if g:
            gap[b, :len(g)] = torch.tensor(g)
            gap_pad[b, :len(g)] = False
    return {"context": context, "context_pad": context_pad, "distance": torch.tensor(dist), "gap": gap,
            "gap_pad": gap_pad, "target": torch.tensor(targets)}


@dataclass
class LeapOutput:
    target_logits: torch.Tensor            # [B, V]
    gap_logits: torch.Tensor               # [B, G, V] (G = the gap length asked for)
    distance_logits: Optional[torch.Tensor] = None  # [B, max_distance + 1] (classes < min_distance unused)


class _LeapBase(nn.Module):
    """Training, loss and leap-by-leap generation shared by the two LEAP models."""

    causal = False

    def get_batch(self, data, batch_size, generator):
        c = self.config
        return sample_leap_batch(data, batch_size, generator, c.context_len, c.min_distance, c.max_distance)

    @staticmethod
    def batch_tokens(batch) -> int:
        return int((~batch["context_pad"]).sum() + (~batch["gap_pad"]).sum() + batch["target"].numel())

    def _to(self, batch):
        dev = next(self.parameters()).device
        return {k: v.to(dev) for k, v in batch.items()}

    def _loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        """The CE terms present: "target", "gap" (only if some gap position is valid), "distance"
        (only with a distance head)."""
        b = self._to(batch)
        out = self(b["context"], b["context_pad"], b["distance"], b["target"])
        terms = {"target": F.cross_entropy(out.target_logits.float(), b["target"])}
        G = out.gap_logits.shape[1]
        gap, valid = b["gap"][:, :G], ~b["gap_pad"][:, :G]
        if valid.any():
            terms["gap"] = F.cross_entropy(out.gap_logits[valid].float(), gap[valid])
        if out.distance_logits is not None:
            terms["distance"] = F.cross_entropy(out.distance_logits.float(), b["distance"])
        return terms

    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        """{"target", "gap"[, "distance" with a distance head]}: each a mean cross-entropy in nats
        per predicted token (target tokens, valid gap tokens, distances); "gap" is a 0 tensor when
        the batch has no gap token. ``loss`` is their sum."""
        terms = self._loss_terms(batch)
        out = {"target": terms["target"], "gap": terms.get("gap", terms["target"].new_zeros(()))}
        if "distance" in terms:
            out["distance"] = terms["distance"]
        return out

    def loss(self, batch):
        """CE(target) + CE(gap) (+ CE(distance)); an absent gap term adds nothing."""
        terms = self._loss_terms(batch)
        loss = terms["target"]
        for k in ("gap", "distance"):
            if k in terms:
                loss = loss + terms[k]
        return loss

    def _distance_mask(self, logits):
        c = self.config
        k = torch.arange(logits.shape[-1], device=logits.device)
        return logits.masked_fill((k < c.min_distance) | (k > c.max_distance), float("-inf"))

    @torch.no_grad()
    def leap(self, contexts: List[List[int]], distance: Optional[int] = None, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None):
        """One leap per context: -> list of (gap ids, target id). The distance is ``distance`` if
        given, else sampled from the distance head (greedy with temperature 0), else
        ``config.gen_distance``. The target is sampled first, then the gap given that target."""
        c = self.config
        dev = next(self.parameters()).device
        ctx, pad = left_pad([list(x)[-c.context_len:] or [0] for x in contexts], length=c.context_len, device=dev)
        B = ctx.shape[0]
        enc = self.encode(ctx, pad)
        if distance is not None:
            d = torch.full((B,), int(distance), device=dev)
        elif self.distance_head is not None:
            d = sample_logits(self._distance_mask(self.distance_head(enc["summary"])), temperature, None, None,
                              generator)
        else:
            d = torch.full((B,), c.gen_distance, device=dev)
        d = d.clamp(c.min_distance, c.max_distance)
        tgt_logits = self.target_logits(enc, d)
        target = sample_logits(tgt_logits, temperature, top_k, top_p, generator)
        G = int(d.max()) - 1
        gap_logits = self.gap_logits(enc, d, target, G)
        gap = torch.stack([sample_logits(gap_logits[:, g], temperature, top_k, top_p, generator)
                           for g in range(G)], 1) if G > 0 else target.new_zeros(B, 0)
        return [(gap[b, :int(d[b]) - 1].tolist(), int(target[b])) for b in range(B)]

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, distance: Optional[int] = None) -> List[List[int]]:
        """Leap repeatedly from each prompt until max_new_tokens new tokens exist (gap + target per
        leap); returns the new ids (exactly max_new_tokens per prompt)."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        seqs = [list(p) for p in prompts]
        new = [[] for _ in prompts]
        while any(len(n) < max_new_tokens for n in new):
            todo = [b for b in range(len(seqs)) if len(new[b]) < max_new_tokens]
            res = self.leap([seqs[b] for b in todo], distance, temperature, top_k, top_p, generator)
            for b, (gap, tgt) in zip(todo, res):
                seqs[b] += gap + [tgt]
                new[b] += gap + [tgt]
        return [n[:max_new_tokens] for n in new]

    def forward(self, context, context_pad=None, distance=None, target=None, gap_len: Optional[int] = None):
        """context [B, C] (left-padded), context_pad [B, C] bool, distance [B] (d; default
        gen_distance), target [B] (the token the gap is conditioned on; default: argmax of the
        target head) -> LeapOutput with gap logits for gap positions 1 .. gap_len
        (default max_distance - 1)."""
        c = self.config
        if context_pad is None:
            context_pad = torch.zeros_like(context, dtype=torch.bool)
        if distance is None:
            distance = torch.full((context.shape[0],), c.gen_distance, device=context.device)
        enc = self.encode(context, context_pad)
        tgt = self.target_logits(enc, distance)
        if target is None:
            target = tgt.argmax(-1)
        gap = self.gap_logits(enc, distance, target, c.max_distance - 1 if gap_len is None else gap_len)
        dist = self.distance_head(enc["summary"]) if self.distance_head is not None else None
        return LeapOutput(tgt, gap, dist)


# ---------------------------------------------------------------------- LSTM baseline
@dataclass
class LeapLSTMConfig:
    vocab_size: int = 256
    embed_dim: int = 128
    hidden_dim: int = 256
    context_len: int = 12
    min_distance: int = 2
    max_distance: int = 30
    gen_distance: int = 6       # leap length in generate() without a distance head
    distance_head: bool = False

    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the tokenizer)",
        "embed_dim": "token embedding size",
        "hidden_dim": "LSTM hidden size",
        "context_len": "context window in tokens before each leap",
        "min_distance": "smallest leap distance d in tokens (>= 1; d = 1 is plain next-token, no gap)",
        "max_distance": "largest leap distance d in tokens (>= min_distance)",
        "gen_distance": "leap distance in tokens for generate without a distance head (in [min, max] distance)",
        "distance_head": "also predict the leap distance (adds a CE(distance) loss term)",
    }

    def __post_init__(self):
        for n in ("vocab_size", "embed_dim", "hidden_dim", "context_len"):
            cc.check_int(self, n)
        cc.check_distances(self)
        cc.check_bool(self, "distance_head")


class LeapLSTM(_LeapBase):
    """LEAP's LSTM baseline: embed 128 -> LSTM 256 over the (unpadded) context; target head on the
    last hidden state; the LSTM continues from the context's final state over the gap positions
    (input: the target token's embedding), and the gap head reads [lstm_out_g, last hidden]."""

    name = "leap-lstm"
    description = "LEAP LSTM baseline: predict the token d ahead, then in-fill the gap"
    Config = LeapLSTMConfig

    def __init__(self, config: LeapLSTMConfig):
        super().__init__()
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        self.lstm = nn.LSTM(c.embed_dim, c.hidden_dim, batch_first=True)
        self.fc_target = nn.Linear(c.hidden_dim, c.vocab_size)
        self.fc_gap = nn.Linear(2 * c.hidden_dim, c.vocab_size)
        self.distance_head = nn.Linear(c.hidden_dim, c.max_distance + 1) if c.distance_head else None

    def encode(self, context, context_pad):
        B, C = context.shape
        lengths = (~context_pad).sum(1).clamp_min(1)
        # left padding -> right padding (real tokens first), then pack so pads never enter the LSTM
        idx = (torch.arange(C, device=context.device)[None, :] + (C - lengths)[:, None]) % C
        ctx = context.gather(1, idx)
        packed = pack_padded_sequence(self.embedding(ctx), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, cell) = self.lstm(packed)
        return {"h": h, "c": cell, "summary": h[-1]}

    def target_logits(self, enc, distance):
        return self.fc_target(enc["summary"])

    def gap_logits(self, enc, distance, target, G):
        B = target.shape[0]
        if G == 0:
            return enc["summary"].new_zeros(B, 0, self.config.vocab_size)
        inp = self.embedding(target)[:, None, :].expand(B, G, -1)
        out, _ = self.lstm(inp, (enc["h"], enc["c"]))
        last = enc["summary"][:, None, :].expand(B, G, -1)
        return self.fc_gap(torch.cat([out, last], -1))


# ---------------------------------------------------------------------- transformer
@dataclass
class LeapTransformerConfig:
    vocab_size: int = 256
    embed_dim: int = 384
    num_heads: int = 8
    num_layers: int = 4
    gap_layers: int = 1         # blocks over the gap queries (self + cross-attention to the context)
    mlp_ratio: float = 4.0
    context_len: int = 12
    min_distance: int = 2
    max_distance: int = 30
    gen_distance: int = 6
    distance_head: bool = False
    attention: str = "leap"     # leap | softmax | linear | cosformer
    cosformer_max_len: int = 1024  # cosformer: the longest sequence (proportion = position / M)
    leap_hidden: Optional[int] = None
    eps: float = 0.1
    norm: str = "layernorm"
    activation: str = "gelu"
    dropout: float = 0.0

    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the tokenizer)",
        "embed_dim": "model width (embedding size)",
        "num_heads": "attention heads per layer (must divide embed_dim)",
        "num_layers": "encoder layers over the context",
        "gap_layers": "blocks over the gap queries (>= 0; 0 = gap head on the embeddings)",
        "mlp_ratio": "MLP hidden width as a multiple of embed_dim (> 0)",
        "context_len": "context window in tokens before each leap",
        "min_distance": "smallest leap distance d in tokens (>= 1; d = 1 is plain next-token, no gap)",
        "max_distance": "largest leap distance d in tokens (>= min_distance)",
        "gen_distance": "leap distance in tokens for generate without a distance head (in [min, max] distance)",
        "distance_head": "also predict the leap distance (adds a CE(distance) loss term)",
        "attention": "attention: leap | softmax | linear | cosformer (the last three are baselines)",
        "cosformer_max_len": "cosformer attention: the longest sequence M in tokens (proportion = position / M)",
        "leap_hidden": "LeaP predictor hidden width (none = head_dim // 4)",
        "eps": "LeaP denominator clamp (>= 0)",
        "norm": "normalisation: layernorm | rmsnorm",
        "activation": "MLP activation: gelu | swiglu",
        "dropout": "dropout probability in [0, 1)",
    }

    def __post_init__(self):
        for n in ("vocab_size", "embed_dim", "num_heads", "num_layers", "context_len"):
            cc.check_int(self, n)
        cc.check_int(self, "gap_layers", 0)
        cc.check_int(self, "leap_hidden", optional=True)
        cc.check_distances(self)
        cc.check_bool(self, "distance_head")
        cc.check_real(self, "mlp_ratio", 0, lo_open=True)
        cc.check_real(self, "eps", 0)
        cc.check_real(self, "dropout", 0, 1)
        cc.check_choice(self, "attention", ATTENTIONS)
        cc.check_int(self, "cosformer_max_len")
        cc.check_choice(self, "norm", NORMS)
        cc.check_choice(self, "activation", ACTIVATIONS)
        cc.check_divides(self, "num_heads", "embed_dim")
        cc.check_hidden_width(self, "mlp_ratio", "embed_dim")


class LeapTransformer(_LeapBase):
    """LEAP transformer: non-causal LeapAttention encoder over the context (padding mask), target
    from attention pooling (query = masked mean of the hidden states + distance embedding), gap
    positions as queries (gap-position embedding + target-token embedding) through blocks with
    self-attention among the gap positions and cross-attention to the context; gap head on
    [gap hidden, target features]."""

    name = "leap-transformer"
    description = "LEAP transformer (non-causal LeapAttention encoder, attention-pooled target, aligned gap queries)"
    Config = LeapTransformerConfig

    def __init__(self, config: LeapTransformerConfig):
        super().__init__()
        self.config = c = config
        E = c.embed_dim
        akw = dict(mlp_ratio=c.mlp_ratio, activation=c.activation, norm=c.norm, attention=c.attention,
                   leap_hidden=c.leap_hidden, eps=c.eps, dropout=c.dropout, cosformer_max_len=c.cosformer_max_len)
        self.tok_emb = nn.Embedding(c.vocab_size, E)
        self.pos_emb = nn.Embedding(c.context_len, E)          # counted from the end of the context
        self.dist_emb = nn.Embedding(c.max_distance + 1, E)
        self.gap_pos_emb = nn.Embedding(c.max_distance, E)     # gap offset g = 1 .. max_distance - 1
        self.encoder = nn.ModuleList([Block(E, c.num_heads, causal=False, **akw) for _ in range(c.num_layers)])
        self.norm_enc = make_norm(c.norm, E)
        self.pool = lk.LeapAttention(E, c.num_heads, causal=False, cross=True, attention=c.attention,
                                     leap_hidden=c.leap_hidden, eps=c.eps, cosformer_max_len=c.cosformer_max_len)
        self.target_proj = nn.Sequential(nn.Linear(E, E), nn.LayerNorm(E), nn.GELU())
        self.target_head = nn.Linear(E, c.vocab_size)
        self.gap_blocks = nn.ModuleList([Block(E, c.num_heads, causal=False, cross=True, **akw)
                                         for _ in range(c.gap_layers)])
        self.norm_gap = make_norm(c.norm, E)
        self.gap_head = nn.Linear(2 * E, c.vocab_size)
        self.distance_head = nn.Linear(E, c.max_distance + 1) if c.distance_head else None
        init_weights(self, c.num_layers + c.gap_layers)

    def encode(self, context, context_pad):
        B, C = context.shape
        from_end = torch.arange(C - 1, -1, -1, device=context.device)
        h = self.tok_emb(context) + self.pos_emb(from_end)[None]
        for blk in self.encoder:
            h = blk(h, key_padding_mask=context_pad)
        h = self.norm_enc(h)
        real = (~context_pad).to(h.dtype)[..., None]
        summary = (h * real).sum(1) / real.sum(1).clamp_min(1)
        return {"h": h, "pad": context_pad, "summary": summary}

    def _target_features(self, enc, distance):
        q = (enc["summary"] + self.dist_emb(distance))[:, None, :]
        pooled = self.pool(q, context=enc["h"], key_padding_mask=enc["pad"])[:, 0]
        return self.target_proj(pooled)

    def target_logits(self, enc, distance):
        return self.target_head(self._target_features(enc, distance))

    def gap_logits(self, enc, distance, target, G):
        B = target.shape[0]
        if G == 0:
            return enc["h"].new_zeros(B, 0, self.config.vocab_size)
        feats = self._target_features(enc, distance)
        g = torch.arange(1, G + 1, device=target.device)
        x = self.gap_pos_emb(g)[None] + self.tok_emb(target)[:, None, :] + self.dist_emb(distance)[:, None, :]
        gap_pad = g[None, :] >= distance[:, None]  # gap positions beyond d - 1 are padding
        for blk in self.gap_blocks:
            x = blk(x, context=enc["h"], key_padding_mask=gap_pad, context_padding_mask=enc["pad"])
        x = self.norm_gap(x)
        return self.gap_head(torch.cat([x, feats[:, None, :].expand(B, G, -1)], -1))

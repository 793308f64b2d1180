"""``deepsight``: DeepSight (upstream yiphei/yif-AI, later DeepPlan), an autoregressive
encoder-decoder LM with a planning loss, built from the package's layers (DESIGN section 7).

    tokens -> embedding (+ positions) -> causal encoder blocks -> h
    context = norm_enc(h)                      (what every decoder block cross-attends to)
    decoder input = bridge(context)            (``Linear(d, d)``)
    decoder blocks: causal self-attention, causal position-aligned cross-attention to the
    context (query i sees encoder positions <= i), MLP -> final norm -> tied head -> logits

Planning loss (``plan_weight``, default 1): ``plan_norm(h)`` (a LayerNorm of the encoder output)
regresses the detached target ``LayerNorm(0.5 * sum_{k=1..F} E[i+k] / k + 0.5 * mean(E[0..i]))``
over the input token embeddings E (no positions), F = ``plan_horizon`` (11 upstream), with MSE or
cosine (``plan_loss``), at the positions 0 .. T-F-1 whose F future tokens all lie in the window.
Both aggregates come from ``lk.window_pool`` (``plan_target``): the harmonic weights 1/k are a
combination of the nested future window sums ``(1, j)``, j = 1..F, with coefficients
``c_j = 1/j - 1/(j+1)`` (``c_F = 1/F``), and the cumulative mean is the window ``(-inf, 0)``; no
T x T matrix. The loss is ``next_token + plan_weight * plan``.

Generation (``generate``, inherited from ``leapformer-lm``) carries the recurrent state of both
stacks: each encoder layer's self-attention state, each decoder layer's self-attention state and
its causal cross-attention state (position-aligned: a step passes the new token's encoder output
as context). Positions: learned, sinusoidal, none, or ``rope`` (rotary positions inside every
self-attention, ``LeapAttention(rope=True)``; for LeaP an absolute position signal, see its
docstring). Upstream's code is an encoder-decoder with softmax attention and learned positions;
everything here is also available with ``--attention softmax`` as the baseline.
"""
import sys
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import leapformer_kernels as lk

from . import config_checks as cc
from .blocks import ACTIVATIONS, ATTENTIONS, NORMS, Block, TiedHead, init_weights, make_norm, make_positions
from .lm import LeapformerLM

POS_EMBS = ("learned", "sinusoidal", "none", "rope")
PLAN_LOSSES = ("mse", "cosine")


@dataclass
class DeepSightConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_encoder_layer: int = 2
    n_decoder_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm: str = "layernorm"
    pos_emb: str = "learned"     # learned | sinusoidal | none | rope
    max_positions: int = 1024
    attention: str = "leap"
    cosformer_max_len: int = 1024
    leap_hidden: Optional[int] = None
    eps: float = 0.1
    dropout: float = 0.0
    bias: bool = True
    plan_weight: float = 1.0     # 0 = next-token loss only (the planning head still runs for eval)
    plan_horizon: int = 11       # F: future tokens in the planning target
    plan_loss: str = "mse"       # mse | cosine

    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the tokenizer)",
        "seq_len": "training context length in tokens (> plan_horizon)",
        "n_encoder_layer": "causal encoder blocks",
        "n_decoder_layer": "decoder blocks (self-attention, causal cross-attention to the encoder, MLP)",
        "n_head": "attention heads per block (must divide n_embd)",
        "n_embd": "model width",
        "mlp_ratio": "MLP hidden width as a multiple of n_embd (> 0)",
        "activation": "MLP activation: gelu | swiglu",
        "norm": "normalisation: layernorm | rmsnorm",
        "pos_emb": "positions: learned | sinusoidal | none | rope (rotary, inside every self-attention)",
        "max_positions": "learned positions: the longest sequence in tokens (prompt + generated)",
        "attention": "attention: leap | softmax | linear | cosformer (the last three are baselines)",
        "cosformer_max_len": "cosformer attention: the longest sequence M in tokens",
        "leap_hidden": "LeaP predictor hidden width (none = head_dim // 4)",
        "eps": "LeaP denominator clamp (>= 0)",
        "dropout": "dropout probability in [0, 1)",
        "bias": "biases in the linear layers",
        "plan_weight": "weight of the planning loss (>= 0; 0 = next-token loss only)",
        "plan_horizon": "F: the planning target sums E[i+k]/k over k = 1..F (11 upstream)",
        "plan_loss": "planning loss: mse | cosine",
    }

    def __post_init__(self):
        for n in ("vocab_size", "seq_len", "n_encoder_layer", "n_decoder_layer", "n_head", "n_embd",
                  "max_positions", "cosformer_max_len", "plan_horizon"):
            cc.check_int(self, n)
        cc.check_int(self, "leap_hidden", optional=True)
        cc.check_real(self, "mlp_ratio", 0, lo_open=True)
        cc.check_real(self, "eps", 0)
        cc.check_real(self, "dropout", 0, 1)
        cc.check_real(self, "plan_weight", 0)
        cc.check_choice(self, "activation", ACTIVATIONS)
        cc.check_choice(self, "norm", NORMS)
        cc.check_choice(self, "pos_emb", POS_EMBS)
        cc.check_choice(self, "attention", ATTENTIONS)
        cc.check_choice(self, "plan_loss", PLAN_LOSSES)
        cc.check_bool(self, "bias")
        cc.check_divides(self, "n_head", "n_embd")
        cc.check_hidden_width(self, "mlp_ratio", "n_embd")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            cc.fail("pos_emb", f"have an even head size (n_embd / n_head = {self.n_embd // self.n_head}) for rope",
                    self.pos_emb)
        if self.seq_len <= self.plan_horizon:
            cc.fail("seq_len", f"be > {cc.field('plan_horizon')} = {self.plan_horizon} (the planning loss needs "
                    "positions whose whole future window fits)", self.seq_len)
        if self.pos_emb == "learned" and self.seq_len > self.max_positions:
            cc.fail("seq_len", f"be <= {cc.field('max_positions')} = {self.max_positions} with learned positions",
                    self.seq_len)
        if self.attention == "cosformer" and self.seq_len > self.cosformer_max_len:
            cc.fail("seq_len", f"be <= {cc.field('cosformer_max_len')} = {self.cosformer_max_len} with cosformer "
                    "attention", self.seq_len)


def plan_windows(horizon: int):
    """The nested future windows (1, j), j = 1..F, and their coefficients c_j with
    ``sum_j c_j * sum(E[i+1 .. i+j]) = sum_k E[i+k] / k``."""
    windows = [(1, j) for j in range(1, horizon + 1)]
    coef = [1.0 / j - 1.0 / (j + 1) for j in range(1, horizon)] + [1.0 / horizon]
    return windows, coef


def plan_target(emb: torch.Tensor, horizon: int):
    """emb [B, T, D] -> (target [B, T, D], valid [B, T] bool): LayerNorm(0.5 * sum_{k=1..F} emb[i+k]/k
    + 0.5 * mean(emb[0..i])), valid where the whole future window lies inside the sequence.
    Built from ``lk.window_pool`` (O(T * D) per window), never a T x T matrix."""
    windows, coef = plan_windows(horizon)
    future, valid = lk.window_pool(emb, windows, reduce="sum")  # [B, T, F, D], [B, T, F]
    c = torch.tensor(coef, dtype=future.dtype, device=future.device)
    future = torch.einsum("btfd,f->btd", future, c)
    past, _ = lk.window_pool(emb, [(-sys.maxsize, 0)], reduce="mean")  # cumulative mean of emb[0..i]
    target = F.layer_norm(0.5 * future + 0.5 * past[:, :, 0], emb.shape[-1:])
    return target, valid[:, :, -1]


@dataclass
class DeepSightState:
    """Per-layer states of both stacks and the real tokens seen per row ([B] long)."""
    encoder: list
    decoder: list
    pos: torch.Tensor


class DeepSight(LeapformerLM):
    name = "deepsight"
    description = "DeepSight: causal encoder + decoder with position-aligned cross-attention and a planning loss"
    Config = DeepSightConfig
    causal = True

    def __init__(self, config: DeepSightConfig):
        nn.Module.__init__(self)
        self.config = c = config
        rope = c.pos_emb == "rope"
        bkw = dict(mlp_ratio=c.mlp_ratio, activation=c.activation, norm=c.norm, attention=c.attention, causal=True,
                   leap_hidden=c.leap_hidden, eps=c.eps, bias=c.bias, dropout=c.dropout,
                   cosformer_max_len=c.cosformer_max_len, rope=rope)
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = make_positions("none" if rope else c.pos_emb, c.n_embd, c.max_positions)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList([Block(c.n_embd, c.n_head, **bkw) for _ in range(c.n_encoder_layer)])
        self.norm_enc = make_norm(c.norm, c.n_embd)
        self.bridge = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.decoder = nn.ModuleList([Block(c.n_embd, c.n_head, cross=True, cross_causal=True, **bkw)
                                      for _ in range(c.n_decoder_layer)])
        self.norm_f = make_norm(c.norm, c.n_embd)
        self.plan_norm = nn.LayerNorm(c.n_embd)
        self.head = TiedHead(self.tok_emb)
        init_weights(self, c.n_encoder_layer + c.n_decoder_layer)
        self.embed_scale = 1.0
        if c.pos_emb == "sinusoidal":  # as leapformer-lm: fairseq's scaled embeddings beside unit sinusoids
            nn.init.normal_(self.tok_emb.weight, 0.0, c.n_embd ** -0.5)
            self.embed_scale = c.n_embd ** 0.5

    def _position_limit(self):
        c = self.config
        limits = ([(c.max_positions, "max_positions")] if c.pos_emb == "learned" else []) + \
            ([(c.cosformer_max_len, "cosformer_max_len")] if c.attention == "cosformer" else [])
        return min(limits) if limits else None

    # ------------------------------------------------------------------ forward
    def run(self, tokens, key_padding_mask=None, state: Optional[DeepSightState] = None, use_cache: bool = False):
        """tokens [B, T] -> (logits [B, T, V], encoder output h [B, T, d], new state or None)."""
        B, T = tokens.shape
        real = torch.ones(B, T, dtype=torch.long, device=tokens.device) if key_padding_mask is None \
            else (~key_padding_mask).long()
        start = state.pos if state is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)
        positions = (start[:, None] + real.cumsum(1) - 1).clamp_min(0)
        x = self.drop(self.embed_scale * self.tok_emb(tokens) + self.pos_emb(positions))
        cached = use_cache or state is not None
        enc_states, dec_states = [], []
        for i, blk in enumerate(self.encoder):
            if cached:
                x, s = blk(x, key_padding_mask=key_padding_mask, state=state.encoder[i] if state else None,
                           use_cache=True)
                enc_states.append(s)
            else:
                x = blk(x, key_padding_mask=key_padding_mask)
        h = x
        context = self.norm_enc(h)
        x = self.bridge(context)
        for i, blk in enumerate(self.decoder):
            kw = dict(context=context, key_padding_mask=key_padding_mask, context_padding_mask=key_padding_mask)
            if cached:
                x, s = blk(x, state=state.decoder[i] if state else None, use_cache=True, **kw)
                dec_states.append(s)
            else:
                x = blk(x, **kw)
        logits = self.head(self.norm_f(x))
        new_state = DeepSightState(enc_states, dec_states, start + real.sum(1)) if use_cache else None
        return logits, h, new_state

    def forward(self, tokens, key_padding_mask=None, state: Optional[DeepSightState] = None, use_cache: bool = False):
        """tokens [B, T] -> next-token logits [B, T, V]; with use_cache -> (logits, DeepSightState)."""
        logits, _, new_state = self.run(tokens, key_padding_mask, state, use_cache)
        return (logits, new_state) if use_cache else logits

    # ------------------------------------------------------------------ training
    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        """{"next_token": CE in nats per token, "plan": the planning loss (MSE or 1 - cosine, mean over
        the positions 0..T-F-1)}; ``loss`` = next_token + plan_weight * plan."""
        x, y = batch
        logits, h, _ = self.run(x)
        terms = {"next_token": F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))}
        with torch.no_grad():
            target, valid = plan_target(self.tok_emb(x).detach(), self.config.plan_horizon)
        pred = self.plan_norm(h)[valid].float()
        target = target[valid].float()
        if pred.shape[0] == 0:  # a sequence shorter than the horizon: nothing to plan
            terms["plan"] = h.sum() * 0.0
        elif self.config.plan_loss == "mse":
            terms["plan"] = F.mse_loss(pred, target)
        else:
            terms["plan"] = 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()
        return terms

    def loss(self, batch):
        t = self.loss_terms(batch)
        return t["next_token"] + self.config.plan_weight * t["plan"]

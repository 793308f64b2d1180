"""``futureformer``: FutureFormer (upstream evintunador/FutureFormer, marked broken there), a causal LM
whose last layers predict pooled windows of the future, coarsest first, and read each other's
predictions, built from the package's layers (DESIGN section 7).

    tokens -> tied embedding -> n_layer - P - 1 plain blocks
           -> P "future" blocks: block j predicts window P - j (coarsest first) from its output x_j;
              blocks j >= 1 cross-attend (position-aligned, causal: query i sees positions <= i)
              to the prediction of block j - 1 (the next coarser window)
           -> the final block cross-attends to the finest prediction -> RMSNorm -> tied head -> logits

Every block: pre-norm RMSNorm, multi-query self-attention (``n_kv_head`` = 1 key/value head) with
rotary positions (``LeapAttention(rope=True)``), SwiGLU MLP, no biases; ``attention="softmax"``
(or ``linear`` / ``cosformer``) is the baseline with the same projections.

Windows (``fs_windows``; offsets from position i, offset 1 = x_{i+1}, the next token, which the
final layer predicts): ``dyadic`` (upstream README) the disjoint windows (2, 3), (4, 7), (8, 15),
... (``lk.dyadic_windows(P + 1)[1:]``); ``nested`` (upstream code, ``splice_future_indices``) the
windows of ``fs_mult``^k tokens after the next one: (2, 4), (2, 10), (2, 28) for 3, 9, 27.

Targets (``fs_target``, detached; ``future_targets``), built with ``lk.window_pool`` (no loop over
positions, no T x T matrix), at the positions whose whole window lies inside the training sequence
``x_0 .. x_T`` (the inputs and the last label):

- ``sum`` / ``mean`` / ``max``: that pool of the RMS-normed (no gain) tied embeddings of the window's
  tokens; the prediction is ``Linear_k(RMSNorm_k(x_j))`` in embedding space, scored with MSE or
  1 - cosine (``fs_loss``); the next block reads the prediction itself.
- ``bce``: upstream's multi-hot over the window's tokens (the ``max`` window pool of one-hot rows),
  scored with BCE-with-logits against ``head(RMSNorm_k(x_j))`` through the shared tied head; the
  next block reads the window rebuilt from the prediction: the probability-weighted mean of the
  normed embeddings of its top-n tokens (n = the window length, or ``fs_topk``).

Loss = next-token CE + sum_k ``fs_lambda``^k L_k, k = 1 for the finest window up to P for the
coarsest (``fs_lambda`` = 0: next-token loss only; the future blocks still run and are read).

The leak upstream, and why there is none here. Upstream's training pass was meant to cross-attend
to the *true* future: ``future_vecs = pool(embed(splice_future_indices(targets)))`` (its own
comment: "i'm supposed to be cross-attending to future_vecs instead of the y i just made since this
is training"). With position-aligned causal cross-attention, query i reading its own window
x_{i+2..} is not the next token, but query i also reads position i - 1, whose window starts at
x_{i+1}: the very token position i predicts (and, through self-attention in later layers, every
position after i - 1 gets it). So the next-token loss could be driven down by copying, and at
inference, where the true future does not exist, the model met inputs it never trained on
(upstream also had to disable its KV cache in those layers to rebuild windows). Here nothing built
from tokens after i ever enters the forward pass: the cross-attention context at position i is the
model's own prediction computed at position i, a function of x_0..x_i only (causal self-attention,
per-position norms, heads and top-k), and a causal cross-attention query i reads contexts <= i.
The true windows appear only in the loss. Training and inference run the same computation, so
decoding carries the recurrent state of every self- and cross-attention (O(1) per token with
LeaP): a prediction made at position i never changes when later tokens arrive; each step computes
the new position's future predictions from the model's own outputs at that step.
tests/test_futureformer.py changes x_{t+1} and checks that the logits and every future prediction
and context at positions <= t are unchanged, for both window schemes x every target x leap/softmax.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import leapformer_kernels as lk

from . import config_checks as cc
from .blocks import ATTENTIONS, Block, RMSNorm, TiedHead, init_weights
from .lm import LeapformerLM, LMState

WINDOW_SCHEMES = ("nested", "dyadic")
FS_TARGETS = ("sum", "mean", "max", "bce")
FS_LOSSES = ("mse", "cosine")


def future_windows(scheme: str, periods: int, mult: int = 3):
    """The P future windows (a, b), finest first, as offsets from position i (1 = the next token):
    dyadic (2, 3), (4, 7), ...; nested (2, 1 + mult), (2, 1 + mult^2), ..."""
    if scheme == "dyadic":
        return [tuple(w) for w in lk.dyadic_windows(periods + 1)[1:]]
    if scheme == "nested":
        return [(2, 1 + mult ** k) for k in range(1, periods + 1)]
    raise ValueError(f"window scheme must be one of {', '.join(WINDOW_SCHEMES)}, got {scheme!r}")


def normed_embeddings(weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm without a gain of each embedding row."""
    return weight * torch.rsqrt(weight.pow(2).mean(-1, keepdim=True) + eps)


def future_targets(seq: torch.Tensor, emb_weight: torch.Tensor, windows, kind: str):
    """seq [B, T + 1] (the inputs x_0..x_{T-1} and the last label x_T) -> (targets, valid [B, T, P])
    for positions 0..T-1: ``sum``/``mean``/``max`` pool of the normed embeddings of seq[i+a .. i+b]
    -> [B, T, P, D]; ``bce`` the multi-hot of those tokens -> [B, T, P, V]. valid: the whole window
    lies in seq (i + b <= T). ``lk.window_pool`` only: no loop over positions."""
    T = seq.shape[1] - 1
    if kind == "bce":
        pooled, valid = lk.window_pool(F.one_hot(seq, emb_weight.shape[0]).to(emb_weight.dtype), windows,
                                       reduce="max")
    else:
        pooled, valid = lk.window_pool(F.embedding(seq, normed_embeddings(emb_weight)), windows, reduce=kind)
    return pooled[:, :T], valid[:, :T]


@dataclass
class FutureFormerConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 5
    n_head: int = 4
    n_kv_head: int = 1           # 1 = multi-query attention
    n_embd: int = 128
    mlp_ratio: float = 4.0
    attention: str = "leap"
    cosformer_max_len: int = 1024
    leap_hidden: Optional[int] = None
    eps: float = 0.1
    dropout: float = 0.0
    fs_periods: int = 3          # P: future windows, one per block before the final one (upstream: 3)
    fs_windows: str = "nested"   # nested (upstream code: 3, 9, 27) | dyadic (upstream README: 2-3, 4-7, ...)
    fs_mult: int = 3             # nested: window k holds fs_mult^k tokens after the next one
    fs_target: str = "mean"      # sum | mean | max (pooled normed embeddings) | bce (multi-hot)
    fs_loss: str = "mse"         # pooled targets: mse | cosine
    fs_lambda: float = 0.5       # future loss weights lambda^k, k = 1 (finest) .. P; 0 = off
    fs_topk: Optional[int] = None  # bce: tokens in a rebuilt window (none = the window length)

    pos_emb: ClassVar[str] = "rope"  # rotary, inside every self-attention (not a choice; read by `eval`)
    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the tokenizer)",
        "seq_len": "training context length in tokens (>= the end of the farthest future window)",
        "n_layer": "blocks in all (>= fs_periods + 1: the future blocks, then the next-token block)",
        "n_head": "query heads per block (must divide n_embd; head size even for the rotary positions)",
        "n_kv_head": "key/value heads (1 = multi-query attention; must divide n_head)",
        "n_embd": "model width",
        "mlp_ratio": "SwiGLU hidden width as a multiple of n_embd (> 0)",
        "attention": "attention: leap | softmax | linear | cosformer (the last three are baselines)",
        "cosformer_max_len": "cosformer attention: the longest sequence M in tokens",
        "leap_hidden": "LeaP predictor hidden width (none = head_dim // 4)",
        "eps": "LeaP denominator clamp (>= 0)",
        "dropout": "dropout probability in [0, 1)",
        "fs_periods": "future windows P, predicted coarsest first by the P blocks before the last",
        "fs_windows": "future windows: nested | dyadic (nested: fs_mult^k tokens after the next one; dyadic: 2-3, "
                      "4-7, 8-15, ...)",
        "fs_mult": "nested windows: window k holds fs_mult^k tokens after the next one (>= 2)",
        "fs_target": "future target: sum | mean | max | bce (that pool of the normed tied embeddings, or the "
                     "multi-hot of the window's tokens)",
        "fs_loss": "loss of the pooled targets: mse | cosine",
        "fs_lambda": "future loss weight lambda^k for window k = 1 (finest) .. P (>= 0; 0 = off)",
        "fs_topk": "bce: tokens of a window rebuilt from its prediction (none = the window length)",
    }

    def __post_init__(self):
        for n in ("vocab_size", "seq_len", "n_layer", "n_head", "n_kv_head", "n_embd", "cosformer_max_len",
                  "fs_periods"):
            cc.check_int(self, n)
        cc.check_int(self, "fs_mult", 2)
        cc.check_int(self, "leap_hidden", optional=True)
        cc.check_int(self, "fs_topk", optional=True)
        cc.check_real(self, "mlp_ratio", 0, lo_open=True)
        cc.check_real(self, "eps", 0)
        cc.check_real(self, "dropout", 0, 1)
        cc.check_real(self, "fs_lambda", 0)
        cc.check_choice(self, "attention", ATTENTIONS)
        cc.check_choice(self, "fs_windows", WINDOW_SCHEMES)
        cc.check_choice(self, "fs_target", FS_TARGETS)
        cc.check_choice(self, "fs_loss", FS_LOSSES)
        cc.check_divides(self, "n_head", "n_embd")
        cc.check_divides(self, "n_kv_head", "n_head")
        cc.check_hidden_width(self, "mlp_ratio", "n_embd")
        if (self.n_embd // self.n_head) % 2:
            cc.fail("n_head", f"leave an even head size for the rotary positions (n_embd / n_head = "
                    f"{self.n_embd // self.n_head})", self.n_head)
        if self.n_layer < self.fs_periods + 1:
            cc.fail("n_layer", f"be >= {cc.field('fs_periods')} + 1 = {self.fs_periods + 1} (one block per future "
                    "window, then the next-token block)", self.n_layer)
        if self.fs_windows == "dyadic" and self.fs_periods > 30:
            cc.fail("fs_periods", "be <= 30 with dyadic windows", self.fs_periods)
        if self.fs_windows == "nested" and self.fs_mult ** self.fs_periods > 2 ** 30:
            cc.fail("fs_periods", f"keep {cc.field('fs_mult')}^fs_periods <= 2^30", self.fs_periods)
        far = future_windows(self.fs_windows, self.fs_periods, self.fs_mult)[-1][1]
        if self.seq_len < far:
            cc.fail("seq_len", f"be >= {far}, the end of the farthest future window (a shorter sequence holds no "
                    "complete window to learn from)", self.seq_len)
        if self.attention == "cosformer" and self.seq_len > self.cosformer_max_len:
            cc.fail("seq_len", f"be <= {cc.field('cosformer_max_len')} = {self.cosformer_max_len} with cosformer "
                    "attention", self.seq_len)


class FutureFormer(LeapformerLM):
    name = "futureformer"
    description = ("FutureFormer: MQA + RoPE LM whose last blocks predict pooled future windows (coarsest first) "
                   "and cross-attend to them, with no future leak")
    Config = FutureFormerConfig
    causal = True
    tasks = ()  # the future targets need a text: no generated task

    def __init__(self, config: FutureFormerConfig):
        nn.Module.__init__(self)
        self.config = c = config
        self.windows = future_windows(c.fs_windows, c.fs_periods, c.fs_mult)  # finest first
        P = c.fs_periods
        self.n_body = c.n_layer - P - 1
        bkw = dict(mlp_ratio=c.mlp_ratio, activation="swiglu", norm="rmsnorm", attention=c.attention, causal=True,
                   num_kv_heads=c.n_kv_head, leap_hidden=c.leap_hidden, eps=c.eps, bias=False, dropout=c.dropout,
                   cosformer_max_len=c.cosformer_max_len, rope=True)
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        # blocks n_body + 1 .. n_layer - 1 read the prediction of the block before them
        self.blocks = nn.ModuleList([Block(c.n_embd, c.n_head, cross=i > self.n_body, cross_causal=True, **bkw)
                                     for i in range(c.n_layer)])
        # fs_norm[k], fs_proj[k]: the prediction of window k (finest first), made by block n_layer - 2 - k
        self.fs_norm = nn.ModuleList([RMSNorm(c.n_embd) for _ in range(P)])
        self.fs_proj = None if c.fs_target == "bce" else \
            nn.ModuleList([nn.Linear(c.n_embd, c.n_embd, bias=False) for _ in range(P)])
        self.norm_f = RMSNorm(c.n_embd)
        self.head = TiedHead(self.tok_emb)
        init_weights(self, c.n_layer)
        self.embed_scale = 1.0

    def _position_limit(self):
        c = self.config
        return (c.cosformer_max_len, "cosformer_max_len") if c.attention == "cosformer" else None

    # ------------------------------------------------------------------ forward
    def _predict(self, k: int, x):
        """(prediction of window k from the block output x, the context the next block reads)."""
        h = self.fs_norm[k](x)
        if self.fs_proj is not None:
            pred = self.fs_proj[k](h)
            return pred, pred
        logits = self.head(h)
        a, b = self.windows[k]
        n = min(self.config.fs_topk or (b - a + 1), logits.shape[-1])
        top = torch.topk(logits, n, dim=-1)
        w = torch.sigmoid(top.values)  # [B, T, n]
        e = F.embedding(top.indices, normed_embeddings(self.tok_emb.weight))  # [B, T, n, D]
        return logits, (w[..., None] * e).sum(-2) / n

    def run(self, tokens, key_padding_mask=None, state: Optional[LMState] = None, use_cache: bool = False):
        """tokens [B, T] -> (logits [B, T, V], preds, contexts, new state or None).

        preds[k] / contexts[k]: window ``self.windows[k]`` (finest first): the prediction ([B, T, D],
        or [B, T, V] logits for ``bce``) and what the next block cross-attends to ([B, T, D])."""
        B, T = tokens.shape
        real = torch.ones(B, T, dtype=torch.long, device=tokens.device) if key_padding_mask is None \
            else (~key_padding_mask).long()
        start = state.pos if state is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)
        x = self.drop(self.embed_scale * self.tok_emb(tokens))
        cached = use_cache or state is not None
        P = self.config.fs_periods
        preds: List[Optional[torch.Tensor]] = [None] * P
        ctxs: List[Optional[torch.Tensor]] = [None] * P
        ctx, layer_states = None, []
        for i, blk in enumerate(self.blocks):
            kw = dict(key_padding_mask=key_padding_mask)
            if blk.cross is not None:
                kw.update(context=ctx, context_padding_mask=key_padding_mask)
            if cached:
                x, s = blk(x, state=state.layers[i] if state is not None else None, use_cache=True, **kw)
                layer_states.append(s)
            else:
                x = blk(x, **kw)
            if i >= self.n_body and i < len(self.blocks) - 1:  # a future block: coarsest window first
                k = len(self.blocks) - 2 - i
                preds[k], ctxs[k] = ctx_pred = self._predict(k, x)
                ctx = ctx_pred[1]
        logits = self.head(self.norm_f(x))
        new_state = LMState(layer_states, start + real.sum(1)) if use_cache else None
        return logits, preds, ctxs, new_state

    def forward(self, tokens, key_padding_mask=None, state: Optional[LMState] = None, use_cache: bool = False):
        """tokens [B, T] -> next-token logits [B, T, V]; with use_cache -> (logits, LMState).
        ``run`` also returns the future predictions."""
        logits, _, _, new_state = self.run(tokens, key_padding_mask, state, use_cache)
        return (logits, new_state) if use_cache else logits

    # ------------------------------------------------------------------ training
    def get_batch(self, data, batch_size: int, generator: torch.Generator):
        if not isinstance(data, torch.Tensor):
            raise ValueError("futureformer trains on text (its future targets need the tokens after each window)")
        return super().get_batch(data, batch_size, generator)

    def future_loss(self, k: int, pred, target, valid):
        """Loss of window k over the positions where valid [B, T]."""
        if not bool(valid.any()):  # no complete window in this sequence
            return pred.sum() * 0.0
        p, t = pred[valid].float(), target[valid].float()
        if self.config.fs_target == "bce":
            return F.binary_cross_entropy_with_logits(p, t)
        if self.config.fs_loss == "mse":
            return F.mse_loss(p, t)
        return 1.0 - F.cosine_similarity(p, t, dim=-1).mean()

    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        """{"next_token": CE in nats per token, "future_k": the loss of window k (k = 1 finest .. P)}."""
        x, y = batch
        logits, preds, _, _ = self.run(x)
        terms = {"next_token": F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))}
        seq = torch.cat([x, y[:, -1:]], 1)  # x_0 .. x_T
        with torch.no_grad():
            targets, valid = future_targets(seq, self.tok_emb.weight.detach(), self.windows, self.config.fs_target)
        for k in range(self.config.fs_periods):
            terms[f"future_{k + 1}"] = self.future_loss(k, preds[k], targets[:, :, k], valid[:, :, k])
        return terms

    def loss(self, batch):
        t = self.loss_terms(batch)
        lam = self.config.fs_lambda
        return t["next_token"] + sum(lam ** (k + 1) * t[f"future_{k + 1}"] for k in range(self.config.fs_periods))

"""``leapformer-lra``: the LeaPformer LRA classifier (non-causal, with a padding mask), on ListOps.

Sizes of the paper's LRA code (DESIGN section 7): width 64, FFN 128, head dim 32 (2 heads),
2 layers, LeaP hidden 16. Token embedding + learned positions, pre-norm non-causal
``LeapAttention`` blocks over the right-padded expression (``key_padding_mask``), final norm,
mean over the real tokens, then an MLP head (``Linear -> ReLU -> Linear``) to the 10 values.

Trains on generated ListOps (``models/tasks.py``; the default data of ``leapformer train --model
leapformer-lra``). The default ``seq_len`` (the longest expression) is 128 so that a default run
finishes in minutes on 2 CPU cores; LRA's setting is ``--seq-len 2000 --listops-min-len 500
--listops-max-depth 10 --listops-max-args 10``.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import config_checks as cc
from .blocks import ACTIVATIONS, ATTENTIONS, NORMS, Block, init_weights, left_pad, make_norm, sample_logits
from .tasks import DIGIT0, TaskData


@dataclass
class LRAConfig:
    vocab_size: int = 16
    seq_len: int = 128           # longest expression in tokens (LRA ListOps: 2000)
    num_classes: int = 10
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    ffn_dim: int = 128
    attention: str = "leap"      # leap | softmax | linear | cosformer
    cosformer_max_len: Optional[int] = None  # None = seq_len
    leap_hidden: Optional[int] = 16
    eps: float = 0.1
    norm: str = "layernorm"
    activation: str = "gelu"
    dropout: float = 0.0

    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the task)",
        "seq_len": "longest input in tokens (learned positions; LRA ListOps: 2000)",
        "num_classes": "number of classes (ListOps: the values 0-9)",
        "n_layer": "transformer blocks",
        "n_head": "attention heads per block (must divide n_embd)",
        "n_embd": "model width",
        "ffn_dim": "MLP hidden width",
        "attention": "attention: leap | softmax | linear | cosformer (the last three are baselines)",
        "cosformer_max_len": "cosformer attention: the longest sequence M in tokens (none = seq_len)",
        "leap_hidden": "LeaP predictor hidden width (16 in the LRA code; none = head_dim // 4)",
        "eps": "LeaP denominator clamp (>= 0)",
        "norm": "normalisation: layernorm | rmsnorm",
        "activation": "MLP activation: gelu | swiglu",
        "dropout": "dropout probability in [0, 1)",
    }

    def __post_init__(self):
        for n in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "ffn_dim"):
            cc.check_int(self, n)
        cc.check_int(self, "num_classes", 2)
        cc.check_int(self, "leap_hidden", optional=True)
        cc.check_int(self, "cosformer_max_len", optional=True)
        cc.check_real(self, "eps", 0)
        cc.check_real(self, "dropout", 0, 1)
        cc.check_choice(self, "attention", ATTENTIONS)
        cc.check_choice(self, "norm", NORMS)
        cc.check_choice(self, "activation", ACTIVATIONS)
        cc.check_divides(self, "n_head", "n_embd")
        if self.attention == "cosformer" and self.cosformer_max_len is not None and \
                self.seq_len > self.cosformer_max_len:
            cc.fail("seq_len", f"be <= {cc.field('cosformer_max_len')} = {self.cosformer_max_len} with cosformer "
                    "attention", self.seq_len)


class LeapformerLRA(nn.Module):
    name = "leapformer-lra"
    description = "LRA classifier (non-causal LeapAttention with padding mask, mean pooling) on generated ListOps"
    Config = LRAConfig
    causal = False
    tasks = ("listops",)
    default_data = "listops"
    needs_task = True

    def __init__(self, config: LRAConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Embedding(c.seq_len, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([
            Block(c.n_embd, c.n_head, mlp_ratio=c.ffn_dim / c.n_embd, activation=c.activation, norm=c.norm,
                  attention=c.attention, causal=False, leap_hidden=c.leap_hidden, eps=c.eps, dropout=c.dropout,
                  cosformer_max_len=c.cosformer_max_len or c.seq_len) for _ in range(c.n_layer)])
        self.norm_f = make_norm(c.norm, c.n_embd)
        self.head = nn.Sequential(nn.Linear(c.n_embd, c.ffn_dim), nn.ReLU(), nn.Linear(c.ffn_dim, c.num_classes))
        init_weights(self, c.n_layer)

    def forward(self, tokens, key_padding_mask=None):
        """tokens [B, T] (right-padded), key_padding_mask [B, T] bool (True = pad) -> logits [B, classes]."""
        B, T = tokens.shape
        if T > self.config.seq_len:
            raise ValueError(f"input of {T} tokens is longer than {cc.field('seq_len')} = {self.config.seq_len}")
        pos = torch.arange(T, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos)[None])
        for blk in self.blocks:
            x = blk(x, key_padding_mask=key_padding_mask)
        x = self.norm_f(x)
        real = torch.ones_like(x[..., :1]) if key_padding_mask is None else (~key_padding_mask).to(x.dtype)[..., None]
        return self.head((x * real).sum(1) / real.sum(1).clamp_min(1))

    # ------------------------------------------------------------------ training
    def get_batch(self, data, batch_size: int, generator: torch.Generator):
        """A batch of generated ListOps -> (x [B, L], pad [B, L], label [B])."""
        if not isinstance(data, TaskData) or data.task != "listops":
            raise ValueError(f"{self.name} trains on generated ListOps (--data listops)")
        return data.listops_batch(batch_size, self.config.seq_len, generator)

    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        x, pad, label = batch
        return {"class": F.cross_entropy(self(x, pad).float(), label)}

    def loss(self, batch):
        return self.loss_terms(batch)["class"]

    @staticmethod
    def batch_tokens(batch) -> int:
        return int((~batch[1]).sum())

    @torch.no_grad()
    def accuracy_counts(self, batch):
        x, pad, label = batch
        return int((self(x, pad).argmax(-1) == label).sum()), len(label)

    # ------------------------------------------------------------------ "generation"
    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int = 1, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, **_) -> List[List[int]]:
        """Classify each prompt (token ids of an expression): one "new token" per prompt, the id
        of the predicted digit (sampled with temperature > 0, as the CLI's generate does);
        max_new_tokens = 0 gives empty lists."""
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        dev = self.tok_emb.weight.device
        seqs = [list(p)[:self.config.seq_len] or [0] for p in prompts]
        tokens, pad = left_pad([s[::-1] for s in seqs], device=dev)  # right padding: pad reversed, flip back
        tokens, pad = tokens.flip(1), pad.flip(1)
        cls = sample_logits(self(tokens, pad), temperature, top_k, top_p, generator)
        return [[DIGIT0 + int(c)] for c in cls]

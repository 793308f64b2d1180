"""``leapformer-lm``: a decoder-only LeaPformer language model (the paper's LM setting, scaled down).

Token embedding plus absolute position embeddings: learned by default (GPT-2 style, both
N(0, 0.02)), sinusoidal (fairseq's default, which the paper's LM used; then the token embedding is
scaled by sqrt(d) as in fairseq) or none. ``LeapAttention`` has no RoPE hook (RoPE must rotate q
and k inside the attention), so rotary embeddings are not available. Then a stack of
pre-norm causal blocks with ``LeapAttention`` (``attention="softmax"`` for the baseline), a final
norm and an output head tied to the token embedding.

Generation carries the recurrent state: with LeaP attention each layer's state is the pair
(S, z), O(1) in the context length; with softmax it is a KV cache. Prompts of different lengths
are left-padded and masked with ``key_padding_mask``; positions count real tokens only, so a
prompt gives the same tokens batched as alone.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import config_checks as cc
from .tasks import IGNORE, TaskData
from .blocks import (ACTIVATIONS, ATTENTIONS, NORMS, POS_EMBS, Block, TiedHead, init_weights, left_pad, make_norm,
                     make_positions, sample_logits)


@dataclass
class LMConfig:
    vocab_size: int = 256
    seq_len: int = 128          # training context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    activation: str = "gelu"    # gelu | swiglu
    norm: str = "layernorm"     # layernorm | rmsnorm
    pos_emb: str = "learned"    # learned | sinusoidal | none
    max_positions: int = 1024   # learned positions: the longest sequence (prompt + generated)
    attention: str = "leap"     # leap | softmax | linear | cosformer
    cosformer_max_len: int = 1024  # cosformer: the longest sequence (proportion = position / M)
    leap_hidden: Optional[int] = None  # LeaP predictor width (None = head_dim // 4)
    eps: float = 0.1            # denominator clamp (official fairseq value)
    dropout: float = 0.0
    bias: bool = True

    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the tokenizer)",
        "seq_len": "training context length in tokens (<= max_positions with learned positions)",
        "n_layer": "number of transformer blocks",
        "n_head": "attention heads per block (must divide n_embd)",
        "n_embd": "model width (embedding size)",
        "mlp_ratio": "MLP hidden width as a multiple of n_embd (> 0)",
        "activation": "MLP activation: gelu | swiglu",
        "norm": "normalisation: layernorm | rmsnorm",
        "pos_emb": "position embedding: learned | sinusoidal | none",
        "max_positions": "learned positions: the longest sequence in tokens (prompt + generated)",
        "attention": "attention: leap | softmax | linear | cosformer (the last three are baselines)",
        "cosformer_max_len": "cosformer attention: the longest sequence M in tokens (proportion = position / M)",
        "leap_hidden": "LeaP predictor hidden width (none = head_dim // 4)",
        "eps": "LeaP denominator clamp (>= 0)",
        "dropout": "dropout probability in [0, 1)",
        "bias": "biases in the linear layers",
    }

    def __post_init__(self):
        for n in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "max_positions"):
            cc.check_int(self, n)
        cc.check_int(self, "leap_hidden", optional=True)
        cc.check_real(self, "mlp_ratio", 0, lo_open=True)
        cc.check_real(self, "eps", 0)
        cc.check_real(self, "dropout", 0, 1)
        cc.check_choice(self, "activation", ACTIVATIONS)
        cc.check_choice(self, "norm", NORMS)
        cc.check_choice(self, "pos_emb", POS_EMBS)
        cc.check_choice(self, "attention", ATTENTIONS)
        cc.check_int(self, "cosformer_max_len")
        cc.check_bool(self, "bias")
        cc.check_divides(self, "n_head", "n_embd")
        cc.check_hidden_width(self, "mlp_ratio", "n_embd")
        if self.attention == "cosformer" and self.seq_len > self.cosformer_max_len:
            cc.fail("seq_len", f"be <= {cc.field('cosformer_max_len')} = {self.cosformer_max_len} with "
                    "cosformer attention", self.seq_len)
        if self.pos_emb == "learned" and self.seq_len > self.max_positions:
            cc.fail("seq_len", f"be <= {cc.field('max_positions')} = {self.max_positions} with learned "
                    "positions (--pos-emb learned)", self.seq_len)


@dataclass
class LongLMConfig(LMConfig):
    """``leapformer-lm-long``: the same model at a long training context (T = 2048; 4096 or 8192 with
    ``--seq-len``), with no position embedding so that no table caps the length: a sequence may
    run past seq_len, and ``leapformer eval`` can carry the recurrent state over the whole
    validation text without positions the model never saw (sinusoidal positions would reach
    values far beyond training there)."""
    seq_len: int = 2048
    pos_emb: str = "none"
    max_positions: int = 8192     # only read with --pos-emb learned
    cosformer_max_len: int = 8192  # only read with --attention cosformer


@dataclass
class LMState:
    """Per-layer attention states plus the number of real tokens seen per sequence ([B] long)."""
    layers: list
    pos: torch.Tensor


class LeapformerLM(nn.Module):
    name = "leapformer-lm"
    description = "decoder-only LeaPformer language model (causal LeapAttention blocks, tied head)"
    Config = LMConfig
    causal = True
    tasks = ("mqar",)  # generated tasks it trains on (``--data mqar``)

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = make_positions(c.pos_emb, c.n_embd, c.max_positions)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([
            Block(c.n_embd, c.n_head, mlp_ratio=c.mlp_ratio, activation=c.activation, norm=c.norm,
                  attention=c.attention, causal=True, leap_hidden=c.leap_hidden, eps=c.eps, bias=c.bias,
                  dropout=c.dropout, cosformer_max_len=c.cosformer_max_len) for _ in range(c.n_layer)])
        self.norm_f = make_norm(c.norm, c.n_embd)
        self.head = TiedHead(self.tok_emb)
        init_weights(self, c.n_layer)
        self.embed_scale = 1.0
        if c.pos_emb == "sinusoidal":
            # fairseq's transformer_lm: token embeddings N(0, 1/d) times sqrt(d). Unit-amplitude
            # sinusoids added to GPT-2's N(0, 0.02) token embeddings drown the tokens and stall
            # learning (seen on the pydoc text: still at the unigram loss, 3.3, after 120 steps).
            nn.init.normal_(self.tok_emb.weight, 0.0, c.n_embd ** -0.5)
            self.embed_scale = c.n_embd ** 0.5

    # ------------------------------------------------------------------ forward
    def forward(self, tokens, key_padding_mask=None, state: Optional[LMState] = None, use_cache: bool = False):
        """tokens [B, T] -> logits [B, T, V]; with use_cache -> (logits, LMState).

        key_padding_mask [B, T] bool (True = pad, for left-padded prompts); state continues a
        sequence (the new tokens follow everything the state has seen).
        """
        B, T = tokens.shape
        real = torch.ones(B, T, dtype=torch.long, device=tokens.device) if key_padding_mask is None \
            else (~key_padding_mask).long()
        start = state.pos if state is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)
        positions = (start[:, None] + real.cumsum(1) - 1).clamp_min(0)
        x = self.drop(self.embed_scale * self.tok_emb(tokens) + self.pos_emb(positions))
        layer_states = []
        for i, blk in enumerate(self.blocks):
            if use_cache or state is not None:
                x, s = blk(x, key_padding_mask=key_padding_mask,
                           state=state.layers[i] if state is not None else None, use_cache=True)
                layer_states.append(s)
            else:
                x = blk(x, key_padding_mask=key_padding_mask)
        logits = self.head(self.norm_f(x))
        if use_cache:
            return logits, LMState(layer_states, start + real.sum(1))
        return logits

    # ------------------------------------------------------------------ training
    def get_batch(self, data: torch.Tensor, batch_size: int, generator: torch.Generator):
        """Random windows of seq_len + 1 tokens from a 1-D token tensor -> (x [B, T], y [B, T]);
        from a generated task (``TaskData``: MQAR) its sequences of seq_len tokens, y = -100 where
        unscored (cross_entropy ignores those)."""
        if isinstance(data, TaskData):
            return data.mqar_batch(batch_size, self.config.seq_len, generator)
        T = min(self.config.seq_len, len(data) - 1)
        if T < 1:
            raise ValueError(f"the corpus has {len(data)} tokens: too short for training")
        ix = torch.randint(0, len(data) - T, (batch_size,), generator=generator)
        x = torch.stack([data[i:i + T] for i in ix.tolist()])
        y = torch.stack([data[i + 1:i + T + 1] for i in ix.tolist()])
        return x, y

    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        """{"next_token": mean cross-entropy in nats per predicted token} (the interface the LEAP
        models share; ``loss`` is the sum of the terms)."""
        x, y = batch
        logits = self(x)
        return {"next_token": F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))}

    def loss(self, batch):
        return self.loss_terms(batch)["next_token"]

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[0].numel()

    @torch.no_grad()
    def accuracy_counts(self, batch):
        """(right, scored) next-token predictions of a batch: the positions where y != -100."""
        x, y = batch
        scored = y != IGNORE
        return int((self(x).argmax(-1)[scored] == y[scored]).sum()), int(scored.sum())

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _prompt_lists(prompts) -> List[List[int]]:
        """Prompts as lists of ids, an empty prompt replaced by [0] (as generate runs them)."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        return [list(p) if len(p) else [0] for p in prompts]

    def _position_limit(self):
        """(the most positions a sequence may hold, the config field that sets it) or None: learned
        positions hold max_positions, cosformer attention cosformer_max_len (the smaller wins)."""
        c = self.config
        limits = ([(c.max_positions, "max_positions")] if c.pos_emb == "learned" else []) + \
            ([(c.cosformer_max_len, "cosformer_max_len")] if c.attention == "cosformer" else [])
        return min(limits) if limits else None

    def max_new_tokens_that_fit(self, prompts) -> Optional[int]:
        """How many tokens ``generate`` can add to these prompts: with learned positions,
        max_positions minus the longest prompt (positions count real tokens only, so padding
        does not count; an empty prompt counts as one token), with cosformer attention likewise
        cosformer_max_len; None (unbounded) otherwise. Never negative."""
        limit = self._position_limit()
        if limit is None:
            return None
        longest = max((len(p) for p in self._prompt_lists(prompts)), default=0)
        return max(0, limit[0] - longest)

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> List[List[int]]:
        """Continue each prompt (a list of token ids) by max_new_tokens tokens; returns the new ids.

        Prompts of different lengths run as one left-padded batch. ``use_cache=True`` processes the
        prompts in one call and then one token per step through the state (O(1) memory per token
        with LeaP); ``use_cache=False`` recomputes the whole sequence at each step (the reference).
        With learned positions, raises ValueError if max_new_tokens > ``max_new_tokens_that_fit``.
        """
        prompts = self._prompt_lists(prompts)
        fit = self.max_new_tokens_that_fit(prompts)
        if fit is not None:
            (M, name), longest = self._position_limit(), max(len(p) for p in prompts)
            if longest > M:
                raise ValueError(f"the longest prompt has {longest} tokens, more than {cc.field(name)} "
                                 f"= {M} positions")
            if max_new_tokens > fit:
                raise ValueError(f"max_new_tokens={max_new_tokens} does not fit: the longest prompt has {longest} "
                                 f"tokens and {cc.field(name)} = {M}, so at most {fit} new tokens")
        dev = self.tok_emb.weight.device
        tokens, pad = left_pad(prompts, device=dev)
        out = []
        if use_cache:
            logits, state = self(tokens, key_padding_mask=pad if pad.any() else None, use_cache=True)
        for step in range(max_new_tokens):
            if not use_cache:
                logits = self(tokens, key_padding_mask=pad if pad.any() else None)
            nxt = sample_logits(logits[:, -1], temperature, top_k, top_p, generator)
            out.append(nxt)
            if step + 1 == max_new_tokens:
                break
            if use_cache:
                logits, state = self(nxt[:, None], state=state, use_cache=True)
            else:
                tokens = torch.cat([tokens, nxt[:, None]], 1)
                pad = torch.cat([pad, torch.zeros_like(pad[:, :1])], 1)
        if not out:
            return [[] for _ in prompts]
        return torch.stack(out, 1).tolist()


class LeapformerLMLong(LeapformerLM):
    """``leapformer-lm`` at long context: ``LongLMConfig`` (T = 2048, no position embedding) and
    training defaults sized for a 2-core CPU (``train_defaults``: 2 x 2048 tokens per step, 200
    steps, a few minutes). Checkpoints, generation and evaluation are the LM's."""
    name = "leapformer-lm-long"
    description = "leapformer-lm at long context: T = 2048 (up to 8192), no position table, CPU-sized training"
    Config = LongLMConfig
    # TrainConfig defaults of this model (``TrainConfig.for_model``; the command line applies them
    # to every flag not given): 4 k tokens per step (on the pydoc text, 2 x 2048 per step beat 4 x
    # 2048 at the same number of tokens: val 2.59 after 373 k tokens against 2.61 after 819 k),
    # validation on 4 batches (16 k tokens)
    train_defaults = {"batch_size": 2, "steps": 200, "warmup": 20, "eval_interval": 50, "eval_batches": 4,
                      "ckpt_interval": 100}

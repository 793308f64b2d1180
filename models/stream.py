"""``leapformer-stream``: LeaPformer's simultaneous (wait-k) encoder-decoder, streaming in O(block)
per step, with average lagging.

- Encoder: token embedding + learned source positions, pre-norm *block-causal* ``LeapAttention``
  blocks (``block_size`` = W: a position sees its own block and every earlier one), final norm.
  Upstream (LeaPformer's SimulST agent) re-encodes the whole source prefix bidirectionally at
  every step; here a new block of W source tokens extends the encoder's state and costs O(W).
- Decoder: the same (shared) token embedding + learned target positions, pre-norm blocks of causal
  self-attention, then non-causal cross-attention to the encoder outputs with
  ``num_visible_keys`` (monotone: wait-k), then the MLP; final norm, output head tied to the
  embedding. Every attention (encoder, decoder self, cross) is ``--attention`` (leap | softmax |
  linear | cosformer).
- Policy: wait-k (``--wait-k``; none = the whole source first, the offline model). Target t may
  use ``g(t) = min(k + floor(rate t), S)`` source tokens (``lk.wait_k``); an encoder position
  needs its whole block, so the reads are rounded up to blocks, ``R(t) = min(ceil(g/W) W, S)``, and
  the decoder sees the ``R(t)`` encoder outputs that exist then (training and decoding alike).
  Latency is average lagging over those reads (``stream_task.average_lagging``).
- Incremental decoding (``simultaneous_decode``): the source arrives block by block; each block
  extends every encoder layer's state by W tokens, its encoder outputs extend every decoder
  layer's cross state as the policy makes them visible, and the target tokens the policy allows
  are written one at a time through the decoder's self-attention state. With LeaP / linear /
  cosformer attention every state is O(1) in the stream length; softmax keeps KV caches.

Trains on the generated task of ``models/stream_task.py`` (its default data); the task's shape
(``src_len``, ``rate``, ``max_delay``) is part of the config, as ``seq_len`` is for MQAR.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import config_checks as cc
from .blocks import ACTIVATIONS, ATTENTIONS, NORMS, Block, TiedHead, init_weights, make_norm, sample_logits
from .stream_task import (BOS, STREAM_SYMBOLS, STREAM_VOCAB, average_lagging, block_reads, policy_ceiling, stream_batch,
                          stream_check)
from .tasks import TaskData


@dataclass
class StreamConfig:
    vocab_size: int = STREAM_VOCAB
    src_len: int = 32            # source tokens per example (learned positions: the longest source)
    rate: int = 2                # source tokens per target token
    max_delay: int = 7           # task: target t copies source token rate * t + (t mod (max_delay + 1))
    block_size: int = 4          # W: encoder block (block-causal self-attention)
    wait_k: Optional[int] = 3    # k source tokens before the first target token; None = whole source
    n_enc_layer: int = 2
    n_dec_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    mlp_ratio: float = 2.0
    attention: str = "leap"      # leap | softmax | linear | cosformer
    leap_hidden: Optional[int] = None
    eps: float = 0.1
    norm: str = "layernorm"
    activation: str = "gelu"
    dropout: float = 0.0

    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the task)",
        "src_len": "source tokens per example (the task's length; learned positions)",
        "rate": "source tokens per target token (target length = src_len / rate)",
        "max_delay": "task: target t copies the source token rate*t + (t mod (max_delay+1))",
        "block_size": "encoder block W: block-causal self-attention; reads are rounded up to blocks",
        "wait_k": "wait-k policy: source tokens read before the first target token (none = the whole source)",
        "n_enc_layer": "encoder blocks",
        "n_dec_layer": "decoder blocks",
        "n_head": "attention heads per block (must divide n_embd)",
        "n_embd": "model width",
        "mlp_ratio": "MLP hidden width / n_embd",
        "attention": "attention: leap | softmax | linear | cosformer (the last three are baselines)",
        "leap_hidden": "LeaP predictor hidden width (none = head_dim // 4)",
        "eps": "LeaP denominator clamp (>= 0)",
        "norm": "normalisation: layernorm | rmsnorm",
        "activation": "MLP activation: gelu | swiglu",
        "dropout": "dropout probability in [0, 1)",
    }

    def __post_init__(self):
        for n in ("vocab_size", "src_len", "rate", "block_size", "n_enc_layer", "n_dec_layer", "n_head", "n_embd"):
            cc.check_int(self, n)
        cc.check_int(self, "max_delay", 0)
        cc.check_int(self, "wait_k", optional=True)
        cc.check_int(self, "leap_hidden", optional=True)
        cc.check_real(self, "mlp_ratio", 0, lo_open=True)
        cc.check_real(self, "eps", 0)
        cc.check_real(self, "dropout", 0, 1)
        cc.check_choice(self, "attention", ATTENTIONS)
        cc.check_choice(self, "norm", NORMS)
        cc.check_choice(self, "activation", ACTIVATIONS)
        cc.check_divides(self, "n_head", "n_embd")
        cc.check_hidden_width(self, "mlp_ratio", "n_embd")
        if self.src_len % self.rate:
            cc.fail("src_len", f"be a multiple of {cc.field('rate')} = {self.rate}", self.src_len)


class StreamDecoderBlock(Block):
    """``Block`` with causal self-attention and non-causal cross-attention whose visible keys
    follow the policy (``num_visible_keys``)."""

    def forward(self, x, context=None, num_visible_keys=None, state=None, use_cache: bool = False):
        state = state or {}
        new_state = {}
        h = self.attn(self.norm1(x), state=state.get("self"), use_cache=use_cache)
        if use_cache:
            h, new_state["self"] = h
        x = x + self.drop(h)
        h = self.cross(self.norm_c(x), context=context, state=state.get("cross"), use_cache=use_cache,
                       num_visible_keys=num_visible_keys)
        if use_cache:
            h, new_state["cross"] = h
        x = x + self.drop(h)
        x = x + self.mlp(self.norm2(x))
        return (x, new_state) if use_cache else x


class LeapformerStream(nn.Module):
    name = "leapformer-stream"
    description = ("simultaneous (wait-k) encoder-decoder: block-causal LeaP encoder streamed block by block, "
                   "monotone cross-attention; accuracy and average lagging on a generated stream task")
    Config = StreamConfig
    causal = False
    tasks = ("stream",)
    default_data = "stream"
    needs_task = True
    # what the table (python -m leapformer_models.stream_table) trained with: ~2 min on 2 CPU cores
    train_defaults = {"batch_size": 32, "steps": 600}

    def __init__(self, config: StreamConfig):
        super().__init__()
        self.config = c = config
        self.tgt_len = c.src_len // c.rate
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.src_pos = nn.Embedding(c.src_len, c.n_embd)
        self.tgt_pos = nn.Embedding(self.tgt_len, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        kw = dict(mlp_ratio=c.mlp_ratio, activation=c.activation, norm=c.norm, attention=c.attention,
                  leap_hidden=c.leap_hidden, eps=c.eps, dropout=c.dropout, cosformer_max_len=c.src_len)
        self.encoder = nn.ModuleList([Block(c.n_embd, c.n_head, causal=True, block_size=c.block_size, **kw)
                                      for _ in range(c.n_enc_layer)])
        self.enc_norm = make_norm(c.norm, c.n_embd)
        self.decoder = nn.ModuleList([StreamDecoderBlock(c.n_embd, c.n_head, causal=True, cross=True, **kw)
                                      for _ in range(c.n_dec_layer)])
        self.dec_norm = make_norm(c.norm, c.n_embd)
        self.head = TiedHead(self.tok_emb)
        init_weights(self, c.n_enc_layer + c.n_dec_layer)

    # ------------------------------------------------------------------ policy
    def _lag(self, wait_k="config"):
        return self.config.wait_k if wait_k == "config" else wait_k

    def reads(self, src_len: int, wait_k="config") -> List[int]:
        """R(t) for the targets of a source of ``src_len`` tokens: the source tokens read (and
        encoder outputs visible) when target t is written; wait-k rounded up to encoder blocks."""
        c = self.config
        return block_reads(src_len // c.rate, src_len, self._lag(wait_k), c.rate, c.block_size)

    def average_lagging(self, src_len: Optional[int] = None, wait_k="config") -> float:
        S = src_len or self.config.src_len
        return average_lagging(self.reads(S, wait_k), S)

    # ------------------------------------------------------------------ full-sequence forward
    def _check_src(self, S, start=0):
        if start + S > self.config.src_len:
            raise ValueError(f"a source of {start + S} tokens is longer than {cc.field('src_len')} = "
                             f"{self.config.src_len}")

    def encode(self, src, start: int = 0, state=None, use_cache: bool = False):
        """Encoder outputs [B, S, E] of source tokens [B, S] at positions ``start ..``. One
        block-causal pass, or with ``state`` / ``use_cache`` the continuation of a stream (feed
        whole blocks aligned to ``block_size``) -> (outputs, per-layer states)."""
        B, S = src.shape
        self._check_src(S, start)
        pos = torch.arange(start, start + S, device=src.device)
        x = self.drop(self.tok_emb(src) + self.src_pos(pos)[None])
        states = []
        for i, blk in enumerate(self.encoder):
            if use_cache:
                x, st = blk(x, state=None if state is None else state[i], use_cache=True)
                states.append(st)
            else:
                x = blk(x)
        x = self.enc_norm(x)
        return (x, states) if use_cache else x

    def forward(self, src, tgt_in, wait_k="config"):
        """src [B, S], decoder input tgt_in [B, T] (BOS then the previous targets) -> logits
        [B, T, V]; target t sees the first R(t) encoder outputs (``reads``)."""
        T, S = tgt_in.shape[1], src.shape[1]
        if T > S // self.config.rate:
            raise ValueError(f"{T} target tokens for a source of {S}: more than S / rate = {S // self.config.rate}")
        enc = self.encode(src)
        lag = self._lag(wait_k)
        n = None if lag is None else torch.tensor(self.reads(S, lag)[:T], device=src.device)
        x = self.drop(self.tok_emb(tgt_in) + self.tgt_pos(torch.arange(T, device=src.device))[None])
        for blk in self.decoder:
            x = blk(x, enc, num_visible_keys=n)
        return self.head(self.dec_norm(x))

    @staticmethod
    def decoder_input(tgt):
        return torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)

    # ------------------------------------------------------------------ training
    def get_batch(self, data, batch_size: int, generator: torch.Generator):
        """A batch of the generated stream task -> (source [B, S], target [B, S / rate])."""
        if not isinstance(data, TaskData) or data.task != "stream":
            raise ValueError(f"{self.name} trains on the generated stream task (--data stream)")
        c = self.config
        return stream_batch(data, batch_size, c.src_len, c.rate, c.max_delay, generator)

    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        src, tgt = batch
        logits = self(src, self.decoder_input(tgt))
        return {"target": F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())}

    def loss(self, batch):
        return self.loss_terms(batch)["target"]

    @staticmethod
    def batch_tokens(batch) -> int:
        return int(batch[0].numel() + batch[1].numel())

    @torch.no_grad()
    def accuracy_counts(self, batch):
        """Right target tokens of simultaneous greedy decoding (the streaming path) and their count."""
        src, tgt = batch
        out = self.simultaneous_decode(src)
        return int((out == tgt).sum()), tgt.numel()

    @torch.no_grad()
    def extra_eval(self, data, batches: int, batch_size: int, seed: int = 0) -> dict:
        """What ``leapformer eval`` reports beside the loss and accuracy: the policy, its average
        lagging, the accuracy its reads allow at best, and chance."""
        c = self.config
        reads = self.reads(c.src_len)
        return {"wait_k": c.wait_k if c.wait_k is not None else "full", "block_size": c.block_size,
                "average_lagging": average_lagging(reads, c.src_len),
                "policy_ceiling_accuracy": policy_ceiling(c.src_len, c.rate, c.max_delay, reads),
                "chance_accuracy": 1.0 / STREAM_SYMBOLS}

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def simultaneous_decode(self, src, wait_k="config", temperature: float = 0.0, top_k=None, top_p=None,
                            generator: Optional[torch.Generator] = None, max_new_tokens: Optional[int] = None,
                            return_logits: bool = False, trace: Optional[list] = None):
        """Stream ``src`` [B, S] block by block and write S / rate target tokens by the policy ->
        tokens [B, T] (and logits [B, T, V] with ``return_logits``).

        Each block of W source tokens extends every encoder layer's state (O(W) work); before
        writing target t the blocks covering R(t) source tokens have been read, and the encoder
        outputs not yet in the decoder's cross states (those in [R(t-1), R(t))) extend them; the
        decoder then takes one step through its self-attention state. ``trace`` (a list) gets
        ("read", n) and ("write", t) events in order."""
        c = self.config
        B, S = src.shape
        self._check_src(S)
        T = S // c.rate if max_new_tokens is None else min(S // c.rate, max_new_tokens)
        reads = self.reads(S, wait_k)
        enc_state, enc_out, n_read = None, [], 0
        dec_state = [None] * len(self.decoder)
        fed = 0
        prev = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)
        toks, logits_all = [], []
        for t in range(T):
            while n_read < reads[t]:  # read (and encode) the next block
                blk = src[:, n_read:n_read + c.block_size]
                out, enc_state = self.encode(blk, start=n_read, state=enc_state, use_cache=True)
                enc_out.append(out)
                n_read += blk.shape[1]
                if trace is not None:
                    trace.append(("read", n_read))
            enc = torch.cat(enc_out, 1) if len(enc_out) > 1 else enc_out[0]
            enc_out = [enc]
            new = enc[:, fed:reads[t]] if reads[t] > fed else None
            fed = max(fed, reads[t])
            x = self.tok_emb(prev) + self.tgt_pos.weight[t][None, None]
            for i, blk in enumerate(self.decoder):
                x, dec_state[i] = blk(x, new, state=dec_state[i], use_cache=True)
            logits = self.head(self.dec_norm(x))[:, -1]
            prev = sample_logits(logits, temperature, top_k, top_p, generator)[:, None]
            toks.append(prev)
            logits_all.append(logits)
            if trace is not None:
                trace.append(("write", t))
        out = torch.cat(toks, 1) if toks else src.new_zeros(B, 0)
        if return_logits:
            return out, (torch.stack(logits_all, 1) if logits_all else src.new_zeros(B, 0, c.vocab_size).float())
        return out

    @torch.no_grad()
    def full_sequence_decode(self, src, wait_k="config", return_logits: bool = False):
        """The reference of ``simultaneous_decode`` (greedy): at every target step, one full
        forward of the encoder and of the decoder over the whole prefix, with the same policy."""
        B, S = src.shape
        T = S // self.config.rate
        tgt_in = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)
        logits_all = []
        for t in range(T):
            logits = self(src, tgt_in, wait_k)[:, -1]
            logits_all.append(logits)
            tgt_in = torch.cat([tgt_in, logits.argmax(-1)[:, None]], 1)
        out = tgt_in[:, 1:]
        return (out, torch.stack(logits_all, 1)) if return_logits else out

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: Optional[int] = None, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, **_) -> List[List[int]]:
        """Translate each prompt (source token ids, at most ``src_len``; a length that is not a
        multiple of ``rate`` is cut to one) simultaneously: its len / rate target tokens (at most
        ``max_new_tokens``)."""
        dev = self.tok_emb.weight.device
        c = self.config
        outs = []
        for p in prompts:
            p = list(p)[:c.src_len]
            p = p[:len(p) - len(p) % c.rate]
            if not p:
                outs.append([])
                continue
            src = torch.tensor([p], dtype=torch.long, device=dev)
            outs.append(self.simultaneous_decode(src, temperature=temperature, top_k=top_k, top_p=top_p,
                                                 generator=generator, max_new_tokens=max_new_tokens)[0].tolist())
        return outs



"""``softar``: softAR, an autoregressive model over the embedding space (DESIGN section 7; the seed
``softAR`` is a README only, so the design below is ours).

    inputs v_t in R^m (m = n_embd): the tied embedding E[x_t] of hard tokens when teacher-forced,
        the model's own soft vectors (or their collapse) when generating
    h = v + position-in-window embedding
    blocks: self-attention over the *recent* tokens (causal, within the current window of
        ``window`` = W positions), then position-aligned causal cross-attention to the summaries
        of the *older* history, then the MLP
    y = Linear(norm_f(h)) in R^m                   (the head outputs a vector, not logits)
    logits = y @ E^T                               (``forward(tokens)``: next-token logits)

Loss (``loss_terms``): ``mse_weight * MSE(y_t, E[x_{t+1}].detach())`` (mean over the m dims and the
positions) ``+ ce_weight * CE(y_t @ E^T, x_{t+1})``; both default to 1 and either may be 0 (not
both). Teacher-forced on hard tokens. The embedding starts at N(0, 1) per dimension, so the MSE
of predicting 0 is about 1 at the start (and the CE through the tied embedding has room).

Where DESIGN and the issue are silent, the choices are:

- "Recent tokens" are the tokens of the current window: positions ``floor(t / W) * W .. t``
  (between 1 and W of them). ``lk.LeapAttention`` has causal and block-causal modes but no sliding
  window (a linear-attention state cannot forget a key without keeping it), so the recent
  attention is causal attention *inside tumbling windows*: training reshapes [B, T] into windows
  of W (every window an independent causal sequence, any attention kind); decoding carries the
  layer's state within a window and starts it afresh at each window boundary, so the
  self-attention state is O(1) with LeaP and at most W keys with softmax. Everything older than
  the window start s(t) = floor(t / W) * W reaches position t only through the summaries.
- The summaries of the older history (of the input vectors v, positions < s(t)), three per
  position: the aggregate ``mean(v[0 .. s-1])`` (everything older), and two segment sums, the
  previous window ``sum(v[s-W .. s-1])`` and the one before it ``sum(v[s-2W .. s-W-1])`` (zero
  where the history is shorter). They come from ``lk.window_pool`` (``history_summaries``: the
  windows (-inf, 0) mean, (-W+1, 0) and (-2W+1, -W) sums, read at the last position before the
  window start), never from a T x T matrix. Each summary gets its own norm (the sums and the mean
  differ in scale), and the three are concatenated into one context vector of 3m per position.
- Position-aligned causal cross-attention (``LeapAttention(cross=True, causal=True)``, query t sees
  context positions <= t) reads these context vectors: at t it sees the current summaries and the
  earlier snapshots (every one of them holds only history before its own window, so before s(t)):
  in effect every past window's sum once it has left the recent window.
- Positions: ``pos_emb`` ``window`` (learned, default) or ``sinusoidal`` embed the position inside
  the window (t mod W), ``none`` adds nothing; no table caps the sequence length, so the model
  generates past ``seq_len`` (cosformer attention: up to ``cosformer_max_len`` positions).
- Generation carries the summaries as running sums in the state (``SoftARState.sums``: the sum of
  everything before the window, the current window's sum so far and the two segment sums, shifted
  at each window boundary): equal to ``window_pool`` over the whole sequence (tested).
- The rows of one call share their position (no padding): ``generate`` runs prompts of different
  lengths as separate batches, one per length (window boundaries then fall at the same step for
  every row of a batch).

Generation (``rollout`` / ``generate``): the prompt is embedded (hard tokens), then every step's
output y is fed back as the next input vector, by the collapse policy: ``never`` (the soft vector),
``always`` (``collapse``: the embedding of the vocabulary token nearest to y by cosine), or
``threshold`` (collapse where the cosine distance to the nearest token, 1 - max cos, exceeds
``threshold``: a vector far from every token is out of the training distribution, and collapsing
it grounds the context, the seed's "coherence" argument). The output text is always the collapsed
tokens (deterministic: the sampling arguments of the zoo's ``generate`` are accepted and ignored).
The default policy is ``never``: in ``bench_softar`` (benchmarks/results/softar.md) it gave the
lowest loss of the true continuation when the model runs on its own outputs, ``always`` the
highest, ``threshold`` in between. The default threshold (0.5) is a plain cosine distance; trained
models there put their outputs 0.74-0.77 from the nearest token (the MSE-optimal output under
uncertainty is the mean of the likely next embeddings, far from each of them), so 0.5 collapses
nearly everything: pick the threshold from a model's own distances (the bench's quantiles).
"""
import math
import sys
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import leapformer_kernels as lk

from . import config_checks as cc
from .blocks import ACTIVATIONS, ATTENTIONS, MLP, NORMS, init_weights, make_norm, make_positions
from .lm import LeapformerLM
from .tasks import IGNORE

POS_EMBS = ("window", "sinusoidal", "none")
COLLAPSE_POLICIES = ("never", "always", "threshold")
DEFAULT_THRESHOLD = 0.5


@dataclass
class SoftARConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128            # m: the embedding space, the head's output and the model width
    window: int = 32             # W: the recent tokens (self-attention inside windows of W positions)
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm: str = "layernorm"
    pos_emb: str = "window"      # window | sinusoidal | none (of the position inside the window)
    attention: str = "leap"
    cosformer_max_len: int = 1024
    leap_hidden: Optional[int] = None
    eps: float = 0.1
    dropout: float = 0.0
    bias: bool = True
    mse_weight: float = 1.0      # MSE of y against the next token's embedding (detached)
    ce_weight: float = 1.0       # next-token cross-entropy through the tied embedding (0 = off)

    HELP: ClassVar[Dict[str, str]] = {
        "vocab_size": "vocabulary size in tokens (set from the tokenizer)",
        "seq_len": "training context length in tokens",
        "n_layer": "blocks (recent self-attention, cross-attention to the history summaries, MLP)",
        "n_head": "attention heads per block (must divide n_embd)",
        "n_embd": "model width = the embedding space R^m the head predicts in",
        "window": "W: recent tokens; self-attention within windows of W positions, older history via summaries",
        "mlp_ratio": "MLP hidden width as a multiple of n_embd (> 0)",
        "activation": "MLP activation: gelu | swiglu",
        "norm": "normalisation: layernorm | rmsnorm",
        "pos_emb": "positions inside the window: window | sinusoidal | none (window = learned)",
        "attention": "attention: leap | softmax | linear | cosformer (the last three are baselines)",
        "cosformer_max_len": "cosformer attention: the longest sequence M in tokens",
        "leap_hidden": "LeaP predictor hidden width (none = head_dim // 4)",
        "eps": "LeaP denominator clamp (>= 0)",
        "dropout": "dropout probability in [0, 1)",
        "bias": "biases in the linear layers",
        "mse_weight": "weight of the MSE against the next token's embedding (>= 0)",
        "ce_weight": "weight of the next-token cross-entropy through the tied embedding (>= 0; 0 = off)",
    }

    def __post_init__(self):
        for n in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "window", "cosformer_max_len"):
            cc.check_int(self, n)
        cc.check_int(self, "leap_hidden", optional=True)
        cc.check_real(self, "mlp_ratio", 0, lo_open=True)
        cc.check_real(self, "eps", 0)
        cc.check_real(self, "dropout", 0, 1)
        cc.check_real(self, "mse_weight", 0)
        cc.check_real(self, "ce_weight", 0)
        cc.check_choice(self, "activation", ACTIVATIONS)
        cc.check_choice(self, "norm", NORMS)
        cc.check_choice(self, "pos_emb", POS_EMBS)
        cc.check_choice(self, "attention", ATTENTIONS)
        cc.check_bool(self, "bias")
        cc.check_divides(self, "n_head", "n_embd")
        cc.check_hidden_width(self, "mlp_ratio", "n_embd")
        if self.mse_weight == 0 and self.ce_weight == 0:
            cc.fail("mse_weight", f"be > 0 when {cc.field('ce_weight')} = 0 (nothing would be trained)",
                    self.mse_weight)
        if self.attention == "cosformer" and self.seq_len > self.cosformer_max_len:
            cc.fail("seq_len", f"be <= {cc.field('cosformer_max_len')} = {self.cosformer_max_len} with cosformer "
                    "attention", self.seq_len)


# ---------------------------------------------------------------------- the history summaries
def _anchors(T: int, window: int, start: int = 0, device=None):
    """Window starts s(t) = floor(t / W) * W of the positions start .. start+T-1, [T] long."""
    t = torch.arange(start, start + T, device=device)
    return torch.div(t, window, rounding_mode="floor") * window


def history_summaries(v: torch.Tensor, window: int) -> torch.Tensor:
    """v [B, T, m] -> [B, T, 3, m]: at position t with window start s = floor(t / W) * W, the mean of
    v[0 .. s-1], the sum of v[s-W .. s-1] and the sum of v[s-2W .. s-W-1] (the parts inside the
    sequence; zero where empty). From ``lk.window_pool`` read at position s - 1: O(T * m) per
    window, no T x T matrix."""
    B, T, m = v.shape
    W = window
    mean, _ = lk.window_pool(v, [(-sys.maxsize, 0)], reduce="mean")         # mean of v[0 .. j]
    segs, _ = lk.window_pool(v, [(-W + 1, 0), (-2 * W + 1, -W)], reduce="sum")  # the two windows ending at j
    pooled = torch.cat([mean, segs], 2)                                     # [B, T, 3, m], at j
    s = _anchors(T, W, device=v.device)
    out = pooled.index_select(1, (s - 1).clamp_min(0))
    return out * (s > 0).to(v.dtype)[None, :, None, None]


@dataclass
class HistorySums:
    """Running sums of the input vectors ([B, m] each): ``older`` everything before the current
    window, ``current`` the current window so far, ``seg1`` / ``seg2`` the previous window and the
    one before it."""
    older: torch.Tensor
    current: torch.Tensor
    seg1: torch.Tensor
    seg2: torch.Tensor

    @classmethod
    def zeros(cls, B: int, m: int, like: torch.Tensor) -> "HistorySums":
        z = like.new_zeros(B, m)
        return cls(z, z, z, z)

    def summaries(self, pos: int, window: int) -> torch.Tensor:
        """[B, 3, m]: the summaries of the position ``pos`` (a position of the current window)."""
        s = (pos // window) * window
        agg = self.older / s if s > 0 else torch.zeros_like(self.older)
        return torch.stack([agg, self.seg1, self.seg2], 1)

    def advance(self, v: torch.Tensor, pos: int, window: int):
        """Take in v [B, n, m] at positions pos .. pos+n-1 -> (summaries [B, n, 3, m] of those
        positions, the sums after them). Works window segment by window segment."""
        sums, out, i, n = self, [], 0, v.shape[1]
        while i < n:
            r = (pos + i) % window
            k = min(window - r, n - i)
            out.append(sums.summaries(pos + i, window)[:, None].expand(-1, k, -1, -1))
            cur = sums.current + v[:, i:i + k].sum(1)
            if r + k == window:  # the window is complete: it becomes the previous segment
                sums = HistorySums(sums.older + cur, torch.zeros_like(cur), cur, sums.seg1)
            else:
                sums = HistorySums(sums.older, cur, sums.seg1, sums.seg2)
            i += k
        return torch.cat(out, 1), sums


@dataclass
class SoftARState:
    """Per-layer attention states ({"self": state within the current window or None at a window
    boundary, "cross": the cross-attention state}), the running history sums, and the number of
    positions seen (shared by every row)."""
    layers: list
    sums: HistorySums
    pos: int


# ---------------------------------------------------------------------- the block
class SoftARBlock(nn.Module):
    """Pre-norm block: ``x + attn_recent(norm(x))``, ``+ cross(norm(x), summaries)`` (position-aligned
    causal), ``+ mlp(norm(x))``. The self-attention is causal within tumbling windows of W positions
    (see the module doc); with a state, it continues the current window and restarts at boundaries."""

    def __init__(self, dim: int, num_heads: int, window: int, kdim: int, *, mlp_ratio: float = 4.0,
                 activation: str = "gelu", norm: str = "layernorm", attention: str = "leap",
                 leap_hidden: Optional[int] = None, eps: float = 0.1, bias: bool = True, dropout: float = 0.0,
                 cosformer_max_len: int = 1024):
        super().__init__()
        akw = dict(leap_hidden=leap_hidden, eps=eps, bias=bias, attention=attention,
                   cosformer_max_len=cosformer_max_len)
        self.window = window
        self.norm1 = make_norm(norm, dim)
        self.attn = lk.LeapAttention(dim, num_heads, causal=True, **akw)
        self.attn.out_proj.is_residual_proj = True
        self.norm_c = make_norm(norm, dim)
        self.cross = lk.LeapAttention(dim, num_heads, causal=True, cross=True, kdim=kdim, vdim=kdim, **akw)
        self.cross.out_proj.is_residual_proj = True
        self.norm2 = make_norm(norm, dim)
        self.mlp = MLP(dim, int(mlp_ratio * dim), activation, bias=bias, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def _windows(self, x):
        """Causal attention inside windows of W starting at x's first position (no state)."""
        B, T, E = x.shape
        W = self.window
        if T <= W:
            return self.attn(x)
        n = -(-T // W)
        xp = F.pad(x, (0, 0, 0, n * W - T))  # right padding: later positions, unseen by causal attention
        return self.attn(xp.reshape(B * n, W, E)).reshape(B, n * W, E)[:, :T]

    def _recent(self, x, pos: int, state):
        """The self-attention of x [B, T, E] at positions pos.. continuing ``state`` -> (y, new state)."""
        W, T = self.window, x.shape[1]
        r = pos % W
        parts, i = [], 0
        if r:  # finish the current window with its state
            i = min(W - r, T)
            y, state = self.attn(x[:, :i], state=state, use_cache=True)
            parts.append(y)
            if r + i == W:
                state = None
        full = ((T - i) // W) * W  # whole windows: no state needed after them
        if full:
            parts.append(self._windows(x[:, i:i + full]))
            i += full
            state = None
        if i < T:  # a window begun here and left open: its state goes on
            y, state = self.attn(x[:, i:], state=None, use_cache=True)
            parts.append(y)
        return torch.cat(parts, 1), state

    def forward(self, x, context, pos: int = 0, state=None, use_cache: bool = False):
        state = state or {}
        if use_cache:
            h, s_self = self._recent(self.norm1(x), pos, state.get("self"))
        else:
            if pos % self.window:
                raise ValueError("without a state the sequence must start at a window boundary")
            h = self._windows(self.norm1(x))
        x = x + self.drop(h)
        h = self.cross(self.norm_c(x), context=context, state=state.get("cross"), use_cache=use_cache)
        if use_cache:
            h, s_cross = h
        x = x + self.drop(h)
        x = x + self.mlp(self.norm2(x))
        return (x, {"self": s_self, "cross": s_cross}) if use_cache else x


# ---------------------------------------------------------------------- the model
class SoftAR(LeapformerLM):
    name = "softar"
    description = ("softAR: AR over the embedding space (MSE to the next embedding), recent-window attention + "
                   "cross-attention to window_pool history summaries, collapse policies")
    Config = SoftARConfig
    causal = True
    collapse_policies = COLLAPSE_POLICIES
    default_collapse = "never"  # the lowest free-running loss in bench_softar (benchmarks/results/softar.md)
    default_threshold = DEFAULT_THRESHOLD

    def __init__(self, config: SoftARConfig):
        nn.Module.__init__(self)
        self.config = c = config
        m = c.n_embd
        self.tok_emb = nn.Embedding(c.vocab_size, m)
        self.pos_emb = make_positions({"window": "learned"}.get(c.pos_emb, c.pos_emb), m, c.window)
        self.drop = nn.Dropout(c.dropout)
        self.sum_norms = nn.ModuleList([make_norm(c.norm, m) for _ in range(3)])  # aggregate, segment 1, 2
        self.blocks = nn.ModuleList([
            SoftARBlock(m, c.n_head, c.window, 3 * m, mlp_ratio=c.mlp_ratio, activation=c.activation, norm=c.norm,
                        attention=c.attention, leap_hidden=c.leap_hidden, eps=c.eps, bias=c.bias, dropout=c.dropout,
                        cosformer_max_len=c.cosformer_max_len) for _ in range(c.n_layer)])
        self.norm_f = make_norm(c.norm, m)
        self.head = nn.Linear(m, m, bias=c.bias)  # y in R^m
        init_weights(self, c.n_layer)
        nn.init.normal_(self.tok_emb.weight, 0.0, 1.0)

    def _position_limit(self):
        c = self.config
        return (c.cosformer_max_len, "cosformer_max_len") if c.attention == "cosformer" else None

    # ------------------------------------------------------------------ forward
    def _context(self, summaries):
        """[B, T, 3, m] -> [B, T, 3m]: each summary through its own norm, concatenated."""
        return torch.cat([n(summaries[:, :, i]) for i, n in enumerate(self.sum_norms)], -1)

    def run(self, v, state: Optional[SoftARState] = None, use_cache: bool = False):
        """Input vectors v [B, T, m] (continuing ``state``) -> (y [B, T, m], new state or None)."""
        B, T, m = v.shape
        c = self.config
        pos = state.pos if state is not None else 0
        cached = use_cache or state is not None
        if cached:
            sums = state.sums if state is not None else HistorySums.zeros(B, m, v)
            summ, sums = sums.advance(v, pos, c.window)
        else:
            summ = history_summaries(v, c.window)
        context = self._context(summ)
        where = (torch.arange(pos, pos + T, device=v.device) % c.window)[None].expand(B, T)
        x = self.drop(v + self.pos_emb(where))
        layer_states = []
        for i, blk in enumerate(self.blocks):
            if cached:
                x, s = blk(x, context, pos, state.layers[i] if state is not None else None, use_cache=True)
                layer_states.append(s)
            else:
                x = blk(x, context)
        y = self.head(self.norm_f(x))
        return y, (SoftARState(layer_states, sums, pos + T) if use_cache else None)

    def logits(self, y):
        """Next-token logits through the tied embedding: y @ E^T."""
        return F.linear(y, self.tok_emb.weight)

    def forward(self, tokens, key_padding_mask=None, state: Optional[SoftARState] = None, use_cache: bool = False):
        """tokens [B, T] -> next-token logits [B, T, V] (through the tied embedding); with use_cache ->
        (logits, SoftARState). Rows share their positions: no padding (``key_padding_mask`` must be
        None or all False)."""
        if key_padding_mask is not None and bool(key_padding_mask.any()):
            raise ValueError("softar runs the rows of a batch at the same positions: no padding (run prompts of "
                             "different lengths separately, as generate does)")
        y, new_state = self.run(self.tok_emb(tokens), state, use_cache)
        logits = self.logits(y)
        return (logits, new_state) if use_cache else logits

    # ------------------------------------------------------------------ training
    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        """{"next_token": CE of y @ E^T in nats per token, "mse": mean squared error of y against the
        next token's embedding (detached), per dimension}; ``loss`` = ce_weight * next_token +
        mse_weight * mse. Targets -100 (generated tasks) are not scored."""
        x, tgt = batch
        y, _ = self.run(self.tok_emb(x))
        logits = self.logits(y)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=IGNORE)
        scored = tgt != IGNORE
        target = self.tok_emb.weight.detach()[tgt.clamp_min(0)]
        mse = ((y.float() - target.float()) ** 2).mean(-1)[scored].mean()
        return {"next_token": ce, "mse": mse}

    def loss(self, batch):
        t = self.loss_terms(batch)
        return self.config.ce_weight * t["next_token"] + self.config.mse_weight * t["mse"]

    # ------------------------------------------------------------------ collapse and generation
    def collapse(self, y):
        """y [..., m] -> (token ids [...] of the vocabulary embeddings nearest to y by cosine,
        cosine distances 1 - max cos [...])."""
        E = F.normalize(self.tok_emb.weight, dim=-1).to(y.dtype)
        cos = F.normalize(y, dim=-1) @ E.t()
        best, ids = cos.max(-1)
        return ids, 1.0 - best

    @staticmethod
    def _check_policy(collapse: str, threshold: float):
        if collapse not in COLLAPSE_POLICIES:
            raise ValueError(f"collapse must be one of {', '.join(COLLAPSE_POLICIES)}, got {collapse!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0 (a cosine distance, in [0, 2]), got "
                             f"{threshold!r}")

    @torch.no_grad()
    def rollout(self, prompt: torch.Tensor, steps: int, collapse: str = "never",
                threshold: float = DEFAULT_THRESHOLD, use_cache: bool = True) -> Dict[str, torch.Tensor]:
        """Generate ``steps`` vectors after the hard-token prompt [B, P] (P >= 1, rows of one length).

        Each step's output y is fed back as the next input: y itself, or the embedding of
        ``collapse(y)`` by the policy (``never``, ``always``, ``threshold``: where the cosine distance
        exceeds ``threshold``). ``use_cache=True`` carries the state (one vector per step);
        ``use_cache=False`` recomputes the whole sequence of inputs each step (the reference).
        Returns {"y" [B, steps, m], "tokens" [B, steps] (the collapsed outputs, the text),
        "distance" [B, steps] (cosine distance of y to its token), "collapsed" [B, steps] bool
        (whether the vector fed back was collapsed)}."""
        self._check_policy(collapse, threshold)
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be [B, P] token ids with P >= 1, got shape {tuple(prompt.shape)}")
        E = self.tok_emb.weight
        v = self.tok_emb(prompt)
        if use_cache:
            y, state = self.run(v, use_cache=True)
        out = {"y": [], "tokens": [], "distance": [], "collapsed": []}
        for step in range(steps):
            if not use_cache:
                y, _ = self.run(v)
            yt = y[:, -1]
            ids, dist = self.collapse(yt)
            if collapse == "never":
                hard = torch.zeros_like(ids, dtype=torch.bool)
            elif collapse == "always":
                hard = torch.ones_like(ids, dtype=torch.bool)
            else:
                hard = dist > threshold
            nxt = torch.where(hard[:, None], E[ids].to(yt.dtype), yt)
            for k, val in zip(("y", "tokens", "distance", "collapsed"), (yt, ids, dist, hard)):
                out[k].append(val)
            if step + 1 == steps:
                break
            if use_cache:
                y, state = self.run(nxt[:, None], state, use_cache=True)
            else:
                v = torch.cat([v, nxt[:, None]], 1)
        B = prompt.shape[0]
        if not steps:
            return {"y": v.new_zeros(B, 0, v.shape[-1]), "tokens": prompt.new_zeros(B, 0),
                    "distance": v.new_zeros(B, 0), "collapsed": torch.zeros(B, 0, dtype=torch.bool)}
        return {k: torch.stack(val, 1) for k, val in out.items()}

    @torch.no_grad()
    def generate(self, prompts: List[List[int]], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True,
                 collapse: str = "never", threshold: float = DEFAULT_THRESHOLD) -> List[List[int]]:
        """Continue each prompt by max_new_tokens tokens; returns the new ids (the collapsed outputs).

        Soft vectors are fed back by the ``collapse`` policy (see ``rollout``). The text is always
        the nearest token by cosine, so ``temperature``, ``top_k``, ``top_p`` and ``generator`` are
        accepted (the zoo's interface) and ignored. Prompts of different lengths run as separate
        batches, one per length."""
        self._check_policy(collapse, threshold)
        prompts = self._prompt_lists(prompts)
        fit = self.max_new_tokens_that_fit(prompts)
        if fit is not None:
            (M, name), longest = self._position_limit(), max(len(p) for p in prompts)
            if longest > M:
                raise ValueError(f"the longest prompt has {longest} tokens, more than {cc.field(name)} = {M} positions")
            if max_new_tokens > fit:
                raise ValueError(f"max_new_tokens={max_new_tokens} does not fit: the longest prompt has {longest} "
                                 f"tokens and {cc.field(name)} = {M}, so at most {fit} new tokens")
        dev = self.tok_emb.weight.device
        out: List[Optional[List[int]]] = [None] * len(prompts)
        for n in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == n]
            r = self.rollout(torch.tensor([prompts[i] for i in rows], device=dev), max_new_tokens, collapse,
                             threshold, use_cache)
            for i, ids in zip(rows, r["tokens"].tolist()):
                out[i] = ids
        return out

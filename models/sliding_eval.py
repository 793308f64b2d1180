"""Held-out loss of a causal LM by one full pass over a token sequence with a sliding window.

``leapformer eval`` on a causal LM (``leapformer-lm``, ``leapformer-lm-long``) runs this over the
whole validation text. Tokens x_0 .. x_{N-1}: every target x_1 .. x_{N-1} is scored exactly once,
and the loss is the mean cross-entropy over those N - 1 predictions (nats per token).

Window j reads the input tokens [j * stride, min(j * stride + window, N - 1)) and scores the
predictions of the inputs that no earlier window scored: all of window 0, then the last
``stride`` positions of each window (Hugging Face's "perplexity of fixed-length models"
recipe), so with stride < window each scored token has at least window - stride tokens of
context, and with stride == window the windows are disjoint.

Two ways to treat what lies before a window:

- fresh windows (``carry_state=False``; softmax, learned positions): each window starts with
  nothing before it (positions from 0, empty KV cache / state), as in training;
- carried state (``carry_state=True``; LeaP and linear attention with no position table): the
  windows are disjoint (stride == window) and window j starts from the recurrent state (S, z and
  the position counter of every layer) left by window j - 1, so every token is predicted from
  all the text before it and the loss equals that of one forward pass over the whole sequence
  (up to float rounding); the window only bounds the tokens of one forward call.

Loss by position: each scored prediction is filed under its context length c, the number of
tokens it has read (itself included): its position in the window plus one for fresh windows,
its position in the whole text plus one with the carried state. The numbers are kept in bins
(every c up to 16, then 8 bins per doubling) and drawn as a PNG.
"""
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

RECURRENT = ("leap", "linear")  # attentions with a constant-size state that can carry the whole text


def position_bin_edges(max_context: int):
    """Bin edges over context lengths 1 .. max_context: [1, 2, ..., 16], then 8 bins per doubling."""
    edges = list(range(1, min(16, max_context) + 1))
    x = 16.0
    while edges[-1] <= max_context:
        x *= 2 ** 0.125
        e = int(round(x))
        if e > edges[-1]:
            edges.append(e)
    return edges


def carry_supported(model) -> Optional[str]:
    """None if the model can carry its state over a whole text, else the reason why not."""
    c = model.config
    att = getattr(c, "attention", None)
    if att not in RECURRENT:
        return (f"{att} attention has no constant-size recurrent state (softmax keeps a KV cache that grows "
                "with the text)" if att == "softmax" else
                f"{att} attention counts positions up to cosformer_max_len = {c.cosformer_max_len}")
    if c.pos_emb == "learned":
        return f"learned positions stop at max_positions = {c.max_positions}"
    return None


@torch.no_grad()
def sliding_window_loss(model, ids: torch.Tensor, window: int, stride: Optional[int] = None,
                        carry_state: bool = False, batch_size: int = 8, progress: bool = False) -> dict:
    """Mean next-token cross-entropy over all of ``ids`` (1-D long) read in windows (module doc).

    Returns {"loss", "tokens" (predictions scored), "windows", "window", "stride", "carry_state",
    "by_position": {"context_lo", "context_hi", "tokens", "loss"}} with loss in nats per token.
    """
    stride = window if stride is None else stride
    n_in = len(ids) - 1  # inputs that have a target
    if n_in < 1:
        raise ValueError(f"the text has {len(ids)} tokens: at least 2 are needed to score one prediction")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window = {window}], got {stride}")
    if carry_state and stride != window:
        raise ValueError("with the state carried, windows are disjoint: stride must equal window")
    window = min(window, n_in)
    stride = min(stride, window)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = [0]
    while starts[-1] + window < n_in:
        starts.append(starts[-1] + stride)
    # each window: (start, length, first scored position in the window)
    plan, scored_to = [], 0
    for s in starts:
        length = min(window, n_in - s)
        plan.append((s, length, scored_to - s))
        scored_to = s + length
    max_context = n_in if carry_state else window
    edges = position_bin_edges(max_context)
    edge_t = torch.tensor(edges[1:], dtype=torch.long)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    total, n_scored = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc="eval windows", unit="win", dynamic_ncols=True)

    def file(nll, context):  # nll [n] float64, context [n] long (context lengths, >= 1)
        nonlocal total, n_scored
        b = torch.bucketize(context, edge_t, right=True)
        sums.index_add_(0, b, nll)
        counts.index_add_(0, b, torch.ones_like(b))
        total += float(nll.sum())
        n_scored += nll.numel()

    try:
        if carry_state:
            state = None
            for s, length, first in plan:
                x = ids[s:s + length].to(dev)[None]
                y = ids[s + 1:s + length + 1].to(dev)
                logits, state = model(x, state=state, use_cache=True)
                nll = F.cross_entropy(logits[0].float(), y, reduction="none").double().cpu()
                file(nll, torch.arange(s + 1, s + length + 1))
                if bar is not None:
                    bar.update(1)
        else:
            i = 0
            while i < len(plan):  # batches of equal-length windows
                group = [plan[i]]
                while (len(group) < batch_size and i + len(group) < len(plan)
                       and plan[i + len(group)][1] == group[0][1]):
                    group.append(plan[i + len(group)])
                length = group[0][1]
                x = torch.stack([ids[s:s + length] for s, _, _ in group]).to(dev)
                y = torch.stack([ids[s + 1:s + length + 1] for s, _, _ in group]).to(dev)
                logits = model(x)
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                      reduction="none").view(len(group), length).double().cpu()
                for row, (_, _, first) in zip(nll, group):
                    first = max(first, 0)
                    file(row[first:], torch.arange(first + 1, length + 1))
                i += len(group)
                if bar is not None:
                    bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    assert n_scored == n_in, (n_scored, n_in)
    keep = counts > 0
    lo = torch.tensor(edges[:-1])[keep]
    hi = (torch.tensor(edges[1:]) - 1).clamp_max(max_context)[keep]
    return {"loss": total / n_scored, "tokens": n_scored, "windows": len(plan), "window": window, "stride": stride,
            "carry_state": carry_state,
            "by_position": {"context_lo": lo.tolist(), "context_hi": hi.tolist(), "tokens": counts[keep].tolist(),
                            "loss": (sums[keep] / counts[keep]).tolist()}}


def plot_position_loss(result: dict, path: str, title: str = "") -> None:
    """PNG of the loss against context length (log x), one point per bin, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bp = result["by_position"]
    mid = [math.sqrt(lo * hi) for lo, hi in zip(bp["context_lo"], bp["context_hi"])]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(mid, bp["loss"], "o-", ms=3, lw=1.5, label="mean loss of the bin")
    ax.axhline(result["loss"], color="k", ls="--", lw=1, label=f"overall {result['loss']:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens read, the predicted one's input included)")
    ax.set_ylabel("loss (nats / token)")
    how = ("state carried over the whole text" if result["carry_state"] else
           f"fresh windows of {result['window']}, stride {result['stride']}")
    ax.set_title(f"{title}\n{how}; {result['tokens']:,} predictions", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

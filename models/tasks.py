"""Generated tasks: MQAR (Zoology's multi-query associative recall) and ListOps (LRA).

Each task is a pure generator (deterministic for a seed) plus a direct solver that the tests
check the labels against. Training uses them through ``TaskData`` (``leapformer train --data
mqar`` / ``--data listops``): a model's ``get_batch(data, batch_size, generator)`` asks it for a
batch, which it generates from one number drawn from the run's batch generator (so runs, their
validation batches and ``--resume`` are exactly reproducible), instead of cutting windows out of
a text corpus. Token ids come from ``TaskTokenizer`` (stored in checkpoints like a text one).

MQAR (Arora et al., Zoology): ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...``, then every key
queried once in random order at a random even slot of the rest of the sequence, its value right
after it (the other slots hold the noise token 0). Keys are drawn without replacement from ids
``1 .. K`` and values from ``K+1 .. vocab_size-1`` (K = (vocab_size - 1) // 2). The model reads
``x`` [T] and is scored where ``y`` != -100: at each query the label is the queried value (the
next token). Gaps are uniform here (Zoology draws them from a power law).

ListOps (Nangia & Bowman; LRA): nested ``[MAX``, ``[MIN``, ``[MED`` (median, rounded down),
``[SM`` (sum modulo 10) expressions over the digits 0-9, each closed by ``]``; the label is the
expression's value (10 classes). Trees are drawn as in LRA's generator (below the root, which
is always an operator, an operator with probability 0.25, else a digit; 2 .. max_args
arguments; depth <= max_depth) and rejected until their length is in [min_len, max_len] tokens
(LRA: 500 .. 2000, max_depth 10, max_args 10).
"""
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

IGNORE = -100  # label of the positions that are not scored (cross_entropy's default ignore_index)
TASKS = ("mqar", "listops", "stream")  # stream: models/stream_task.py (leapformer-stream)


# --------------------------------------------------------------------------- MQAR
def mqar_check(num_pairs: int, vocab_size: int, seq_len: int) -> None:
    for name, v, lo in (("num_pairs", num_pairs, 1), ("vocab_size", vocab_size, 5), ("seq_len", seq_len, 4)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"mqar: {name} must be an int >= {lo}, got {v!r}")
    if (vocab_size - 1) // 2 < num_pairs:
        raise ValueError(f"mqar: vocab_size {vocab_size} holds {(vocab_size - 1) // 2} keys, fewer than num_pairs "
                         f"{num_pairs} (need vocab_size >= {2 * num_pairs + 1})")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"mqar: seq_len {seq_len} is too short for {num_pairs} pairs (need >= 4 * num_pairs = "
                         f"{4 * num_pairs}: the pairs, then a query and its answer per key)")


def mqar_example(rng: np.random.Generator, num_pairs: int, vocab_size: int, seq_len: int) -> Tuple[list, list]:
    """One MQAR sequence -> (x [seq_len] token ids, y [seq_len] labels, IGNORE where unscored)."""
    K = (vocab_size - 1) // 2
    keys = rng.choice(np.arange(1, K + 1), num_pairs, replace=False)
    values = rng.integers(K + 1, vocab_size, num_pairs)
    x = np.zeros(seq_len, dtype=np.int64)
    x[0:2 * num_pairs:2], x[1:2 * num_pairs:2] = keys, values
    slots = (seq_len - 2 * num_pairs) // 2           # query slots: (key, answer) at 2N + 2s, 2N + 2s + 1
    where = 2 * num_pairs + 2 * np.sort(rng.choice(slots, num_pairs, replace=False))
    order = rng.permutation(num_pairs)
    x[where], x[where + 1] = keys[order], values[order]
    y = np.full(seq_len, IGNORE, dtype=np.int64)
    y[where] = values[order]
    return x.tolist(), y.tolist()


def mqar_solve(x: Sequence[int], num_pairs: int) -> List[int]:
    """Direct solver: read the pairs, then label each query (a key token after the pairs) with
    its value."""
    x = list(x)
    table = {x[2 * i]: x[2 * i + 1] for i in range(num_pairs)}
    y = [IGNORE] * len(x)
    t = 2 * num_pairs
    while t < len(x):
        if x[t] in table:
            y[t] = table[x[t]]
            t += 2  # the answer token itself is not a query
        else:
            t += 1
    return y


# --------------------------------------------------------------------------- ListOps
LISTOPS_OPS = ("[MAX", "[MIN", "[MED", "[SM")
LISTOPS_VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + LISTOPS_OPS + ("]",)
_ID = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
DIGIT0 = _ID["0"]  # digit d has id DIGIT0 + d


def listops_apply(op: str, args: Sequence[int]) -> int:
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        a = sorted(args)
        return (a[(len(a) - 1) // 2] + a[len(a) // 2]) // 2
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list) -> int:
    """Append one random (sub)expression's tokens to ``out``; return its value."""
    if depth > 0 and (depth >= max_depth or rng.random() >= 0.25):
        d = rng.randrange(10)
        out.append(str(d))
        return d
    op = rng.choice(LISTOPS_OPS)
    out.append(op)
    args = [_listops_tree(rng, depth + 1, max_depth, max_args, out) for _ in range(rng.randint(2, max_args))]
    out.append("]")
    return listops_apply(op, args)


def listops_check(min_len: int, max_len: int, max_depth: int, max_args: int) -> None:
    for name, v, lo in (("min_len", min_len, 1), ("max_len", max_len, 4), ("max_depth", max_depth, 1),
                        ("max_args", max_args, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"listops: {name} must be an int >= {lo}, got {v!r}")
    if min_len > max_len:
        raise ValueError(f"listops: min_len {min_len} must be <= max_len {max_len}")


def listops_example(rng: random.Random, min_len: int, max_len: int, max_depth: int = 10,
                    max_args: int = 10) -> Tuple[List[str], int]:
    """One expression (tokens, value) with min_len <= len(tokens) <= max_len."""
    for _ in range(100000):
        out: list = []
        value = _listops_tree(rng, 0, max_depth, max_args, out)
        if min_len <= len(out) <= max_len:
            return out, value
    raise ValueError(f"listops: no expression of {min_len} .. {max_len} tokens after 100000 draws with "
                     f"max_depth={max_depth}, max_args={max_args}")


def listops_solve(tokens: Sequence[str]) -> int:
    """Direct solver: evaluate the token sequence with a stack."""
    stack: list = []
    for t in tokens:
        if t in LISTOPS_OPS:
            stack.append((t, []))
        elif t == "]":
            op, args = stack.pop()
            v = listops_apply(op, args)
            if not stack:
                return v
            stack[-1][1].append(v)
        else:
            d = int(t)
            if not stack:
                return d
            stack[-1][1].append(d)
    raise ValueError("unbalanced ListOps expression")


def listops_encode(tokens: Sequence[str]) -> List[int]:
    return [_ID[t] for t in tokens]


def listops_decode(ids: Sequence[int]) -> List[str]:
    return [LISTOPS_VOCAB[int(i)] for i in ids if int(i) != 0]


# --------------------------------------------------------------------------- training hook
class TaskTokenizer:
    """Token ids of a generated task (the checkpoint's tokenizer state names the task)."""

    kind = "task"

    def __init__(self, task: str, vocab_size: int):
        self.task, self.vocab_size = task, vocab_size

    def encode(self, text: str) -> List[int]:
        parts = text.replace("[ ", "[").split()
        if self.task == "listops":
            unknown = [p for p in parts if p not in _ID]
            if unknown:
                raise ValueError(f"listops: unknown token {unknown[0]!r}; tokens: {' '.join(LISTOPS_VOCAB[1:])}")
            return listops_encode(parts)
        return [int(p) % self.vocab_size for p in parts if p.lstrip("-").isdigit()]

    def decode(self, ids) -> str:
        if self.task == "listops":
            return " " + " ".join(listops_decode(ids))
        return " " + " ".join(str(int(i)) for i in ids)

    def state(self) -> dict:
        return {"kind": "task", "task": self.task, "vocab_size": self.vocab_size}


class TaskData:
    """A generated task's split, handed to ``model.get_batch`` where a text corpus tensor would be.

    ``params``: MQAR ``num_pairs``, ``vocab_size``; ListOps ``min_len``, ``max_depth``,
    ``max_args``. The sequence length comes from the model (its ``seq_len``).
    """

    def __init__(self, task: str, split: int, **params):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        self.task, self.split, self.params = task, split, params

    def __len__(self):  # for messages that print a corpus size
        return 0

    def _rng_seed(self, generator: torch.Generator) -> list:
        return [int(torch.randint(0, 2 ** 62, (1,), generator=generator)), self.split]

    def mqar_batch(self, batch_size: int, seq_len: int, generator: torch.Generator):
        """-> (x [B, T] long, y [B, T] long, IGNORE where unscored)."""
        p = self.params
        mqar_check(p["num_pairs"], p["vocab_size"], seq_len)
        rng = np.random.default_rng(self._rng_seed(generator))
        ex = [mqar_example(rng, p["num_pairs"], p["vocab_size"], seq_len) for _ in range(batch_size)]
        return torch.tensor([e[0] for e in ex]), torch.tensor([e[1] for e in ex])

    def listops_batch(self, batch_size: int, max_len: int, generator: torch.Generator):
        """-> (x [B, L] long right-padded with 0, pad [B, L] bool, label [B] long); L = the longest."""
        p = self.params
        min_len = min(p["min_len"], max_len)
        listops_check(min_len, max_len, p["max_depth"], p["max_args"])
        rng = random.Random(str(self._rng_seed(generator)))
        ex = [listops_example(rng, min_len, max_len, p["max_depth"], p["max_args"]) for _ in range(batch_size)]
        L = max(len(t) for t, _ in ex)
        x = torch.zeros(batch_size, L, dtype=torch.long)
        for i, (toks, _) in enumerate(ex):
            x[i, :len(toks)] = torch.tensor(listops_encode(toks))
        return x, x == 0, torch.tensor([v for _, v in ex])


def task_data(task: str, params: dict):
    """(tokenizer, train split, validation split) of a generated task."""
    if task == "stream":  # its shape (src_len, rate, max_delay) is the model's config
        from .stream_task import STREAM_VOCAB
        return TaskTokenizer(task, STREAM_VOCAB), TaskData(task, 0), TaskData(task, 1)
    vocab = params["vocab_size"] if task == "mqar" else len(LISTOPS_VOCAB)
    return TaskTokenizer(task, vocab), TaskData(task, 0, **params), TaskData(task, 1, **params)


@torch.no_grad()
def accuracy(model, data: TaskData, batches: int, batch_size: int, seed: int = 0) -> Optional[float]:
    """Fraction of the scored predictions that are right over ``batches`` seeded batches (MQAR:
    the queried values; ListOps: the expressions' values); None for a model without
    ``accuracy_counts``."""
    if not hasattr(model, "accuracy_counts"):
        return None
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    right = total = 0
    for _ in range(batches):
        batch = tuple(t.to(dev) for t in model.get_batch(data, batch_size, gen))
        r, n = model.accuracy_counts(batch)
        right, total = right + r, total + n
    model.train(was_training)
    return right / max(1, total)

"""Corpora and tokenizers that need no network.

The default corpus is the Python documentation text shipped with every CPython install
(``pydoc_data.topics``), or any local text file. The split into train / validation is
deterministic: the last ``val_fraction`` of the text is validation.
"""
import json
from typing import Optional, Tuple

import torch


def load_text(path: Optional[str] = None) -> str:
    """The text of ``path``, or of ``pydoc_data.topics`` (topics in sorted order) when None."""
    if path:
        import os
        from .errors import UsageError
        if os.path.isdir(path):
            raise UsageError(f"--data {path} is a folder; give a UTF-8 text file")
        if not os.path.isfile(path):
            raise UsageError(f"--data {path} does not exist; give a UTF-8 text file (or omit --data for the "
                             "Python docs corpus)")
        with open(path, "rb") as f:
            raw = f.read()
        if b"\0" in raw[:65536]:
            raise UsageError(f"--data {path} is a binary file, not text")
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            raise UsageError(f"--data {path} is empty")
        return text
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def split_text(text: str, val_fraction: float = 0.1) -> Tuple[str, str]:
    """Deterministic split: the first ``1 - val_fraction`` of the text trains, the rest validates."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


class ByteTokenizer:
    """UTF-8 bytes: vocabulary 256, no training, lossless (invalid UTF-8 decodes to U+FFFD)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str):
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": "byte"}


class BPETokenizer:
    """A byte-level BPE trained locally with the ``tokenizers`` package (``pip install tokenizers``)."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @staticmethod
    def _lib():
        try:
            import tokenizers
        except ImportError:
            from .errors import MissingExtra
            raise MissingExtra('--tokenizer bpe needs tokenizers: pip install "leapformer-kernels[bpe]" '
                               "(the default --tokenizer byte needs nothing)") from None
        return tokenizers

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024):
        tk = cls._lib()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)], trainer=trainer)
        return cls(tok)

    def encode(self, text: str):
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def state(self) -> dict:
        return {"kind": "bpe", "json": self.tok.to_str()}


def make_tokenizer(kind: str, train_text: str = "", vocab_size: int = 1024):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(train_text, vocab_size)
    raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {kind!r}")


def tokenizer_from_state(state: dict):
    if state["kind"] == "byte":
        return ByteTokenizer()
    if state["kind"] == "task":
        from .tasks import TaskTokenizer
        return TaskTokenizer(state["task"], state["vocab_size"])
    if state["kind"] == "bpe":
        tk = BPETokenizer._lib()
        return BPETokenizer(tk.Tokenizer.from_str(state["json"]))
    raise ValueError(f"unknown tokenizer state {json.dumps(state)[:80]}")


def encode_corpus(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)

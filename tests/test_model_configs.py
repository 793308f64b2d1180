"""Model config validation (every bad value names the field and its flag), HELP strings, the
loss terms of every model, and the LM's generation-length limit with learned positions."""
import math
import re
from dataclasses import fields

import pytest
import torch

import leapformer_models as lm
from leapformer_models.blocks import left_pad
from leapformer_models.leap import LeapLSTMConfig, LeapTransformerConfig
from leapformer_models.lm import LMConfig
from utils import TINY_TEXT as TEXT

CONFIGS = [LMConfig, LeapLSTMConfig, LeapTransformerConfig]
TINY = {
    "leapformer-lm": dict(n_layer=2, n_head=2, n_embd=32, seq_len=32),
    "leap-lstm": dict(embed_dim=16, hidden_dim=32),
    "leap-transformer": dict(embed_dim=32, num_heads=4, num_layers=2),
}

INT_SIZES = {
    LMConfig: ["vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "max_positions"],
    LeapLSTMConfig: ["vocab_size", "embed_dim", "hidden_dim", "context_len", "min_distance", "max_distance",
                     "gen_distance"],
    LeapTransformerConfig: ["vocab_size", "embed_dim", "num_heads", "num_layers", "context_len", "min_distance",
                            "max_distance", "gen_distance"],
}


def bad_cases():
    """(config class, overrides, the field the message must name)."""
    cases = []
    for cls, names in INT_SIZES.items():
        for n in names:
            for v in (0, -1, 2.0, True, "8", None):
                cases.append((cls, {n: v}, n))
    for cls in (LMConfig, LeapTransformerConfig):
        for v in (0, -4.0, math.inf, math.nan, True, "4"):
            cases.append((cls, {"mlp_ratio": v}, "mlp_ratio"))
        cases.append((cls, {"mlp_ratio": 0.001}, "mlp_ratio"))  # empty MLP hidden layer
        for v in (-0.1, math.inf, math.nan, False, "0.1", None):
            cases.append((cls, {"eps": v}, "eps"))
        for v in (-0.1, 1, 1.0, 1.5, math.nan, True, None):
            cases.append((cls, {"dropout": v}, "dropout"))
        for v in (0, -1, 2.5, True):
            cases.append((cls, {"leap_hidden": v}, "leap_hidden"))
        for v in ("soft", "Leap", "", None, 1):
            cases.append((cls, {"attention": v}, "attention"))
        for v in ("relu", "GELU", None):
            cases.append((cls, {"activation": v}, "activation"))
        for v in ("batchnorm", "layer_norm", None):
            cases.append((cls, {"norm": v}, "norm"))
    cases += [
        (LMConfig, {"n_head": 3}, "n_head"),
        (LMConfig, {"n_embd": 100, "n_head": 8}, "n_head"),
        (LeapTransformerConfig, {"num_heads": 5}, "num_heads"),
        (LeapTransformerConfig, {"gap_layers": -1}, "gap_layers"),
        (LeapTransformerConfig, {"gap_layers": 1.0}, "gap_layers"),
        (LeapTransformerConfig, {"gap_layers": True}, "gap_layers"),
        (LMConfig, {"pos_emb": "rope"}, "pos_emb"),
        (LMConfig, {"pos_emb": None}, "pos_emb"),
        (LMConfig, {"seq_len": 2048}, "seq_len"),                      # > max_positions = 1024
        (LMConfig, {"seq_len": 65, "max_positions": 64}, "seq_len"),
        (LMConfig, {"bias": 1}, "bias"),
    ]
    for cls in (LeapLSTMConfig, LeapTransformerConfig):
        cases += [
            (cls, {"min_distance": 8, "max_distance": 5, "gen_distance": 5}, "min_distance"),
            (cls, {"gen_distance": 31}, "gen_distance"),
            (cls, {"gen_distance": 1}, "gen_distance"),                  # < min_distance = 2
            (cls, {"min_distance": 4, "gen_distance": 3}, "gen_distance"),
            (cls, {"distance_head": "yes"}, "distance_head"),
        ]
    return cases


CASES = bad_cases()


@pytest.mark.parametrize("cls,kw,name", CASES, ids=[f"{c.__name__}-{k}" for c, k, _ in CASES])
def test_bad_values_raise_naming_field_and_flag(cls, kw, name):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=re.escape(f"{name} ({flag}) must ")) as e:
        cls(**kw)
    msg = str(e.value)
    assert "\n" not in msg and ", got " in msg


def test_message_format():
    with pytest.raises(ValueError) as e:
        LMConfig(n_head=3)
    assert str(e.value) == "n_head (--n-head) must divide n_embd (--n-embd) = 128, got 3"
    with pytest.raises(ValueError) as e:
        LMConfig(dropout=1.5)
    assert str(e.value) == "dropout (--dropout) must be in [0, 1), got 1.5"
    with pytest.raises(ValueError) as e:
        LeapTransformerConfig(attention="soft")
    assert str(e.value) == "attention (--attention) must be one of leap, softmax, linear, cosformer, got 'soft'"
    with pytest.raises(ValueError) as e:
        LMConfig(vocab_size=0)
    assert str(e.value) == "vocab_size (--vocab-size) must be an int >= 1, got 0"


@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_construct_and_help_covers_every_field(cls):
    cfg = cls()
    names = [f.name for f in fields(cfg)]
    assert "HELP" not in names  # a ClassVar, not a field (the CLI makes a flag per field)
    assert set(cls.HELP) == set(names)
    assert all(isinstance(h, str) and h and "\n" not in h for h in cls.HELP.values())


def test_good_edge_values_construct():
    LMConfig(pos_emb="sinusoidal", seq_len=4096, max_positions=16)   # max_positions unused
    LMConfig(pos_emb="none", seq_len=4096)
    LMConfig(seq_len=1024, max_positions=1024, dropout=0, eps=0, leap_hidden=1, mlp_ratio=1)
    LMConfig(activation="swiglu", norm="rmsnorm", attention="softmax", bias=False, dropout=0.99)
    LeapTransformerConfig(gap_layers=0, min_distance=1, max_distance=1, gen_distance=1)
    LeapLSTMConfig(min_distance=3, max_distance=3, gen_distance=3, distance_head=True)


# ----------------------------------------------------------------------------- loss terms
@pytest.fixture(scope="module")
def corpus():
    return torch.tensor(list(TEXT.encode()), dtype=torch.long)


@pytest.mark.parametrize("name", ["leap-lstm", "leap-transformer"])
@pytest.mark.parametrize("distance_head", [False, True])
def test_leap_loss_is_sum_of_terms(name, distance_head, corpus):
    torch.manual_seed(0)
    model = lm.build(name, distance_head=distance_head, **TINY[name])
    batch = model.get_batch(corpus, 4, torch.Generator().manual_seed(0))
    terms = model.loss_terms(batch)
    assert list(terms) == ["target", "gap"] + (["distance"] if distance_head else [])
    assert all(t.dtype == torch.float32 and t.dim() == 0 and float(t.detach()) > 0 for t in terms.values())
    loss = model.loss(batch)
    assert torch.equal(loss, sum(terms.values()))
    loss.backward()


@pytest.mark.parametrize("name", ["leap-lstm", "leap-transformer"])
def test_leap_loss_terms_without_gap(name, corpus):
    """Every distance 1: no gap token, the gap term is 0 and the loss is target (+ distance)."""
    torch.manual_seed(0)
    model = lm.build(name, min_distance=1, max_distance=1, gen_distance=1, distance_head=True, **TINY[name])
    batch = model.get_batch(corpus, 4, torch.Generator().manual_seed(0))
    assert batch["gap_pad"].all()
    terms = model.loss_terms(batch)
    assert float(terms["gap"]) == 0.0
    loss = model.loss(batch)
    assert torch.equal(loss, terms["target"] + terms["distance"])
    assert torch.equal(loss, sum(terms.values()))
    assert [len(o) for o in model.eval().generate([[1, 2], []], 3, temperature=0)] == [3, 3]


def test_lm_loss_terms(corpus):
    torch.manual_seed(0)
    model = lm.build("leapformer-lm", **TINY["leapformer-lm"])
    batch = model.get_batch(corpus, 4, torch.Generator().manual_seed(0))
    terms = model.loss_terms(batch)
    assert list(terms) == ["next_token"]
    assert torch.equal(model.loss(batch), sum(terms.values()))


# ----------------------------------------------------------------------------- generation length
def test_lm_max_new_tokens_that_fit():
    model = lm.build("leapformer-lm", **dict(TINY["leapformer-lm"], max_positions=40)).eval()
    prompts = [[1, 2, 3], list(range(10, 20)), []]          # left-padded to 10; [] runs as [0]
    assert model.max_new_tokens_that_fit(prompts) == 30
    assert model.max_new_tokens_that_fit([[]]) == 39
    tokens, _ = left_pad(prompts)
    assert model.max_new_tokens_that_fit(tokens[:1]) == 30   # a tensor row: its padding counts
    assert model.max_new_tokens_that_fit([list(range(45))]) == 0
    out = model.generate(prompts, 30, temperature=0)          # exactly fits: last position 39
    assert [len(o) for o in out] == [30, 30, 30]
    # positions count real tokens: the short prompt alone gets as far as in the batch
    assert model.generate([[1, 2, 3]], 37, temperature=0)[0][:30] == out[0]
    with pytest.raises(ValueError, match=r"max_positions \(--max-positions\) = 40"):
        model.generate(prompts, 31, temperature=0)
    with pytest.raises(ValueError, match="max_positions"):
        model.generate(prompts, 31, temperature=0, use_cache=False)
    with pytest.raises(ValueError, match="max_positions"):
        model.generate([list(range(41))], 0)


@pytest.mark.parametrize("pos", ["sinusoidal", "none"])
def test_lm_generation_unlimited_without_learned_positions(pos):
    m = lm.build("leapformer-lm", **dict(TINY["leapformer-lm"], pos_emb=pos, max_positions=8)).eval()
    assert m.max_new_tokens_that_fit([[1, 2, 3], list(range(10, 20)), []]) is None
    assert [len(o) for o in m.generate([[1, 2, 3]], 10, temperature=0)] == [10]

"""Backend selection (DESIGN section 3)."""
import warnings

import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels import backends
from utils import make_inputs


def test_torch_always_available():
    assert "torch" in lk.available_backends()
    assert "torch" in lk.available_backends("window_pool")


def test_explicit_backend_is_used(monkeypatch):
    calls = []
    kern = backends.get("torch").attention_kernels()
    real = kern.fwd
    monkeypatch.setattr(kern, "fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, pq, pk = make_inputs(1, 5, None, 1, None, 4, 4)
    lk.leap_attention(q, k, v, pq, pk, backend="torch")
    assert calls == [1]


def test_float64_automatic_never_goes_to_triton():
    assert backends.select("leap_attention", None, torch.device("cpu"), torch.float64).__name__.split(".")[-1] \
        in ("torch_backend", "cpu_backend")


def test_env_preference_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("LEAPFORMER_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends.reset()
    q, k, v, pq, pk = make_inputs(1, 5, None, 1, None, 4, 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lk.leap_attention(q, k, v, pq, pk)
        lk.leap_attention(q, k, v, pq, pk)
    msgs = [str(x.message) for x in w if "LEAPFORMER_BACKEND" in str(x.message)]
    assert len(msgs) == 1 and "torch" in msgs[0]


def test_env_preference_unknown_name(monkeypatch):
    monkeypatch.setenv("LEAPFORMER_BACKEND", "nope")
    backends.reset()
    with pytest.warns(RuntimeWarning, match="LEAPFORMER_BACKEND"):
        assert backends.select("leap_attention", None, torch.device("cpu"), torch.float32) is backends.get("torch")


def test_env_preference_is_honoured(monkeypatch):
    monkeypatch.setenv("LEAPFORMER_BACKEND", "torch")
    assert backends.select("leap_attention", None, torch.device("cpu"), torch.float32) is backends.get("torch")


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        backends.select("leap_attention", "triton", torch.device("cpu"), torch.float32)


def test_interpreter_lists_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = backends.get("triton").unavailable("leap_attention", torch.device("cpu"), torch.float32)
    assert got is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in backends.get("triton").unavailable("leap_attention", torch.device("cpu"),
                                                                    torch.float32)

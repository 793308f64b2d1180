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
    kern = backends.kernels("leap_attention", "torch")
    real = kern.fwd
    monkeypatch.setattr(kern, "fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v, pq, pk = make_inputs(1, 5, None, 1, None, 4, 4)
    lk.leap_attention(q, k, v, pq, pk, backend="torch")
    assert calls == [1]


OPS = ["leap_attention", "leap_attention_step", "window_pool"]
CUDA = torch.device("cuda", 0)


@pytest.fixture
def cuda_and_triton(monkeypatch):
    """The selection rules for CUDA tensors, without a GPU: CUDA reported available (only the
    selection functions are called, no kernel runs), triton importable."""
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LEAPFORMER_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned", set())


@pytest.mark.parametrize("op", OPS)
def test_cuda_float64_automatic_goes_to_torch_silently(cuda_and_triton, op):
    """DESIGN section 3/4: the automatic choice sends float64 CUDA tensors to torch, without a
    warning, while the other float dtypes go to triton."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select(op, None, CUDA, torch.float64) == "torch"
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert backends.select(op, None, CUDA, dtype) == "triton", dtype


@pytest.mark.parametrize("op", OPS)
def test_cuda_float64_explicit_triton_raises(cuda_and_triton, op):
    with pytest.raises(ValueError, match="backend='triton'.*float64"):
        backends.select(op, "triton", CUDA, torch.float64)


def test_cuda_float64_env_triton_falls_back_to_torch(cuda_and_triton, monkeypatch):
    monkeypatch.setenv("LEAPFORMER_BACKEND", "triton")
    with pytest.warns(RuntimeWarning, match="float64"):
        assert backends.select("leap_attention", None, CUDA, torch.float64) == "torch"


def test_cuda_automatic_without_gpu():
    """On this machine as it is: float64 CUDA tensors go to torch silently; float32 ones fall back
    to torch with a warning when CUDA is missing (and go to triton on a GPU machine)."""
    backends.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("leap_attention", None, CUDA, torch.float64) == "torch"
    if torch.cuda.is_available():
        return
    with pytest.warns(RuntimeWarning, match="triton backend is unavailable"):
        assert backends.select("leap_attention", None, CUDA, torch.float32) == "torch"


def test_cpu_float64_automatic_never_goes_to_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even where triton can serve CPU tensors
    monkeypatch.delenv("LEAPFORMER_BACKEND", raising=False)
    assert backends.select("leap_attention", None, torch.device("cpu"), torch.float64) in \
        ("torch", "cpu")


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
        assert backends.select("leap_attention", None, torch.device("cpu"), torch.float32) == "torch"


def test_env_preference_is_honoured(monkeypatch):
    monkeypatch.setenv("LEAPFORMER_BACKEND", "torch")
    assert backends.select("leap_attention", None, torch.device("cpu"), torch.float32) == "torch"


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        backends.select("leap_attention", "triton", torch.device("cpu"), torch.float32)


def test_interpreter_lists_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = backends.unavailable("leap_attention", "triton", torch.device("cpu"), torch.float32)
    assert got is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in backends.unavailable("leap_attention", "triton", torch.device("cpu"),
                                                                    torch.float32)

"""The low-precision baseline of window_pool's parity tests (flash-attn's rule, DESIGN section 4)
and the one exemption from it.

``utils.plain_pool`` is the oracle's form run entirely in the half dtype: the half-precision
parity tests (test_window_pool.py, test_hardening_pool.py) require every backend's error to be at
most 2x its error. Triton's bfloat16 under ``TRITON_INTERPRET=1`` is exempt because the
interpreter's float32 -> bfloat16 cast truncates; the last test here checks that this is still so
(if it fails, a fixed interpreter rounds to nearest: drop the exemption in
``test_window_pool.baseline_rule`` and ``test_hardening_pool._plain``).
"""
import os

import pytest
import torch

import leapformer_kernels as lk
from utils import HALF, plain_pool, rel_err

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a test dependency
    triton = None

if triton is not None:
    @triton.jit
    def _store_kernel(x_ptr, y_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(y_ptr + i, tl.load(x_ptr + i).to(y_ptr.dtype.element_ty))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_plain_pool_runs_in_low_precision(dtype):
    """The baseline computes in dtype (sum, then quotient, rounded each): its mean is not the
    correctly rounded one (the oracle's float64 mean rounded once), and its error exceeds that."""
    x = torch.randn(2, 300, 8, dtype=torch.float64).to(dtype)
    windows = [(-200, 0), (0, 0), (3, 40)]
    for reduce in ("sum", "mean", "max"):
        base, valid = plain_pool(x, windows, reduce, dtype=dtype)
        ref, ref_valid = lk.reference.window_pool(x.double(), windows, reduce)
        assert base.dtype == dtype and torch.equal(valid, ref_valid)
        once = ref.to(dtype)  # the exact result rounded once: the best any kernel can return
        if reduce == "max":
            assert torch.equal(base, once)  # a max is exact in any dtype
        elif reduce == "mean":
            assert not torch.equal(base, once) and rel_err(base, ref) > rel_err(once, ref)
    # differentiable in x, gradients in dtype
    xg = x.clone().requires_grad_()
    base, _ = plain_pool(xg, windows, "mean", dtype=dtype)
    (dx,) = torch.autograd.grad(base, xg, torch.ones_like(base))
    assert dx.dtype == dtype and torch.isfinite(dx).all()


@pytest.mark.skipif(triton is None or not INTERPRETED or "triton" not in lk.available_backends("window_pool"),
                    reason="the exemption concerns triton under TRITON_INTERPRET=1")
def test_interpreter_bfloat16_cast_truncates():
    """Why triton's bfloat16 is exempt from the 2x rule under the interpreter: its float32 ->
    bfloat16 cast drops the low 16 bits (round toward zero) where torch (and a GPU) rounds to
    nearest even, which doubles the RMS rounding error; its float16 cast rounds to nearest."""
    n = 4096
    x = torch.randn(n)
    y = torch.empty(n, dtype=torch.bfloat16)
    _store_kernel[(1,)](x, y, n)
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(y, truncated), "the interpreter now rounds bfloat16: drop the exemption"
    ratio = rel_err(y, x.double()) / rel_err(x.to(torch.bfloat16), x.double())
    assert 1.8 < ratio < 2.2
    h = torch.empty(n, dtype=torch.float16)
    _store_kernel[(1,)](x, h, n)
    assert torch.equal(h, x.to(torch.float16))

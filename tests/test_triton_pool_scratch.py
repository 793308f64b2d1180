"""Scratch memory of the Triton window_pool kernels (issue 18), without a GPU.

``triton_pool.scratch_bytes`` states what one ``fwd`` / ``bwd`` call allocates beyond its inputs and
outputs. The max path stays under 128 MiB each way at B=4, T=8192, D=1024 with dyadic_windows(8)
(before: two [B, 2T, D] float32 + int32 tables forward, about 1 GiB; int32 run ends st, en
[B, T, NW, D] and a float32 prefix of the gradient [B, T, NW*D] backward, about 3 GiB): the
backward runs in chunks of (sequences, windows, columns) (``bwd_plan``), summing dx over window
groups in a float32 buffer in the same order as in one piece, so any chunking gives the same bits.
An interpreted run must allocate exactly what ``scratch_bytes`` says (every storage created
between the inputs and the outputs, recorded with a ``TorchDispatchMode``), and the chunked
backward must match the unchunked one bit for bit (ties, NaN, shapes that are no block multiple).
"""
import pytest
import torch

import leapformer_kernels as lk
from utils import assert_close, ScratchRecorder

tp = pytest.importorskip("leapformer_kernels.pooling.triton_pool")
pytestmark = pytest.mark.skipif("triton" not in lk.available_backends("window_pool"),
                                reason="triton backend not available")

MiB = 2 ** 20
NAN = float("nan")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_anchor_scratch_under_cap():
    """B=4, T=8192, D=1024, dyadic_windows(8): the max forward and backward and the sum / mean
    backward under 128 MiB (independent of the number of windows); the sum / mean forward holds
    one float32 prefix of x (O(B * T * D), no window factor)."""
    B, T, D = 4, 8192, 1024
    for nw in (8, 13):
        wins = lk.dyadic_windows(nw)
        for reduce in ("sum", "mean", "max"):
            assert tp.scratch_bytes(B, T, D, wins, reduce, backward=True) <= 128 * MiB, (nw, reduce)
        assert tp.scratch_bytes(B, T, D, wins, "max") <= 128 * MiB
        assert tp.scratch_bytes(B, T, D, wins, "sum") <= 4 * B * T * D * 1.05
    wins = lk.dyadic_windows(8)
    plan = tp.bwd_plan(B, T, D, 8, "max")
    assert (plan["BC"], plan["WC"]) == (B, 1) and plan["DC"] % tp.OUT_BD == 0
    # before: st, en int32 [B, T, NW, D] + the float32 prefix of grad (+ its block carries)
    before = B * T * 8 * D * 12
    assert tp.scratch_bytes(B, T, D, wins, "max", backward=True) < before / 25


B, T, D = 2, 100, 70
WINDOWS = [(-3, 0), (1, 1), (-90, -88), (-70, 0), (95, 200)]  # longest 71; (95, 200) mostly outside
NW = len(WINDOWS)
UNIT = {"max": 4 * T + 20 + 8 * T, "sum": 4 * T + 20, "mean": 4 * T + 20}  # bytes per (sequence, window,
# column): the prefix of the gradient (Q, Bs, Cr, S; one block at T = 100), for max the run ends st, en


def caps(reduce):
    """BWD_SCRATCH per regime: every chunk at once; 2 windows of everything; one window of 64
    columns of every sequence; one window of 64 columns of one sequence (the float32 running sum
    of dx, 4 * T per (sequence, column), with them)."""
    u = UNIT[reduce]
    return {"one_chunk": B * D * NW * u, "windows": B * D * (2 * u + 4 * T), "columns": B * 64 * (u + 4 * T),
            "sequences": 64 * (u + 4 * T)}


PLANS = {"one_chunk": (B, NW, D), "windows": (B, 2, D), "columns": (B, 1, 64), "sequences": (1, 1, 64)}


def _tie_input(dtype=torch.float32):
    x = torch.randint(-2, 3, (B, T, D)).to(dtype)  # many equal maxima: the argmax takes the first
    x[0, 40, 3] = NAN
    x[0, 43, 3] = NAN  # two NaNs: the first takes the gradient
    x[-1, 70, 66] = NAN  # in the second column chunk
    return x


@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("regime", list(PLANS))
def test_bwd_plan_regimes(monkeypatch, regime, reduce):
    monkeypatch.setattr(tp, "BWD_SCRATCH", caps(reduce)[regime])
    plan = tp.bwd_plan(B, T, D, NW, reduce)
    assert (plan["BC"], plan["WC"], plan["DC"]) == PLANS[regime]
    assert plan["groups"] == -(-NW // plan["WC"]) and plan["unit"] == UNIT[reduce]
    assert plan["scratch"] <= caps(reduce)[regime]


@pytest.mark.parametrize("regime", ["one_chunk", "sequences"])
def test_interpreted_run_allocates_what_scratch_bytes_says(monkeypatch, regime):
    """Every storage created by fwd / bwd beyond inputs and outputs, for every reduce, with the
    backward in one piece or in chunks (one window of 64 columns of one sequence: window groups
    with their float32 running sum, column and sequence chunks), and the max forward's table in
    one piece or in chunks."""
    monkeypatch.setattr(tp, "ST_SCRATCH", 2 * 8 * (T + 64) * 64 if regime == "sequences" else tp.ST_SCRATCH)
    x = _tie_input().to(_device())
    for reduce in ("sum", "mean", "max"):
        monkeypatch.setattr(tp, "BWD_SCRATCH", caps(reduce)[regime])
        for with_argmax in ((False, True) if reduce == "max" else (False,)):
            with ScratchRecorder([x]) as rec:
                outs = tp.fwd(x, WINDOWS, reduce, with_argmax)
            assert rec.scratch(outs) == tp.scratch_bytes(B, T, D, WINDOWS, reduce), (reduce, with_argmax)
        g = torch.randn(outs[0].shape, device=x.device)
        with ScratchRecorder([x, g, outs[2]]) as rec:
            dx = tp.bwd(g, T, WINDOWS, reduce, outs[2])
        expected = tp.scratch_bytes(B, T, D, WINDOWS, reduce, backward=True)
        assert rec.scratch([dx]) == expected, reduce
        assert expected > 0
    assert tp.st_plan(B, T, D, tp.clamp_windows(WINDOWS, T))["BC"] == (1 if regime == "sequences" else B)


def _grads(monkeypatch, x, reduce, g, cap):
    monkeypatch.setattr(tp, "BWD_SCRATCH", cap)
    xk = x.clone().to(_device()).requires_grad_()
    pooled, _ = lk.window_pool(xk, WINDOWS, reduce, backend="triton")
    pooled.backward(g.to(_device()))
    return pooled.detach().cpu(), xk.grad.cpu()


@pytest.mark.parametrize("reduce", ["max", "sum", "mean"])
def test_chunked_backward_bitwise(monkeypatch, reduce):
    """Window groups, column chunks (64 + 6 columns) and sequence chunks give dx bit for bit as
    one piece (the float32 sum over windows runs in the same order), which matches the float64
    oracle: ties and NaN to the first index, T and D no block multiples."""
    torch.manual_seed(0)
    x = _tie_input() if reduce == "max" else torch.randn(B, T, D)
    g = torch.randn(B, T, NW, D)
    pooled, dx = _grads(monkeypatch, x, reduce, g, caps(reduce)["one_chunk"])
    xr = x.double().requires_grad_()
    ref, _ = lk.reference.window_pool(xr, WINDOWS, reduce)
    ref.backward(g.double())
    torch.testing.assert_close(pooled.double(), ref.detach(), rtol=0 if reduce == "max" else 1e-5,
                               atol=0 if reduce == "max" else 1e-5, equal_nan=True)
    assert_close(dx, xr.grad, torch.float32, "dx", factor=2)
    regimes = ["windows", "sequences"] if reduce == "max" else ["windows"]  # sequences: also columns
    for regime in regimes:
        _, dxc = _grads(monkeypatch, x, reduce, g, caps(reduce)[regime])
        assert torch.equal(dxc, dx), regime


def test_chunked_backward_half(monkeypatch):
    """float16: the running sum of the window groups stays float32, dx is rounded once."""
    x = _tie_input(torch.float16)
    g = torch.randn(B, T, NW, D).half()
    _, dx = _grads(monkeypatch, x, "max", g, caps("max")["one_chunk"])
    _, dxc = _grads(monkeypatch, x, "max", g, caps("max")["windows"])
    assert dx.dtype == torch.float16 and torch.equal(dxc, dx)

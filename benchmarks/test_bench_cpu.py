"""pytest-benchmark tests of the CPU paths, kept out of the default test run:

    python -m pytest benchmarks/ --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import leapformer_kernels as lk

from .attention import make

CPU_BACKENDS = [b for b in lk.available_backends() if b in ("torch", "cpu")]
T = 2048


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leap_fwd_bwd(benchmark, backend):
    ins = make(1, T, 8, 64, torch.float32, torch.device("cpu"), grad=True)

    def run():
        lk.leap_attention(*ins, backend=backend).sum().backward()

    benchmark(run)


def test_sdpa_fwd_bwd(benchmark):
    q, k, v, _, _ = make(1, T, 8, 64, torch.float32, torch.device("cpu"), grad=True)

    def run():
        F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True).sum().backward()

    benchmark(run)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_step(benchmark, backend):
    q, k, v, pq, pk = make(8, 1, 8, 64, torch.float32, torch.device("cpu"), grad=False)
    state = (torch.rand(8, 8, 128, 64), torch.rand(8, 8, 128))
    benchmark(lambda: lk.leap_attention_step(q, k, v, pq, pk, state, backend=backend))


@pytest.mark.parametrize("backend", [b for b in lk.available_backends("window_pool") if b in ("torch", "cpu")])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_window_pool(benchmark, backend, reduce):
    x = torch.randn(2, 4096, 256)
    benchmark(lambda: lk.window_pool(x, lk.dyadic_windows(8), reduce, backend=backend))

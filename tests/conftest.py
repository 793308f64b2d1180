"""Shared fixtures: every test that takes ``backend`` runs once per available backend.

Without a GPU the Triton kernels run through the interpreter (``TRITON_INTERPRET=1``, set
here before triton is imported). During tests ``torch.empty`` / ``empty_like`` return
NaN-filled floating tensors, so an output element that a kernel forgets to write fails loudly.
"""
import os

if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    import torch as _torch_probe  # noqa: E402

    if not _torch_probe.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import leapformer_kernels as lk  # noqa: E402

BACKENDS = lk.available_backends()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the full grid (run with -m slow)")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _nan_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            try:
                t.fill_(float("nan"))
            except RuntimeError:
                pass
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

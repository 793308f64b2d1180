"""Shared fixtures: every test that takes ``backend`` runs once per available backend.

Without a GPU the Triton kernels run through the interpreter (``TRITON_INTERPRET=1``, set
here before triton is imported). During tests ``torch.empty`` / ``empty_like`` /
``empty_strided`` and ``Tensor.new_empty`` / ``new_empty_strided`` return NaN-filled floating
tensors, so an output element that a kernel forgets to write fails loudly.

Backends that must be there: the names in ``LEAPFORMER_REQUIRE_BACKENDS`` (comma list; default
``torch,cpu,triton`` when ``CI=true``, else none). A required backend that is unavailable (a
failed C++ build, a broken triton import) ends the session at startup with a one-line reason,
instead of silently dropping its test cases.

Threads: each test gets back the thread count it started with (``train()`` sets its own), and
tests whose name contains "determin" run on 2 threads, so the C++ kernels' parallel paths are
what the determinism tests compare.
"""
import functools
import os

if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    import torch as _torch_probe  # noqa: E402

    if not _torch_probe.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import leapformer_kernels as lk  # noqa: E402
from utils import missing_backends, required_backends  # noqa: E402

BACKENDS = lk.available_backends()
SESSION_THREADS = torch.get_num_threads()
DETERMINISM_THREADS = 2


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the full grid (run with -m slow)")
    try:
        required = required_backends()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    missing = missing_backends(required)
    if missing:
        why = "; ".join(f"{name}: {reason}" for name, reason in missing.items())
        raise pytest.UsageError(f"required backend(s) unavailable (LEAPFORMER_REQUIRE_BACKENDS="
                                f"{','.join(required)}): {why}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


_NAN_FACTORIES = ((torch, ("empty", "empty_like", "empty_strided")),
                  (torch.Tensor, ("new_empty", "new_empty_strided")))


def _nan_filled(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            try:
                with torch.no_grad():
                    t.fill_(float("nan"))
            except RuntimeError:
                pass
        return t

    return make


@pytest.fixture(autouse=True)
def _nan_empty(monkeypatch):
    for owner, names in _NAN_FACTORIES:
        for name in names:
            monkeypatch.setattr(owner, name, _nan_filled(getattr(owner, name)))
    yield


@pytest.fixture(autouse=True)
def _threads(request):
    """Restore the thread count after each test; 2 threads for the determinism tests."""
    before = torch.get_num_threads()
    if "determin" in request.node.name:
        torch.set_num_threads(DETERMINISM_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after. For tests that train tiny models for
    many steps: threads gain nothing there, and on a shared 2-core runner OpenMP threads waiting
    for descheduled peers made test_loss_decreases ~40x slower at 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

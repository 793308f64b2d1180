"""Backend selection and the kernel table (DESIGN section 3).

Three backends: ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cpu``
(C++ kernels for CPU tensors), ``torch`` (anywhere). ``KERNELS`` maps (op family, backend) to the
family's kernel module, which provides the family's interface (``attention/op.py``,
``pooling/op.py``) and says itself whether it can run: ``unavailable(device, dtype) -> str | None``.
Kernel modules are imported on first use by name, so the op modules import this one and never the
reverse (no import cycle).

Selection: the ``backend=`` argument (raises ``ValueError`` if it cannot serve), else the
``LEAPFORMER_BACKEND`` environment variable (a preference: falls back to torch with one
warning), else automatic by device (falls back to torch with one warning naming the cause).
"""
import importlib
import os
import warnings
from types import ModuleType
from typing import List, Optional

import torch

from ._validate import BACKEND_NAMES

FAMILY = {"leap_attention": "attention", "leap_attention_step": "attention", "window_pool": "pooling"}
KERNELS = {
    ("attention", "torch"): "attention.torch_chunk",
    ("attention", "cpu"): "attention.cpu",
    ("attention", "triton"): "attention.triton_chunk",
    ("pooling", "torch"): "pooling.torch_prefix",
    ("pooling", "cpu"): "pooling.cpu",
    ("pooling", "triton"): "pooling.triton_pool",
}
_warned = set()
_chosen = {}
_loaded = {}


def kernels(op: str, backend: str) -> ModuleType:
    """The kernel module of ``backend`` for ``op`` (an op name or a family: "attention", "pooling"),
    imported on first use and then looked up (the decode step calls this once per token)."""
    key = (FAMILY.get(op, op), backend)
    mod = _loaded.get(key)
    if mod is None:
        mod = _loaded[key] = importlib.import_module(f"{__package__}.{KERNELS[key]}")
    return mod


def unavailable(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if ``backend`` can run ``op`` on ``device`` / ``dtype`` tensors, else the reason."""
    try:
        return kernels(op, backend).unavailable(device, dtype)
    except ImportError as e:  # an optional backend's missing package is a reason, not a crash
        if (e.name or "").split(".")[0] == "triton":
            return "triton is not installed"
        return f"{type(e).__name__}: {e}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _automatic(device: torch.device, dtype: torch.dtype) -> List[str]:
    if device.type == "cuda":
        return [] if dtype == torch.float64 else ["triton"]  # float64 goes to torch, silently
    if device.type == "cpu":
        return ["cpu"]
    return []


def select(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The name of the backend that runs ``op`` on tensors of ``device`` / ``dtype``."""
    if backend is not None:
        reason = unavailable(op, backend, device, dtype)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {op} on {device} {dtype} tensors: {reason}")
        return backend
    pref = os.environ.get("LEAPFORMER_BACKEND")
    if pref:
        if pref not in BACKEND_NAMES:
            _warn_once(f"LEAPFORMER_BACKEND={pref!r} is not one of {BACKEND_NAMES}; using torch")
            return "torch"
        reason = unavailable(op, pref, device, dtype)
        if reason is None:
            return pref
        _warn_once(f"LEAPFORMER_BACKEND={pref!r} cannot run {op} here ({reason}); falling back to torch")
        return "torch"
    for name in _automatic(device, dtype):
        reason = unavailable(op, name, device, dtype)
        if reason is None:
            return name
        _warn_once(f"leapformer_kernels: the {name} backend is unavailable ({reason}); "
                   "falling back to the torch backend")
    return "torch"


_ENV_NAMES = ("LEAPFORMER_BACKEND", "TRITON_INTERPRET")  # what select() reads from the environment
try:  # CPython's os.environ: a mapping of encoded names to encoded values (_data) kept in step with it
    _ENV_KEYS = tuple(os.environ.encodekey(n) for n in _ENV_NAMES)
except AttributeError:  # pragma: no cover
    _ENV_KEYS = None


def _env_state():
    """The variables ``select`` reads, as a memo key, read on every call (they may change between
    calls). From ``os.environ``'s encoded mapping where it has one: two dict lookups, against
    about 1 us for each ``os.environ.get`` (which decodes); distinct values stay distinct."""
    if not torch.compiler.is_compiling() and _ENV_KEYS is not None and type(os.environ) is os._Environ:
        data = os.environ._data
        return data.get(_ENV_KEYS[0]), data.get(_ENV_KEYS[1])
    return os.environ.get(_ENV_NAMES[0]), os.environ.get(_ENV_NAMES[1])


def choose(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """``select``, evaluated once per trace under torch.compile, and memoised per (arguments,
    environment) in eager mode (the decode step is latency-bound)."""
    return _choose_cached(op, backend, device.type, device.index, dtype, _env_state())


@torch._dynamo.assume_constant_result
def _choose_cached(op, backend, device_type, device_index, dtype, env) -> str:
    key = (op, backend, device_type, device_index, dtype, env)
    name = _chosen.get(key)
    if name is None:
        name = _chosen[key] = select(op, backend, torch.device(device_type, device_index), dtype)
    return name


def reset() -> None:
    """Forget memoised choices and the warnings already given (for tests, or after a rebuild)."""
    _chosen.clear()
    _warned.clear()


def available_backends(op: str = "leap_attention") -> List[str]:
    """Backends that can run ``op`` (float32) on this machine, e.g. ["torch", "cpu", "triton"]."""
    probes = {"torch": torch.device("cpu"), "cpu": torch.device("cpu"),
              "triton": torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")}
    return [name for name in BACKEND_NAMES if unavailable(op, name, probes[name], torch.float32) is None]

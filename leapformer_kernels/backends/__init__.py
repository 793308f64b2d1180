"""Backend registry and selection (DESIGN section 3).

Three backends: ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cpu``
(C++ kernels for CPU tensors), ``torch`` (anywhere). Each backend module provides
``unavailable(op, device, dtype) -> str | None`` and its kernel modules
``attention_kernels()`` and ``pool_kernels()`` (interfaces in attention/op.py, pooling/op.py).

Selection: the ``backend=`` argument (raises ``ValueError`` if it cannot serve), else the
``LEAPFORMER_BACKEND`` environment variable (a preference: falls back to torch with one
warning), else automatic by device (falls back to torch with one warning naming the cause).
"""
import importlib
import os
import warnings
from typing import List, Optional

import torch

from .._validate import BACKEND_NAMES

_MODULES = {"torch": "torch_backend", "cpu": "cpu_backend", "triton": "triton_backend"}
_warned = set()
_chosen = {}


def get(name: str):
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def _reason(name: str, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    try:
        return get(name).unavailable(op, device, dtype)
    except Exception as e:  # an import error of an optional backend is a reason, not a crash
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


def select(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype):
    """Return the backend module that runs ``op`` on tensors of ``device`` / ``dtype``."""
    if backend is not None:
        reason = _reason(backend, op, device, dtype)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run {op} on {device} {dtype} tensors: {reason}")
        return get(backend)
    pref = os.environ.get("LEAPFORMER_BACKEND")
    if pref:
        if pref not in BACKEND_NAMES:
            _warn_once(f"LEAPFORMER_BACKEND={pref!r} is not one of {BACKEND_NAMES}; using torch")
            return get("torch")
        reason = _reason(pref, op, device, dtype)
        if reason is None:
            return get(pref)
        _warn_once(f"LEAPFORMER_BACKEND={pref!r} cannot run {op} here ({reason}); falling back to torch")
        return get("torch")
    for name in _automatic(device, dtype):
        reason = _reason(name, op, device, dtype)
        if reason is None:
            return get(name)
        _warn_once(f"leapformer_kernels: the {name} backend is unavailable ({reason}); "
                   "falling back to the torch backend")
    return get("torch")


def choose(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The name of the backend that runs ``op``; evaluated once per trace under torch.compile,
    and memoised per (arguments, environment) in eager mode (the decode step is latency-bound)."""
    env = (os.environ.get("LEAPFORMER_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    return _choose_cached(op, backend, device.type, device.index, dtype, env)


@torch._dynamo.assume_constant_result
def _choose_cached(op, backend, device_type, device_index, dtype, env) -> str:
    key = (op, backend, device_type, device_index, dtype, env)
    if key not in _chosen:
        mod = select(op, backend, torch.device(device_type, device_index), dtype)
        _chosen[key] = next(name for name, m in _MODULES.items() if mod.__name__.endswith(m))
    return _chosen[key]


def reset() -> None:
    """Forget memoised choices and the warnings already given (for tests, or after a rebuild)."""
    _chosen.clear()
    _warned.clear()


def available_backends(op: str = "leap_attention") -> List[str]:
    """Backends that can run ``op`` (float32) on this machine, e.g. ["torch", "cpu", "triton"]."""
    out = []
    probes = {"torch": torch.device("cpu"), "cpu": torch.device("cpu"),
              "triton": torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")}
    for name in BACKEND_NAMES:
        if _reason(name, op, probes[name], torch.float32) is None:
            out.append(name)
    return out

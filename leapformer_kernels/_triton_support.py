"""Whether the Triton kernels can run here, answered without importing triton (so that a missing
triton is a reason, not an ImportError). Shared by every family's Triton kernel module."""
import importlib.util
import os
from typing import Optional

import torch


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton runs the kernels on the CPU, as CI does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if the Triton kernels can run on ``device`` / ``dtype`` tensors, else the reason."""
    try:
        missing = importlib.util.find_spec("triton") is None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        missing = True
    if missing:
        return "triton is not installed"
    if device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
    if device.type not in ("cuda", "cpu"):
        return f"the triton backend serves CUDA tensors, got {device}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if dtype == torch.float64:
        return "float64 is not supported by the Triton kernels (use backend='torch' or 'cpu')"
    return None

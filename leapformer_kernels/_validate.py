"""Argument validation shared by every backend.

Every public op validates its arguments here, before a backend is chosen, so the same bad
input gives the same error whatever backend would have run. Checks that read tensor
*values* (``cu_seqlens``) run eagerly only: they are skipped under fake tensors and while
``torch.compile`` traces.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKEND_NAMES = ("torch", "cpu", "triton")
REDUCES = ("sum", "mean", "max")
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1  # window offsets (the custom ops take int64 lists)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / state dtype for inputs of ``dtype``: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TINY32, _TINY64 = torch.finfo(torch.float32).tiny, torch.finfo(torch.float64).tiny  # state dtypes' smallest normals


def effective_eps(eps: float, dtype: torch.dtype) -> float:
    """The clamp actually applied: ``eps``, but at least the smallest normal number of the state
    dtype, so that ``eps=0`` gives 0 (not 0/0 = NaN) where no key is visible."""
    return max(float(eps), _TINY64 if dtype == torch.float64 else _TINY32)


def _is_fake(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, (FakeTensor, FunctionalTensor)) or t.device.type == "meta"


def _tensor(x, name: str, ndim: Optional[int] = None, what: str = "") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {what}, got shape {tuple(x.shape)}")
    return x


def _floating(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_backend(backend) -> None:
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {backend!r}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    # Comparisons, not ``math.isfinite``: under ``torch.compile(dynamic=True)`` a Python float
    # argument is traced as a SymFloat, on which ``math.isfinite`` is a graph break, while a
    # comparison is a guard. NaN fails both comparisons.
    if not (eps >= 0 and eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


@dataclass(frozen=True)
class AttnDims:
    """Sizes of a validated attention call."""

    B: int
    T: int
    S: int
    H: int
    Hkv: int
    Dk: int
    Dv: int
    num_seqs: int  # batch size of the state: B, or N with cu_seqlens


def check_qkvp(q, k, v, pq, pk) -> AttnDims:
    """Ranks, dtypes, devices and matching shapes of q, k, v, pq, pk (see DESIGN section 2)."""
    q = _tensor(q, "q", 4, "[B, T, H, Dk]")
    k = _tensor(k, "k", 4, "[B, S, Hkv, Dk]")
    v = _tensor(v, "v", 4, "[B, S, Hkv, Dv]")
    pq = _tensor(pq, "pq", 3, "[B, T, H]")
    pk = _tensor(pk, "pk", 3, "[B, S, Hkv]")
    _floating(q, "q")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _floating(t, name)
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k, v must share a dtype")
    for name, t in (("pq", pq), ("pk", pk)):
        if t.dtype not in (q.dtype, torch.float32, torch.float64):
            _floating(t, name)
            raise TypeError(f"{name} has dtype {t.dtype}; expected q's dtype ({q.dtype}) or float32")
    dev = q.device
    for name, t in (("k", k), ("v", v), ("pq", pq), ("pk", pk)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but q is on {dev}: all tensors must share a device")
    B, T, H, Dk = q.shape
    _, S, Hkv, _ = k.shape
    Dv = v.shape[3]
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {B}")
    if k.shape[3] != Dk:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {Dk}")
    if v.shape[0] != B or v.shape[1] != S or v.shape[2] != Hkv:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [B, S, Hkv, Dv] = [{B}, {S}, {Hkv}, Dv] "
                         f"to match k {tuple(k.shape)}")
    if min(T, S, H, Hkv, Dk, Dv) < 1:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must have "
                         "no empty dimension (T, S, H, Hkv, Dk, Dv >= 1)")
    if H % Hkv != 0:
        raise ValueError(f"k has {Hkv} heads, which does not divide the {H} heads of q (MQA/GQA needs Hkv | H)")
    if tuple(pq.shape) != (B, T, H):
        raise ValueError(f"pq has shape {tuple(pq.shape)}; expected [B, T, H] = {[B, T, H]} from q")
    if tuple(pk.shape) != (B, S, Hkv):
        raise ValueError(f"pk has shape {tuple(pk.shape)}; expected [B, S, Hkv] = {[B, S, Hkv]} from k")
    return AttnDims(B, T, S, H, Hkv, Dk, Dv, B)


def check_cu_seqlens(cu_seqlens, dims: AttnDims, causal: bool) -> int:
    """Returns the number of sequences N. Value checks run eagerly only."""
    cu = _tensor(cu_seqlens, "cu_seqlens", 1, "[N + 1]")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu.dtype}")
    if cu.numel() < 2:
        raise ValueError(f"cu_seqlens must hold N + 1 >= 2 offsets, got {cu.numel()}")
    if dims.B != 1:
        raise ValueError(f"cu_seqlens needs q, k, v packed with batch size 1, got q with batch size {dims.B}")
    if dims.S != dims.T:
        raise ValueError(f"cu_seqlens needs k of the same length as q (packed sequences), got S={dims.S} and T={dims.T}")
    if not _is_fake(cu):
        c = cu.detach().to("cpu", torch.int64)
        if int(c[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(c[0])}")
        if bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {c.tolist()}")
        if int(c[-1]) != dims.T:
            raise ValueError(f"cu_seqlens must end at the total length T={dims.T} of q, got {int(c[-1])}")
    return cu.numel() - 1


def check_state(state, name: str, n: int, dims: AttnDims, device) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{name} must be a pair (S, z) of tensors, got {type(state).__name__}")
    S, z = state
    S = _tensor(S, f"{name}[0] (S)", 4, "[B or N, H, 2*Dk, Dv]")
    z = _tensor(z, f"{name}[1] (z)", 3, "[B or N, H, 2*Dk]")
    _floating(S, f"{name}[0] (S)")
    _floating(z, f"{name}[1] (z)")
    want_S = (n, dims.H, 2 * dims.Dk, dims.Dv)
    want_z = (n, dims.H, 2 * dims.Dk)
    if tuple(S.shape) != want_S:
        raise ValueError(f"{name}[0] (S) has shape {tuple(S.shape)}; expected {list(want_S)} "
                         "= [B or N, H, 2*Dk, Dv] from q, v (and cu_seqlens)")
    if tuple(z.shape) != want_z:
        raise ValueError(f"{name}[1] (z) has shape {tuple(z.shape)}; expected {list(want_z)} = [B or N, H, 2*Dk]")
    for t, nm in ((S, f"{name}[0] (S)"), (z, f"{name}[1] (z)")):
        if t.device != device:
            raise ValueError(f"{nm} is on {t.device} but q is on {device}")


def check_num_visible_keys(n, dims: AttnDims, causal: bool, cu_seqlens, device) -> None:
    """``num_visible_keys``: int [B, T] or [T], non-decreasing along t, values in [0, S]; not with
    ``causal=True`` nor ``cu_seqlens``. Value checks run eagerly only (the op clamps under fake tensors)."""
    if causal:
        raise ValueError("num_visible_keys cannot be combined with causal=True: it replaces the causal rule "
                         "(query t sees keys 0 .. n[t]-1); pass causal=False")
    if cu_seqlens is not None:
        raise ValueError("num_visible_keys cannot be combined with cu_seqlens (packed sequences); "
                         "pad the batch instead")
    if not isinstance(n, torch.Tensor):
        raise TypeError(f"num_visible_keys must be an int tensor [B, T] or [T], got {type(n).__name__}")
    if n.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"num_visible_keys must have dtype int32 or int64, got {n.dtype}")
    if tuple(n.shape) not in ((dims.B, dims.T), (dims.T,)):
        raise ValueError(f"num_visible_keys has shape {tuple(n.shape)}; expected [B, T] = {[dims.B, dims.T]} "
                         f"or [T] = [{dims.T}] from q")
    if n.device != device:
        raise ValueError(f"num_visible_keys is on {n.device} but q is on {device}")
    if _is_fake(n) or n.numel() == 0:
        return
    c = n.detach()
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi > dims.S:
        raise ValueError(f"num_visible_keys must lie in [0, S] = [0, {dims.S}] (S = the number of keys), "
                         f"got values in [{lo}, {hi}]")
    if c.shape[-1] > 1 and bool((c[..., 1:] < c[..., :-1]).any()):
        raise ValueError("num_visible_keys must be non-decreasing along t (query t + 1 sees at least the keys "
                         "query t sees)")


def check_attention(q, k, v, pq, pk, *, causal, block_size, key_padding_mask, cu_seqlens,
                    initial_state, output_final_state, eps, normalize, backend,
                    num_visible_keys=None) -> AttnDims:
    """Validate every argument of ``leap_attention``; returns the sizes."""
    dims = check_qkvp(q, k, v, pq, pk)
    for name, flag in (("causal", causal), ("output_final_state", output_final_state), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _check_eps(eps)
    check_backend(backend)
    if causal and dims.S != dims.T:
        raise ValueError(f"causal=True needs k of the same length as q: got k length S={dims.S}, "
                         f"q length T={dims.T} (use causal=False for cross-attention)")
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int or None, got {type(block_size).__name__}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not causal:
            raise ValueError("block_size needs causal=True (block-causal attention); got causal=False")
    if key_padding_mask is not None:
        m = _tensor(key_padding_mask, "key_padding_mask", 2, "[B, S]")
        if m.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padded), got {m.dtype}")
        if tuple(m.shape) != (dims.B, dims.S):
            raise ValueError(f"key_padding_mask has shape {tuple(m.shape)}; expected [B, S] = {[dims.B, dims.S]} from k")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask is on {m.device} but q is on {q.device}")
    n = dims.B
    if cu_seqlens is not None:
        n = check_cu_seqlens(cu_seqlens, dims, causal)
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if num_visible_keys is not None:
        check_num_visible_keys(num_visible_keys, dims, causal, cu_seqlens, q.device)
    if initial_state is not None:
        check_state(initial_state, "initial_state", n, dims, q.device)
    return AttnDims(dims.B, dims.T, dims.S, dims.H, dims.Hkv, dims.Dk, dims.Dv, n)


def check_step(q, k, v, pq, pk, state, *, eps, normalize, backend) -> AttnDims:
    """Validate the arguments of ``leap_attention_step``."""
    dims = check_qkvp(q, k, v, pq, pk)
    if dims.S != dims.T:
        raise ValueError(f"leap_attention_step needs k with the same number of new tokens as q: "
                         f"got k with {dims.S}, q with {dims.T}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    _check_eps(eps)
    check_backend(backend)
    if state is not None:
        check_state(state, "state", dims.B, dims, q.device)
    return dims


_Tensor = torch.Tensor
_FLOATS = frozenset(FLOAT_DTYPES)
_P_DTYPES = (torch.float32, torch.float64)


def _same_device(q, ts) -> bool:
    if q.is_cpu:  # one CPU device: no torch.device objects built (the decode step's common case)
        for t in ts:
            if not t.is_cpu:
                return False
        return True
    dev = q.device
    for t in ts:
        if t.device != dev:
            return False
    return True


def step_args_ok(q, k, v, pq, pk, state, eps, normalize, backend) -> bool:
    """True only when ``check_step`` would accept these arguments: the decode step's fast path
    (a few attribute reads). It accepts a subset of what ``check_step`` accepts (plain tensors,
    float eps); for anything else, bad or merely unusual, it returns False and the caller runs
    ``check_step``, which raises its usual error."""
    if (type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor or type(pq) is not _Tensor
            or type(pk) is not _Tensor or type(normalize) is not bool or type(eps) is not float
            or not (0.0 <= eps < math.inf) or (backend is not None and backend not in BACKEND_NAMES)):
        return False
    dt = q.dtype
    if (dt not in _FLOATS or k.dtype is not dt or v.dtype is not dt
            or (pq.dtype is not dt and pq.dtype not in _P_DTYPES) or (pk.dtype is not dt and pk.dtype not in _P_DTYPES)):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return False
    B, T, H, Dk = qs
    Hkv, Dv = ks[2], vs[3]
    if (ks[0] != B or ks[1] != T or ks[3] != Dk or vs[0] != B or vs[1] != T or vs[2] != Hkv
            or T < 1 or H < 1 or Hkv < 1 or Dk < 1 or Dv < 1 or H % Hkv
            or pq.shape != (B, T, H) or pk.shape != (B, T, Hkv)):
        return False
    if state is None:
        return _same_device(q, (k, v, pq, pk))
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        return False
    S, z = state
    if (type(S) is not _Tensor or type(z) is not _Tensor or S.dtype not in _FLOATS or z.dtype not in _FLOATS
            or S.shape != (B, H, 2 * Dk, Dv) or z.shape != (B, H, 2 * Dk)):
        return False
    return _same_device(q, (k, v, pq, pk, S, z))


def check_step_inplace(q, k, v, pq, pk, state, state_indices, *, eps, normalize, backend) -> AttnDims:
    """Validate the arguments of ``leap_attention_step_`` (the in-place step on a state pool)."""
    dims = check_step(q, k, v, pq, pk, None, eps=eps, normalize=normalize, backend=backend)
    if state is None:
        raise ValueError("leap_attention_step_ needs state=(S, z): the preallocated pool it updates "
                         "(S [N, H, 2*Dk, Dv], z [N, H, 2*Dk], float32); use leap_attention_step for a fresh state")
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"state must be a pair (S, z) of tensors, got {type(state).__name__}")
    S = _tensor(state[0], "state[0] (S)", 4, "[N, H, 2*Dk, Dv]")
    n = S.shape[0]
    check_state(state, "state", n, dims, q.device)
    for t, nm in ((state[0], "state[0] (S)"), (state[1], "state[1] (z)")):
        if t.dtype != torch.float32:
            raise ValueError(f"{nm} must be float32 (the pool is updated in place), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{nm} must be contiguous (the pool is updated in place); allocate it with torch.zeros")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{nm} requires grad: leap_attention_step_ is inference-only "
                             "(use leap_attention_step, or torch.no_grad())")
    if state[0].data_ptr() == state[1].data_ptr() and state[0].numel() and state[1].numel():
        raise ValueError("state[0] (S) and state[1] (z) must not share memory")
    for t, nm in ((q, "q"), (k, "k"), (v, "v"), (pq, "pq"), (pk, "pk")):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{nm} requires grad: leap_attention_step_ is inference-only "
                             "(use leap_attention_step, or torch.no_grad())")
    if state_indices is None:
        if n != dims.B:
            raise ValueError(f"state holds {n} rows but q has batch {dims.B}: pass state_indices "
                             f"(int [{dims.B}], the pool row of each batch row)")
        return dims
    if not isinstance(state_indices, torch.Tensor):
        raise TypeError(f"state_indices must be an int tensor [B], got {type(state_indices).__name__}")
    if state_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state_indices must be int32 or int64, got {state_indices.dtype}")
    if tuple(state_indices.shape) != (dims.B,):
        raise ValueError(f"state_indices must have shape [{dims.B}] (one pool row per batch row), "
                         f"got {tuple(state_indices.shape)}")
    if state_indices.device != q.device:
        raise ValueError(f"state_indices is on {state_indices.device} but q is on {q.device}")
    capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if dims.B and not capturing:  # values: a host sync on CUDA, skipped inside a CUDA-graph capture
        lo, hi = int(state_indices.min()), int(state_indices.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"state_indices must lie in [0, {n}) (the pool's rows), got values in [{lo}, {hi}]")
        if torch.unique(state_indices).numel() != dims.B:
            raise ValueError("state_indices must not repeat a row (two batch rows would update the same state)")
    return dims


def check_wait_k(num_queries, num_keys, lag, rate) -> None:
    for name, val in (("num_queries", num_queries), ("num_keys", num_keys), ("lag", lag)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        if val < 0:
            raise ValueError(f"{name} must be >= 0, got {val}")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"rate must be a float (source tokens per target token), got {type(rate).__name__}")
    if not (0 <= rate < math.inf):
        raise ValueError(f"rate must be a finite number >= 0 (source tokens per target token), got {rate}")


def check_window_pool(x, windows, reduce, backend) -> Tuple[Tuple[int, int], ...]:
    """Validate ``window_pool`` arguments; returns the windows as a tuple of int pairs."""
    x = _tensor(x, "x", 3, "[B, T, D]")
    _floating(x, "x")
    if min(x.shape[1:]) < 1:  # an empty batch (B = 0) gives empty outputs, as in leap_attention
        raise ValueError(f"x must have T >= 1 and D >= 1, got shape {tuple(x.shape)}")
    if not isinstance(reduce, str) or reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    check_backend(backend)
    return check_windows(windows)


def check_windows(windows) -> Tuple[Tuple[int, int], ...]:
    """Validate window offsets (a non-empty list of int pairs (a, b), a <= b, in the int64 range)."""
    if isinstance(windows, torch.Tensor) or not isinstance(windows, Sequence) or isinstance(windows, str):
        raise TypeError(f"windows must be a list of (a, b) int pairs, got {type(windows).__name__}")
    if len(windows) == 0:
        raise ValueError("windows must hold at least one (a, b) pair, got an empty list")
    out = []
    for i, w in enumerate(windows):
        # ints, numpy integers included (numbers.Integral); bools and floats are not offsets
        if not isinstance(w, Sequence) or len(w) != 2 or not all(
                isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in w):
            raise TypeError(f"windows[{i}] must be a pair of ints (a, b), got {w!r}")
        a, b = int(w[0]), int(w[1])
        if not (INT64_MIN <= a <= INT64_MAX and INT64_MIN <= b <= INT64_MAX):
            raise ValueError(f"windows[{i}] = ({a}, {b}) has an offset outside the int64 range; an offset "
                             f"beyond +-T acts as +-T (write sys.maxsize for 'to the end')")
        if a > b:
            raise ValueError(f"windows[{i}] = ({a}, {b}) has a > b; a window (a, b) needs a <= b")
        out.append((a, b))
    return tuple(out)

"""The ``cpu`` backend's LeaP attention kernels: ``csrc/leap_attention.cpp`` (C++, OpenMP).

Implements the kernel interface of ``attention/op.py`` (fwd / bwd / step on contiguous
inputs; pq, pk and states in the state dtype). The extension is built on first use through
``leapformer_kernels._build`` (JIT, ninja, cached); a failed build makes ``unavailable``
return the build error (with the log's tail), which the dispatch turns into a fallback
warning or, for an explicit ``backend="cpu"``, a ``ValueError``.

Kernels: chunkwise (64 keys), features built per chunk in thread-local buffers, states in
float32 (float64 for float64 inputs), templated on the input dtype (float32, float64,
bfloat16, float16), deterministic. Monotone cross-attention (``num_visible_keys``) runs the same
kernels with each query's key limit read from the tensor (checked in C++: [B, T] int64, values in
[0, S], non-decreasing). ``set_mode(1)`` forces the sequential-over-chunks driver,
``set_mode(2)`` the across-chunks (two-pass) one, ``set_mode(0)`` chooses automatically.

Instruction-set paths: the kernels are built for AVX-512, AVX2 + FMA and a generic fallback
(the baseline ISA: also aarch64) and the best one this CPU supports runs, unless one is forced:
``LEAPFORMER_CPU_ISA=avx512|avx2|generic`` (read at the first call) or ``set_isa(name)`` (``None`` or
"auto": back to the automatic choice); ``supported_isas()`` lists the paths this machine runs,
``get_isa()`` names the one in use. Forcing a path the CPU lacks raises ``ValueError``. The
driver mode and the path are passed to the C++ with every call (no state in the extension), and
the C++ releases the GIL while its kernels run.

Outputs are allocated here, with ``torch.empty``, and handed to the C++ entry points, which check
them and write every element (so the tests' NaN poisoning of fresh buffers covers them); the
backward also passes the per-query-head key-gradient buffers it needs for GQA or half dtypes.
"""
import os

import torch

from .. import _build

NAME = "leap_attention"
ISAS = ("generic", "avx2", "avx512")  # the C++ codes 0, 1, 2 (csrc/common/isa.h); -1: automatic

_mode = 0  # the driver: 0 automatic, 1 sequential over chunks, 2 across chunks


def _isa_code(name):
    if name is None or str(name).strip().lower() in ("", "auto"):
        return -1
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)} or 'auto', got {name!r}")
    return ISAS.index(key)


_isa = None  # the C++ code of the forced path, -1 automatic; None: not read from the environment yet


def _isa_now():
    global _isa
    if _isa is None:
        try:
            _isa = _isa_code(os.environ.get("LEAPFORMER_CPU_ISA"))
        except ValueError as e:
            raise ValueError(f"LEAPFORMER_CPU_ISA: {e}") from None
    return _isa


def _ext():
    return _build.load(NAME)


def unavailable(device, dtype):
    """None if the C++ kernels can run ``device`` / ``dtype`` inputs, else the reason (a string)."""
    return _build.cpu_unavailable(device, dtype, NAME)


def _acc(q):
    """The state dtype of q's dtype (``_validate.state_dtype``): float64 for float64, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _out(*shape, dtype, like):
    # torch.empty, looked up at call time: the tests' NaN poisoning of fresh buffers reaches it
    return torch.empty(*shape, dtype=dtype, device=like.device)


def _num_seqs(B, cu_seqlens):
    # a cu_seqlens too short to hold one sequence is refused by the C++ check, with its message
    return B if cu_seqlens is None else max(cu_seqlens.numel() - 1, 0)


def fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal, block_size, eps, normalize,
        output_final_state):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = _acc(q)
    o = _out(B, T, H, Dv, dtype=q.dtype, like=q)
    S = z = None
    if output_final_state:
        n = _num_seqs(B, cu_seqlens)
        S = _out(n, H, 2 * Dk, Dv, dtype=acc, like=q)
        z = _out(n, H, 2 * Dk, dtype=acc, like=q)
    _ext().fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, bool(causal),
               int(block_size or 0), float(eps), bool(normalize), o, S, z, _mode, _isa_now())
    return o, S, z


def bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal, block_size,
        eps, normalize):
    B, T, H, Dk = q.shape
    S_len, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    acc = _acc(q)
    dq = _out(B, T, H, Dk, dtype=q.dtype, like=q)
    dk = _out(B, S_len, Hkv, Dk, dtype=q.dtype, like=q)
    dv = _out(B, S_len, Hkv, Dv, dtype=q.dtype, like=q)
    dpq = _out(B, T, H, dtype=acc, like=q)
    dpk = _out(B, S_len, Hkv, dtype=acc, like=q)
    dS0 = dz0 = None
    if S0 is not None:
        n = _num_seqs(B, cu_seqlens)
        dS0 = _out(n, H, 2 * Dk, Dv, dtype=acc, like=q)
        dz0 = _out(n, H, 2 * Dk, dtype=acc, like=q)
    # per-query-head key gradients where the kernel cannot write dk, dv, dpk directly (GQA: reduced
    # over the group; half dtypes: accumulated in float32, then rounded)
    dkh = dvh = dpkh = None
    if Hkv != H or q.dtype != acc:
        dkh = _out(B, S_len, H, Dk, dtype=acc, like=q)
        dvh = _out(B, S_len, H, Dv, dtype=acc, like=q)
    if Hkv != H:
        dpkh = _out(B, S_len, H, dtype=acc, like=q)
    _ext().bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, bool(causal),
               int(block_size or 0), float(eps), bool(normalize), dq, dk, dv, dpq, dpk, dS0, dz0, dkh, dvh, dpkh,
               _mode, _isa_now())
    return dq, dk, dv, dpq, dpk, dS0, dz0


def step(q, k, v, pq, pk, S0, z0, eps, normalize):
    # the decode hot path: torch.empty inline (pq is in the state dtype, as the C++ checks)
    B, t, H, Dk = q.shape
    Dv = v.shape[3]
    dev, acc = q.device, pq.dtype
    o = torch.empty(B, t, H, Dv, dtype=q.dtype, device=dev)
    S = torch.empty(B, H, 2 * Dk, Dv, dtype=acc, device=dev)
    z = torch.empty(B, H, 2 * Dk, dtype=acc, device=dev)
    _ext().step(q, k, v, pq, pk, S0, z0, float(eps), bool(normalize), o, S, z, _isa_now())
    return o, S, z


def set_mode(mode: int) -> None:
    """0: automatic; 1: sequential over chunks per (sequence, head); 2: across chunks."""
    global _mode
    mode = int(mode)
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0, 1 or 2, got {mode}")
    _mode = mode


def get_mode() -> int:
    return _mode


def supported_isas():
    """The instruction-set paths this machine (CPU and build) runs, generic first."""
    ext = _ext()
    return [name for i, name in enumerate(ISAS) if ext.isa_available(i)]


def set_isa(name) -> None:
    """Force an instruction-set path ("avx512", "avx2", "generic"), or None / "auto" for the best
    one this CPU supports. A path this machine cannot run raises ``ValueError``."""
    global _isa
    code = _isa_code(name)
    if code >= 0 and not _ext().isa_available(code):
        raise ValueError(f"isa {ISAS[code]!r} is not supported on this machine (supported: "
                         f"{', '.join(supported_isas())})")
    _isa = code


def get_isa() -> str:
    """The path the kernels run: the forced one, or the automatic choice."""
    code = _isa_now()
    return ISAS[code if code >= 0 else int(_ext().best_isa())]

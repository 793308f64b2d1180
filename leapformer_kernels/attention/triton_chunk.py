"""The ``triton`` backend's kernels for LeaP attention: ``fwd``, ``bwd`` and ``step``.

The interface (shapes, dtypes, what may be None) is in ``attention/op.py``. Kernels:

- ``triton_fwd.leap_fwd_kernel_sweep``: forward-order chunkwise sweep carrying the fp32
  state in registers; ``STAGE`` 0 = forward (o, ``den`` and the final state), 2 = ``dq`` and
  ``dpq``; no pass recomputes ``den``.
- ``triton_bwd.leap_bwd_kernel_dden``: ``dL/dden`` per row from the forward's o and den.
- ``triton_bwd.leap_bwd_kernel_dkv``: reverse sweep for ``dk``, ``dv``, ``dpk``, one program per
  key/value head (the group's state gradient summed, its query heads looped over): dk and dv
  together (Dk, Dv <= 64), or a dk launch over key blocks and a dv launch over value tiles.
- ``triton_step.leap_fwd_kernel_step``: the decode step (one launch per step).
- ``triton_monotone``: monotone cross-attention (``num_visible_keys``), kernels and launchers
  (``triton_monotone.fwd`` / ``bwd``, called from ``fwd`` / ``bwd`` here): a forward-order sweep over
  query chunks (o and ``den`` per value tile; ``dq`` / ``dpq`` / ``dS0`` / ``dz0`` per key block) and
  a reverse sweep over key chunks per key/value head (``dk``, ``dv``, ``dpk``, blocked as
  ``leap_bwd_kernel_dkv``), not segmented.

Segment-parallel sweeps (v2): when the (sequence x head x value tile) programs do not fill 4x
the GPU's SMs, each sequence is cut into segments of ``L`` rows (``segment_length``: a multiple of
the chunk, >= 256 rows on CUDA) and every segment runs at once: ``triton_segments`` sums each key
segment's ``k~^T v`` and ``k~``, a scan here gives every segment its exclusive prefix state (the
sum of all keys, for non-causal / cross-attention / one block wider than the sequence), and the
sweep kernels start from it (``SEGMENTED``). The backward does the same for ``dq`` (the forward's
prefix states, recomputed) and mirrors it for ``dk``/``dv`` (query segment sums of ``q~^T g`` and
``q~ r``, a reverse scan that also gives ``dS0``/``dz0``; without segments but with an initial
state the same with one segment per sequence). The backward plans its segments for the key side
(sequences x key/value heads x key blocks: ``_bwd_plan``). Segments are whole chunks, or whole
blocks for block-causal attention with blocks wider than a chunk, cut per sequence from its first
row, so no block straddles a segment boundary (a block longer than the target segment is one
segment: W=4096 at T=8192 runs 2 segments per sequence).
The per-segment states are the only per-segment memory: ``[B*H*segments, 2Dk, Dv]`` fp32 (18 MiB
at B=4, H=16, D=64, T=8192 and 132 SMs), one buffer: the scan runs in place, and the backward
reuses the key states' buffer for the query gradient states once dq is done.

Scratch memory: ``_scratch`` lists every tensor a ``fwd`` / ``bwd`` call allocates besides its
outputs, ``workspace_bytes`` sums it (``tests/test_triton_workspace.py`` records an interpreted
run and checks the two agree). At B=4, H=16, T=32768, 132 SMs: 26 MiB (D=64) and 96 MiB
(D=128) for the backward, 73 / 121 MiB with GQA Hkv=4 (34 / 128 and 81 / 153 MiB before the backward
read the forward's ``den``); the saved ``den`` itself (with its derivative in pi/2 pq: ``[2, B, T,
H]``) is 16 MiB, an output of the forward. The
monotone backward (``workspace_bytes(monotone=True)``, S=T): 8 MiB (D=64, MHA and GQA), 72 / 48 MiB
(D=128, MHA / GQA Hkv=4), against 8 / 1296 MiB and 10312 / 10824 MiB of fp32 partials before.

Grid: (sequences x query heads, value tiles, segments) (``sweep_grid``, ``step_grid``): B*H on
axis 0, whose CUDA limit is 2**31 - 1, since axes 1 and 2 stop at 65535 (decoding at B*H >= 65536
must launch). The forward returns ``den`` (fp32 ``[2, B, T, H]``: the normaliser per query row and
head and its derivative ``d den / d(pi/2 pq)``, which the dq sweep's dpq correction reads;
``SAVES_DEN``), which the op saves with ``o`` (as flash-attention saves ``lse``); the backward reads
both and recomputes the
chunk states on the fly (nothing per chunk is stored); its extra memory is ``dden = dL/dden``
(fp32, per query row and head) and, at Dk = 128, one fp32 per row and key block for
``dpq`` / ``dpk`` (summed here in a fixed order). dq, dk, dv are written complete, in the input
dtype: the dq and dk sweeps hold every value column and split the key columns (``_bwd_tiles``),
the dv sweep splits the value columns; GQA sums over the group inside the key-side kernels.
Deterministic, no atomics.

Tiles: the features are ``2 * Dk`` wide (sin and cos halves, each a ``[BT, BK]`` tile with
``BK = next_pow2(Dk)``); ``BT = 64`` rows (every dot has M = 64: wgmma on sm_90, also at
Dk = 128, where BT = 32 left 136 mma.sync per kernel), ``BV <= 64`` value columns for Dk <= 64 and
``BV <= 32`` for Dk = 128, so that the two ``[BK, BV]`` fp32 states fit in registers (sm_90,
Dk = 128, 8 warps: 0.7-1.8 KB of spills per thread, against 1.4-2.5 KB with BT = 32;
``benchmarks/triton_report``). The autotuner varies num_stages (num_warps 8, ``autotune_configs``) keyed on head
sizes and flags, never on T (``do_not_specialize``), so a new length does not re-tune.

Unchecked ``cu_seqlens`` (its values are not validated under torch.compile): the kernels never
read or write outside the tensors. The offsets are first clamped into [0, T], made
non-decreasing (a running maximum) and pinned to 0 first and T last (``_safe_cu_seqlens``), and
the kernels clamp each sequence's bounds again. The output is then exactly that of the
corrected offsets: sequence i covers rows [c_i, c_{i+1}) (possibly none; its final state is
then its initial state); every row belongs to one sequence, so every output row and gradient
is written. For example, with T = 9, [0, 4, 100000] reads as [0, 4, 9], [0, 4, 7] as [0, 4, 9],
[2, 5, 9] as [0, 5, 9] and [0, 6, 3, 9] as [0, 6, 6, 9]. A valid ``cu_seqlens`` is unchanged.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .._guard import contiguous_as, on_device
from .._triton_support import interpreting, unavailable  # noqa: F401  (unavailable: the backend table's probe)
from .triton_bwd import leap_bwd_kernel_dden, leap_bwd_kernel_dkv
from .triton_segments import leap_bwd_kernel_segment_sums, leap_fwd_kernel_segment_scan, leap_fwd_kernel_segment_sums
from .triton_fwd import leap_fwd_kernel_sweep
from . import triton_monotone  # its launchers (fwd, bwd) call back into this module's helpers
from .triton_step import leap_fwd_kernel_step

SAVES_DEN = True  # fwd returns (o, S, z, den); bwd takes o=, den= (see attention/op.py)
# the decode step reads pq, pk in any float dtype (converted in the kernel): no host-side cast, which
# would be one more launch per token (attention/op.py passes them through)
STEP_READS_ANY_P = True

_DT = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_mode(dtype: torch.dtype) -> int:
    """0: fp32 operands with input_precision="ieee"; 1: bf16 operands; 2: fp16 inputs, fp32
    operands as tf32x3 (see triton_fwd._dot). The interpreter's bf16 dot is wrong, so bf16 runs
    its dots in fp32 there."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()):
        return 0
    return 2 if dtype == torch.float16 else 1


def _tiles(K: int, V: int):
    BK = max(16, triton.next_power_of_2(K))
    BT = 64
    BV = max(16, min(triton.next_power_of_2(V), 64 if BK <= 64 else 32))
    return BT, BK, BV, triton.cdiv(V, BV)


def _sweep(T: int, S: int, causal: bool, block_size: int, BT: int):
    """(INTRA, W, CL): see triton_fwd's docstring."""
    longest = max(T, S, 1)
    if not causal:
        return False, longest, BT
    if not block_size:
        return True, 1, BT
    if block_size <= BT:
        return True, block_size, (BT // block_size) * block_size
    return False, min(block_size, longest), BT


# compile options of every launch: floating-point contraction (FMA) on, as every figure on the
# H200 was measured (triton 3.6); triton 3.9 keeps it on by default with a warning and 3.10 turns
# the default off. Pinned per launch (which also silences 3.9's warning), never through
# environment variables.
LAUNCH = dict(enable_fp_fusion=True)

MIN_SEGMENT = 256  # rows: a segment costs a [2Dk, Dv] fp32 state read and write; keep it >= 4 chunks


def segment_policy(device: torch.device):
    """(streaming multiprocessors, shortest segment or None for one chunk) of ``device``: the SM
    count and ``MIN_SEGMENT`` on CUDA; (4, None) elsewhere, i.e. under the interpreter, so that
    the CPU tests run several segments per sequence at small T. ``triton_report`` replaces it
    with an H100's (132, MIN_SEGMENT) to plan for the GPU it compiles for."""
    if device.type != "cuda":
        return 4, None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()), MIN_SEGMENT


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _seg_mode(plan) -> int:
    """The kernels' SEGMENTED constexpr: 0 one program per sequence, 1 per-segment prefix
    states, 2 the whole state for every segment."""
    return 0 if not plan else (2 if plan[2] else 1)


def segment_length(T: int, programs: int, CL: int, sms: int, min_len: int = MIN_SEGMENT) -> int:
    """Rows per segment of the segment-parallel sweep: 0 (no segments: one program per sequence
    walks it all, as in v1) when ``programs`` (sequences x heads x value tiles) already fill 4x
    the ``sms``, else the smallest multiple of the chunk ``CL`` that is at least ``min_len``
    (rounded up to CL) and cuts T into about ``ceil(4 sms / programs)`` segments. Never depends on
    anything but shapes (no host sync). Examples (CL=64, 132 SMs): B*H=64, T=8192 -> 960 (9
    segments); B*H=8, T=8192 -> 256 (32 segments)."""
    if programs >= 4 * sms or T <= CL:
        return 0
    nseg = -(-4 * sms // programs)
    L = -(-T // nseg)
    L = max(L, min_len, CL)
    L = -(-L // CL) * CL
    return 0 if L >= T else L


def key_states(k, pk, v, kpm, cu, S0, z0, T, S, N, H, G, K, V, BT, BK, BV, NV, L, whole, dot_mode, dt,
               seg, zseg, S_whole=None, z_whole=None, S_fin=None, z_fin=None):
    """The states the segmented sweep starts from (and the final state), from segment sums.

    ``seg`` / ``zseg``: buffers of at least ``N*H*NSEG`` rows of ``[2K, V]`` / ``[2K]`` fp32 (NSEG =
    ceil(S / L)): the segment sums, then (the scan runs in place) the start states. ``whole=False``
    (causal / block-causal): the exclusive prefix state of each segment, rows ``nh * NSEG + j`` of
    ``seg``; ``whole=True`` (one block holds every key: non-causal, cross-attention): the sum over
    all keys, written to ``S_whole [N*H, 2K, V]``, ``z_whole [N*H, 2K]``. The initial state (if any)
    is added in both. The final state ``[N, H, 2K, V]``, ``[N, H, 2K]`` goes to ``S_fin``/``z_fin``
    when given. Returns ``(S_start, z_start)``; deterministic (a scan in a fixed order)."""
    nseg = triton.cdiv(S, L)
    leap_fwd_kernel_segment_sums[(N * H, NV, nseg)](
        k, pk, v, kpm if kpm is not None else pk, cu if cu is not None else pk, seg, zseg, T, S, L,
        H=H, G=G, K=K, V=V, BT=BT, BK=BK, BV=BV, IS_VARLEN=cu is not None, HAS_KPM=kpm is not None,
        DOT_MODE=dot_mode, DT=dt, **LAUNCH)
    return _scan(seg, zseg, S0, z0, N, H, K, V, nseg, whole, False, S_whole, z_whole, S_fin, z_fin)


def _scan(seg, zseg, S_init, z_init, N, H, K, V, nseg, whole, reverse, S_whole, z_whole, S_fin, z_fin):
    """One launch of ``leap_fwd_kernel_segment_scan``, in place in ``seg`` / ``zseg`` (or into
    ``S_whole`` / ``z_whole`` when ``whole``); the finals written into ``S_fin`` / ``z_fin`` when
    given (the op's own output buffers: no copy). Returns (start states, start normalisers)."""
    S_start, z_start = (S_whole, z_whole) if whole else (seg, zseg)
    SK = 2 * K * V
    BLOCK = min(1024, triton.next_power_of_2(SK))
    has_init = S_init is not None
    fin = S_fin is not None
    leap_fwd_kernel_segment_scan[(N * H, triton.cdiv(SK, BLOCK))](
        seg, zseg, S_init if has_init else seg, z_init if has_init else zseg, S_start, z_start,
        S_fin if fin else seg, z_fin if fin else zseg,
        nseg, SK=SK, ZK=2 * K, BLOCK=BLOCK, BLOCK_Z=triton.next_power_of_2(2 * K),
        HAS_INIT=has_init, REVERSE=reverse, WHOLE=whole, STORE_FIN=fin, **LAUNCH)
    return S_start, z_start


def query_grad_states(q, pq, do, den, dden, cu, dS, dz, T, S, N, H, K, V, BT, BK, BV, NV, L, whole, eps,
                      normalize, dot_mode, dt, seg, zseg, S_whole=None, z_whole=None, dS0=None, dz0=None):
    """The state gradients the segmented reverse sweep starts from (and ``dS0``, ``dz0``).

    Buffers as in ``key_states`` (NSEG = ceil(T / L) here). ``whole=False``: for each segment,
    ``dS`` plus the sums of the segments after it (a reverse exclusive scan, in place in ``seg``);
    ``whole=True``: ``dS`` plus the sum over every query, into ``S_whole``. Per query head (the
    key side sums a GQA group). ``dS0``/``dz0`` are written when given. Returns ``(dS_start,
    dz_start)``; deterministic."""
    nseg = triton.cdiv(T, L)
    leap_bwd_kernel_segment_sums[(N * H, NV, nseg)](
        q, pq, do, den, dden, cu if cu is not None else pq, seg, zseg, T, S, L, eps,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, IS_VARLEN=cu is not None, NORMALIZE=normalize, DOT_MODE=dot_mode, DT=dt,
        **LAUNCH)
    return _scan(seg, zseg, dS, dz, N, H, K, V, nseg, whole, True, S_whole, z_whole, dS0, dz0)


def sweep_grid(N: int, H: int, NV: int):
    """Launch grid of the chunk sweeps (forward, backward stages): (N*H, NV), sequences x heads
    on axis 0 (CUDA allows 2**31 - 1 there, but only 65535 on axes 1 and 2)."""
    return (N * H, NV)


def step_grid(B: int, H: int, NV: int):
    """Launch grid of the decode step: (B*H, NV), batch x heads on axis 0."""
    return (B * H, NV)


def _safe_cu_seqlens(cu: torch.Tensor, T: int) -> torch.Tensor:
    """Offsets the kernels can always follow (no host sync): clamped into [0, T], non-decreasing,
    first 0, last T. A valid ``cu_seqlens`` comes back equal."""
    c = torch.cummax(cu.clamp(0, T), dim=0).values
    c[0].zero_()  # in place (an item assignment would allocate a scalar tensor)
    c[-1].fill_(T)
    return c


def _check_dtype(q: torch.Tensor):
    if q.dtype not in _DT:
        raise ValueError(f"backend='triton' supports float32, float16 and bfloat16, got {q.dtype}")


def _c(t, dtype=None):
    """Contiguous (and in ``dtype``: ``_guard.contiguous_as``), or None for an absent or empty
    placeholder. The kernels index dense row-major tensors: an expanded gradient (``S.sum()`` gives
    a stride-0 dS) must be materialised first."""
    return None if t is None or t.numel() == 0 else contiguous_as(t, dtype)


def _bwd_tiles(K: int, V: int):
    """(BKq, NK, BVf, merged) of the backward's dq and dk/dv sweeps. ``BVf`` covers every value
    column (complete dq and dk rows need all of them); the fp32 state a program carries is
    ``2 x [BKq, BVf]``, held to ``BKq * BVf <= 64 * 64`` (the forward's budget), so ``BKq`` key
    columns per program and ``NK`` key blocks. ``merged``: one program holds every key and value
    column (Dk, Dv <= 64): dk and dv in one kernel; otherwise a dk kernel split over key blocks
    and a dv kernel split over the forward's value tiles (``_tiles``), as FLA does."""
    BK = _tiles(K, V)[1]
    BVf = max(16, triton.next_power_of_2(V))
    BKq = max(16, min(BK, 64 * 64 // BVf))
    return BKq, triton.cdiv(K, BKq), BVf, BKq >= K


# The sweep backward's key side when one program could hold every key and value column (Dk, Dv <= 64):
# dk and dv in one program (one pass; at sm_90 bf16 it spills 304-416 B per thread) or, as at Dk = 128,
# a dk kernel and a dv kernel (no spills with the dk kernel's one stage, but 15% more MMA instructions
# and q, do, k read twice; ``triton_report_3.9.0_v4_sm90_bf16.md``). Two kernels until a GPU timing
# (``benchmarks.gpu_report``) says the one-pass form is faster despite its spills. The monotone mode
# keeps its own rule (``triton_monotone``).
MERGE_DKV = False


def _bwd_plan(device, T, S, N, H, Hkv, K, V, INTRA, W, CL):
    """The backward's segment plan: sized so that the key side (one program per sequence x key/value
    head x key block or value tile) fills the GPU."""
    NV = _tiles(K, V)[3]
    BKq, NK, BVf, merged = _bwd_tiles(K, V)
    return _plan(device, T, S, N, Hkv, 1 if merged and MERGE_DKV else min(NK, NV), INTRA, W, CL)


def _state_rows(N, H, K, V, rows):
    """A state buffer pair of ``rows`` rows: ([rows, 2K, V], [rows, 2K]) fp32."""
    return {"S": ((rows, 2 * K, V), torch.float32), "z": ((rows, 2 * K), torch.float32)}


def _scratch(backward, B, T, S, H, Hkv, K, V, N, plan, *, normalize=True, initial_state=False,
             output_final_state=False, dS_given=False, dz_given=False, varlen=False, monotone=False):
    """Every scratch tensor one ``fwd`` / ``bwd`` call allocates (besides its outputs):
    {name: (shape, dtype)}. The launchers allocate exactly these; ``workspace_bytes`` sums them.
    ``monotone`` (``num_visible_keys``, ``triton_monotone``; plan None): the forward allocates
    nothing; the backward the int32 chunk tables, ``dden`` and the key-block ``dpq``/``dpk``
    partials (dS0 comes from its dq sweep: no segment states)."""
    f32 = torch.float32
    out = {}
    if monotone:
        if not backward:
            return out
        out["tab"] = ((B, 2, triton.cdiv(S, _tiles(K, V)[0]) + 1), torch.int32)
    elif varlen:  # _safe_cu_seqlens: clamp, cummax (values and indices)
        out["cu"] = ((3 * (N + 1),), torch.int64)
    if plan:
        L, nseg, whole = plan
        rows = triton.cdiv(S, L)
        if backward:
            rows = max(rows, triton.cdiv(T, L))  # the key states, then the query gradient states
        for n, v in _state_rows(N, H, K, V, N * H * rows).items():
            out["seg_" + n] = v
        if whole and (backward or not output_final_state):  # forward: the whole state is S_final
            for n, v in _state_rows(N, H, K, V, N * H).items():
                out["whole_" + n] = v
    elif backward and initial_state and not monotone:  # dS0: one query segment per sequence, a reverse scan
        for n, v in _state_rows(N, H, K, V, N * H).items():
            out["seg_" + n] = v
    if not backward:
        return out
    NK = _bwd_tiles(K, V)[1]
    if normalize:  # dL/dden per row (den itself is the forward's)
        out["dden"] = ((B, T, H), f32)
    if NK > 1:  # one fp32 per row and key block, summed into dpq / dpk
        out["dpq_part"] = ((NK, B, T, H), f32)
        out["dpk_part"] = ((NK, B, S, Hkv), f32)
    if dS_given != dz_given:  # zeros for the missing half of the final-state gradient
        out["dS_zero" if dz_given else "dz_zero"] = ((N, H, 2 * K, V) if dz_given else (N, H, 2 * K), f32)
    return out


def workspace_bytes(B, T, H, Hkv, Dk, Dv, sm_count, *, S=None, causal=True, block_size=None, normalize=True,
                    initial_state=False, output_final_state=False, final_state_grad=False, cu_seqlens=None,
                    min_segment=MIN_SEGMENT, backward=True, monotone=False):
    """Scratch bytes of one triton ``bwd`` call (``backward=False``: ``fwd``) on a GPU with
    ``sm_count`` SMs, beyond its inputs and outputs: what ``_scratch`` lists, which is exactly what
    the launcher allocates (``tests/test_triton_workspace.py`` records it). ``cu_seqlens``: the
    number of sequences N (varlen, B == 1), or None. ``min_segment``: the shortest segment (None:
    one chunk, as under the interpreter). ``final_state_grad``: dS and dz both given (or neither:
    False); the forward's ``output_final_state``. The backward is counted as the op runs it, with
    the forward's ``o`` and ``den`` given (called without them it first reruns the forward).
    ``monotone=True``: the monotone mode (``num_visible_keys``, cross-attention of T queries on S
    keys; ``causal``, ``block_size``, ``cu_seqlens`` and the segment policy do not apply)."""
    S = T if S is None else S
    N = B if cu_seqlens is None else cu_seqlens
    BT = _tiles(Dk, Dv)[0]
    INTRA, W, CL = _sweep(T, S, causal, block_size or 0, BT)
    policy = lambda dev: (sm_count, min_segment)  # noqa: E731
    if monotone:
        plan = None
    elif backward:
        plan = _bwd_plan(policy, T, S, N, H, Hkv, Dk, Dv, INTRA, W, CL)
    else:
        plan = _plan(policy, T, S, N, H, _tiles(Dk, Dv)[3], INTRA, W, CL)
    sc = _scratch(backward, B, T, S, H, Hkv, Dk, Dv, N, plan, normalize=normalize, initial_state=initial_state,
                  output_final_state=output_final_state, dS_given=final_state_grad, dz_given=final_state_grad,
                  varlen=cu_seqlens is not None, monotone=monotone)
    return sum(math.prod(shape) * dt.itemsize for shape, dt in sc.values())


def _alloc(scratch, device):
    return {n: torch.empty(shape, dtype=dt, device=device) for n, (shape, dt) in scratch.items()}


def fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal, block_size, eps,
        normalize, output_final_state):
    _check_dtype(q)
    if num_visible_keys is not None:
        return triton_monotone.fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, num_visible_keys, eps, normalize,
                                   output_final_state)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pq, pk, S0, z0 = _c(pq, torch.float32), _c(pk, torch.float32), _c(S0, torch.float32), _c(z0, torch.float32)
    key_padding_mask, cu_seqlens = _c(key_padding_mask), _c(cu_seqlens, torch.int64)
    B, T, H, K = q.shape
    S, Hkv, V = k.shape[1], k.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None:
        cu_seqlens = _safe_cu_seqlens(cu_seqlens, T)
    BT, BK, BV, NV = _tiles(K, V)
    INTRA, W, CL = _sweep(T, S, causal, block_size, BT)
    f32 = dict(dtype=torch.float32, device=q.device)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    den = torch.empty(2, B, T, H, **f32) if normalize else None  # den and d den / d(pi/2 pq)
    if output_final_state:
        Sf = torch.empty(N, H, 2 * K, V, **f32)
        zf = torch.empty(N, H, 2 * K, **f32)
    else:
        Sf = zf = None
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    dummy = pq
    with on_device(q):
        plan = _plan(q.device, T, S, N, H, NV, INTRA, W, CL)
        ws = _alloc({n: v for n, v in _scratch(False, B, T, S, H, Hkv, K, V, N, plan,
                                                output_final_state=output_final_state).items() if n != "cu"},
                    q.device)
        if plan:  # segment-parallel: segment sums, a scan, then every segment at once
            L, nseg, whole = plan
            S_whole, z_whole = (ws["whole_S"], ws["whole_z"]) if "whole_S" in ws else (Sf, zf)
            S0, z0 = key_states(k, pk, v, kpm, cu_seqlens, S0, z0, T, S, N, H, H // Hkv, K, V, BT, BK, BV, NV, L,
                                whole, _dot_mode(q.dtype), _DT[q.dtype], ws["seg_S"], ws["seg_z"],
                                S_whole, z_whole, None if whole else Sf, None if whole else zf)
        else:
            L, nseg = max(T, S, 1), 1
        leap_fwd_kernel_sweep[(N * H, NV, nseg)](
            q, k, v, pq, pk, kpm if kpm is not None else dummy, cu_seqlens if cu_seqlens is not None else dummy,
            S0 if S0 is not None else dummy, z0 if z0 is not None else dummy,
            o, Sf if Sf is not None else dummy, zf if zf is not None else dummy,
            dummy, den if den is not None else dummy, dummy, dummy, dummy,
            T, S, W, CL, L, B * T * H, eps,
            H=H, G=H // Hkv, K=K, V=V, BT=BT, BK=BK, BV=BV, STAGE=0, INTRA=INTRA,
            IS_VARLEN=cu_seqlens is not None, HAS_KPM=kpm is not None, USE_S0=S0 is not None,
            STORE_STATE=output_final_state and not plan, NORMALIZE=normalize, SEGMENTED=_seg_mode(plan),
            DOT_MODE=_dot_mode(q.dtype), DT=_DT[q.dtype], **LAUNCH)
    return o, Sf, zf, den


def _plan(device, T, S, N, H, NV, INTRA, W, CL):
    """(L, query segments, whole) of the segment-parallel sweep, or None to walk each sequence in
    one program (the programs already fill the GPU). ``whole``: one block holds every key
    (non-causal, cross-attention, a block at least as long as the sequences), so every query
    reads the sum of all keys. Otherwise segments are whole chunks (causal, blocks within a
    chunk) or whole blocks (block-causal with blocks wider than a chunk: L a multiple of W, at
    least one block), so no block straddles a segment boundary. ``device`` may also be a
    function standing for ``segment_policy`` (``workspace_bytes``)."""
    whole = not INTRA and W >= max(T, S)
    sms, min_len = device(None) if callable(device) else segment_policy(device)
    unit = CL if INTRA or whole else W
    L = segment_length(max(T, S), N * H * NV, unit, sms, min_len or unit)
    return (L, triton.cdiv(T, L), whole) if L else None


def bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal, block_size,
        eps, normalize, o=None, den=None):
    """``o``, ``den``: the forward's output and normaliser (``fwd``'s first and last results);
    normalised and without them, the forward is run again first to get them."""
    _check_dtype(q)
    if normalize and (o is None or den is None):
        o, _, _, den = fwd(q, k, v, pq, pk, S0, z0, key_padding_mask, cu_seqlens, num_visible_keys, causal,
                           block_size, eps, True, False)
    if num_visible_keys is not None:
        return triton_monotone.bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, key_padding_mask, num_visible_keys, eps,
                                   normalize, o, den)
    pq_dtype, pk_dtype = pq.dtype, pk.dtype
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    pq, pk, S0, z0 = _c(pq, torch.float32), _c(pk, torch.float32), _c(S0, torch.float32), _c(z0, torch.float32)
    dS, dz = _c(dS, torch.float32), _c(dz, torch.float32)
    key_padding_mask, cu_seqlens = _c(key_padding_mask), _c(cu_seqlens, torch.int64)
    B, T, H, K = q.shape
    S, Hkv, V = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None:
        cu_seqlens = _safe_cu_seqlens(cu_seqlens, T)
    BT, BK, BV, NV = _tiles(K, V)
    BKq, NK, BVf, merged = _bwd_tiles(K, V)
    INTRA, W, CL = _sweep(T, S, causal, block_size, BT)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    NTH, NSK = B * T * H, B * S * Hkv
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    dummy = pq
    plan = _bwd_plan(dev, T, S, N, H, Hkv, K, V, INTRA, W, CL)
    sc = _scratch(True, B, T, S, H, Hkv, K, V, N, plan, normalize=normalize, initial_state=S0 is not None,
                  dS_given=dS is not None, dz_given=dz is not None)
    ws = _alloc({n: v for n, v in sc.items() if n not in ("cu", "dS_zero", "dz_zero")}, dev)
    if dS is None and dz is not None:
        dS = torch.zeros(sc["dS_zero"][0], **f32)
    if dz is None and dS is not None:
        dz = torch.zeros(sc["dz_zero"][0], **f32)
    common = dict(H=H, G=G, K=K, V=V, BT=BT, INTRA=INTRA, IS_VARLEN=cu_seqlens is not None,
                  HAS_KPM=kpm is not None, NORMALIZE=normalize, DOT_MODE=_dot_mode(q.dtype), DT=_DT[q.dtype],
                  **LAUNCH)
    cu = cu_seqlens if cu_seqlens is not None else dummy
    kp = kpm if kpm is not None else dummy
    o, den, dden, dq, dpq, dk, dv, dpk, dS0, dz0 = grad_buffers(q, k, v, S0 is not None, N, NK, ws, normalize, o,
                                                                den, dummy)
    whole_bufs = (ws.get("whole_S"), ws.get("whole_z"))
    with on_device(q):
        s0, z0_ = S0, z0
        if plan:  # the query-side stages run segment-parallel from the forward's prefix states
            L, nseg, whole = plan
            s0, z0_ = key_states(k, pk, v, kpm, cu_seqlens, S0, z0, T, S, N, H, G, K, V, BT, BK, BV, NV, L, whole,
                                 common["DOT_MODE"], common["DT"], ws["seg_S"], ws["seg_z"], *whole_bufs)
        else:
            L, nseg = max(T, S, 1), 1
        if normalize:
            _dden(o, do, den, dden, eps)
        qargs = (q, k, v, pq, pk, kp, cu, s0 if s0 is not None else dummy, z0_ if z0_ is not None else dummy,
                 dummy, dummy, dummy, do, den, dden, dq, dpq, T, S, W, CL, L, NTH, eps)
        qflags = dict(USE_S0=s0 is not None, STORE_STATE=False, SEGMENTED=_seg_mode(plan), **common)
        # dq, dpq: key blocks of BKq columns, every value column in one tile: complete dq rows
        leap_fwd_kernel_sweep[(N * H, NK, nseg)](*qargs, BK=BKq, BV=BVf, STAGE=2, SPLIT_K=True, **qflags)
        kseg = _seg_mode(plan)
        if plan:  # the key side too: query segment sums, a reverse scan, every key segment at once
            dS, dz = query_grad_states(
                q, pq, do, den, dden, cu_seqlens, dS, dz, T, S, N, H, K, V, BT, BK, BV, NV, L, whole, eps,
                normalize, common["DOT_MODE"], common["DT"], ws["seg_S"], ws["seg_z"], *whole_bufs, dS0, dz0)
            kseg_n = triton.cdiv(S, L)
        elif S0 is not None:  # dS0, dz0: one query segment per sequence (its start: dS, dz)
            dS, dz = query_grad_states(
                q, pq, do, den, dden, cu_seqlens, dS, dz, T, S, N, H, K, V, BT, BK, BV, NV, L, False, eps,
                normalize, common["DOT_MODE"], common["DT"], ws["seg_S"], ws["seg_z"], None, None, dS0, dz0)
            kseg, kseg_n = 1, 1
        else:
            kseg_n = 1
        kargs = (q, k, v, pq, pk, kp, cu, dS if dS is not None else dummy, dz if dz is not None else dummy,
                 do, den, dden, dk, dv, dpk, T, S, W, CL, L, NSK, eps)
        kflags = dict(USE_DS=dS is not None, SEGMENTED=kseg, **common)
        if merged and MERGE_DKV:  # one program holds every key and value column: dk and dv together
            leap_bwd_kernel_dkv[(N * Hkv, 1, kseg_n)](*kargs, BK=BK, BV=BVf, DO_DK=True, DO_DV=True, **kflags)
        else:  # dk over key blocks (all value columns), dv over value tiles (all key columns)
            leap_bwd_kernel_dkv[(N * Hkv, NK, kseg_n)](*kargs, BK=BKq, BV=BVf, DO_DK=True, DO_DV=False, **kflags)
            leap_bwd_kernel_dkv[(N * Hkv, NV, kseg_n)](*kargs, BK=BK, BV=BV, DO_DK=False, DO_DV=True, **kflags)
    if NK > 1:
        dpq, dpk = dpq.sum(0), dpk.sum(0)
    return dq, dk, dv, dpq.to(pq_dtype), dpk.to(pk_dtype), dS0, dz0


def grad_buffers(q, k, v, with_state, N, NK, ws, normalize, o, den, dummy):
    """The backward's inputs and outputs as its kernels take them: o, den (contiguous, fp32) and the
    workspace's dden (``dummy`` x 3 unnormalised), then dq, dpq, dk, dv, dpk (dpq / dpk: the
    workspace's per-key-block fp32 partials when there are ``NK > 1`` key blocks) and dS0, dz0 for
    ``N`` state rows (None without an initial state)."""
    B, T, H, K = q.shape
    S, Hkv, V = k.shape[1], k.shape[2], v.shape[3]
    dev, f32 = q.device, dict(dtype=torch.float32, device=q.device)
    if normalize:
        o, den, dden = o.contiguous(), _c(den, torch.float32), ws["dden"]
    else:
        o = den = dden = dummy
    dq = torch.empty(B, T, H, K, dtype=q.dtype, device=dev)
    dpq = ws["dpq_part"] if NK > 1 else torch.empty(B, T, H, **f32)
    dk = torch.empty(B, S, Hkv, K, dtype=q.dtype, device=dev)
    dv = torch.empty(B, S, Hkv, V, dtype=q.dtype, device=dev)
    dpk = ws["dpk_part"] if NK > 1 else torch.empty(B, S, Hkv, **f32)
    dS0 = torch.empty(N, H, 2 * K, V, **f32) if with_state else None
    dz0 = torch.empty(N, H, 2 * K, **f32) if with_state else None
    return o, den, dden, dq, dpq, dk, dv, dpk, dS0, dz0


def _dden(o, do, den, dden, eps):
    """``dden = dL/dden`` per query row and head from the forward's ``o`` and ``den``
    (``leap_bwd_kernel_dden``): ``o``, ``do`` ``[B, T, H, V]``, ``den`` ``[2, B, T, H]`` (its first
    plane read), ``dden`` ``[B, T, H]`` fp32."""
    R, V = dden.numel(), o.shape[-1]
    BV = max(16, triton.next_power_of_2(V))
    BR = max(16, 4096 // BV)
    leap_bwd_kernel_dden[(triton.cdiv(R, BR),)](o, do, den, dden, R, eps, V=V, BR=BR, BV=BV, num_warps=4, **LAUNCH)


def _step_warps(BK: int, BV: int) -> int:
    """The step kernel's one config: 4 warps, 8 once a program holds 2 x [128, 128] fp32."""
    return 8 if BK * BV > 64 * 64 else 4


def step(q, k, v, pq, pk, S0, z0, eps, normalize):
    _check_dtype(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pq, pk, S0, z0 = _c(pq), _c(pk), _c(S0, torch.float32), _c(z0, torch.float32)  # pq, pk: any float dtype
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), 32))
    NV = triton.cdiv(V, BV)
    f32 = dict(dtype=torch.float32, device=q.device)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    Sn = torch.empty(B, H, 2 * K, V, **f32)
    zn = torch.empty(B, H, 2 * K, **f32)
    dummy = pq
    with on_device(q):
        leap_fwd_kernel_step[step_grid(B, H, NV)](
            q, k, v, pq, pk, S0 if S0 is not None else dummy, z0 if z0 is not None else dummy, o, Sn, zn, dummy,
            T, B, eps, H=H, G=H // Hkv, K=K, V=V, BK=BK, BV=BV, USE_S0=S0 is not None, NORMALIZE=normalize,
            HAS_IDX=False, num_warps=_step_warps(BK, BV), **LAUNCH)
    return o, Sn, zn


def step_(q, k, v, pq, pk, S, z, state_indices, eps, normalize):
    """In-place decode step: reads and rewrites rows ``state_indices`` (or 0..B-1) of the pool
    ``S [N, H, 2K, V]``, ``z [N, H, 2K]`` (fp32, contiguous: checked by the caller). One
    program per (batch row, head) holding all V columns, so no program reads a ``z`` another
    one rewrites. Returns o."""
    _check_dtype(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pq, pk = _c(pq), _c(pk)  # any float dtype: the kernel converts (no host-side cast, no extra launch)
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    idx = state_indices.contiguous() if state_indices is not None else pq
    with on_device(q):
        leap_fwd_kernel_step[step_grid(B, H, 1)](
            q, k, v, pq, pk, S, z, o, S, z, idx,
            T, S.shape[0], eps, H=H, G=H // Hkv, K=K, V=V, BK=BK, BV=BV, USE_S0=True, NORMALIZE=normalize,
            HAS_IDX=state_indices is not None, num_warps=_step_warps(BK, BV), **LAUNCH)
    return o

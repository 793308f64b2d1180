"""Context-parallel attention (``lk.distributed.leap_attention_cp``) on CPU: gloo, 2 and 3 spawned
processes, one thread each.

One spawn per world size runs every case (process start-up dominates the cost) and writes each
rank's results to a file; the tests below read them. Each rank builds the whole sequence from the
same seed, runs ``lk.leap_attention`` on it as the reference, and runs the context-parallel op on its
own slice; outputs and the gradients of q, k, v, pq, pk (of a loss summed over every rank's output)
must match the reference's rows of this rank (DESIGN tolerances: float64 1e-10, float32 1e-5, twice
that for gradients). Every spawn has a deadline, every process group a timeout, and every group is
destroyed. ``LK_CP_TEST_BACKEND=cpu`` (or ``triton`` under ``TRITON_INTERPRET=1``, where the float64
cases are refused by the backend) runs the parity cases on another backend; CI uses ``torch``.
"""
import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import leapformer_kernels as lk
from utils import TOL, rel_err

SPAWN_TIMEOUT = 100  # seconds for one world (start-up of the processes included)
PG_TIMEOUT = 40  # seconds: a collective that waits longer raises

F64, F32 = "float64", "float32"

# name -> (lens (one per rank, the world size is len(lens)), options)
# options: dtype, causal, block_size, mask (pad positions of batch row 1: global indices), H, Hkv,
# normalize, given (pass slice_lengths), qlens (non-causal: query slice lengths differ from keys)
CASES = {
    "causal_2": ([5, 9], dict()),
    "causal_3_len1": ([1, 7, 4], dict()),
    "causal_2_gqa_f32": ([6, 6], dict(dtype=F32, H=4, Hkv=2)),
    "causal_3_f32_unnormalized": ([4, 1, 6], dict(dtype=F32, normalize=False)),
    "causal_2_padding": ([6, 5], dict(mask=[0, 1, 2, 3, 4, 5, 6, 8])),
    "causal_3_given_lengths": ([3, 5, 2], dict(given=True)),
    "block_2_straddle": ([6, 7], dict(block_size=4)),
    "block_3_straddle_len1": ([3, 1, 9], dict(block_size=4)),
    "block_3_over_three_ranks": ([2, 1, 10], dict(block_size=8)),
    "block_3_aligned": ([4, 8, 3], dict(block_size=4)),
    "block_2_padding_gqa": ([5, 6], dict(block_size=3, mask=[1, 4, 5, 6], H=2, Hkv=1)),
    "block_3_f32_given": ([5, 2, 6], dict(block_size=4, dtype=F32, given=True)),
    "block_2_one_block": ([4, 3], dict(block_size=50)),
    "noncausal_2": ([4, 7], dict(causal=False)),
    "noncausal_3_padding_f32": ([3, 1, 5], dict(causal=False, mask=[0, 2, 8], dtype=F32)),
    "noncausal_2_cross": ([5, 2], dict(causal=False, qlens=[3, 4])),
}

B, DK, DV = 2, 4, 3


def _inputs(lens, opt):
    """The whole sequence (same on every rank): q, k, v, pq, pk, mask, cotangent."""
    g = torch.Generator().manual_seed(sum(lens) * 7919 + len(lens))
    dtype = getattr(torch, opt.get("dtype", F64))
    H, Hkv = opt.get("H", 2), opt.get("Hkv", opt.get("H", 2))
    N = sum(lens)
    Tq = sum(opt.get("qlens", lens))

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = r(B, Tq, H, DK), r(B, N, Hkv, DK), r(B, N, Hkv, DV)
    pq = torch.rand(B, Tq, H, generator=g, dtype=torch.float64).to(dtype)
    pk = torch.rand(B, N, Hkv, generator=g, dtype=torch.float64).to(dtype)
    pq[0, 0, 0], pk[0, 0, 0] = 0.0, 1.0  # proportions exactly 0 and 1
    mask = None
    if "mask" in opt:
        mask = torch.zeros(B, N, dtype=torch.bool)
        mask[1, opt["mask"]] = True
    do = r(B, Tq, H, DV)
    return q, k, v, pq, pk, mask, do


def _bounds(lens, r):
    a = sum(lens[:r])
    return a, a + lens[r]


def _parity(rank, lens, opt):
    P = len(lens)
    q, k, v, pq, pk, mask, do = _inputs(lens, opt)
    kw = dict(causal=opt.get("causal", True), block_size=opt.get("block_size"),
              normalize=opt.get("normalize", True), backend=os.environ.get("LK_CP_TEST_BACKEND", "torch"))
    full = [t.clone().requires_grad_() for t in (q, k, v, pq, pk)]
    ref = lk.leap_attention(*full, key_padding_mask=mask, **kw)
    (ref * do).sum().backward()

    qa, qb = _bounds(opt.get("qlens", lens), rank)
    ka, kb = _bounds(lens, rank)
    mine = [t[:, qa:qb].clone().requires_grad_() for t in (q, pq)]
    mine_k = [t[:, ka:kb].clone().requires_grad_() for t in (k, v, pk)]
    local = [mine[0], *mine_k[:2], mine[1], mine_k[2]]
    o = lk.distributed.leap_attention_cp(
        *local, group=dist.group.WORLD, key_padding_mask=None if mask is None else mask[:, ka:kb],
        slice_lengths=lens if opt.get("given") else None, **kw)
    (o * do[:, qa:qb]).sum().backward()
    assert len(lens) == P
    errs = {"o": rel_err(o, ref[:, qa:qb])}
    for name, t, f, (a, b) in zip(("dq", "dk", "dv", "dpq", "dpk"), local, full,
                                  ((qa, qb), (ka, kb), (ka, kb), (qa, qb), (ka, kb))):
        errs[name] = rel_err(t.grad, f.grad[:, a:b])
    return {"errs": errs}


def _raises(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return {"raised": [type(e).__name__, str(e)]}
    return {"raised": None}


def _error_cases(rank):
    """Bad input on a world of 2; every case must raise on every rank (no rank left waiting)."""
    W = dist.group.WORLD
    out = {}

    def args(T=4, Dk=DK, H=2):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(1, T, H, Dk, generator=g), torch.randn(1, T, H, Dk, generator=g),
                torch.randn(1, T, H, DV, generator=g), torch.rand(1, T, H, generator=g),
                torch.rand(1, T, H, generator=g))

    out["head_dim_differs"] = _raises(lambda: lk.distributed.leap_attention_cp(
        *args(Dk=4 if rank == 0 else 5), group=W))
    out["causal_differs"] = _raises(lambda: lk.distributed.leap_attention_cp(
        *args(), group=W, causal=rank == 0))
    out["block_size_differs"] = _raises(lambda: lk.distributed.leap_attention_cp(
        *args(), group=W, block_size=2 + rank))
    grad_args = args()
    grad_args[1].requires_grad_(rank == 0)
    out["grad_differs"] = _raises(lambda: lk.distributed.leap_attention_cp(*grad_args, group=W))
    bad_mask = torch.zeros(1, 4 if rank == 0 else 3, dtype=torch.bool)
    out["mask_bad_on_rank_1"] = _raises(lambda: lk.distributed.leap_attention_cp(
        *args(), group=W, key_padding_mask=bad_mask))
    out["slice_lengths_count"] = _raises(lambda: lk.distributed.leap_attention_cp(
        *args(), group=W, slice_lengths=[4, 4, 4]))
    out["slice_lengths_swapped"] = _raises(lambda: lk.distributed.leap_attention_cp(
        *args(T=3 + rank), group=W, slice_lengths=[4, 3]))
    out["slice_lengths_zero"] = _raises(lambda: lk.distributed.leap_attention_cp(
        *args(), group=W, slice_lengths=[4, 0]))
    # the group still works after all of these
    o = lk.distributed.leap_attention_cp(*args(), group=W)
    out["after"] = {"finite": bool(torch.isfinite(o).all())}
    return out


def _bytes_case(rank):
    """Bytes this rank sends and receives per call (forward + backward) at two sequence lengths."""
    res = {}
    for T in (8, 64):
        x = [t.requires_grad_() for t in _inputs([T, T], dict(dtype=F32, H=4, Hkv=2))[:5]]
        a, b = _bounds([T, T], rank)
        local = [t[:, a:b].detach().clone().requires_grad_() for t in x]
        for mode, kw in (("causal", {}), ("block", dict(block_size=3)), ("noncausal", dict(causal=False))):
            with lk.distributed.track_communication() as st:
                lk.distributed.leap_attention_cp(*local, group=dist.group.WORLD, slice_lengths=[T, T],
                                                 backend="torch", **kw).sum().backward()
            res[f"{mode}_{T}"] = dict(st)
    return res


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    results = {}
    try:
        for name, (lens, opt) in CASES.items():
            if len(lens) != world:
                continue
            try:
                results[name] = _parity(rank, lens, opt)
            except Exception:
                results[name] = {"crash": traceback.format_exc()}
        if world == 2:
            results["errors"] = _error_cases(rank)
            results["bytes"] = _bytes_case(rank)
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        dist.barrier()
        dist.destroy_process_group()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(results, fh)


_RUNS = {}


def _run(world, tmp_path_factory):
    """Spawn ``world`` processes once per session; returns each rank's results."""
    if world in _RUNS:  # one spawn per world, a failed one included (no re-spawn per test)
        if isinstance(_RUNS[world], BaseException):
            raise _RUNS[world]
        return _RUNS[world]
    try:
        _RUNS[world] = _spawn(world, tmp_path_factory)
    except BaseException as e:
        _RUNS[world] = e
        raise
    return _RUNS[world]


def _spawn(world, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"cp{world}")
    ctx = mp.start_processes(_worker, args=(world, str(d / "store"), str(d)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {world} processes did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    runs = []
    for r in range(world):
        with open(d / f"rank{r}.json") as fh:
            runs.append(json.load(fh))
    for r, res in enumerate(runs):
        assert "crash" not in res, f"rank {r}: {res['crash']}"
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, tmp_path_factory):
    lens, opt = CASES[case]
    runs = _run(len(lens), tmp_path_factory)
    tol = TOL[getattr(torch, opt.get("dtype", F64))]
    for r, res in enumerate(runs):
        got = res[case]
        assert "crash" not in got, f"rank {r}: {got['crash']}"
        for what, err in got["errs"].items():
            limit = tol if what == "o" else 2 * tol
            assert err <= limit, f"rank {r} {what}: relative error {err:.3e} > {limit:.1e}"


ERRORS = {  # case -> (exception type, words every rank's one-line message contains)
    "head_dim_differs": ("ValueError", ["q", "head dim", "rank 1"]),
    "causal_differs": ("ValueError", ["causal", "rank 1"]),
    "block_size_differs": ("ValueError", ["block_size", "rank 1"]),
    "grad_differs": ("ValueError", ["requires_grad", "rank 1"]),
    "mask_bad_on_rank_1": ("ValueError", ["key_padding_mask"]),
    "slice_lengths_count": ("ValueError", ["slice_lengths", "3 entries", "2 ranks"]),
    "slice_lengths_swapped": ("ValueError", ["slice_lengths"]),
    "slice_lengths_zero": ("ValueError", ["slice_lengths[1]"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_every_rank_raises(case, tmp_path_factory):
    kind, words = ERRORS[case]
    runs = _run(2, tmp_path_factory)
    for r, res in enumerate(runs):
        raised = res["errors"][case]["raised"]
        assert raised is not None, f"rank {r} did not raise"
        assert raised[0] == kind, f"rank {r}: {raised}"
        assert "\n" not in raised[1]
        for w in words:
            assert w in raised[1], f"rank {r}: {w!r} not in {raised[1]!r}"
        assert res["errors"]["after"]["finite"]


def test_communication_independent_of_length(tmp_path_factory):
    """State bytes per call do not depend on T, and match the bound (P - 1) * s per all-gather."""
    runs = _run(2, tmp_path_factory)
    P, Hkv = 2, 2
    s = B * Hkv * 2 * DK * (DV + 1) * 4  # one float32 state, kv heads
    for r, res in enumerate(runs):
        st = res["bytes"]
        for mode in ("causal", "block", "noncausal"):
            assert st[f"{mode}_8"] == st[f"{mode}_64"], f"rank {r} {mode}: {st}"
        # causal: forward all-gather of one state, backward all-gather of its gradient
        assert st["causal_8"] == {"sent": 2 * s, "received": 2 * (P - 1) * s, "collectives": 2}
        # block-causal with a boundary inside a block (T = 8, W = 3): two states each way
        assert st["block_8"] == {"sent": 4 * s, "received": 4 * (P - 1) * s, "collectives": 2}
        assert st["noncausal_8"] == {"sent": 2 * s, "received": 2 * s, "collectives": 2}


def test_group_is_required():
    q = torch.randn(1, 3, 1, 4)
    p = torch.rand(1, 3, 1)
    with pytest.raises(TypeError, match="group"):
        lk.distributed.leap_attention_cp(q, q, q, p, p)
    with pytest.raises(TypeError, match="group is required"):
        lk.distributed.leap_attention_cp(q, q, q, p, p, group=None)

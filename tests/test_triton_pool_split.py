"""The Triton window_pool kernels after issue 18: the sum prefix split over T (block prefixes in
parallel, then a carry scan), the max path's sparse table built in bounded (sequence, column)
chunks, int64 addresses, ``enable_fp_fusion`` pinned per launch.

The interpreter is slow per program and op, so the block and scan sizes are shrunk here
(``PBT`` = 16 rows, ``SCAN_BK`` = 4 blocks, ``ST_SCRATCH`` a few KiB): the multi-block,
multi-step and multi-chunk paths run at T of a few hundred.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import leapformer_kernels as lk
from utils import TOL, assert_close, rel_err

tp = pytest.importorskip("leapformer_kernels.pooling.triton_pool")
pytestmark = pytest.mark.skipif("triton" not in lk.available_backends("window_pool"),
                                reason="triton backend not available")

ROOT = Path(__file__).resolve().parents[1]
H100_SMS = 132
NAN, INF = float("nan"), float("inf")
HUGE = 2 ** 63 - 1


@pytest.fixture
def small_blocks(monkeypatch):
    """16-row prefix blocks, 4 blocks per scan step: T = 300 gives 19 blocks and 5 scan steps."""
    monkeypatch.setattr(tp, "PBT", 16)
    monkeypatch.setattr(tp, "SCAN_BK", 4)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(x, windows, reduce, g):
    xk = x.clone().to(_device()).requires_grad_()
    pooled, valid = lk.window_pool(xk, windows, reduce, backend="triton")
    pooled.backward(g.to(_device()))
    return pooled.detach().cpu(), valid.cpu(), xk.grad.cpu()


def _oracle(x, windows, reduce, g):
    xr = x.double().requires_grad_()
    pooled, valid = lk.reference.window_pool(xr, windows, reduce)
    pooled.backward(g.double())
    return pooled.detach(), valid, xr.grad


# ------------------------------------------------------------------ 1. the split prefix
SUM_WINDOWS = [(0, 0), (-3, 1), (-20, 35), (-HUGE, 0), (0, HUGE), (-2 ** 63, -290), (290, 2 ** 62)]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_split_prefix_parity(small_blocks, reduce):
    """Many blocks and scan steps, T and D not multiples of any block, windows partly and wholly
    outside, offsets near +-2^63: forward and backward against the float64 oracle."""
    x = torch.randn(2, 301, 5)
    g = torch.randn(2, 301, len(SUM_WINDOWS), 5)
    pooled, valid, dx = _run(x, SUM_WINDOWS, reduce, g)
    ref, ref_valid, ref_dx = _oracle(x, SUM_WINDOWS, reduce, g)
    assert torch.equal(valid, ref_valid)
    assert_close(pooled, ref, torch.float32, "pooled")
    assert_close(dx, ref_dx, torch.float32, "dx", factor=2)


def test_split_prefix_nonfinite(small_blocks):
    """NaN / Inf: windows holding them are non-finite; every window that ends before the first
    non-finite row of its (sequence, feature) is exact, also across scan steps (the carry of a
    block never holds the block itself), and the other columns are untouched."""
    x = torch.randn(2, 300, 3)
    x[0, 150, 1] = NAN  # block 9, scan step 2
    x[1, 37, 2] = INF
    x[1, 250, 2] = -INF  # after both: NaN
    windows = [(0, 0), (-3, 0), (-40, 40), (-300, 0)]
    g = torch.randn(2, 300, len(windows), 3)
    pooled, _, dx = _run(x, windows, "sum", g)
    ref, _, ref_dx = _oracle(x, windows, "sum", g)
    holds = ~torch.isfinite(ref)
    assert holds.any() and not torch.isfinite(pooled[holds]).any()
    t = torch.arange(300)
    clean = torch.ones_like(holds)
    for (b, d), pos in {(0, 1): 150, (1, 2): 37}.items():
        for w, (_, hi) in enumerate(windows):
            clean[b, :, w, d] = (t + hi + 1).clamp(0, 300) <= pos
    assert_close(pooled[clean], ref[clean], torch.float32, "clean windows")
    assert_close(dx, ref_dx, torch.float32, "dx", factor=2)  # the gradient does not depend on x


def test_split_prefix_large_values(small_blocks):
    """Blocks above 2^120 are summed scaled by 2^-8, ordinary blocks exactly as before, in one
    sequence: every result whose true value fits float32 is finite and accurate."""
    big = 1e37
    x = torch.randn(1, 300, 4, dtype=torch.float64)
    x[:, 100:180] = big * (0.5 + torch.rand(1, 80, 4, dtype=torch.float64))
    x[:, 100:180, 1] *= -1
    x = x.float()
    windows = [(0, 0), (-1, 0), (0, 2)]
    g = torch.randn(1, 300, len(windows), 4)
    for reduce in ("sum", "mean"):
        pooled, _, dx = _run(x, windows, reduce, g)
        ref, _, ref_dx = _oracle(x, windows, reduce, g)
        assert torch.isfinite(pooled).all() and torch.isfinite(ref).all()
        assert_close(pooled.double() / big, ref / big, torch.float32, f"{reduce} / big")
        assert_close(dx, ref_dx, torch.float32, f"{reduce} dx", factor=2)
    pooled, _, _ = _run(x, [(-300, 0)], "mean", torch.ones(1, 300, 1, 4))
    ref, _, _ = _oracle(x, [(-300, 0)], "mean", torch.ones(1, 300, 1, 4))
    assert torch.isfinite(pooled).all()
    assert rel_err(pooled.double() / big, ref / big) <= TOL[torch.float32]


def test_split_prefix_half(small_blocks):
    """bfloat16 runs through the float32 prefix: flash-attn's tolerance for bfloat16."""
    x = torch.randn(2, 200, 5).bfloat16()
    windows = [(-5, 0), (3, 90)]
    g = torch.randn(2, 200, 2, 5).bfloat16()
    pooled, _, dx = _run(x, windows, "mean", g)
    ref, _, ref_dx = _oracle(x, windows, "mean", g)
    assert_close(pooled, ref, torch.bfloat16, "pooled")
    assert_close(dx, ref_dx, torch.bfloat16, "dx", factor=2)


# ------------------------------------------------------------------ 2. the bounded sparse table
MAX_WINDOWS = [(-3, 0), (1, 1), (-90, -88), (-70, 0), (95, 200), (0, 0)]  # longest 71: R = 64 < T = 100
MAX_WINDOWS_HUGE = [(-HUGE, 0), (-2 ** 63, 2 ** 63 - 1), (2 ** 62, HUGE), (-1, 1)]  # R = T


def _tie_input(B, T, D):
    x = torch.randint(-2, 3, (B, T, D)).float()  # many equal maxima: the argmax takes the first
    x[0, 40, 3] = NAN
    x[0, 43, 3] = NAN  # two NaNs: the first takes the gradient
    x[-1, 70, 0] = NAN
    return x


@pytest.mark.parametrize("cap", ["columns", "sequences"])
@pytest.mark.parametrize("wset", ["short", "huge"])
def test_chunked_max_parity(monkeypatch, cap, wset):
    """The table built in chunks of columns (all sequences) or of sequences (64 columns): values
    (NaN included) exactly the oracle's, ties and NaN to the first index, forward and backward."""
    B, T, D = 2, 100, 70
    windows = MAX_WINDOWS if wset == "short" else MAX_WINDOWS_HUGE
    plan0 = tp.st_plan(B, T, D, tp.clamp_windows(windows, T))
    unit = plan0["nbuf"] * 8 * plan0["NR"]
    # columns: 64 columns of every sequence per chunk; sequences: one sequence (of 64 columns)
    monkeypatch.setattr(tp, "ST_SCRATCH", unit * B * 64 if cap == "columns" else unit * 64)
    plan = tp.st_plan(B, T, D, tp.clamp_windows(windows, T))
    assert (plan["BC"], plan["DC"]) == ((B, 64) if cap == "columns" else (1, 64))
    assert plan["R"] == (64 if wset == "short" else T)
    x = _tie_input(B, T, D)
    g = torch.randn(B, T, len(windows), D)
    pooled, valid, dx = _run(x, windows, "max", g)
    ref, ref_valid, ref_dx = _oracle(x, windows, "max", g)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(pooled, ref.float(), rtol=0, atol=0, equal_nan=True)
    assert_close(dx, ref_dx, torch.float32, "dx", factor=2)
    with torch.no_grad():  # inference (no argmax) gives the same values
        inf, _ = lk.window_pool(x.to(_device()), windows, "max", backend="triton")
    torch.testing.assert_close(inf.cpu(), pooled, rtol=0, atol=0, equal_nan=True)


class _Allocations(TorchDispatchMode):
    """Records the (shape, dtype) of every tensor the host code allocates with an empty / full
    factory (what the kernels write into)."""

    FACTORIES = ("empty.memory_format", "empty_strided.default", "full.default", "zeros.default",
                 "new_empty.default", "new_empty_strided.default", "new_full.default")

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if any(name.endswith(f) or str(func).endswith(f) for f in self.FACTORIES):
            self.log.append((tuple(out.shape), out.dtype))
        return out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


@pytest.mark.parametrize("case", ["one_chunk", "columns", "sequences"])
def test_max_scratch_matches_formula(monkeypatch, case):
    """Every allocation of the max forward, recorded: the output, the argmax, valid and the level
    buffers, nbuf x (float32 + int32) of BC * (T + R) * DC elements, i.e. ``st_plan``'s scratch,
    which stays within max(ST_SCRATCH, nbuf * 8 * (T + R) * min(D, 64)) bytes."""
    for name in dir(tp):
        if name.startswith(("pool_fwd_kernel_", "pool_bwd_kernel_")):
            monkeypatch.setattr(tp, name, _NoLaunch())
    B, T, D = 4, 500, 200
    windows = [(-3, 0), (1, 1), (5, 40)]  # longest 36: jmax 5, R = 32
    R, nbuf = 32, 2
    unit = nbuf * 8 * (T + R)
    cap = {"one_chunk": unit * B * D, "columns": unit * B * 128 + 1, "sequences": unit * 64 * 2}[case]
    monkeypatch.setattr(tp, "ST_SCRATCH", cap)
    want_bc, want_dc = {"one_chunk": (B, D), "columns": (B, 128), "sequences": (2, 64)}[case]
    x = torch.empty(B, T, D, device="meta")
    with _Allocations() as rec:
        tp.fwd(x, windows, "max", with_argmax=True)
    n = want_bc * (T + R) * want_dc
    expected = sorted([((B, T, len(windows), D), torch.float32), ((B, T, len(windows), D), torch.int16),
                       ((B, T, len(windows)), torch.bool)]
                      + [((n,), torch.float32), ((n,), torch.int32)] * nbuf, key=str)
    assert sorted(rec.log, key=str) == expected
    plan = tp.st_plan(B, T, D, windows)
    scratch = sum(s[0] * 4 for s, _ in rec.log if len(s) == 1)
    assert scratch == plan["scratch"] == nbuf * 8 * want_bc * (T + R) * want_dc
    assert tp.scratch_bytes(B, T, D, windows, "max") == scratch + 8 * len(windows)  # + the window table
    assert scratch <= max(cap, nbuf * 8 * (T + R) * min(D, tp.OUT_BD))
    assert scratch < 2 * 8 * B * 2 * T * D  # before: two [B, 2T, D] float32 + int32 buffers


@pytest.mark.parametrize("D", [64, 1024])
def test_anchor_plans(D):
    """B=4, T=8192, dyadic_windows(8): the sum prefix fills an H100 (>= 3 programs per SM; it was
    B = 4 programs at D = 64), the max table stays within ST_SCRATCH (it was 1 GiB at D = 1024)."""
    B, T = 4, 8192
    windows = lk.dyadic_windows(8)
    blk, scan = tp.prefix_grids(B, T, D)
    assert blk[0] >= 3 * H100_SMS and blk[0] == B * (T // tp.PBT) * -(-D // tp.PRE_BD)
    assert scan[0] == B * -(-D // tp.SCAN_BD)
    plan = tp.st_plan(B, T, D, windows)
    assert plan["R"] == 128 and plan["scratch"] <= tp.ST_SCRATCH


def test_launch_options(monkeypatch):
    """Every pooling launch pins enable_fp_fusion (as the attention launches do)."""
    log = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: log.append((self.name, k))

    for name in dir(tp):
        if name.startswith(("pool_fwd_kernel_", "pool_bwd_kernel_")):
            monkeypatch.setattr(tp, name, Rec(name))
    x = torch.empty(2, 300, 70, device="meta")
    for reduce in ("sum", "mean", "max"):
        pooled, _, arg = tp.fwd(x, [(-3, 0), (1, 4)], reduce, with_argmax=True)
        tp.bwd(torch.empty(pooled.shape, device="meta"), 300, [(-3, 0), (1, 4)], reduce, arg)
    names = {n for n, _ in log}
    assert {"pool_fwd_kernel_block_prefix", "pool_fwd_kernel_carry_scan", "pool_fwd_kernel_st_init", "pool_fwd_kernel_st_level", "pool_fwd_kernel_max_out",
            "pool_bwd_kernel_max_runs", "pool_bwd_kernel_max", "pool_fwd_kernel_sum_out", "pool_bwd_kernel_sum"} <= names
    assert all(k.get("enable_fp_fusion") is True for _, k in log), [n for n, k in log if "enable_fp_fusion" not in k]


# ------------------------------------------------------------------ 3. int64 addresses
TTIR_CHECK = r'''
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from benchmarks import aot
from leapformer_kernels.pooling import triton_pool as tp
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

x = torch.empty(2, 300, 70, device="meta")
wins = [(-3, 0), (1, 1), (2, 40)]
with aot.record() as launches:
    for red in ("mean", "max"):
        p, _, arg = tp.fwd(x, wins, red, True)
        tp.bwd(p, 300, wins, red, arg)
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
seen, bad = set(), []
for L in launches:
    if L.key() in seen:
        continue
    seen.add(L.key())
    s = aot.specs(L, target)[0]
    src = ASTSource(aot._jit_fn(L.kernel()), s["signature"], s["constexprs"], s["attrs"])
    opts = backend.parse_options(s["options"])
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    text = str(src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx))
    defs = {m.group(1): m.group(2) for m in re.finditer(r"(%[\w.]+) = ([\w.]+)", text)}
    for m in re.finditer(r"(%[\w.]+) = arith\.muli (%[\w.]+), (%[\w.]+) : (\S*i32>?)\s", text):
        if "arith.constant" not in (defs.get(m.group(2)), defs.get(m.group(3))):
            bad.append(f"{L.label}: {m.group(0).strip()}")
print("KERNELS", len(seen))
print("\n".join(bad) or "OK")
'''


def test_int64_addressing():
    """No int32 product of two runtime values (a row index times a stride, a window index times
    D, ...) in the pooling kernels' IR (compiled for sm_90 on this CPU, front end only): every
    address is formed in int64, so B * T * W * D >= 2^31 elements address correctly (before, e.g.
    ``(t * W + w) * D`` in the max backward was int32). Products with a constant (a program id
    times a block size, bounded by T or the column count) are allowed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TTIR_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("KERNELS") and int(lines[0].split()[1]) >= 9, proc.stdout
    assert lines[1:] == ["OK"], "\n".join(lines[1:])

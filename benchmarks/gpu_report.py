"""python -m benchmarks.gpu_report --out DIR: the first thing to run whenever a GPU is available.

One command, at most 8 minutes on one H100 / H200 (``--budget``, wall clock from start, imports
and compilation included; every stage checks the clock before each case and skips what does not
fit). Stages, each written to DIR before the next starts (a run cut short keeps what it measured):

0. smoke (<= 60 s once its kernels are compiled, which may take up to 120 s from the start on a cold
   Triton cache: 50 s on an H200 with 15 compile jobs): imports, one tiny forward+backward per mode,
   the decode step and window_pool against the float64 reference; a failure (or a machine too slow
   for it) aborts with exit code 2.
1. parity: fp32 (tf32 off), fp16, bf16; every mode, GQA, varlen, padding, state; D 64 and 128;
   T up to 65536; forward, final state and every gradient against the float64 reference (the
   quadratic ``lk.reference`` up to T=2048, the torch backend's chunked form in float64 beyond),
   with the tolerance rule of the tests (``tests/utils.py``; its low-precision baseline is the plain
   form in that dtype up to T=2048, the torch backend in that dtype beyond); the adversarial inputs of DESIGN
   section 4; bitwise determinism of the backward; the decode step and window_pool.
2. anchor: bf16, causal, T = 1k..64k, forward and forward+backward of leap[triton] against SDPA
   (flash) and, where ``fla`` imports, LeaP on FLA (``benchmarks/attention.py``); the memory floor
   from the copy bandwidth measured in this run; peak memory and the workspace beyond o, do and the
   input gradients. B=4, H=16, D=64, then B=1, H=8 and D=128.
3. decode: the step at batch 1 and 64 over 1k..128k context against SDPA with a KV cache, GPU time
   of a CUDA-graph replay and eager time (``benchmarks/decode.py``).
4. window_pool against its memory floor.

Kernels are compiled up front in parallel (``benchmarks/aot.py``: launches recorded, every config
compiled in ``--jobs`` processes into Triton's cache while earlier stages run); parity cases run
the first autotune config only, the benchmarks autotune in an untimed warm-up. Files (<= 8):
report.json, report.md, anchor_*.png, decode.png, log.txt, with device, torch and triton versions.

Without CUDA (or with --tiny) it rehearses everything at tiny sizes under TRITON_INTERPRET=1 (the
CI smoke test), compiling a couple of kernels for sm_90 on the side.
"""
import time

T_START = time.monotonic()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import torch  # noqa: E402

SMOKE_COMPILE_S = 120  # seconds from the start for the smoke kernels to compile (not part of the smoke budget)
STAGE_BUDGETS = {"smoke": 60, "parity": 150, "anchor": 150, "decode": 45, "pool": 20}  # seconds, of 450


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (at most 8 files)")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole run (default 450)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without CUDA)")
    p.add_argument("--require-cuda", action="store_true",
                   help="exit at once (code 2) if CUDA is unavailable, instead of rehearsing on the CPU")
    p.add_argument("--stages", nargs="+", default=list(STAGE_BUDGETS), choices=list(STAGE_BUDGETS),
                   help="stages to run (smoke always runs, unless --skip-smoke)")
    p.add_argument("--skip-smoke", action="store_true",
                   help="no smoke stage (a focused rerun on a machine already known to work)")
    p.add_argument("--anchor-T", type=int, nargs="+", default=None, help=f"anchor lengths (default {ANCHOR_T})")
    p.add_argument("--anchor-shapes", nargs="+", default=None, choices=ANCHOR_SHAPES,
                   help="anchor shapes (default: all three)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="compile processes")
    p.add_argument("--tiny-compiles", type=int, default=2,
                   help="with --tiny: kernels compiled for sm_90 on the side (rehearses the precompile)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- bookkeeping
class Report:
    """Results so far, rewritten to DIR (report.json, report.md) after every case."""

    def __init__(self, out: Path, meta):
        self.out = out
        self.data = {"meta": meta, "stages": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.logf = open(out / "log.txt", "w")

    def log(self, msg=""):
        print(msg, flush=True)
        self.logf.write(msg + "\n")
        self.logf.flush()

    def stage(self, name):
        return self.data["stages"].setdefault(name, {"status": "running", "cases": []})

    def save(self):
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - T_START, 1)
        tmp = self.out / "report.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "report.json")
        (self.out / "report.md").write_text(markdown(self.data))


class Clock:
    def __init__(self, budget, scale):
        self.deadline = T_START + budget
        self.scale = scale

    def left(self):
        return self.deadline - time.monotonic()

    def stage_deadline(self, name, later):
        """This stage's own budget, but leave the later stages their minimum (a third of theirs)."""
        reserve = sum(STAGE_BUDGETS[s] for s in later) * self.scale / 3
        return min(time.monotonic() + STAGE_BUDGETS[name] * self.scale, self.deadline - reserve)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- parity cases
@dataclass
class Case:
    name: str
    dtype: str
    B: int = 2
    T: int = 200
    S: Optional[int] = None
    H: int = 2
    Hkv: Optional[int] = None
    D: int = 64
    mode: dict = field(default_factory=lambda: {"causal": True})
    padding: bool = False
    state: bool = False
    cu: Optional[List[int]] = None
    normalize: bool = True
    final_state: bool = True
    kind: str = "parity"  # parity, negative_q, negative_k, orthogonal, large_fp16, determinism


@functools.lru_cache(None)
def tu():
    """tests/utils.py (inputs, rel_err, the tolerance rule), loaded by path: a ``tests`` package
    installed on the machine must not shadow it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("leapformer_test_utils",
                                                  Path(__file__).resolve().parents[1] / "tests" / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUADRATIC_MAX_T = 2048  # above: the float64 reference is the torch backend's chunked form


def case_inputs(c: Case, dev):
    make_inputs, make_state = tu().make_inputs, tu().make_state
    torch.manual_seed(zlib.crc32(c.name.encode()))
    B = 1 if c.cu else c.B
    q, k, v, pq, pk = make_inputs(B, c.T, c.S, c.H, c.Hkv, c.D, c.D, dtype=torch.float32, device=dev)
    if c.kind == "negative_q":
        q = -q.abs() - 0.1
    elif c.kind == "negative_k":
        k = -k.abs() - 0.1
    elif c.kind == "orthogonal":
        pq, pk = torch.ones_like(pq), torch.zeros_like(pk)
    elif c.kind == "large_fp16":
        q, k, v = 1e3 * q, 1e3 * k, 1e3 * v
    q, k, v = (t.to(DT[c.dtype]) for t in (q, k, v))
    kw = dict(c.mode, normalize=c.normalize)
    if c.padding:
        kpm = torch.rand(B, k.shape[1], device=dev) < 0.3
        kpm[:, 0] = True
        kw["key_padding_mask"] = kpm
    if c.cu:
        kw["cu_seqlens"] = torch.tensor(c.cu, dtype=torch.int64, device=dev)
    n = len(c.cu) - 1 if c.cu else B
    ins = [q, k, v, pq, pk] + (list(make_state(n, c.H, c.D, c.D, device=dev)) if c.state else [])
    return ins, kw


def call(fn, ins, kw, c: Case, **extra):
    """[o, S, z] (or [o]) of fn on ins."""
    init = (ins[5], ins[6]) if c.state else None
    out = fn(*ins[:5], initial_state=init, output_final_state=c.final_state, **kw, **extra)
    return [out[0], *out[1]] if c.final_state else [out]


def loss(outs, gens):
    return sum((y.double() * g).sum() for y, g in zip(outs, gens))


def triton_fwd_bwd(c: Case, dev, ins=None, kw=None, gens=None):
    import leapformer_kernels as lk

    if ins is None:
        ins, kw = case_inputs(c, dev)
    ins = [t.detach().requires_grad_() for t in ins]
    outs = call(lk.leap_attention, ins, kw, c, backend="triton")
    if gens is None:
        g = torch.Generator(device=dev).manual_seed(1)
        gens = [torch.randn(o.shape, dtype=torch.float64, device=dev, generator=g) for o in outs]
    loss(outs, gens).backward()
    return ins, kw, outs, gens


GRADS = ["dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"]


def check_case(c: Case, dev):
    """Run the case; return {name, ok, errs: {what: rel err}, msg}."""
    import leapformer_kernels as lk
    TOL, assert_close, plain_form, rel_err = tu().TOL, tu().assert_close, tu().plain_form, tu().rel_err
    dtype = DT[c.dtype]
    res = {"case": c.name, "dtype": c.dtype, "T": c.T, "D": c.D, "kind": c.kind, "ok": True, "errs": {}}
    fails = []
    if c.kind == "determinism":
        ins, kw, _, gens = triton_fwd_bwd(c, dev)
        first = [t.grad.clone() for t in ins]
        runs = 2 if dev.type == "cpu" else 3  # the interpreter is slow
        for _ in range(runs - 1):
            ins2, _, _, _ = triton_fwd_bwd(c, dev, [t.detach() for t in ins], kw, gens)
            for name, a, b in zip(GRADS, first, [t.grad for t in ins2]):
                if not torch.equal(a, b):
                    diff = (a.double() - b.double()).abs().max()
                    fails.append(f"{name} differs between runs (max |diff| {diff:.3e})")
        res.update(ok=not fails, msg="; ".join(fails) or f"bitwise equal over {runs} runs")
        return res
    ins, kw, outs, gens = triton_fwd_bwd(c, dev)
    names = ["o", "S", "z"][:len(outs)]
    if c.kind in ("negative_q", "negative_k", "orthogonal"):  # finite, and o == 0 exactly
        for name, t in zip(names + GRADS, outs + [t.grad for t in ins]):
            if not bool(torch.isfinite(t).all()):
                fails.append(f"{name} not finite")
        if outs[0].abs().max() != 0:
            fails.append(f"o is not 0 (max {outs[0].abs().max():.3e})")
        res.update(ok=not fails, msg="; ".join(fails) or "finite, o == 0")
        return res
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    quadratic = c.T <= QUADRATIC_MAX_T and (c.S or c.T) <= QUADRATIC_MAX_T
    ref_fn = lk.reference.leap_attention if quadratic else functools.partial(lk.leap_attention, backend="torch")
    refs = call(ref_fn, ref_ins, kw, c)
    loss(refs, gens).backward()
    bases = [None] * 10
    if dtype != torch.float32 and c.kind == "parity":
        # the flash-attn rule's baseline: the plain form run in dtype; beyond the quadratic form's
        # reach, the torch backend run in dtype (fp32 arithmetic on the same half inputs, do and o:
        # stricter). Needed at T=65536: p_extremes puts a query whose only key is orthogonal at t=0
        # (den = 0, clamp active, dp ~ 1/eps), so the norm of dpq/dpk is that one entry's, and its
        # relative error in bf16 is 2.7e-2 even with fp32 arithmetic (H200, precision_probe).
        base_fn = (functools.partial(plain_form, dtype=dtype) if quadratic else
                   functools.partial(lk.leap_attention, backend="torch"))
        base_ins = [t.detach().clone().requires_grad_() for t in ins]
        base_outs = call(base_fn, base_ins, kw, c)
        loss(base_outs, gens).backward()
        bases = base_outs + [t.grad for t in base_ins]
    pairs = list(zip(names, outs, refs)) + [(n, t.grad, r.grad) for n, t, r in zip(GRADS, ins, ref_ins)]
    if c.kind == "large_fp16":  # DESIGN: forward only
        pairs = pairs[:1]
    for i, (name, out, ref) in enumerate(pairs):
        res["errs"][name] = rel_err(out, ref, finite=False)
        try:
            assert_close(out, ref, dtype, name, factor=1.0 if name in ("o", "S", "z") else 2.0,
                         baseline=bases[i] if i < len(bases) else None)
        except AssertionError as e:
            fails.append(str(e))
    res["tol"] = TOL[dtype]
    res.update(ok=not fails, msg="; ".join(fails))
    return res


def check_step(name, dtype, D, dev, B=3, t=3, H=4, dry=False):
    import leapformer_kernels as lk
    TOL, make_inputs, make_state, rel_err = tu().TOL, tu().make_inputs, tu().make_state, tu().rel_err
    torch.manual_seed(7)
    q, k, v, pq, pk = make_inputs(B, t, None, H, None, D, D, dtype=torch.float32, device=dev)
    q, k, v = (x.to(DT[dtype]) for x in (q, k, v))
    st = make_state(B, H, D, D, device=dev)
    o, (S, z) = lk.leap_attention_step(q, k, v, pq, pk, st, backend="triton")
    if dry:  # recording the launches only
        return None
    o_r, (S_r, z_r) = lk.reference.leap_attention_step(*(x.double() for x in (q, k, v, pq, pk)),
                                                      tuple(x.double() for x in st))
    errs = {n: rel_err(a, b, finite=False) for n, a, b in (("o", o, o_r), ("S", S, S_r), ("z", z, z_r))}
    tol = TOL[DT[dtype]]
    bad = [f"{k} {e:.2e} > {tol:.0e}" for k, e in errs.items() if not e <= tol]
    return {"case": name, "dtype": dtype, "D": D, "kind": "step", "ok": not bad, "errs": errs, "tol": tol,
            "msg": "; ".join(bad)}


def pool_windows():
    import leapformer_kernels as lk

    return lk.dyadic_windows(6) + [(-5, 3), (-3000, 0)]


def check_pool(name, dtype, reduce, dev, shape, dry=False):
    import leapformer_kernels as lk
    TOL, rel_err = tu().TOL, tu().rel_err
    torch.manual_seed(3)
    x = torch.randn(*shape, device=dev).to(DT[dtype]).requires_grad_()
    w = pool_windows()
    out, valid = lk.window_pool(x, w, reduce, backend="triton")
    g = torch.randn(out.shape, dtype=torch.float64, device=dev)
    (out.double() * g).sum().backward()
    if dry:  # recording the launches only
        return None
    xr = x.detach().double().requires_grad_()
    ref, valid_r = lk.reference.window_pool(xr, w, reduce)
    (ref * g).sum().backward()
    tol = TOL[DT[dtype]]
    errs = {"out": rel_err(out, ref, finite=False), "dx": rel_err(x.grad, xr.grad, finite=False)}
    bad = [f"{k} {e:.2e} > {f * tol:.0e}" for (k, e), f in zip(errs.items(), (1, 2)) if not e <= f * tol]
    if not torch.equal(valid, valid_r):
        bad.append("valid differs")
    return {"case": name, "dtype": dtype, "kind": "pool", "ok": not bad, "errs": errs, "tol": tol,
            "msg": "; ".join(bad)}


MODES = {"causal": {"causal": True}, "block16": {"causal": True, "block_size": 16},
         "block100": {"causal": True, "block_size": 100}, "noncausal": {"causal": False},
         "cross": {"causal": False}}


def smoke_cases(tiny):
    D, T = (16, 33) if tiny else (64, 65)
    cs = [Case(f"smoke.{m}", "float32", T=T, D=D, mode=kw, S=T + 17 if m == "cross" else None,
               padding=m != "cross", state=m != "cross") for m, kw in MODES.items()]
    cs.append(Case("smoke.varlen", "float32", T=T + 7, D=D, cu=[0, 7, 7, T, T + 7], state=True))
    return cs


def parity_cases(tiny):
    """Ordered: the core grid first, long sequences, adversarial, determinism last."""
    if tiny:  # the rehearsal: every kind of case once, interpreted
        dims, T, long_T, adv_T, det_T = [16], 65, 256, 65, 65
        grid = [("float32", 16, m) for m in ("causal", "block16", "cross")] + [("float16", 16, "causal"),
                                                                              ("bfloat16", 32, "cross")]
        extra = [("float32", 16)]
        longs = [("bfloat16", 16)]
    else:
        dims, T, long_T, adv_T, det_T = [64, 128], 1000, 65536, 1000, 4096
        grid = [(dt, D, m) for dt in DT for D in dims for m in MODES]
        extra = [(dt, D) for dt in DT for D in dims]
        longs = extra
    cs = []
    for dt, D, m in grid:
        gqa = m in ("causal", "cross", "block100")
        cs.append(Case(f"{m}.{dt}.D{D}", dt, T=T, D=D, mode=MODES[m], S=T + 37 if m == "cross" else None,
                       H=4 if gqa else 2, Hkv=2, padding=m != "cross", state=m != "cross"))
    for dt, D in extra:
        cs.append(Case(f"varlen.{dt}.D{D}", dt, T=T, D=D, cu=[0, 7, 7, T // 2 + 3, T - 1, T], padding=True,
                       state=True, H=4, Hkv=2))
        cs.append(Case(f"unnormalized.{dt}.D{D}", dt, T=T, D=D, normalize=False, state=True))
    for dt, D in longs:
        cs.append(Case(f"long.{dt}.D{D}.T{long_T}", dt, B=1, T=long_T, D=D, final_state=False))
    for kind in ("negative_q", "negative_k"):
        for m in ("causal", "noncausal"):
            if not tiny or (kind, m) == ("negative_q", "causal"):
                cs.append(Case(f"{kind}.{m}.bfloat16", "bfloat16", T=adv_T, D=dims[0], mode=MODES[m], kind=kind,
                               final_state=False))
    cs.append(Case("orthogonal.bfloat16", "bfloat16", T=adv_T, D=dims[0], kind="orthogonal", final_state=False))
    cs.append(Case("large_fp16.forward", "float16", B=1, T=adv_T, D=dims[0], kind="large_fp16",
                   final_state=False))
    cs.append(Case("determinism.bfloat16.gqa", "bfloat16", T=det_T, D=dims[0], H=4, Hkv=2, padding=True,
                   state=True, kind="determinism"))
    if not tiny:
        cs.append(Case("determinism.float32.varlen", "float32", T=det_T, D=dims[-1],
                       cu=[0, 5, det_T // 2, det_T], state=True, kind="determinism"))
    return cs


def extra_checks(tiny, smoke=False):
    """(name, callable(dev)) for the decode step and window_pool."""
    shape = (1, 100, 16) if tiny else (2, 1000, 96)
    if smoke or tiny:
        pre = "smoke." if smoke else ""
        steps = [("float32", 16 if tiny else 64)]
        pools = [("float32", "mean"), ("float32" if smoke else "bfloat16", "max")]
    else:
        pre = ""
        steps = [(dt, D) for dt in DT for D in (64, 128)]
        pools = [(dt, r) for dt in DT for r in ("sum", "mean", "max")]
    out = [(f"{pre}step.{dt}.D{D}", functools.partial(check_step, f"{pre}step.{dt}.D{D}", dt, D))
           for dt, D in steps]
    out += [(f"{pre}pool.{r}.{dt}", functools.partial(check_pool, f"{pre}pool.{r}.{dt}", dt, r, shape=shape))
            for dt, r in pools]
    return out


# ----------------------------------------------------------------------------- precompile
RECORD_ERRORS = []


def record_launches(fns, dev):
    """The kernel launches (nothing runs) of each fn(dev), deduplicated."""
    from . import aot

    with aot.record() as launches:
        for fn in fns:
            try:
                fn(dev)
            except Exception as e:  # its kernels then compile when the stage runs (slower, still right)
                RECORD_ERRORS.append(f"{type(e).__name__}: {e}"[:200])
    return list({L.key(): L for L in launches}.values())


def step_call(B, H, D, dtype, dev):
    import leapformer_kernels as lk

    g = dict(dtype=dtype, device=dev)
    q = torch.randn(B, 1, H, D, **g)
    p = torch.rand(B, 1, H, **g)
    st = (torch.rand(B, H, 2 * D, D, device=dev), torch.rand(B, H, 2 * D, device=dev))
    return lk.leap_attention_step(q, q, q, p, p, st, backend="triton")


# ----------------------------------------------------------------------------- stages
def run_checks(rep, stage, items, dev, deadline):
    """items: (name, callable(dev) -> result dict). Stops (skips the rest) at the deadline."""
    st = rep.stage(stage)
    for name, fn in items:
        if time.monotonic() > deadline:
            st["cases"].append({"case": name, "ok": None, "msg": "skipped: stage budget"})
            continue
        t0 = time.perf_counter()
        try:
            res = fn(dev)
        except Exception as e:
            res = {"case": name, "ok": False, "msg": f"{type(e).__name__}: {e}"[:500],
                   "trace": traceback.format_exc()[-1500:]}
        sync()
        res["seconds"] = round(time.perf_counter() - t0, 2)
        st["cases"].append(res)
        worst = max([v for v in res.get("errs", {}).values() if v is not None] or [0.0])
        rep.log(f"  {'ok  ' if res['ok'] else 'FAIL' if res['ok'] is False else 'skip'} {name:<40} "
                f"worst {worst:.2e}  {res['seconds']:.1f} s  {res.get('msg', '')[:150]}")
        rep.save()
    cases = st["cases"]
    st["status"] = "done"
    st["passed"] = sum(c["ok"] is True for c in cases)
    st["failed"] = sum(c["ok"] is False for c in cases)
    st["skipped"] = sum(c["ok"] is None for c in cases)
    return st


ANCHOR_T = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
ANCHOR_SHAPES = ["B4.H16.D64", "B1.H8.D64", "B4.H16.D128"]
ANCHOR_PICK = {"T": None, "shapes": None}  # --anchor-T / --anchor-shapes


def anchor_variants(tiny):
    if tiny:
        return [dict(B=1, H=2, D=16, T=[64, 128])]
    Ts = ANCHOR_PICK["T"] or ANCHOR_T
    out = []
    for name in ANCHOR_PICK["shapes"] or ANCHOR_SHAPES:
        B, H, D = (int(x[1:]) for x in name.split("."))
        out.append(dict(B=B, H=H, D=D, T=Ts))
    return out


def anchor_record_fns(tiny):
    from .attention import make

    def fn(var, dev):
        import leapformer_kernels as lk

        q, k, v, pq, pk = make(var["B"], var["T"][0], var["H"], var["D"], torch.bfloat16, dev, grad=True)
        o = lk.leap_attention(q, k, v, pq, pk, causal=True, backend="triton")
        o.sum().backward()

    return [functools.partial(fn, var) for var in anchor_variants(tiny)]


# backward variants timed beside the default leap[triton] (Dk, Dv <= 64): the triton_chunk switch each sets
MERGED_DKV = "leap[triton] one-pass dk/dv"  # MERGE_DKV: one dk + dv kernel instead of two
VARIANTS = {MERGED_DKV: {"MERGE_DKV": True}}
DEFAULTS = {"MERGE_DKV": False}


def _merge_dkv(method):
    """triton_chunk's backward switches as ``method`` (one of VARIANTS) sets them, the defaults for any
    other method (None: back to the defaults)."""
    from leapformer_kernels.attention import triton_chunk

    for name, value in dict(DEFAULTS, **VARIANTS.get(method, {})).items():
        setattr(triton_chunk, name, value)


def stage_anchor(rep, dev, tiny, deadline, bw):
    from .attention import floor_bytes, make, methods, run_case

    st = rep.stage("anchor")
    st["copy_bandwidth_GBps"] = bw / 1e9
    st["results"] = res = []
    fns = methods(["triton"], dev)  # leap[triton], sdpa, and leap_on_fla where fla imports
    if "leap[triton]" in fns:  # the backward variants (VARIANTS) against the default
        for m in VARIANTS:
            fns[m] = fns["leap[triton]"]
    dtype = torch.bfloat16
    for var in anchor_variants(tiny):
        B, H, D = var["B"], var["H"], var["D"]
        if time.monotonic() > deadline:
            res += [{"method": m, "B": B, "H": H, "D": D, "T": T, "skipped": "stage budget"} for T in var["T"]
                    for m in fns]
            continue
        t0 = time.perf_counter()  # untimed warm-up at the first T: cache loads and the autotune sweep
        for m, fn in fns.items():
            try:
                _merge_dkv(m)
                fn(*make(B, var["T"][0], H, D, dtype, dev, grad=True)).sum().backward()
            except Exception as e:
                rep.log(f"  warm-up of {m} failed: {type(e).__name__}: {e}"[:300])
        _merge_dkv(None)
        sync()
        rep.log(f"  B={B} H={H} D={D}: warm-up (compile + autotune) {time.perf_counter() - t0:.1f} s")
        c = Case(f"anchor.B{B}.H{H}.D{D}", "bfloat16", B=B, T=var["T"][0], H=H, D=D, final_state=False)
        run_checks(rep, "anchor_parity", [(c.name, functools.partial(check_case, c))], dev, deadline)
        for T in var["T"]:
            row = {}
            for m, fn in fns.items():
                if time.monotonic() > deadline:
                    row[m] = {"method": m, "B": B, "H": H, "D": D, "T": T, "skipped": "stage budget"}
                    continue
                try:
                    _merge_dkv(m)
                    r = run_case(m, fn, B, T, H, D, dtype, dev, 3 if tiny else 5)
                except Exception as e:  # e.g. out of memory: reported, the others go on
                    r = {"method": m, "B": B, "T": T, "H": H, "D": D, "error": f"{type(e).__name__}: {e}"[:300]}
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                _merge_dkv(None)
                r["fwd_floor_ms"] = floor_bytes(B, T, H, D, dtype, False) / bw * 1e3
                r["fwdbwd_floor_ms"] = floor_bytes(B, T, H, D, dtype, True) / bw * 1e3
                row[m] = r
            for r in row.values():
                for key in ("fwd", "fwdbwd"):
                    if f"{key}_ms" in r:
                        r[f"{key}_x_floor"] = r[f"{key}_ms"] / r[f"{key}_floor_ms"]
                        if f"{key}_ms" in row.get("sdpa", {}):
                            r[f"{key}_speedup_vs_sdpa"] = row["sdpa"][f"{key}_ms"] / r[f"{key}_ms"]
            res += row.values()
            rep.log(f"  T={T}: " + "  ".join(f"{m} {r['fwd_ms']:.3f}/{r['fwdbwd_ms']:.3f} ms" if "fwd_ms" in r else
                                             f"{m} {r.get('error') or r.get('skipped')}" for m, r in row.items()))
            rep.save()
        plot_anchor(rep, [r for r in res if (r["B"], r["H"], r["D"]) == (B, H, D) and "fwd_ms" in r],
                    f"anchor_B{B}_H{H}_D{D}.png", B, H)


def stage_decode(rep, dev, tiny, deadline):
    from .decode import run_decode

    st = rep.stage("decode")
    st["results"] = []
    H, D = (2, 16) if tiny else (16, 64)
    batches, contexts = ([2], [64]) if tiny else ([1, 64], [1024, 8192, 32768, 131072])
    for B in batches:
        step_call(B, H, D, torch.bfloat16, dev)  # untimed: the step kernel's first launch (compile)
        for L in contexts:
            if time.monotonic() > deadline:
                st["results"].append({"B": B, "context": L, "skipped": "stage budget"})
                continue
            try:
                r = run_decode(B, H, D, L, torch.bfloat16, dev, ["triton"], 3 if tiny else 20)
            except Exception as e:
                r = {"B": B, "context": L, "error": f"{type(e).__name__}: {e}"[:300]}
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            st["results"].append(r)
            rep.log("  decode " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in r.items() if k in ("B", "context") or k.endswith("_ms")))
            rep.save()
    plot_decode(rep, [r for r in st["results"] if "step[triton]_ms" in r])


def pool_setup(dt, reduce, dev, tiny):
    """(fwd, fwd+bwd, bytes of each) for the window_pool benchmark: dyadic_windows(8)."""
    import leapformer_kernels as lk

    B, T, D = (1, 128, 16) if tiny else (8, 4096, 512)
    w = lk.dyadic_windows(8)
    dtype = DT[dt]
    e = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(B, T, D, device=dev).to(dtype).requires_grad_()
    g = torch.randn(B, T, len(w), D, device=dev).to(dtype)
    out_b = B * T * len(w) * D * e
    fwd_bytes = B * T * D * e + out_b + B * T * len(w)  # x in; pooled and valid out
    bwd_bytes = out_b + B * T * D * e  # grad in, dx out

    def fwd():
        with torch.no_grad():
            lk.window_pool(x, w, reduce, backend="triton")

    def fwdbwd():
        out, _ = lk.window_pool(x, w, reduce, backend="triton")
        out.backward(g)
        x.grad = None

    shape = dict(B=B, T=T, D=D, W=len(w))
    return fwd, fwdbwd, fwd_bytes, fwd_bytes + bwd_bytes, shape


def pool_cases(tiny):
    return [("float32", "mean"), ("bfloat16", "max")] if tiny else [(dt, r) for dt in ("float32", "bfloat16")
                                                                     for r in ("mean", "max")]


def stage_pool(rep, dev, tiny, deadline, bw):
    from .timing import median_ms

    st = rep.stage("pool")
    st["results"] = []
    for dt, reduce in pool_cases(tiny):
        r = {"reduce": reduce, "dtype": dt}
        if time.monotonic() > deadline:
            st["results"].append(dict(r, skipped="stage budget"))
            continue
        try:
            fwd, fwdbwd, fb, fbb, shape = pool_setup(dt, reduce, dev, tiny)
            r.update(shape)
            fwdbwd()  # warm-up, untimed
            r["fwd_ms"] = median_ms(fwd, dev, 3 if tiny else 5)
            r["fwdbwd_ms"] = median_ms(fwdbwd, dev, 3 if tiny else 5)
            r["fwd_floor_ms"], r["fwdbwd_floor_ms"] = fb / bw * 1e3, fbb / bw * 1e3
            r["fwd_x_floor"] = r["fwd_ms"] / r["fwd_floor_ms"]
            r["fwdbwd_x_floor"] = r["fwdbwd_ms"] / r["fwdbwd_floor_ms"]
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"[:300]
        st["results"].append(r)
        rep.log(f"  pool {reduce} {dt}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)))
        rep.save()


# ----------------------------------------------------------------------------- output
def plot_anchor(rep, rows, name, B, H):
    if not rows:
        return
    try:
        from .__main__ import plot

        meta = rep.data["meta"]
        plot(rows, {"device": meta["device"], "versions": meta["versions"], "B": B, "H": H}, rep.out / name)
    except Exception as e:  # matplotlib missing: the JSON and the table hold the numbers
        rep.log(f"  (no plot {name}: {type(e).__name__}: {e})")


def plot_decode(rep, rows):
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for B in sorted({r["B"] for r in rows}):
            rs = sorted((r for r in rows if r["B"] == B), key=lambda r: r["context"])
            for key, style in (("sdpa_kv_cache", "-o"), ("step[triton]", "-s"), ("state_copy", ":")):
                col = f"{key}_graph_ms" if f"{key}_graph_ms" in rs[0] else f"{key}_ms"
                ax.plot([r["context"] for r in rs], [r.get(col, math.nan) for r in rs], style, label=f"{key} B={B}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context")
        ax.set_ylabel("ms per step (CUDA graph replay, median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        m = rep.data["meta"]
        ax.set_title(f"{m['device']} | torch {m['versions']['torch']} | triton {m['versions']['triton']}", fontsize=8)
        fig.tight_layout()
        fig.savefig(rep.out / "decode.png", dpi=110)
        plt.close(fig)
    except Exception as e:
        rep.log(f"  (no decode plot: {type(e).__name__}: {e})")


def _f(x, fmt="{:.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def markdown(data, brief=False):
    m = data["meta"]
    v = m["versions"]
    L = [f"# GPU report: {m['device']}", "",
         f"torch {v['torch']}, triton {v['triton']}, fla {v.get('fla')}, CUDA {m.get('cuda')}; {m['date']}; "
         f"{'tiny (rehearsal)' if m['tiny'] else 'full'} run, budget {m['budget_s']:.0f} s, elapsed "
         f"{m.get('elapsed_s', 0):.0f} s; precompile: {m.get('precompile', {})}", "",
         "| stage | status | seconds | passed | failed | skipped |", "| --- | --- | --- | --- | --- | --- |"]
    for name, st in data["stages"].items():
        L.append(f"| {name} | {st.get('status')} | {_f(st.get('seconds'), '{:.0f}')} | {st.get('passed', '-')} | "
                 f"{st.get('failed', '-')} | {st.get('skipped', '-')} |")
    checks = [c for s in ("smoke", "parity", "anchor_parity") for c in data["stages"].get(s, {}).get("cases", [])
              if not (brief and c["ok"])]
    if checks:
        L += ["", f"## Parity{' (failed and skipped cases only)' if brief else ''}: relative error against the "
              "float64 reference (tolerance per dtype, gradients x2, or within 2x the plain low-precision form)", "",
              "| case | ok | worst output | worst gradient | seconds | message |",
              "| --- | --- | --- | --- | --- | --- |"]
        for c in checks:
            errs = c.get("errs", {})
            wo = max([e for k, e in errs.items() if k in ("o", "S", "z", "out")] or [None], key=lambda e: e or 0)
            wg = max([e for k, e in errs.items() if k not in ("o", "S", "z", "out")] or [None], key=lambda e: e or 0)
            ok = {True: "ok", False: "**FAIL**", None: "skipped"}[c["ok"]]
            L.append(f"| {c['case']} | {ok} | {_f(wo, '{:.2e}')} | {_f(wg, '{:.2e}')} | "
                     f"{_f(c.get('seconds'), '{:.1f}')} | {c.get('msg', '')[:160]} |")
    an = data["stages"].get("anchor", {}).get("results", [])
    if an:
        L += ["", f"## Anchor: bf16, causal (median ms; copy bandwidth "
              f"{data['stages']['anchor'].get('copy_bandwidth_GBps', 0):.0f} GB/s)", "",
              "| B | H | D | T | method | fwd ms | x SDPA | fwd+bwd ms | x SDPA | fwd+bwd / floor | peak extra MiB "
              "| workspace MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in an:
            L.append(f"| {r['B']} | {r['H']} | {r['D']} | {r['T']} | {r['method']} | {_f(r.get('fwd_ms'))} | "
                     f"{_f(r.get('fwd_speedup_vs_sdpa'), '{:.2f}')} | {_f(r.get('fwdbwd_ms'))} | "
                     f"{_f(r.get('fwdbwd_speedup_vs_sdpa'), '{:.2f}')} | {_f(r.get('fwdbwd_x_floor'), '{:.1f}')} | "
                     f"{_f(r.get('peak_extra_mib'), '{:.0f}')} | {_f(r.get('workspace_mib'), '{:.0f}')} |"
                     + (f" {r.get('error') or r.get('skipped')}" if "fwd_ms" not in r else ""))
    dec = data["stages"].get("decode", {}).get("results", [])
    if dec:
        L += ["", "## Decode step, bf16 (ms: CUDA-graph replay / eager)", "",
              "| B | context | SDPA KV cache | step[triton] | step_[triton] (in place, pool rows) | state copy (floor) |",
              "| --- | --- | --- | --- | --- | --- |"]
        for r in dec:
            cells = [f"{_f(r.get(k + '_graph_ms'), '{:.4f}')} / {_f(r.get(k + '_ms'), '{:.4f}')}"
                     for k in ("sdpa_kv_cache", "step[triton]", "step_[triton]", "state_copy")]
            L.append(f"| {r['B']} | {r['context']} | " + " | ".join(cells) + " |")
    pool = data["stages"].get("pool", {}).get("results", [])
    if pool:
        L += ["", "## window_pool (triton) against its memory floor", "",
              "| reduce | dtype | B x T x D, W | fwd ms | x floor | fwd+bwd ms | x floor |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in pool:
            L.append(f"| {r['reduce']} | {r['dtype']} | {r.get('B')}x{r.get('T')}x{r.get('D')}, {r.get('W')} | "
                     f"{_f(r.get('fwd_ms'))} | {_f(r.get('fwd_x_floor'), '{:.1f}')} | {_f(r.get('fwdbwd_ms'))} | "
                     f"{_f(r.get('fwdbwd_x_floor'), '{:.1f}')} |")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv=None):
    a = parse(argv)
    ANCHOR_PICK.update(T=a.anchor_T, shapes=a.anchor_shapes)
    cuda = torch.cuda.is_available()
    if a.require_cuda and not cuda:
        print("ABORT: --require-cuda, but torch sees no CUDA device (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda})", flush=True)
        return 2
    tiny = a.tiny or not cuda
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    dev = torch.device("cuda" if cuda else "cpu")
    import triton  # noqa: F401  (fail here, clearly, if it is missing)

    from . import aot
    from .timing import copy_bandwidth, device_name, versions

    clock = Clock(a.budget, a.budget / 450)
    meta = {"device": device_name(dev), "versions": versions(), "cuda": torch.version.cuda, "tiny": tiny,
            "budget_s": a.budget, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
            "jobs": a.jobs}  # (not lk.available_backends(): it would build the C++ extension)
    if cuda:
        p = torch.cuda.get_device_properties(dev)
        meta.update(sms=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the references too)
        torch.backends.cudnn.allow_tf32 = False
    rep = Report(Path(a.out), meta)
    rep.log(f"gpu_report: {meta['device']}, torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
            f"fla {meta['versions']['fla']}, {'tiny' if tiny else 'full'}, budget {a.budget:.0f} s")

    # compile up front, in parallel, in the order the stages need the kernels
    if cuda:
        from triton.runtime import driver

        t = driver.active.get_current_target()
        target = (t.backend, t.arch, t.warp_size)
    else:
        target = ("cuda", 90, 32)  # rehearsal: compile a few kernels for sm_90 on the side
    smoke, parity = smoke_cases(tiny), parity_cases(tiny)
    t0 = time.perf_counter()
    def checks(cases, extra):
        return [functools.partial(triton_fwd_bwd, c) for c in cases] + [functools.partial(fn, dry=True)
                                                                         for _, fn in extra]

    groups = {  # stage -> (its launches, the configs to compile: [0] = the first only, None = all)
        "smoke": (record_launches(checks(smoke, extra_checks(tiny, smoke=True)), dev), [0]),
        "parity": (record_launches(checks(parity, extra_checks(tiny)), dev), [0]),
        "anchor": (record_launches(anchor_record_fns(tiny), dev), None),
        "decode": (record_launches([functools.partial(step_call, 1, 2 if tiny else 16, 16 if tiny else 64,
                                                      torch.bfloat16)], dev), None),
        "pool": (record_launches([lambda dev, c=c: pool_setup(*c, dev, tiny)[1]() for c in pool_cases(tiny)],
                                 dev), None),
    }
    pc = aot.Precompiler(min(a.jobs, a.tiny_compiles) if tiny else a.jobs)
    keys = {}
    budget_left = a.tiny_compiles
    for name, (launches, which) in groups.items():
        if name not in a.stages and not (name == "smoke" and not a.skip_smoke):
            continue  # a stage that will not run compiles nothing
        if tiny:  # the rehearsal compiles only a couple of kernels (the path, not the volume)
            launches = launches[:budget_left]
            budget_left -= len(launches)
            which = [0]
        keys[name] = pc.submit(launches, target, which)
    meta["precompile"] = {"launches": sum(len(g[0]) for g in groups.values()),
                          "compiles": len(pc.futures), "record_s": round(time.perf_counter() - t0, 1)}
    rep.log(f"precompile: {meta['precompile']} for {target}")
    for err in RECORD_ERRORS:
        rep.log(f"  recording failed (those kernels compile when their stage runs): {err}")

    def wait_for(name, deadline):
        if tiny or name not in keys:
            return
        t0 = time.perf_counter()
        st = pc.wait(keys[name], timeout=max(1.0, deadline - time.monotonic()))
        st["wait_s"] = round(time.perf_counter() - t0, 1)
        rep.stage(name)["precompile"] = st
        rep.log(f"  compiled for {name}: {st}")
        for f in st["failed"]:
            rep.log(f"  compile failed: {f}")

    code = 0
    bw = None
    order = [s for s in STAGE_BUDGETS if s in a.stages or (s == "smoke" and not a.skip_smoke)]
    try:
        for i, name in enumerate(order):
            st = rep.stage(name)
            st["status"], t_stage = "running", time.monotonic()
            if name == "smoke":  # a cold Triton cache: its kernels may take a while (H200, 15 jobs: ~50 s)
                wait_for(name, T_START + SMOKE_COMPILE_S * clock.scale)
                deadline = min(clock.stage_deadline(name, order[i + 1:]),
                               time.monotonic() + STAGE_BUDGETS["smoke"] * clock.scale)
            else:
                deadline = clock.stage_deadline(name, order[i + 1:])
            rep.log(f"stage {name}: until +{deadline - T_START:.0f} s")
            rep.save()
            if name != "smoke":
                wait_for(name, deadline)
            try:
                with aot.first_config_only() if name in ("smoke", "parity") else contextlib.nullcontext():
                    if name == "smoke":
                        items = [(c.name, functools.partial(check_case, c)) for c in smoke]
                        items += extra_checks(tiny, smoke=True)
                        run_checks(rep, "smoke", items, dev, deadline)
                        bw = copy_bandwidth(dev, 256 if cuda else 16)
                        meta["copy_bandwidth_GBps"] = bw / 1e9
                    elif bw is None:  # no smoke stage (--skip-smoke): measure the copy bandwidth here
                        bw = copy_bandwidth(dev, 256 if cuda else 16)
                        meta["copy_bandwidth_GBps"] = bw / 1e9
                    if name == "parity":
                        items = [(c.name, functools.partial(check_case, c)) for c in parity] + extra_checks(tiny)
                        run_checks(rep, "parity", items, dev, deadline)
                    elif name == "anchor":
                        stage_anchor(rep, dev, tiny, deadline, bw)
                    elif name == "decode":
                        stage_decode(rep, dev, tiny, deadline)
                    elif name == "pool":
                        stage_pool(rep, dev, tiny, deadline, bw)
                st["status"] = "done"
            except Exception as e:  # a broken stage is reported; the next one still runs
                st["status"] = f"error: {type(e).__name__}: {e}"[:300]
                st["failed"] = st.get("failed", 0) + 1
                rep.log(traceback.format_exc())
            st["seconds"] = round(time.monotonic() - t_stage, 1)
            if name == "smoke" and (st.get("failed") or st.get("skipped") or bw is None):
                st["status"] = "ABORTED"
                why = ("a tiny forward+backward failed" if st["failed"] else
                       f"its cases did not finish within {STAGE_BUDGETS['smoke'] * clock.scale:.0f} s after "
                       f"{SMOKE_COMPILE_S * clock.scale:.0f} s at most for their kernels to compile")
                rep.log(f"ABORT: stage 0 (smoke) failed: {why}; see {rep.out / 'report.md'}. The machine or the "
                        "install is broken: fix that before spending the GPU budget on the rest.")
                code = 2
                rep.save()
                break
            if st.get("failed"):
                code = 1
            rep.save()
        if tiny:  # the rehearsal's side compiles must have worked
            st = pc.wait([k for ks in keys.values() for k in ks], timeout=max(5.0, clock.left()))
            meta["precompile"].update(st)
            rep.log(f"precompile (sm_90, rehearsal): {st}")
            if st["failed"] or st["pending"]:
                code = code or 1
    finally:
        pc.close()
        meta["exit_code"] = code
        rep.save()
        rep.log("\n" + markdown(rep.data, brief=True))
        rep.log(f"done in {time.monotonic() - T_START:.0f} s (exit {code}); wrote {rep.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())

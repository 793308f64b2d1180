"""python -m benchmarks.triton_report: registers, spills, shared memory, wgmma and launch grids of
every Triton kernel in every config the autotuner may pick, compiled ahead of time (no GPU).

Each kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
for sm_80 and sm_90, for each dtype and Dk = Dv, with the exact arguments the host wrappers pass at
the anchor shape (B=4, H=16, T=8192; window_pool on x [4, 8192, 16*D] with the 8 dyadic windows),
recorded on ``meta`` tensors (``benchmarks/aot.py``). The kernel objects' ``n_regs`` / ``n_spills``
need a driver, so registers and stack come from ``cuobjdump -res-usage`` on the cubin and spill
stores / loads from ``ptxas -v`` on the PTX (the tools in ``triton/backends/nvidia/bin``).
Writes <out>/triton_report_<triton version>.json (every compile) and .md (a summary per kernel).

    python -m benchmarks.triton_report                       # everything (~600 compiles)
    python -m benchmarks.triton_report --archs sm_90 --dtypes bfloat16 --dims 64 --kernels fwd --configs 0
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch

from . import aot

ARCHS = {"sm_80": 80, "sm_90": 90}
SMS = {80: 108, 90: 132}  # A100; H100 / H200
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
ANCHOR = dict(B=4, H=16, T=8192)
H100_SMS = 132  # the segment-parallel sweep plans its grid for this many SMs (an H100 / H200)


def launches(dtype, D, B=ANCHOR["B"], H=ANCHOR["H"], T=ANCHOR["T"]):
    """The launches of forward, backward (also monotone), decode step and window_pool at the anchor shape (meta
    tensors, through the host wrappers: the grids and constexprs are theirs)."""
    import leapformer_kernels as lk
    from leapformer_kernels.attention import triton_chunk as tc
    from leapformer_kernels.pooling import triton_pool as tp

    g = dict(dtype=dtype, device="meta")
    q = torch.empty(B, T, H, D, **g)
    p = torch.empty(B, T, H, device="meta")
    x = torch.empty(B, T, H * D, **g)
    wins = lk.dyadic_windows(8)
    with aot.record() as out, mock.patch.object(tc, "segment_policy", lambda dev: (H100_SMS, tc.MIN_SEGMENT)):
        o, _, _, den = tc.fwd(q, q, q, p, p, None, None, None, None, None, True, None, 1e-6, True, False)
        tc.bwd(q, None, None, q, q, q, p, p, None, None, None, None, None, True, None, 1e-6, True, o=o, den=den)
        # monotone cross-attention (num_visible_keys [B, T], S = T keys): forward and backward
        nvk = torch.empty(B, T, dtype=torch.int64, device="meta")
        o, _, _, den = tc.fwd(q, q, q, p, p, None, None, None, None, nvk, False, None, 1e-6, True, False)
        tc.bwd(q, None, None, q, q, q, p, p, None, None, None, None, nvk, False, None, 1e-6, True, o=o, den=den)
        one = (q[:, :1], q[:, :1], q[:, :1], p[:, :1], p[:, :1])
        tc.step(*one, None, None, 1e-6, True)
        pool = (torch.empty(2 * B, H, 2 * D, D, device="meta"), torch.empty(2 * B, H, 2 * D, device="meta"))
        tc.step_(*one, *pool, torch.empty(B, dtype=torch.int64, device="meta"), 1e-6, True)
        for reduce in ("sum", "mean", "max"):  # sum_out / block_prefix without and with MEAN
            pooled, _, arg = tp.fwd(x, wins, reduce, True)
            tp.bwd(pooled, T, wins, reduce, arg)
    return out


def source_hashes():
    """sha256 (12 hex) of each kernel source file: which kernels these numbers are for."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "leapformer_kernels"
    files = sorted(root.glob("attention/triton_*.py")) + sorted(root.glob("pooling/triton_*.py"))
    return {str(f.relative_to(root.parent)): hashlib.sha256(f.read_bytes()).hexdigest()[:12] for f in files}


def ptxas_versions():
    import subprocess

    from triton.backends.nvidia import compiler as nv

    out = {}
    for name, arch in ARCHS.items():
        text = subprocess.run([nv.get_ptxas(arch).path, "--version"], capture_output=True, text=True).stdout
        out[name] = text.strip().splitlines()[-1] if text.strip() else "unknown"
    return out


def collect(a):
    """The launches to compile, deduplicated, for the chosen dtypes, dims and kernels:
    [(launch, row)], row holding kernel, dtype, D and every grid the launch ran with."""
    todo, seen = [], {}
    for dt in a.dtypes:
        for D in a.dims:
            for L in launches(DTYPES[dt], D):
                L.label = _label(L)
                if a.kernels and not any(L.label == k or L.label.startswith(k + ".") for k in a.kernels):
                    continue
                if L.key() in seen:  # e.g. a pooling kernel launched once per window level
                    seen[L.key()]["grids"].add(L.grid)
                    continue
                seen[L.key()] = dict(kernel=L.label, kernel_name=L.name, dtype=SHORT[dt], D=D, grids={L.grid})
                todo.append((L, seen[L.key()]))
    return todo


def _label(L):
    """aot's label, with the backward's key-side kernels (sweep and monotone) split by what they
    compute: bwd.dkv (dk and dv, Dk, Dv <= 64), bwd.dk (key blocks, every value column), bwd.dv
    (value tiles); monotone.bwd.dkv / .dk / .dv alike."""
    prefix = {"leap_bwd_kernel_dkv": "bwd", "leap_bwd_kernel_monotone_dkv": "monotone.bwd"}.get(L.name)
    if prefix and "DO_DK" in L.kwargs:
        dk, dv = L.kwargs["DO_DK"], L.kwargs["DO_DV"]
        return f"{prefix}.dkv" if dk and dv else f"{prefix}.dk" if dk else f"{prefix}.dv"
    return L.label


def summarise(rows):
    """One line per (kernel, arch, dtype, D): the spread over the configs."""
    groups = defaultdict(list)
    for r in rows:
        if "regs" in r:
            groups[(r["kernel"], r["arch"], r["dtype"], r["D"])].append(r)
    out = []
    for (kern, arch, dt, D), rs in groups.items():
        spill = {}
        for w in sorted({r["num_warps"] for r in rs}):
            spill[w] = max(r["spill_stores"] or 0 for r in rs if r["num_warps"] == w) / 1024
        mma = sorted({_mma(r) + f"@w{r['num_warps']}" for r in rs})
        progs = sorted({r["programs"] for r in rs})
        out.append(dict(kernel=kern, arch=arch, dtype=dt, D=D, compiles=len(rs),
                        regs=f"{min(r['regs'] for r in rs)}-{max(r['regs'] for r in rs)}",
                        spill_kb={f"w{w}": round(v, 2) for w, v in spill.items()},
                        stack_kb_max=round(max(r["stack"] or 0 for r in rs) / 1024, 2),
                        smem_kb_max=round(max(r["shared"] for r in rs) / 1024, 1), mma=_compact_mma(mma),
                        programs=progs, sms=SMS[ARCHS[arch]]))
    order = {"fwd": 0, "bwd.dden": 1, "bwd.dq": 2, "bwd.dkv": 3, "bwd.dk": 3.1, "bwd.dv": 3.2, "step": 4}
    return sorted(out, key=lambda s: (order.get(s["kernel"], 9), s["kernel"], s["arch"], s["D"], s["dtype"]))


def _mma(r):
    """The MMA instructions of one compile: wgmma, mma.sync, both (with counts), or none."""
    if r["wgmma"] and r["mma_sync"]:
        return f"wgmma {r['wgmma']} + mma.sync {r['mma_sync']}"
    return "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "-"


def _compact_mma(tags):
    """['wgmma@w4', 'wgmma@w8', 'mma.sync@w2'] -> 'wgmma (w4,w8); mma.sync (w2)'."""
    by = defaultdict(list)
    for t in tags:
        kind, w = t.split("@")
        by[kind].append(w)
    return "; ".join(f"{k} ({','.join(sorted(v, key=lambda x: int(x[1:])))})" for k, v in sorted(by.items()))


def markdown(meta, summary, failures):
    cmd = " ".join(["python -m benchmarks.triton_report", *meta["argv"]])
    lines = [f"# Triton kernels compiled ahead of time: triton {meta['triton']}",
             "",
             f"`{cmd}` ({meta['date']}, {meta['compiles_done']} of "
             f"{meta['compiles_planned']} compiles, {meta['seconds']:.0f} s; torch {meta['torch']}; ptxas "
             + ", ".join(f"{k}: {v}" for k, v in meta["ptxas"].items()) + "). "
             f"Anchor shape B={ANCHOR['B']}, H={ANCHOR['H']}, T={ANCHOR['T']}; window_pool on x [B, T, H*D] with "
             "dyadic_windows(8). Per kernel, arch, dtype and D = Dk = Dv, over the configs compiled (all the "
             "autotuner may pick, unless --configs chose some): registers per thread (cuobjdump; 32 with KBs of "
             "spills is what ptxas reports when its allocator gives up), the largest spill stores per thread "
             "(ptxas -v) by num_warps, the largest stack frame and shared memory, the MMA instructions in the PTX "
             "by num_warps ('wgmma N + mma.sync M': both kinds), and the launch grid (programs) against the SM "
             "count (A100 108, H100/H200 132). Every compile is in the JSON.",
             "",
             "| kernel | arch | dtype | D | compiles | regs | spill stores KB by num_warps | stack KB | smem KB "
             "| MMA | programs / SMs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        spill = " ".join(f"{w}:{v:g}" for w, v in s["spill_kb"].items())
        lines.append(f"| {s['kernel']} | {s['arch']} | {s['dtype']} | {s['D']} | {s['compiles']} | {s['regs']} | "
                     f"{spill} | {s['stack_kb_max']:g} | {s['smem_kb_max']:g} | {s['mma']} | "
                     f"{','.join(map(str, s['programs']))} / {s['sms']} |")
    if failures:
        lines += ["", "Compiles that failed:", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--dims", nargs="+", type=int, default=[64, 128], help="Dk = Dv")
    p.add_argument("--kernels", nargs="*", default=None,
                   help="labels or prefixes: fwd bwd bwd.dq bwd.dkv bwd.dk bwd.dv step pool ... (default: all)")
    p.add_argument("--configs", nargs="*", type=int, default=None, help="autotune config indices (default: all)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="file stem (default: triton_report_<triton version>)")
    return p.parse_args(argv)


def main(argv=None):
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter (before they load)
    import triton

    a = parse(argv)
    t0 = time.time()
    todo = collect(a)
    pc = aot.Precompiler(a.jobs)
    jobs = []  # (row, arch, key)
    for L, row in todo:
        for arch in a.archs:
            for key in pc.submit([L], ("cuda", ARCHS[arch], 32), a.configs, aot.resources):
                jobs.append((row, arch, key))
    print(f"triton {triton.__version__}: {len(jobs)} compiles on {a.jobs} processes", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"triton_report_{triton.__version__}"
    meta = dict(triton=triton.__version__, torch=torch.__version__, ptxas=ptxas_versions(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), anchor=ANCHOR, argv=sys.argv[1:] if argv is None else argv,
                sms=SMS, sources=source_hashes(), compiles_planned=len(jobs))
    rows, failures = [], []

    def write():  # after every 5% and at the end: a run cut short keeps what it compiled
        meta["seconds"], meta["compiles_done"] = round(time.time() - t0, 1), len(rows)
        summary = summarise(rows)
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, summary=summary, compiles=rows), indent=1,
                                                     default=str))
        (out / f"{stem}.md").write_text(markdown(meta, summary, failures))

    for n, (row, arch, key) in enumerate(jobs, 1):
        r = dict(row, arch=arch, grids=sorted(row["grids"]), config=key[2])
        r["programs"] = max(g[0] * (g[1] if len(g) > 1 else 1) * (g[2] if len(g) > 2 else 1) for g in r["grids"])
        try:
            r.update(pc.futures[key].result())
        except Exception as e:  # reported per kernel, the others go on
            r["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            failures.append(f"{r['kernel']} {arch} {r['dtype']} D={r['D']} config {key[2]}: {r['error']}")
        rows.append(r)
        if n == len(jobs) or n % max(1, len(jobs) // 20) == 0:
            print(f"  {n}/{len(jobs)} ({time.time() - t0:.0f} s)", flush=True)
            write()
    pc.close()
    print((out / f"{stem}.md").read_text())
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')} in {meta['seconds']} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

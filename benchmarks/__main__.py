"""python -m benchmarks: leap_attention and the decode step against SDPA (and FLA on CUDA).

Writes <out>/<name>.json and .png (time vs T, log-log, one line per method) and prints a table;
every time is also given as a ratio against SDPA and the memory floor measured in the same run.
<out> is benchmarks/results (the committed figures) by default; ``--quick`` runs tiny sizes (the
CI smoke test) and writes to a scratch folder (<tmp>/leapformer-benchmarks) unless --out is given.

On the CPU the contenders of one case (SDPA and each leap backend at the same T, D, dtype) are
timed together: warm-up, then round-robin rounds, median per contender (benchmarks/timing.py).
``--quick`` on the CPU also runs torch on one thread (--threads), which keeps its figures steady
on a shared, loaded machine.

Needs the ``zoo`` extra (tqdm, matplotlib): pip install "leapformer-kernels[zoo]".
"""
import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import leapformer_kernels as lk

from .attention import floor_bytes, methods, run_group
from .decode import run_decode
from .timing import copy_bandwidth, device_name, versions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULTS = "benchmarks/results"  # the committed figures: only a full run writes here by default
SCRATCH = str(Path(tempfile.gettempdir()) / "leapformer-benchmarks")
EXTRAS = ("tqdm", "matplotlib")  # the [zoo] extra


def require_extras():
    """Exit with one line on stderr (code 1) if a module of the [zoo] extra is missing."""
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        print(f'python -m benchmarks needs {" and ".join(missing)}: pip install "leapformer-kernels[zoo]"',
              file=sys.stderr)
        sys.exit(1)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, nargs="+", default=[64])
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--decode-context", type=int, nargs="*", default=None, help="context lengths of the decode bench")
    p.add_argument("--decode-batch", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per case, median reported (default: 5; 21 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls of each contender first (default: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --quick on the CPU, see above)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test); writes to a scratch folder")
    p.add_argument("--out", default=None,
                   help=f"results folder (default: {RESULTS}; with --quick: {SCRATCH})")
    p.add_argument("--name", default=None, help="file stem of the results (default: attention_<device>)")
    a = p.parse_args(argv)
    for name in ("repeats", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.warmup is not None and a.warmup < 0:
        p.error("--warmup must be at least 0")
    return a


def defaults(a, device):
    cuda = device.type == "cuda"
    if a.quick:
        a.T = a.T or [64, 128]
        a.batch, a.heads = a.batch or 1, a.heads or 2
        a.head_dim = [16]
        a.decode_context = [64] if a.decode_context is None else a.decode_context
        a.decode_batch = a.decode_batch or [2]
        a.repeats = a.repeats or 21  # tiny calls: many cheap rounds, a stable median
        a.out = a.out or SCRATCH
        if not cuda and a.threads is None:
            # Tiny ops gain nothing from threads, and on a shared machine a parallel region waits
            # for its preempted thread a whole scheduler slice: SDPA at T=64 went 0.08 -> 7 ms,
            # every round alike, so no median or interleaving undoes it. One thread does.
            a.threads = 1
    a.T = a.T or ([1024, 2048, 4096, 8192, 16384, 32768, 65536] if cuda else [512, 1024, 2048, 4096, 8192])
    a.repeats = a.repeats or 5
    a.warmup = 2 if a.warmup is None else a.warmup
    a.out = a.out or RESULTS
    a.batch = a.batch or (4 if cuda else 1)
    a.heads = a.heads or (16 if cuda else 8)
    a.dtype = a.dtype or (["bfloat16"] if cuda else ["float32"])
    a.decode_context = a.decode_context if a.decode_context is not None else (
        [1024, 8192, 32768, 131072] if cuda else [1024, 8192])
    a.decode_batch = a.decode_batch or ([1, 64] if cuda else [8])
    if a.backends is None:
        a.backends = [b for b in lk.available_backends() if not (b == "triton" and device.type == "cpu")]
    return a


def plot(results, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        for m in sorted({r["method"] for r in results}):
            rows = sorted((r["T"], r[key]) for r in results if r["method"] == m and key in r)
            ax.plot([t for t, _ in rows], [v for _, v in rows], marker="o", label=m)
        rows = sorted({(r["T"], r[key.replace("_ms", "_floor_ms")]) for r in results})
        ax.plot([t for t, _ in rows], [v for _, v in rows], "k--", label="memory floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    v = meta["versions"]
    fig.suptitle(f"{meta['device']} | torch {v['torch']} | triton {v['triton']} | "
                 f"B={meta['B']} H={meta['H']} causal", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    require_extras()  # before any work: one line and exit 1 without tqdm / matplotlib
    from tqdm import tqdm

    a = parse(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    a = defaults(a, device)
    if a.threads:
        torch.set_num_threads(a.threads)
    bw = copy_bandwidth(device, 256 if device.type == "cuda" else 64)
    meta = {"device": device_name(device), "versions": versions(), "copy_bandwidth_GBps": bw / 1e9,
            "B": a.batch, "H": a.heads, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
            "repeats": a.repeats, "warmup": a.warmup, "threads": torch.get_num_threads(),
            "timing": "CUDA events (triton do_bench), median" if device.type == "cuda" else
            "wall clock, contenders of a case interleaved round-robin after warm-up, median of the rounds"}
    fns = methods(a.backends, device)
    cases = [(T, D, dt) for dt in a.dtype for D in a.head_dim for T in a.T]
    results = []
    for T, D, dt in tqdm(cases, desc="attention", unit="case"):
        for r in run_group(fns, a.batch, T, a.heads, D, DTYPES[dt], device, a.repeats, a.warmup):
            r["fwd_floor_ms"] = floor_bytes(a.batch, T, a.heads, D, DTYPES[dt], False) / bw * 1e3
            r["fwdbwd_floor_ms"] = floor_bytes(a.batch, T, a.heads, D, DTYPES[dt], True) / bw * 1e3
            results.append(r)
    for r in results:  # ratios against SDPA of the same case, and against the floor
        ref = next(x for x in results if x["method"] == "sdpa" and all(x[k] == r[k] for k in ("T", "D", "dtype")))
        for key in ("fwd", "fwdbwd"):
            r[f"{key}_speedup_vs_sdpa"] = ref[f"{key}_ms"] / r[f"{key}_ms"]
            r[f"{key}_x_floor"] = r[f"{key}_ms"] / r[f"{key}_floor_ms"]
    decode = []
    dec_cases = [(B, L) for B in a.decode_batch for L in a.decode_context]
    for B, L in tqdm(dec_cases, desc="decode", unit="case"):
        # steps take microseconds: many more rounds than the attention cases, at little cost
        decode.append(run_decode(B, a.heads, a.head_dim[0], L, DTYPES[a.dtype[0]], device, a.backends,
                                 a.repeats if device.type == "cuda" else max(20 * a.repeats, 100), a.warmup))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"attention_{device.type}"
    payload = {"meta": meta, "attention": results, "decode": decode}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    plot(results, meta, out / f"{stem}.png")
    print_table(results, decode, meta)
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return payload


def print_table(results, decode, meta):
    print(f"\n{meta['device']}  torch {meta['versions']['torch']}  triton {meta['versions']['triton']}  "
          f"copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s")
    print(f"{'method':<16}{'dtype':<10}{'D':>4}{'T':>7}{'fwd ms':>10}{'x SDPA':>8}{'fwd+bwd ms':>12}{'x SDPA':>8}"
          f"{'/floor':>8}")
    for r in results:
        print(f"{r['method']:<16}{r['dtype']:<10}{r['D']:>4}{r['T']:>7}{r['fwd_ms']:>10.3f}"
              f"{r['fwd_speedup_vs_sdpa']:>8.2f}{r['fwdbwd_ms']:>12.3f}{r['fwdbwd_speedup_vs_sdpa']:>8.2f}"
              f"{r['fwdbwd_x_floor']:>8.1f}")
    if decode:
        print("\ndecode (ms; step vs SDPA with a KV cache, and a copy_ of the state)")
        for d in decode:
            cells = "  ".join(f"{k[:-3]}={v:.4f}" for k, v in d.items() if k.endswith("_ms"))
            print(f"B={d['B']} context={d['context']}: {cells}")


if __name__ == "__main__":
    main()

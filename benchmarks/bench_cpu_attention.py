"""Benchmark of the ``cpu`` backend's LeaP attention (C++ kernels) on the CPU.

Issue 5 targets (fp32, B=1, H=8, D=64, forward+backward, all measured in this run):
  * T=4096: at least 4x faster than causal ``F.scaled_dot_product_attention`` (aim 6x) and
    faster than the ``torch`` backend;
  * T=8192 costs at most 2.2x T=4096 (linear in T);
  * decode step (B=8, H=8, D=64) within 4x of a ``copy_`` of the same state.
Issue 32 targets (same run): forward+backward at T=4096 at least 55% of the ``torch.mm`` rate
(2048 x 2048 fp32, timed in the same rounds), counting the chunked form's FLOPs (forward
``2*T*H*(C*2Dk + C*Dv + 2*2Dk*Dv)`` with C=64, backward twice that); the public decode step
within 2x of the ``copy_``.

Every figure is the median of several repeats after a warm-up; ratios are against anchors
timed in the same run (the machine may be shared: medians, not minima).

    python -m benchmarks.bench_cpu_attention [--T 2048 4096 8192] [--reps 7] [--markdown out.md]
    python -m benchmarks.bench_cpu_attention --decode-only [--reps 21]   # the decode step alone

The decode step is timed as the raw C++ entry point (``ext.step`` into preallocated outputs), the
kernel module's ``attention.cpu.step`` (allocates the outputs), the public op with
``backend="cpu"`` and with the automatic choice, and the torch backend, against ``copy_`` of the
state, round-robin; medians and best of rounds.
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import leapformer_kernels as lk

from .timing import interleaved_ms


CHUNK = 64  # the kernels' chunk length (FLOP count of the chunked form)


def chunked_flops(B, T, H, Dk, Dv, C=CHUNK):
    """FLOPs of the chunked form's forward: 2*T*H*(C*2Dk + C*Dv + 2*2Dk*Dv) per sequence."""
    return 2.0 * B * T * H * (C * 2 * Dk + C * Dv + 2 * 2 * Dk * Dv)


def cpu_model():
    """The CPU's model name (lscpu's "Model name"), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        import os

        return "load average %.2f, %.2f, %.2f" % os.getloadavg()
    except OSError:  # pragma: no cover
        return "load average unknown"


def inputs(B, T, H, D, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, T, H, D, generator=g) * D ** -0.5).requires_grad_(requires_grad)
    k = torch.randn(B, T, H, D, generator=g).requires_grad_(requires_grad)
    v = torch.randn(B, T, H, D, generator=g).requires_grad_(requires_grad)
    pq = torch.rand(B, T, H, generator=g).requires_grad_(requires_grad)
    pk = torch.rand(B, T, H, generator=g).requires_grad_(requires_grad)
    return q, k, v, pq, pk


def leap_fwd_bwd(backend, q, k, v, pq, pk, do):
    def run():
        o = lk.leap_attention(q, k, v, pq, pk, causal=True, backend=backend)
        torch.autograd.backward(o, do)
    return run


def leap_fwd(backend, q, k, v, pq, pk):
    def run():
        with torch.no_grad():
            lk.leap_attention(q, k, v, pq, pk, causal=True, backend=backend)
    return run


def sdpa_fwd_bwd(q, k, v, do):
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()

    def run():
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        torch.autograd.backward(o, dot)
    return run


def sdpa_fwd(q, k, v):
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v))

    def run():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return run


_MEM_SNIPPET = r"""
import sys, threading, time, torch
import leapformer_kernels as lk
torch.manual_seed(0)
B, T, H, D = 1, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
q, k, v = (torch.randn(B, T, H, D).requires_grad_() for _ in range(3))
pq, pk = (torch.rand(B, T, H).requires_grad_() for _ in range(2))
do = torch.randn(B, T, H, D)
lk.leap_attention(q[:, :64], k[:, :64], v[:, :64], pq[:, :64], pk[:, :64], backend=sys.argv[4]).sum().backward()
def anon():  # anonymous resident memory (heap, tensors): not the code pages a loaded machine evicts
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
base = anon()
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
th = threading.Thread(target=sample)
th.start()
o = lk.leap_attention(q, k, v, pq, pk, backend=sys.argv[4])
o.backward(do)
stop.set()
th.join()
peak[0] = max(peak[0], anon())
print((peak[0] - base) / 2 ** 20)
"""


def peak_extra_mib(T, H, D, backend="cpu"):
    """Peak growth (MiB) of anonymous resident memory during one forward+backward, in a fresh
    process, sampled every 0.5 ms: includes the C++ kernels' own buffers (which torch's allocator
    statistics do not see) and o, dq, dk, dv, dpq, dpk (do and the inputs exist before)."""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _MEM_SNIPPET, str(T), str(H), str(D), backend],
                             capture_output=True, text=True, timeout=600)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception:  # pragma: no cover
        return None


def batched_ms(fns, rounds, calls):
    """Per-call ms of each fn: in each round every fn runs ``calls`` times back to back (timed as one
    batch), the fns in turn. Calls of some tens of us timed one at a time mostly measure the
    shared machine's scheduler; batches of them do not. Returns (medians, per-round lists)."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per[name].append((time.perf_counter() - t0) * 1e3 / calls)
    return {name: statistics.median(v) for name, v in per.items()}, per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-torch-backend", action="store_true")
    ap.add_argument("--markdown", type=str, default=None)
    ap.add_argument("--decode-only", action="store_true", help="time the decode step only")
    args = ap.parse_args()
    if args.decode_only:
        args.T = []
    lk.build()
    H, D = args.H, args.D
    load_before = load_average()
    mm_a, mm_b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_c = torch.empty(2048, 2048)

    def mm():
        torch.mm(mm_a, mm_b, out=mm_c)
    rows = []
    for T in args.T:
        q, k, v, pq, pk = inputs(1, T, H, D)
        do = torch.randn(1, T, H, D)
        r = {"T": T}
        fns = {"sdpa_fb": sdpa_fwd_bwd(q, k, v, do), "cpu_fb": leap_fwd_bwd("cpu", q, k, v, pq, pk, do),
               "sdpa_f": sdpa_fwd(q, k, v), "cpu_f": leap_fwd("cpu", q, k, v, pq, pk)}
        if not args.no_torch_backend:
            fns["torch_fb"] = leap_fwd_bwd("torch", q, k, v, pq, pk, do)
        fns["mm"] = mm
        med, raw = interleaved_ms(fns, args.reps)
        r.update(med)
        # rates in GFLOP/s: medians, and the best of rounds of each
        fl = chunked_flops(1, T, H, D, D)
        mm_fl = 2.0 * 2048 ** 3
        for tag, pick in (("", med), ("_min", {n: min(v) for n, v in raw.items()})):
            r["mm_rate" + tag] = mm_fl / pick["mm"] / 1e6
            r["fb_rate" + tag] = 3 * fl / pick["cpu_fb"] / 1e6
            r["f_rate" + tag] = fl / pick["cpu_f"] / 1e6
        r.setdefault("torch_fb", None)
        r["cpu_fb_min"] = min(raw["cpu_fb"])
        r["sdpa_fb_min"] = min(raw["sdpa_fb"])
        r["cpu_mem"] = peak_extra_mib(T, H, D)
        rows.append(r)
        print(r, flush=True)
    # decode step: B=8, H=8, D=64, one token, against a copy_ of the same state
    B = 8
    q, k, v, pq, pk = (x.detach() for x in inputs(B, 1, H, D, requires_grad=False))
    S0 = torch.rand(B, H, 2 * D, D)
    z0 = torch.rand(B, H, 2 * D) + 1
    dst, dstz = torch.empty_like(S0), torch.empty_like(z0)
    from leapformer_kernels.attention import cpu as cpu_kernels
    ext, isa = cpu_kernels._ext(), cpu_kernels._isa_now()
    o1, S1, z1 = torch.empty(B, 1, H, D), torch.empty_like(S0), torch.empty_like(z0)

    def copy():
        dst.copy_(S0)
        dstz.copy_(z0)

    def step_op():
        lk.leap_attention_step(q, k, v, pq, pk, (S0, z0), backend="cpu")

    def step_raw():  # the C++ entry point alone, into preallocated outputs
        ext.step(q, k, v, pq, pk, S0, z0, 1e-6, True, o1, S1, z1, isa)

    def step_kernel():
        cpu_kernels.step(q, k, v, pq, pk, S0, z0, 1e-6, True)

    def step_auto():
        lk.leap_attention_step(q, k, v, pq, pk, (S0, z0))

    def step_torch():
        lk.leap_attention_step(q, k, v, pq, pk, (S0, z0), backend="torch")

    reps = max(args.reps * 4, 20)
    with torch.no_grad():
        dec, raw = batched_ms({"copy": copy, "raw": step_raw, "kernel": step_kernel, "op": step_op,
                               "auto": step_auto, "torch": step_torch}, reps, 100)
    dec_min = {name: min(v) for name, v in raw.items()}
    print(dec, flush=True)

    threads = torch.get_num_threads()
    lines = [f"Device: {cpu_model()} ({platform.machine()}), {threads} threads, torch {torch.__version__} "
             f"(CPU only); {load_before} before the run, {load_average()} after."]
    if rows:
        lines[0] += (f" fp32, B=1, H={H}, D={D}, causal; median ms over {args.reps} rounds after warm-up, the "
                     "contenders timed round-robin within each round (the machine is shared: medians, and ratios "
                     "from the same rounds).")
        lines += ["", "| T | SDPA fwd+bwd | torch backend fwd+bwd | cpu fwd+bwd | SDPA / cpu | torch / cpu | "
             "cpu fwd | SDPA fwd / cpu fwd | cpu fwd+bwd peak extra memory MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tb = "-" if r["torch_fb"] is None else f"{r['torch_fb']:.1f}"
        tr = "-" if r["torch_fb"] is None else f"{r['torch_fb'] / r['cpu_fb']:.2f}x"
        mem = "-" if r["cpu_mem"] is None else f"{r['cpu_mem']:.1f}"
        lines.append(f"| {r['T']} | {r['sdpa_fb']:.1f} | {tb} | {r['cpu_fb']:.1f} | "
                     f"{r['sdpa_fb'] / r['cpu_fb']:.2f}x | {tr} | {r['cpu_f']:.1f} | "
                     f"{r['sdpa_f'] / r['cpu_f']:.2f}x | {mem} |")
    lines += [] if not rows else ["", "Process CPU time (all threads; less sensitive to other processes' load than wall time), "
              "median ms, fwd+bwd: " + "; ".join(
                  f"T={r['T']}: SDPA {r['sdpa_fb_cpu']:.0f}, cpu {r['cpu_fb_cpu']:.0f} "
                  f"({r['sdpa_fb_cpu'] / r['cpu_fb_cpu']:.2f}x)"
                  + ("" if r["torch_fb"] is None else
                     f", torch backend {r['torch_fb_cpu']:.0f} ({r['torch_fb_cpu'] / r['cpu_fb_cpu']:.2f}x)")
                  for r in rows) + "."]
    if 4096 in {r["T"] for r in rows} and 8192 in {r["T"] for r in rows}:
        c = {r["T"]: r["cpu_fb_cpu"] for r in rows}
        lines += ["", f"Linearity in CPU time: cpu fwd+bwd T=8192 / T=4096 = {c[8192] / c[4096]:.2f}x."]
    lines += [] if not rows else ["", "Best-of-rounds (min) fwd+bwd, for reference: " + "; ".join(
        f"T={r['T']}: SDPA {r['sdpa_fb_min']:.1f}, cpu {r['cpu_fb_min']:.1f} "
        f"({r['sdpa_fb_min'] / r['cpu_fb_min']:.2f}x)" for r in rows) + "."]
    by_t = {r["T"]: r for r in rows}
    if 4096 in by_t and 8192 in by_t:
        lines += ["", f"Linearity: cpu fwd+bwd T=8192 / T=4096 = {by_t[8192]['cpu_fb'] / by_t[4096]['cpu_fb']:.2f}x "
                  f"(SDPA: {by_t[8192]['sdpa_fb'] / by_t[4096]['sdpa_fb']:.2f}x)."]
    lines += [] if not rows else ["", "Against `torch.mm` (2048 x 2048 fp32, the same threads, timed in the same rounds), counting the "
              f"chunked form's FLOPs (C={CHUNK}; forward+backward = 3x the forward): "
              + "; ".join(
                  f"T={r['T']}: mm {r['mm_rate']:.1f} GFLOP/s, cpu fwd+bwd {r['fb_rate']:.1f} "
                  f"({100 * r['fb_rate'] / r['mm_rate']:.0f}% of mm), fwd {r['f_rate']:.1f} "
                  f"({100 * r['f_rate'] / r['mm_rate']:.0f}%); best of rounds: mm {r['mm_rate_min']:.1f}, "
                  f"fwd+bwd {r['fb_rate_min']:.1f} ({100 * r['fb_rate_min'] / r['mm_rate_min']:.0f}%), "
                  f"fwd {r['f_rate_min']:.1f} ({100 * r['f_rate_min'] / r['mm_rate_min']:.0f}%)"
                  for r in rows) + "."]
    names = {"copy": "`copy_` of the state (S and z)", "raw": "C++ entry point `ext.step`, preallocated outputs",
             "kernel": "`attention.cpu.step` (allocates o, S, z)", "op": "public op, `backend=\"cpu\"`",
             "auto": "public op, automatic backend", "torch": "torch backend step"}
    lines += ["", f"Decode step (B={B}, H={H}, D={D}, one token, fp32, no_grad; {reps} rounds, each timing 100 "
              "back-to-back calls of every contender in turn; per-call means of a round, median and best round):", "", "| | median us | vs copy_ | best us | vs copy_ |", "| --- | --- | --- | --- | --- |"]
    for n, label in names.items():
        lines.append(f"| {label} | {dec[n] * 1e3:.1f} | {dec[n] / dec['copy']:.2f}x | {dec_min[n] * 1e3:.1f} | "
                     f"{dec_min[n] / dec_min['copy']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

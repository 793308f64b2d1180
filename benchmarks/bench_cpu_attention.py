"""Benchmark of the ``cpu`` backend's LeaP attention (C++ kernels) on the CPU.

Issue 5 targets (fp32, B=1, H=8, D=64, forward+backward, all measured in this run):
  * T=4096: at least 4x faster than causal ``F.scaled_dot_product_attention`` (aim 6x) and
    faster than the ``torch`` backend;
  * T=8192 costs at most 2.2x T=4096 (linear in T);
  * decode step (B=8, H=8, D=64) within 4x of a ``copy_`` of the same state.

Every figure is the median of several repeats after a warm-up; ratios are against anchors
timed in the same run (the machine may be shared: medians, not minima).

    python benchmarks/bench_cpu_attention.py [--T 2048 4096 8192] [--reps 7] [--markdown out.md]
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import leapformer_kernels as lk


def median_ms(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


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
import resource, sys, torch
import leapformer_kernels as lk
torch.manual_seed(0)
B, T, H, D = 1, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
q, k, v = (torch.randn(B, T, H, D).requires_grad_() for _ in range(3))
pq, pk = (torch.rand(B, T, H).requires_grad_() for _ in range(2))
do = torch.randn(B, T, H, D)
lk.leap_attention(q[:, :64], k[:, :64], v[:, :64], pq[:, :64], pk[:, :64], backend=sys.argv[4]).sum().backward()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
base = rss()
o = lk.leap_attention(q, k, v, pq, pk, backend=sys.argv[4])
o.backward(do)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((peak - base) / 2 ** 20)
"""


def peak_extra_mib(T, H, D, backend="cpu"):
    """Peak resident-memory growth (MiB) of one forward+backward beyond the inputs, measured in
    a fresh process (ru_maxrss minus the RSS just before the call): includes the C++ kernels'
    own buffers, which torch's allocator statistics do not see. Includes o, do, dq, dk, dv."""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _MEM_SNIPPET, str(T), str(H), str(D), backend],
                             capture_output=True, text=True, timeout=600)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception:  # pragma: no cover
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-torch-backend", action="store_true")
    ap.add_argument("--markdown", type=str, default=None)
    args = ap.parse_args()
    lk.build()
    H, D = args.H, args.D
    rows = []
    for T in args.T:
        q, k, v, pq, pk = inputs(1, T, H, D)
        do = torch.randn(1, T, H, D)
        r = {"T": T}
        r["sdpa_fb"] = median_ms(sdpa_fwd_bwd(q, k, v, do), args.reps)
        r["cpu_fb"] = median_ms(leap_fwd_bwd("cpu", q, k, v, pq, pk, do), args.reps)
        r["torch_fb"] = None if args.no_torch_backend else median_ms(
            leap_fwd_bwd("torch", q, k, v, pq, pk, do), max(3, args.reps // 2), warmup=1)
        r["sdpa_f"] = median_ms(sdpa_fwd(q, k, v), args.reps)
        r["cpu_f"] = median_ms(leap_fwd("cpu", q, k, v, pq, pk), args.reps)
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

    def copy():
        dst.copy_(S0)
        dstz.copy_(z0)

    def step_op():
        lk.leap_attention_step(q, k, v, pq, pk, (S0, z0), backend="cpu")

    def step_kernel():
        cpu_kernels.step(q, k, v, pq, pk, S0, z0, 1e-6, True)

    def step_torch():
        lk.leap_attention_step(q, k, v, pq, pk, (S0, z0), backend="torch")

    reps = max(args.reps * 30, 200)
    dec = {"copy": median_ms(copy, reps, 20), "kernel": median_ms(step_kernel, reps, 20),
           "op": median_ms(step_op, reps, 20), "torch": median_ms(step_torch, reps, 20)}
    print(dec, flush=True)

    threads = torch.get_num_threads()
    lines = [f"Device: {platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__} "
             f"(CPU only). fp32, B=1, H={H}, D={D}, causal; median ms over {args.reps} repeats after warm-up.", "",
             "| T | SDPA fwd+bwd | torch backend fwd+bwd | cpu fwd+bwd | SDPA / cpu | torch / cpu | "
             "cpu fwd | SDPA fwd / cpu fwd | cpu fwd+bwd peak extra RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tb = "-" if r["torch_fb"] is None else f"{r['torch_fb']:.1f}"
        tr = "-" if r["torch_fb"] is None else f"{r['torch_fb'] / r['cpu_fb']:.2f}x"
        mem = "-" if r["cpu_mem"] is None else f"{r['cpu_mem']:.1f}"
        lines.append(f"| {r['T']} | {r['sdpa_fb']:.1f} | {tb} | {r['cpu_fb']:.1f} | "
                     f"{r['sdpa_fb'] / r['cpu_fb']:.2f}x | {tr} | {r['cpu_f']:.1f} | "
                     f"{r['sdpa_f'] / r['cpu_f']:.2f}x | {mem} |")
    by_t = {r["T"]: r for r in rows}
    if 4096 in by_t and 8192 in by_t:
        lines += ["", f"Linearity: cpu fwd+bwd T=8192 / T=4096 = {by_t[8192]['cpu_fb'] / by_t[4096]['cpu_fb']:.2f}x "
                  f"(SDPA: {by_t[8192]['sdpa_fb'] / by_t[4096]['sdpa_fb']:.2f}x)."]
    lines += ["", f"Decode step (B={B}, H={H}, D={D}, one token, fp32): copy_ of the state {dec['copy'] * 1e3:.1f} us; "
              f"C++ step kernel {dec['kernel'] * 1e3:.1f} us ({dec['kernel'] / dec['copy']:.2f}x the copy); "
              f"public op lk.leap_attention_step(backend='cpu') {dec['op'] * 1e3:.1f} us "
              f"({dec['op'] / dec['copy']:.2f}x, includes validation and dispatch in Python); "
              f"torch backend {dec['torch'] * 1e3:.1f} us."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""Benchmark of window_pool on the CPU (issue 7): the cpu backend (C++) against its anchors.

    python -m benchmarks.bench_window_pool [--repeats 5] [--out benchmarks/results/window_pool_cpu.md]

fp32, B=8, T=4096, D=512, the 8 dyadic windows (lk.dyadic_windows(8)), forward, median ms of
``--repeats`` runs after a warm-up. Every figure is reported as a ratio against an anchor
measured in the same run (absolute times move between machines and with the load of a shared
CPU):

- a plain unfold-based PyTorch implementation (what a user writes today; target: cpu >= 3x faster)
- the torch backend's prefix-sum / sparse-table form (target: cpu at least as fast)
- merely writing the output: torch.empty + fill_ of the same [B, T, W, D] tensor (target: within 2x)
- sum / mean with one 4000-wide window against one 1-wide window (target: within 1.5x)
- max with one window of length L against L = 1 (target: growth at most O(log L))

    python -m benchmarks.bench_window_pool --triton-plan [--B 4 --T 8192 --dims 64 1024]

prints, without a GPU, the Triton backend's launch plan on meta tensors (``aot.record``): the
programs of every launch (forward and backward of sum / mean / max, the 8 dyadic windows) against
an H100's 132 SMs, and the scratch of every pass (``triton_pool.scratch_bytes``) against the
layout before issue 18's caps (the max forward's two [B, 2T, D] float32 + int32 tables; the
backward's [B, T, W, D] prefix of the gradient and, for max, int32 run ends).
"""
import argparse
import os

import torch
import torch.nn.functional as F

import leapformer_kernels as lk

from . import timing


def unfold_pool(x, windows, reduce):
    """Plain PyTorch: pad, unfold each window into [B, T, D, L], reduce the last axis. O(T * L * D)."""
    B, T, D = x.shape
    outs = []
    t = torch.arange(T)
    for a, b in windows:
        L = b - a + 1
        left, right = max(0, -a), max(0, b)
        fill = float("-inf") if reduce == "max" else 0.0
        xp = F.pad(x, (0, 0, left, right), value=fill)  # position p of x sits at p + left
        win = xp[:, a + left:a + left + T + L - 1].unfold(1, L, 1)  # [B, T, D, L]
        if reduce == "max":
            o = win.amax(-1)
        else:
            o = win.sum(-1)
        cnt = (torch.clamp(t + b + 1, 0, T) - torch.clamp(t + a, 0, T)).clamp(min=0)
        if reduce == "mean":
            o = o / cnt.clamp(min=1)[None, :, None].to(o.dtype)
        if reduce == "max":
            o = torch.where((cnt > 0)[None, :, None], o, torch.zeros((), dtype=o.dtype))
        outs.append(o)
    return torch.stack(outs, 2)


def triton_plan(B, T, dims, windows):
    """Markdown lines: the Triton launches of window_pool at [B, T, D] for each D (meta tensors)."""
    from leapformer_kernels.pooling import triton_pool as tp

    from . import aot

    lines = [f"Triton launch plan at B={B}, T={T}, windows = dyadic_windows({len(windows)}) (H100: 132 SMs): "
             "programs per launch (min-max over the launches of one kernel), launches.", "",
             "| D | pass | kernel | launches | programs |", "| --- | --- | --- | --- | --- |"]
    scratch = []
    for D in dims:
        x = torch.empty(B, T, D, device="meta")
        for reduce in ("sum", "max"):
            for direction in ("fwd", "bwd"):
                with aot.record() as launches:
                    pooled, _, arg = tp.fwd(x, windows, reduce, True)
                if direction == "bwd":
                    with aot.record() as launches:
                        tp.bwd(torch.empty(pooled.shape, device="meta"), T, windows, reduce, arg)
                by = {}
                for L in launches:
                    by.setdefault(L.label, []).append(L.grid[0] * L.grid[1] * L.grid[2])
                for label, progs in by.items():
                    span = f"{min(progs)}" if min(progs) == max(progs) else f"{min(progs)}-{max(progs)}"
                    lines.append(f"| {D} | {reduce} {direction} | {label} | {len(progs)} | {span} |")
        plan = tp.st_plan(B, T, D, tp.clamp_windows(windows, T))
        bplan = tp.bwd_plan(B, T, D, len(windows), "max")
        W, nblk = len(windows), -(-T // tp.PBT)
        prefix = lambda ncol: B * ncol * (T * 4 + nblk * (8 + 8 + 4))  # noqa: E731  Q, Bs, Cr, S
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        now = {(red, bwd): tp.scratch_bytes(B, T, D, windows, red, backward=bwd)
               for red in ("sum", "max") for bwd in (False, True)}
        scratch.append(f"| {D} | {mib(2 * 8 * B * 2 * T * D)} | {mib(now['max', False])} (chunks of {plan['BC']} x "
                       f"{plan['DC']} columns, {plan['NR']} rows) | {mib(B * T * W * D * 8 + prefix(W * D))} | "
                       f"{mib(now['max', True])} (chunks of {bplan['BC']} x {bplan['WC']} x {bplan['DC']}) | "
                       f"{mib(now['sum', False])} | {mib(prefix(W * D))} | {mib(now['sum', True])} |")
    lines += ["", f"Scratch (``triton_pool.scratch_bytes``; ST_SCRATCH = {tp.ST_SCRATCH / 2**20:.0f} MiB, "
              f"BWD_SCRATCH = {tp.BWD_SCRATCH / 2**20:.0f} MiB; 'before' is the layout before issue 18's caps; "
              "backward chunks are sequences x windows x columns):", "",
              "| D | max fwd before (2 x [B, 2T, D] fp32 + int32) | max fwd now | max bwd before (st, en, prefix "
              "of [B, T, W*D]) | max bwd now | sum fwd | sum bwd before | sum bwd now |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"] + scratch
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--D", type=int, default=512)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-torch-max", action="store_true", help="skip the memory-hungry torch max form")
    ap.add_argument("--triton-plan", action="store_true", help="print the Triton launch plan (no GPU needed)")
    ap.add_argument("--dims", nargs="+", type=int, default=[64, 1024], help="D of --triton-plan")
    args = ap.parse_args()
    if args.triton_plan:
        B, T = (4, 8192) if (args.B, args.T) == (8, 4096) else (args.B, args.T)
        print("\n".join(triton_plan(B, T, args.dims, lk.dyadic_windows(8))))
        return
    torch.manual_seed(0)
    B, T, D, R = args.B, args.T, args.D, args.repeats
    x = torch.randn(B, T, D)
    windows = lk.dyadic_windows(8)
    W = len(windows)
    assert "cpu" in lk.available_backends("window_pool"), "the cpu backend did not build"
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    log("# window_pool on the CPU (cpu backend = C++ kernels)")
    log()
    log(f"Device: {os.cpu_count()}-core CPU, no GPU, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); the CPU is shared with other engineers' jobs, so "
        "absolute times are noisy: every figure is a ratio against an anchor timed in the same run.")
    log(f"Shape: fp32, B={B}, T={T}, D={D}, windows = lk.dyadic_windows(8) = {windows}; forward only; "
        f"median of {R} runs after a warm-up.")
    log()

    def fill_out():
        torch.empty(B, T, W, D).fill_(1.0)

    # Contenders of one reduce are timed round-robin (one call of each per round): on a shared
    # machine load changes, and the state of the allocator (a fresh 512 MiB output is page-faulted
    # in on first touch), hit all of them alike; each ratio comes from the same rounds.
    xg = x.clone().requires_grad_()
    rows = {}
    with torch.no_grad():
        for reduce in ("sum", "mean", "max"):
            ref = lk.window_pool(x, windows, reduce, backend="cpu")[0]
            chk = unfold_pool(x[:1], windows, reduce)
            assert (chk - ref[:1]).abs().max() < 1e-3, "unfold baseline disagrees"
            del ref, chk
            fns = {"fill": fill_out,
                   "cpu": lambda r=reduce: lk.window_pool(x, windows, r, backend="cpu"),
                   "unfold": lambda r=reduce: unfold_pool(x, windows, r)}
            if not (reduce == "max" and args.skip_torch_max):
                fns["torch"] = lambda r=reduce: lk.window_pool(x, windows, r, backend="torch")
            rows[reduce] = timing.interleaved_ms(fns, R)[0]
    # training forward: x requires grad, so max also writes the argmax its backward needs (int16
    # offsets, half the output's bytes again); unfold records its autograd graph too
    rows["max, x.requires_grad (saves the argmax)"] = timing.interleaved_ms(
        {"fill": fill_out, "cpu": lambda: lk.window_pool(xg, windows, "max", backend="cpu"),
         "unfold": lambda: unfold_pool(xg, windows, "max")}, R)[0]
    del xg
    log(f"Anchor 'write the output' (torch.empty + fill_ of [{B}, {T}, {W}, {D}] fp32, "
        f"{B * T * W * D * 4 / 2**20:.0f} MiB), timed in the same rounds as each row: "
        + ", ".join(f"{r['fill']:.1f} ms ({name})" for name, r in rows.items()))
    log()
    log("| reduce | cpu ms | unfold ms | torch ms | unfold / cpu (target >= 3) | torch / cpu (target >= 1) "
        "| cpu / write-output (target <= 2) |")
    log("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        tor = r.get("torch")
        t_tor, x_tor = ("-", "-") if tor is None else (f"{tor:.1f}", f"{tor / r['cpu']:.2f}")
        log(f"| {name} | {r['cpu']:.1f} | {r['unfold']:.1f} | {t_tor} | {r['unfold'] / r['cpu']:.2f} | {x_tor} "
            f"| {r['cpu'] / r['fill']:.2f} |")
    log()

    log("Window length (one window, cpu backend, interleaved rounds; ratio against the 1-wide window):")
    log()
    log("| reduce | L=1 ms | L=16 | L=256 | L=4000 | ratio 4000 / 1 (sum, mean target <= 1.5) |")
    log("| --- | --- | --- | --- | --- | --- |")
    for reduce in ("sum", "mean", "max"):
        with torch.no_grad():
            ts = timing.interleaved_ms({f"L{L}": (lambda L=L, r=reduce: lk.window_pool(x, [(0, L - 1)], r,
                                                                                  backend="cpu"))
                                        for L in (1, 16, 256, 4000)}, max(R, 7))[0]
        one = ts["L1"]
        log(f"| {reduce} | {one:.1f} | {ts['L16'] / one:.2f}x | {ts['L256'] / one:.2f}x | {ts['L4000'] / one:.2f}x "
            f"| {ts['L4000'] / one:.2f} |")
    log()
    log("(max: a tiled sparse table, O(T * D * log L); the O(log L) target allows up to log2(4000) = 12x.)")
    log()
    log("GPU figures (bf16, B=8, T=8192, D=1024 against the memory floor) are not measurable here: "
        "this machine has no GPU; the Triton kernels were only run through the interpreter.")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

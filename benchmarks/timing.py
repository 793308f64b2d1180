"""Timing, bandwidth and memory helpers shared by the benchmarks.

CPU: a monotonic clock (``time.perf_counter``) around each call after warm-up, median of several
repeats. CUDA: ``triton.testing.do_bench`` (CUDA events, cache flushed) median. Every figure is
reported beside an anchor measured in the same run, since absolute times move between machines.
"""
import platform
import statistics
import time
from typing import Callable, Dict

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> Dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "absent"
    try:
        import fla

        out["fla"] = getattr(fla, "__version__", "present")
    except ImportError:
        out["fla"] = "absent"
    return out


def median_ms(fn: Callable[[], None], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in ms (GPU time by CUDA events on CUDA)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, min(1000, int(0.02 / max(once, 1e-7))))  # a sample lasts >= ~20 ms
    times = []
    for _ in range(max(repeats, 5 if inner > 1 else repeats)):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def interleaved_ms(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1):
    """CPU: median ms of each fn in ``fns``, timed round-robin (one call of each per round), so
    that load changes on a shared machine hit every contender alike and same-round ratios stay
    fair. Returns (medians, raw): medians also holds ``name + "_cpu"``, the median process CPU
    time of all threads; raw maps each name to its list of wall times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    med = {name: statistics.median(v) for name, v in wall.items()}
    med.update({name + "_cpu": statistics.median(v) for name, v in cpu.items()})
    return med, wall


def cuda_graph_ms(fn: Callable[[], None], repeats: int = 100) -> float:
    """GPU time of one replay of a CUDA graph of fn (host launch overhead excluded)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mbytes: int = 256) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted) on this device, this run."""
    n = mbytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=7, warmup=2)
    return 2 * src.numel() * 4 / (ms * 1e-3)


class PeakMemory:
    """CUDA peak allocated bytes above what was allocated on entry (0 on the CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base

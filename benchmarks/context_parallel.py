"""Context-parallel LeaP attention on 2 CPU processes (gloo): bytes communicated per call against
the bound, and time against single-process attention.

    python -m benchmarks.context_parallel [--T 4096 65536] [--time-T 65536] [--out benchmarks/results]

Bytes: each rank's traffic in one forward+backward of ``lk.distributed.leap_attention_cp`` (causal,
``slice_lengths`` given, so no metadata exchange), counted by ``lk.distributed.track_communication``,
against the bound of an all-gather of the states, ``2 * (P - 1) * B * Hkv * 2Dk * (Dv + 1) * 4`` bytes
received per rank (forward and backward), which does not depend on T; the run asserts it.
Time: the same call on 2 processes (1 thread each) against ``lk.leap_attention`` on the whole
sequence in one process (1 thread and 2 threads), medians of ``--repeats`` runs, same backend.
Writes ``context_parallel_cpu.{md,json}``.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import leapformer_kernels as lk

B, H, D = 1, 8, 64


def _inputs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    pq, pk = (torch.rand(B, T, H, generator=g) for _ in range(2))
    return q, k, v, pq, pk


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, Ts, time_T, repeats, backend, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    res = {"bytes": {}, "time_s": None}
    try:
        for T in Ts + [time_T]:
            q, k, v, pq, pk = _inputs(T)
            n = T // world
            lens = [n] * (world - 1) + [T - n * (world - 1)]
            lo = sum(lens[:rank])
            loc = [t[:, lo:lo + lens[rank]].clone().requires_grad_() for t in (q, k, v, pq, pk)]

            def call():
                o = lk.distributed.leap_attention_cp(*loc, group=group, causal=True, slice_lengths=lens,
                                                     backend=backend)
                o.sum().backward()

            if T in Ts and str(T) not in res["bytes"]:
                with lk.distributed.track_communication() as st:
                    call()
                res["bytes"][str(T)] = dict(st)
            if T == time_T:
                call()  # warm-up
                times = []
                for _ in range(repeats):
                    dist.barrier(group)
                    t0 = time.perf_counter()
                    call()
                    dist.barrier(group)
                    times.append(time.perf_counter() - t0)
                res["time_s"] = statistics.median(times)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _single(T, threads, repeats, backend):
    torch.set_num_threads(threads)
    ins = [t.requires_grad_() for t in _inputs(T)]

    def call():
        lk.leap_attention(*ins, causal=True, backend=backend).sum().backward()

    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[4096, 65536])
    p.add_argument("--time-T", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cp.json")
        mp.start_processes(_worker, args=(world, _free_port(), a.T, a.time_T, a.repeats, a.backend, path),
                           nprocs=world, join=True, start_method="spawn")
        with open(path) as f:
            res = json.load(f)
    state_bytes = B * H * 2 * D * (D + 1) * 4  # MHA: Hkv = H
    bound = 2 * (world - 1) * state_bytes  # received per rank, forward + backward
    for T, st in res["bytes"].items():
        assert st["received"] <= bound, f"T={T}: received {st['received']} B > bound {bound} B"
    one = {th: _single(a.time_T, th, a.repeats, a.backend) for th in (1, 2)}
    kv_bytes = a.time_T // world * H * (2 * D + 1) * 4  # all-gathering k, v, pk of the other rank instead
    lines = [
        "# Context-parallel LeaP attention, 2 CPU processes (gloo)",
        "",
        f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"torch {torch.__version__}, backend `{a.backend}`, float32, B={B}, H={H}, D={D}, causal, forward+backward "
        "per call.",
        "",
        "| T | bytes received per rank | bound (state all-gather) | bytes sent per rank | collectives |",
        "| --- | --- | --- | --- | --- |",
    ]
    for T, st in res["bytes"].items():
        lines.append(f"| {int(T):,} | {st['received']:,} | {bound:,} | {st['sent']:,} | {st['collectives']} |")
    lines += [
        "",
        f"Independent of T, as the bound says; all-gathering the other rank's k, v, pk instead would receive "
        f"{kv_bytes:,} bytes in the forward alone at T = {a.time_T:,}.",
        "",
        f"| T = {a.time_T:,}, forward+backward | seconds (median of {a.repeats}) | ratio to 1 process, 1 thread |",
        "| --- | --- | --- |",
        f"| 1 process, 1 thread (anchor) | {one[1]:.3f} | 1.00 |",
        f"| 1 process, 2 threads | {one[2]:.3f} | {one[2] / one[1]:.2f} |",
        f"| 2 processes, 1 thread each (context parallel) | {res['time_s']:.3f} | {res['time_s'] / one[1]:.2f} |",
        "",
        f"Context parallelism adds one state pass per rank and here the processes share one machine's cores, "
        f"so it ran {'faster' if res['time_s'] < one[2] else 'slower'} than one process with 2 threads "
        f"({res['time_s'] / one[2]:.2f}x). It is for sequences that do not fit one device's memory, where the "
        "traffic above is what it costs.",
        "",
    ]
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, "context_parallel_cpu")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(base + ".json", "w") as f:
        json.dump({"bytes": res["bytes"], "bound": bound, "cp_time_s": res["time_s"], "single_time_s": one,
                   "T": a.T, "time_T": a.time_T, "backend": a.backend}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""leap_attention (every backend) against causal SDPA and "LeaP on FLA", forward and forward+backward.

"LeaP on FLA" is what a user writes without this package: the re-weighting in PyTorch, then
FLA's ``chunk_linear_attn(normalize=True, scale=1.0)`` on the 2*Dk features (CUDA only).
The memory floor is the bytes that must move (q, k, v, pq, pk in and o out; the backward also
reads do and writes dq, dk, dv, dpq, dpk) over the copy bandwidth measured in the same run.

On the CPU the contenders of one case (same B, T, H, D, dtype) are timed together by
``run_group``: warm-up, then round-robin rounds (``timing.interleaved_ms``), median per contender,
so that load from other processes on a shared machine hits them alike and the ratios stay fair.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F

import leapformer_kernels as lk
from leapformer_kernels.attention.features import reweight

from .timing import PeakMemory, interleaved_ms, median_ms


def make(B, T, H, D, dtype, device, grad):
    g = dict(dtype=dtype, device=device)
    q = (torch.randn(B, T, H, D, **g) * D ** -0.5).requires_grad_(grad)
    k = torch.randn(B, T, H, D, **g).requires_grad_(grad)
    v = torch.randn(B, T, H, D, **g).requires_grad_(grad)
    pq = torch.rand(B, T, H, **g).requires_grad_(grad)
    pk = torch.rand(B, T, H, **g).requires_grad_(grad)
    return q, k, v, pq, pk


def floor_bytes(B, T, H, D, dtype, backward: bool) -> int:
    e = torch.tensor([], dtype=dtype).element_size()
    fwd = (4 * B * T * H * D + 2 * B * T * H) * e  # q, k, v, o + pq, pk
    if not backward:
        return fwd
    return fwd + (5 * B * T * H * D + 2 * B * T * H) * e + (4 * B * T * H * D + 2 * B * T * H) * e


def methods(backends: List[str], device: torch.device):
    """name -> callable(q, k, v, pq, pk) returning o [B, T, H, D]."""
    out = {}
    for b in backends:
        out[f"leap[{b}]"] = lambda q, k, v, pq, pk, b=b: lk.leap_attention(q, k, v, pq, pk, causal=True, backend=b)
    out["sdpa"] = lambda q, k, v, pq, pk: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    if device.type == "cuda":
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            def leap_on_fla(q, k, v, pq, pk):
                o, _ = chunk_linear_attn(reweight(q, pq), reweight(k, pk), v, scale=1.0, normalize=True)
                return o

            out["leap_on_fla"] = leap_on_fla
        except ImportError:
            pass
    return out


def run_case(name, fn, B, T, H, D, dtype, device, repeats) -> Dict:
    res = {"method": name, "B": B, "T": T, "H": H, "D": D, "dtype": str(dtype).replace("torch.", "")}
    ins = make(B, T, H, D, dtype, device, grad=False)
    with torch.no_grad():
        res["fwd_ms"] = median_ms(lambda: fn(*ins), device, repeats)
    ins = make(B, T, H, D, dtype, device, grad=True)
    do = torch.randn(B, T, H, D, dtype=dtype, device=device)

    def fwd_bwd():
        o = fn(*ins)
        torch.autograd.backward(o, do)
        for t in ins:
            t.grad = None

    res["fwdbwd_ms"] = median_ms(fwd_bwd, device, repeats)
    if device.type == "cuda":
        with PeakMemory(device) as pm:
            fwd_bwd()
        e = torch.tensor([], dtype=dtype).element_size()
        res["peak_extra_mib"] = pm.peak / 2**20
        unavoidable = 5 * B * T * H * D * e  # o, do, dq, dk, dv
        res["workspace_mib"] = (pm.peak - unavoidable + do.numel() * e) / 2**20  # do existed before entry
    return res


def run_group(fns: Dict, B, T, H, D, dtype, device, repeats, warmup=2) -> List[Dict]:
    """Every contender in ``fns`` (name -> callable(q, k, v, pq, pk)) on one case, forward and
    forward+backward. CPU: all of them (both passes) interleaved round-robin over ``repeats``
    rounds after ``warmup`` calls each, median per contender (``timing.interleaved_ms``); CUDA:
    ``run_case`` per contender (CUDA events, and the peak memory)."""
    if device.type == "cuda":
        return [run_case(m, fn, B, T, H, D, dtype, device, repeats) for m, fn in fns.items()]
    dt = str(dtype).replace("torch.", "")
    fwd_ins = make(B, T, H, D, dtype, device, grad=False)
    grad_ins = make(B, T, H, D, dtype, device, grad=True)
    do = torch.randn(B, T, H, D, dtype=dtype, device=device)

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(*fwd_ins)
        return run

    def fwd_bwd(fn):
        def run():
            o = fn(*grad_ins)
            torch.autograd.backward(o, do)
            for t in grad_ins:
                t.grad = None
        return run

    timed = {}
    for m, fn in fns.items():
        timed[f"{m} fwd"] = fwd(fn)
        timed[f"{m} fwdbwd"] = fwd_bwd(fn)
    med, raw = interleaved_ms(timed, repeats, warmup)
    return [{"method": m, "B": B, "T": T, "H": H, "D": D, "dtype": dt, "fwd_ms": med[f"{m} fwd"],
             "fwdbwd_ms": med[f"{m} fwdbwd"], "rounds": len(raw[f"{m} fwd"])} for m in fns]

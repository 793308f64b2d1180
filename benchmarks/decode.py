"""Decode one token: ``leap_attention_step`` (``step[b]``) and the in-place serving step
``leap_attention_step_`` on rows of a state pool (``step_[b]``; its index check syncs on CUDA,
so its eager time includes one sync; the CUDA-graph replay skips the check) against SDPA with a
KV cache of the context length, and the state's read+write floor (a ``copy_`` of the same state, timed in the same run). On the
CPU the contenders are timed round-robin after a warm-up (``timing.interleaved_ms``), median per
contender; on CUDA each by CUDA events, and as a CUDA graph replay."""
from typing import Dict

import torch
import torch.nn.functional as F

import leapformer_kernels as lk

from .timing import cuda_graph_ms, interleaved_ms, median_ms


def run_decode(B, H, D, context, dtype, device, backends, repeats, warmup=2) -> Dict:
    g = dict(dtype=dtype, device=device)
    q, k, v = (torch.randn(B, 1, H, D, **g) for _ in range(3))
    pq, pk = torch.rand(B, 1, H, **g), torch.rand(B, 1, H, **g)
    S = torch.rand(B, H, 2 * D, D, dtype=torch.float32, device=device)
    z = torch.rand(B, H, 2 * D, dtype=torch.float32, device=device)
    res = {"B": B, "H": H, "D": D, "context": context, "dtype": str(dtype).replace("torch.", "")}
    kc = torch.randn(B, H, context, D, **g)
    vc = torch.randn(B, H, context, D, **g)
    qh = q.transpose(1, 2)

    def sdpa():
        F.scaled_dot_product_attention(qh, kc, vc)

    fns = {"sdpa_kv_cache": sdpa}
    # the serving path: rows 0, 2, 4, ... of a pool of 2B states, updated in place
    pool_S = torch.rand(2 * B, H, 2 * D, D, dtype=torch.float32, device=device)
    pool_z = torch.rand(2 * B, H, 2 * D, dtype=torch.float32, device=device)
    rows = torch.arange(0, 2 * B, 2, device=device)
    for b in backends:
        fns[f"step[{b}]"] = lambda b=b: lk.leap_attention_step(q, k, v, pq, pk, (S, z), backend=b)
        fns[f"step_[{b}]"] = lambda b=b: lk.leap_attention_step_(q, k, v, pq, pk, (pool_S, pool_z),
                                                                 state_indices=rows, backend=b)
    S2, z2 = S.clone(), z.clone()
    fns["state_copy"] = lambda: (S2.copy_(S), z2.copy_(z))
    with torch.no_grad():
        if device.type != "cuda":
            med, _ = interleaved_ms(fns, repeats, warmup)
            res.update({f"{name}_ms": med[name] for name in fns})
            return res
        for name, fn in fns.items():
            res[f"{name}_ms"] = median_ms(fn, device, repeats)
            try:
                res[f"{name}_graph_ms"] = cuda_graph_ms(fn)
            except Exception as e:  # a backend that cannot be captured is reported, not hidden
                res[f"{name}_graph_error"] = f"{type(e).__name__}: {e}"[:200]
    return res

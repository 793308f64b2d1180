"""The Triton kernels of monotone cross-attention (``num_visible_keys``, ``triton_monotone.py``) at
the shapes their sweeps branch on, against the float64 oracle (forward, final state, every
gradient): a rate so high that one query chunk spans many key tiles, a limit that jumps from 0 to S
inside one chunk, limits on key-chunk boundaries, Dk = 128 and Dv with several value tiles, GQA,
padding, a carried state, normalize=False and an active den clamp; plus determinism and no fallback
to the torch kernels. The shared parity grid of every backend is in ``test_visible_keys.py``."""
from unittest import mock

import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.attention import torch_chunk
from utils import assert_close, make_inputs, make_state

pytestmark = pytest.mark.skipif("triton" not in lk.available_backends(), reason="triton backend unavailable")


def _jump(T, S, at):
    n = torch.zeros(T, dtype=torch.int64)
    n[at:] = S
    return n


CASES = {  # (B, T, S, H, Hkv, Dk, Dv, limits, dtype, padding, state, extra kwargs)
    # rate 19: the first query chunk reaches key 362, six key tiles of masked scores
    "high-rate-gqa": (1, 20, 400, 2, 1, 16, 16, lambda T, S: lk.wait_k(T, S, 1, 19.0), torch.float32, False, True,
                      {}),
    # 0 keys for rows 0..29, all S keys from row 30 on: one chunk, every key tile masked
    "jump-0-to-S": (2, 50, 130, 2, 2, 16, 8, lambda T, S: _jump(T, S, 30), torch.float32, True, True, {}),
    # limits on key-chunk boundaries (64, 128): whole chunks fold, no masked tile at the boundary
    "chunk-boundaries": (1, 65, 128, 1, 1, 16, 16, lambda T, S: lk.wait_k(T, S, 64, 1.0), torch.float32, False,
                         False, {}),
    # Dk = 128 (BV = 32): Dv = 40 is two value tiles; GQA
    "dk128-two-tiles": (1, 19, 70, 2, 1, 128, 40, lambda T, S: lk.wait_k(T, S, 3, 3.0), torch.float32, True, True,
                        {}),
    # Dv = 80: two 64-wide value tiles; per-batch limits; no normalisation
    "tiles-unnormalized": (2, 67, 90, 2, 1, 32, 80,
                           lambda T, S: torch.stack([lk.wait_k(T, S, 2, 1.5), lk.wait_k(T, S, 9, 1.0)]),
                           torch.float32, True, True, dict(normalize=False)),
    # the den clamp active on some rows
    "eps-clamp-bf16": (1, 67, 90, 2, 2, 32, 80, lambda T, S: lk.wait_k(T, S, 0, 1.5), torch.bfloat16, False, True,
                       dict(eps=0.5)),
    "fp16-gqa": (2, 40, 100, 4, 2, 16, 24, lambda T, S: lk.wait_k(T, S, 0, 2.5), torch.float16, True, False, {}),
    # Dk = 80, Dv = 40 (Dk > 64: dq and dk over two 64-column key blocks, the second one partial; dv
    # over two 32-wide value tiles), GQA groups of 2, padding, a carried state (dS0 from the dq sweep)
    "dk80-key-blocks-gqa": (1, 70, 100, 4, 2, 80, 40, lambda T, S: lk.wait_k(T, S, 5, 1.4), torch.float32, True,
                            True, {}),
}


def _inputs(case):
    B, T, S, H, Hkv, Dk, Dv, limits, dtype, padding, state, extra = CASES[case]
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv)
    ins = [q.to(dtype), k.to(dtype), v.to(dtype), pq, pk]
    if state:
        ins += list(make_state(B, H, Dk, Dv))
    kw = dict(causal=False, num_visible_keys=limits(T, S), **extra)
    if padding:
        kpm = torch.rand(B, S) < 0.25
        kpm[:, -1] = True
        kw["key_padding_mask"] = kpm
    return ins, kw, dtype


def _run(fn, ins, kw, cot, **extra):
    ins = [t.detach().clone().requires_grad_() for t in ins]
    init = (ins[5], ins[6]) if len(ins) > 5 else None
    o, (S, z) = fn(*ins[:5], initial_state=init, output_final_state=True, **kw, **extra)
    do, dS, dz = cot
    grads = torch.autograd.grad((o, S, z), ins, (do.to(o.dtype), dS.to(S.dtype), dz.to(z.dtype)))
    return (o, S, z), grads


@pytest.mark.parametrize("case", list(CASES))
def test_triton_monotone_matches_oracle(case):
    ins, kw, dtype = _inputs(case)
    ref_ins = [t.detach().double() for t in ins]
    B, T, S, H, Hkv, Dk, Dv = CASES[case][:7]
    cot = (torch.randn(B, T, H, Dv, dtype=torch.float64), torch.randn(B, H, 2 * Dk, Dv, dtype=torch.float64),
           torch.randn(B, H, 2 * Dk, dtype=torch.float64))
    # the Triton kernels must serve the mode themselves (no torch fallback)
    with mock.patch.object(torch_chunk, "monotone_core", side_effect=AssertionError("torch fallback")):
        outs, grads = _run(lk.leap_attention, ins, kw, cot, backend="triton")
    outs_ref, grads_ref = _run(lk.reference.leap_attention, ref_ins, kw, cot)
    for name, a, b in zip(["o", "final S", "final z"], outs, outs_ref):
        assert_close(a, b, dtype, name)
    for name, g, r in zip(["dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"], grads, grads_ref):
        assert_close(g, r, dtype, name, factor=2)
    if "key_padding_mask" in kw:  # padded keys: exactly zero gradients
        pad = kw["key_padding_mask"]
        for g in (grads[1], grads[2], grads[4]):
            assert bool((g[pad] == 0).all())


def test_triton_monotone_backward_is_deterministic():
    # key blocks (Dk = 72: dpq / dpk partials summed on the host in a fixed order), value tiles and a
    # GQA group (dk, dv summed over the group's heads in order inside the kernel)
    B, T, S, H, Hkv, Dk, Dv = 1, 30, 50, 2, 1, 72, 40
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv)
    ins = [q, k, v, pq, pk] + list(make_state(B, H, Dk, Dv))
    kw = dict(causal=False, num_visible_keys=lk.wait_k(T, S, 1, 2.0))
    cot = (torch.randn(B, T, H, Dv), torch.randn(B, H, 2 * Dk, Dv), torch.randn(B, H, 2 * Dk))
    first = _run(lk.leap_attention, ins, kw, cot, backend="triton")[1]
    second = _run(lk.leap_attention, ins, kw, cot, backend="triton")[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)

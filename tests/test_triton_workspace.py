"""Scratch memory of the triton backend's forward and backward (issue #19), without a GPU.

``triton_chunk.workspace_bytes`` computes what one ``fwd`` / ``bwd`` call allocates beyond its
inputs and outputs (segment states, ``dden``, one fp32 per row and key block for
``dpq``/``dpk`` at Dk = 128). It must stay under 256 MiB at the anchor shape (bf16, B=4, H=16,
T=32768, Dk = Dv in {64, 128}, MHA and GQA with Hkv=4, 132 SMs), and an interpreted run must
allocate exactly that: every tensor created between the inputs and the outputs is recorded with a
``TorchDispatchMode``. The same for the monotone mode (``num_visible_keys``, ``monotone=True``).
"""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.attention import triton_chunk as tc
from utils import make_inputs, make_state, ScratchRecorder

pytestmark = pytest.mark.skipif("triton" not in lk.available_backends(),
                                reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)")

MiB = 2 ** 20


@pytest.mark.parametrize("Hkv", [16, 4], ids=["mha", "gqa4"])
@pytest.mark.parametrize("D", [64, 128])
def test_anchor_workspace_under_256_mib(D, Hkv):
    for mode in (dict(), dict(causal=True, block_size=3000), dict(causal=False)):
        bwd = tc.workspace_bytes(4, 32768, 16, Hkv, D, D, 132, **mode)
        fwd = tc.workspace_bytes(4, 32768, 16, Hkv, D, D, 132, backward=False, **mode)
        assert bwd <= 256 * MiB and fwd <= 256 * MiB, (mode, bwd / MiB, fwd / MiB)
    # no per-row fp32 gradient partials: at Dk = 128 the biggest share is the segment states
    assert tc.workspace_bytes(4, 32768, 16, Hkv, D, D, 132) < 160 * MiB
    # the monotone mode (num_visible_keys): dden, the chunk tables and, at Dk = 128, one fp32 per
    # row and key block for dpq / dpk; the forward allocates nothing
    for S in (32768, 4096):
        bwd = tc.workspace_bytes(4, 32768, 16, Hkv, D, D, 132, S=S, causal=False, monotone=True)
        assert bwd <= 256 * MiB, (S, bwd / MiB)
        assert tc.workspace_bytes(4, 32768, 16, Hkv, D, D, 132, S=S, causal=False, monotone=True,
                                  backward=False) == 0


CASES = {  # (B, T, S, H, Hkv, Dk, Dv, mode, extras)
    "causal_segmented": (2, 200, None, 2, 2, 16, 16, dict(causal=True), {}),
    "dk128_gqa_state": (1, 70, None, 2, 1, 128, 64, dict(causal=True, block_size=5), dict(state=True, ofs=True)),
    "block70_segments": (1, 300, None, 2, 1, 16, 32, dict(causal=True, block_size=70), {}),
    "cross_whole": (1, 90, 150, 2, 2, 16, 16, dict(causal=False), dict(state=True)),
    "varlen_unnormalized": (1, 200, None, 2, 2, 16, 16, dict(causal=True), dict(cu=[0, 70, 200], normalize=False)),
    "one_segment_state": (1, 70, None, 2, 2, 32, 16, dict(causal=True), dict(state=True, sms=10 ** 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_run_allocates_what_workspace_bytes_says(case, monkeypatch):
    B, T, S, H, Hkv, Dk, Dv, mode, ex = CASES[case]
    sms = ex.get("sms", 4)
    monkeypatch.setattr(tc, "segment_policy", lambda dev: (sms, None))
    normalize = ex.get("normalize", True)
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv)
    cu = torch.tensor(ex["cu"], dtype=torch.int64) if "cu" in ex else None
    N = B if cu is None else len(ex["cu"]) - 1
    S0, z0 = make_state(N, H, Dk, Dv) if ex.get("state") else (None, None)
    do = torch.randn(B, T, H, Dv)
    dS, dz = make_state(N, H, Dk, Dv) if ex.get("ofs") else (None, None)
    causal, bs = mode["causal"], mode.get("block_size", 0)
    ins = [q, k, v, pq, pk, S0, z0, cu, do, dS, dz]
    kw = dict(S=k.shape[1], causal=causal, block_size=bs, normalize=normalize, initial_state=S0 is not None,
              cu_seqlens=None if cu is None else N, min_segment=None)

    with ScratchRecorder(ins) as rec:
        outs = tc.fwd(q, k, v, pq, pk, S0, z0, None, cu, None, causal, bs, 1e-6, normalize, ex.get("ofs", False))
    assert rec.scratch(outs) == tc.workspace_bytes(B, T, H, Hkv, Dk, Dv, sms, backward=False,
                                                   output_final_state=ex.get("ofs", False), **kw)
    o, den = outs[0], outs[3]  # the forward's residuals, which the op saves for the backward
    assert (den is not None) == normalize
    with ScratchRecorder(ins + [o, den]) as rec:
        grads = tc.bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, None, cu, None, causal, bs, 1e-6, normalize,
                       o=o, den=den)
    expected = tc.workspace_bytes(B, T, H, Hkv, Dk, Dv, sms, final_state_grad=dS is not None, **kw)
    assert rec.scratch(grads) == expected
    assert expected > 0
    assert grads[0].dtype == q.dtype and grads[1].shape == k.shape and grads[2].shape == v.shape


MONOTONE_CASES = {  # (B, T, S, H, Hkv, Dk, Dv, extras)
    # Dk = 80: two key blocks (dpq / dpk partials), GQA, a carried state and final-state gradients
    "dk80_gqa_state": (1, 40, 70, 2, 1, 80, 40, dict(state=True, ofs=True)),
    "mha_unnormalized": (2, 65, 90, 2, 2, 16, 16, dict(normalize=False)),
    "gqa_padding": (1, 40, 130, 2, 1, 32, 24, dict(padding=True)),
}


@pytest.mark.parametrize("case", list(MONOTONE_CASES))
def test_interpreted_monotone_run_allocates_what_workspace_bytes_says(case):
    B, T, S, H, Hkv, Dk, Dv, ex = MONOTONE_CASES[case]
    normalize = ex.get("normalize", True)
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv)
    S0, z0 = make_state(B, H, Dk, Dv) if ex.get("state") else (None, None)
    dS, dz = make_state(B, H, Dk, Dv) if ex.get("ofs") else (None, None)
    kpm = torch.rand(B, S) < 0.25 if ex.get("padding") else None
    nvk = lk.wait_k(T, S, 3, 1.3).expand(B, T).contiguous()
    do = torch.randn(B, T, H, Dv)
    ins = [q, k, v, pq, pk, S0, z0, kpm, nvk, do, dS, dz]
    kw = dict(S=S, causal=False, normalize=normalize, initial_state=S0 is not None, monotone=True)

    with ScratchRecorder(ins) as rec:
        outs = tc.fwd(q, k, v, pq, pk, S0, z0, kpm, None, nvk, False, 0, 1e-6, normalize, ex.get("ofs", False))
    assert rec.scratch(outs) == tc.workspace_bytes(B, T, H, Hkv, Dk, Dv, 4, backward=False,
                                                   output_final_state=ex.get("ofs", False), **kw) == 0
    o, den = outs[0], outs[3]
    with ScratchRecorder(ins + [o, den]) as rec:
        grads = tc.bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, kpm, None, nvk, False, 0, 1e-6, normalize, o=o, den=den)
    expected = tc.workspace_bytes(B, T, H, Hkv, Dk, Dv, 4, final_state_grad=dS is not None, **kw)
    assert rec.scratch(grads) == expected
    assert expected > 0
    assert grads[0].dtype == q.dtype and grads[1].shape == k.shape and grads[2].shape == v.shape

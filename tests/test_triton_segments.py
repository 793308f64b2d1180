"""The segment-parallel (v2) sweeps of the triton backend, under TRITON_INTERPRET=1 without a GPU.

Each sequence is cut into segments of L rows (a multiple of the chunk); the key side's segment
sums and a scan give every segment its starting state, and the backward mirrors it with the
query side's sums and a reverse scan. These tests pin the plan (``segment_length``, ``_plan``),
check that the kernels really launch several segments per sequence, and compare forward, final
state and every gradient against the float64 reference with segments forced on (many) and off
(one program per sequence), on shapes that are not chunk multiples, with a last segment shorter
than the rest, varlen sequences shorter than a segment, GQA, padding and an initial state, and
block-causal blocks wider than a chunk (segments of whole blocks, W not a multiple of 64;
segments are cut per sequence from its first row, so varlen blocks never straddle them).
"""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.attention import triton_chunk as tc
from utils import assert_close, make_inputs, make_state

pytestmark = pytest.mark.skipif("triton" not in lk.available_backends(),
                                reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)")


@pytest.mark.parametrize("T, programs, CL, sms, min_len, expected", [
    (8192, 64, 64, 132, 256, 960),     # the anchor: B*H = 64, 9 segments of 960
    (8192, 8, 64, 132, 256, 256),      # B=1, H=8: 32 segments (the 256-row floor)
    (8192, 528, 64, 132, 256, 0),      # 4 x 132 programs already: one program per sequence
    (64, 1, 64, 132, 64, 0),           # one chunk: nothing to split
    (200, 4, 64, 4, 64, 64),           # the interpreter's plan in these tests: 4 segments
    (1000, 1, 60, 4, 60, 120),         # block-causal chunks of 60 rows: L is a multiple of 60
    (300, 1, 64, 100, 64, 64),         # never below one chunk
])
def test_segment_length(T, programs, CL, sms, min_len, expected):
    L = tc.segment_length(T, programs, CL, sms, min_len)
    assert L == expected
    if L:
        assert L % CL == 0 and L < T and L >= min_len


@pytest.mark.parametrize("causal, block_size, T, S, expected", [
    (True, None, 200, 200, (64, 4, False)),     # causal: prefix states per segment
    (True, 5, 200, 200, (60, 4, False)),        # block-causal inside chunks of 60: L multiple of 60
    (False, None, 150, 90, (64, 3, True)),      # cross-attention: one block holds every key
    (True, 1000, 257, 257, (64, 5, True)),      # one block wider than the sequence: as non-causal
    (True, 100, 300, 300, (100, 3, False)),     # blocks wider than a chunk: segments of whole blocks
    (True, 70, 300, 300, (70, 5, False)),       # L is a multiple of W, not of the chunk
])
def test_plan(causal, block_size, T, S, expected):
    INTRA, W, CL = tc._sweep(T, S, causal, block_size, 64)
    assert tc._plan(torch.device("cpu"), T, S, 1, 1, 1, INTRA, W, CL) == expected


@pytest.fixture(params=["segmented", "whole_sequence"])
def policy(request, monkeypatch):
    """Many segments (64 SMs: every test shape splits) or none (0 SMs, nothing to fill: one program
    per sequence walks it, the v1 path; with 1 SM a GQA backward, planned for its key/value heads,
    would still split)."""
    monkeypatch.setattr(tc, "segment_policy", lambda dev: (64, None) if request.param == "segmented" else (0, None))
    return request.param


def _launch_grids(monkeypatch):
    """Record the third grid axis (segments) of every sweep launch."""
    seen = []
    for name in ("leap_fwd_kernel_sweep", "leap_bwd_kernel_dkv", "leap_fwd_kernel_segment_sums",
                 "leap_bwd_kernel_segment_sums"):
        kernel = getattr(tc, name)

        class Spy:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                seen.append((self.n, tuple(grid)))
                return self.k[grid]

        monkeypatch.setattr(tc, name, Spy(kernel, name))
    return seen


CASES = {
    "causal": dict(mode=dict(causal=True)),
    "causal_state_gqa": dict(mode=dict(causal=True), state=True, Hkv=1),
    "block5": dict(mode=dict(causal=True, block_size=5)),
    "block64_unnormalized": dict(mode=dict(causal=True, block_size=64), normalize=False, state=True),
    "block70_state_gqa": dict(mode=dict(causal=True, block_size=70), state=True, Hkv=1),
    "block100_padding": dict(mode=dict(causal=True, block_size=100), padding=True),
    "varlen_block90": dict(mode=dict(causal=True, block_size=90), cu=[0, 5, 200, 333], state=True),
    "noncausal_padding": dict(mode=dict(causal=False), padding=True, state=True),
    "cross": dict(mode=dict(causal=False), S=171),
    "one_block": dict(mode=dict(causal=True, block_size=4096)),
    "varlen": dict(mode=dict(causal=True), cu=[0, 5, 70, 71, 200, 333], state=True),
    "varlen_noncausal": dict(mode=dict(causal=False), cu=[0, 130, 131, 333]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, policy, monkeypatch):
    c = CASES[case]
    seen = _launch_grids(monkeypatch)
    T = 333 if "cu" in c else 201  # not chunk multiples: the last segment is short
    B, H, Hkv, D = (1 if "cu" in c else 2), 2, c.get("Hkv", 2), 16
    kw = dict(c["mode"], normalize=c.get("normalize", True))
    if "cu" in c:
        kw["cu_seqlens"] = torch.tensor(c["cu"])
    q, k, v, pq, pk = make_inputs(B, T, c.get("S"), H, Hkv, D, D)
    if c.get("padding"):
        kpm = torch.rand(B, k.shape[1]) < 0.3
        kpm[:, 0] = True
        kw["key_padding_mask"] = kpm
    n = len(c["cu"]) - 1 if "cu" in c else B
    ins = [q, k, v, pq, pk] + (list(make_state(n, H, D, D)) if c.get("state") else [])

    def run(fn, xs):
        xs = [t.detach().clone().requires_grad_() for t in xs]
        init = (xs[5], xs[6]) if len(xs) > 5 else None
        o, (Sf, zf) = fn(*xs[:5], initial_state=init, output_final_state=True, **kw)
        outs = [o, Sf, zf]
        g = torch.Generator().manual_seed(3)
        loss = sum((y.double() * torch.randn(y.shape, dtype=torch.float64, generator=g)).sum() for y in outs)
        loss.backward()
        return outs, [t.grad for t in xs]

    outs, grads = run(lambda *a, **k: lk.leap_attention(*a, backend="triton", **k), ins)
    ref_outs, ref_grads = run(lk.reference.leap_attention, [t.double() for t in ins])
    for name, a, b in zip(["o", "S", "z"], outs, ref_outs):
        assert_close(a, b, torch.float32, name)
    for name, a, b in zip(["dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"], grads, ref_grads):
        if b is None or (name == "dz0" and not kw["normalize"]):
            continue
        assert a is not None, name
        assert_close(a, b, torch.float32, name, factor=2.0)
    segments = {name: grid[2] if len(grid) > 2 else 1 for name, grid in seen}
    if policy == "segmented":
        assert segments["leap_fwd_kernel_sweep"] > 1 and segments["leap_bwd_kernel_dkv"] > 1, seen
        assert "leap_fwd_kernel_segment_sums" in segments and "leap_bwd_kernel_segment_sums" in segments
    else:
        assert all(s == 1 for s in segments.values()), seen
        assert "leap_fwd_kernel_segment_sums" not in segments


def test_segmented_equals_unsegmented_in_float32_to_rounding(monkeypatch):
    """Same inputs, both plans: the results differ only by the order of fp32 additions."""
    q, k, v, pq, pk = make_inputs(2, 300, None, 2, None, 16, 16)
    outs = {}
    for sms in (1, 64):
        monkeypatch.setattr(tc, "segment_policy", lambda dev, s=sms: (s, None))
        outs[sms] = lk.leap_attention(q, k, v, pq, pk, backend="triton")
    assert_close(outs[64], outs[1].double(), torch.float32, "segmented vs one program per sequence")


def test_segmented_backward_is_deterministic(monkeypatch):
    monkeypatch.setattr(tc, "segment_policy", lambda dev: (64, None))
    q, k, v, pq, pk = make_inputs(1, 260, None, 2, 1, 16, 16)
    grads = []
    for _ in range(2):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v, pq, pk)]
        lk.leap_attention(*xs, backend="triton").sum().backward()
        grads.append([t.grad for t in xs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)

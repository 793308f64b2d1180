"""``leap_attention_step_``: the in-place decode step on a preallocated state pool (serving,
CUDA-graph decoding), on every available backend (triton under TRITON_INTERPRET=1 without a GPU).

After the call, the pool rows named by ``state_indices`` hold what the pure step returns, the
other rows are bit-for-bit untouched, and o equals the pure step's o (which equals the float64
reference, tests/test_state.py). Bad input raises before anything is written.
"""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels.attention import triton_chunk
from utils import assert_close, make_inputs, make_state

BACKENDS = [b for b in ("torch", "cpu", "triton") if b in lk.available_backends()]


def _pool(N, H, Dk, Dv):
    S, z = make_state(N, H, Dk, Dv)
    return S.contiguous(), z.contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("indices", ["int64", "int32", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_the_pure_step(backend, t, indices, normalize):
    B, H, Hkv, Dk, Dv, N = 3, 4, 2, 16, 24, 7  # GQA, Dv not a power of two
    q, k, v, pq, pk = make_inputs(B, t, None, H, Hkv, Dk, Dv)
    if indices == "none":
        idx, N = None, B
    else:
        idx = torch.tensor([5, 0, 3], dtype=getattr(torch, indices))
    S, z = _pool(N, H, Dk, Dv)
    S0, z0 = S.clone(), z.clone()
    rows = idx.long() if idx is not None else torch.arange(B)
    o = lk.leap_attention_step_(q, k, v, pq, pk, (S, z), state_indices=idx, normalize=normalize, backend=backend)
    o_r, (S_r, z_r) = lk.leap_attention_step(q, k, v, pq, pk, (S0[rows], z0[rows]), normalize=normalize,
                                             backend=backend)
    o_64, (S_64, z_64) = lk.reference.leap_attention_step(q.double(), k.double(), v.double(), pq.double(),
                                                          pk.double(), (S0[rows].double(), z0[rows].double()),
                                                          normalize=normalize)
    assert_close(o, o_64, torch.float32, "o")
    assert_close(S[rows], S_64, torch.float32, "S")
    assert_close(z[rows], z_64, torch.float32, "z")
    assert_close(o, o_r.double(), torch.float32, "o vs the pure step")
    others = torch.tensor([i for i in range(N) if i not in rows.tolist()], dtype=torch.long)
    assert torch.equal(S[others], S0[others]) and torch.equal(z[others], z0[others])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_loop_equals_the_full_op(backend):
    """Four tokens decoded one at a time into pool rows [2, 0] equal leap_attention on all four."""
    B, T, H, D = 2, 4, 2, 16
    q, k, v, pq, pk = make_inputs(B, T, None, H, None, D, D)
    S, z = torch.zeros(3, H, 2 * D, D), torch.zeros(3, H, 2 * D)
    idx = torch.tensor([2, 0])
    outs = [lk.leap_attention_step_(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], pq[:, i:i + 1], pk[:, i:i + 1],
                                    (S, z), state_indices=idx, backend=backend) for i in range(T)]
    o_full, (S_full, z_full) = lk.reference.leap_attention(q.double(), k.double(), v.double(), pq.double(),
                                                           pk.double(), output_final_state=True)
    assert_close(torch.cat(outs, 1), o_full, torch.float32, "o")
    assert_close(S[idx], S_full, torch.float32, "S")
    assert_close(z[idx], z_full, torch.float32, "z")
    assert torch.equal(S[1], torch.zeros_like(S[1]))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")
def test_triton_clamps_indices_it_cannot_check():
    """Inside a CUDA-graph capture the values are not checked: the kernel clamps them into
    [0, N), so a bad index updates the last (or first) row instead of memory outside the pool."""
    B, H, D, N = 2, 2, 16, 3
    q, k, v, pq, pk = make_inputs(B, 1, None, H, None, D, D)
    S, z = _pool(N, H, D, D)
    S0, z0 = S.clone(), z.clone()
    triton_chunk.step_(q, k, v, pq, pk, S, z, torch.tensor([N + 5, -4]), 1e-6, True)
    _, (S_r, z_r) = lk.leap_attention_step(q, k, v, pq, pk, (S0[[N - 1, 0]], z0[[N - 1, 0]]), backend="torch")
    assert_close(S[[N - 1, 0]], S_r.double(), torch.float32, "S")
    assert torch.equal(S[1], S0[1]) and torch.equal(z[1], z0[1])


def _bad_cases():
    B, H, D, N = 2, 2, 8, 4
    q, k, v, pq, pk = make_inputs(B, 1, None, H, None, D, D)
    S, z = _pool(N, H, D, D)
    idx = torch.tensor([1, 3])
    yield "no state", (q, k, v, pq, pk, None), dict(state_indices=idx), ValueError, "needs state"
    yield "float64 pool", (q, k, v, pq, pk, (S.double(), z)), dict(state_indices=idx), ValueError, "float32"
    yield "strided pool", (q, k, v, pq, pk, (S.transpose(2, 3).contiguous().transpose(2, 3), z)), \
        dict(state_indices=idx), ValueError, "contiguous"
    yield "float indices", (q, k, v, pq, pk, (S, z)), dict(state_indices=idx.float()), TypeError, "int32 or int64"
    yield "list indices", (q, k, v, pq, pk, (S, z)), dict(state_indices=[1, 3]), TypeError, "state_indices"
    yield "indices shape", (q, k, v, pq, pk, (S, z)), dict(state_indices=idx[:1]), ValueError, "shape [2]"
    yield "index too large", (q, k, v, pq, pk, (S, z)), dict(state_indices=torch.tensor([1, 4])), ValueError, \
        "[0, 4)"
    yield "negative index", (q, k, v, pq, pk, (S, z)), dict(state_indices=torch.tensor([-1, 2])), ValueError, \
        "[0, 4)"
    yield "repeated index", (q, k, v, pq, pk, (S, z)), dict(state_indices=torch.tensor([3, 3])), ValueError, \
        "repeat"
    yield "pool rows != B", (q, k, v, pq, pk, (S, z)), {}, ValueError, "state_indices"
    yield "pool shape", (q, k, v, pq, pk, (S[:, :1], z)), dict(state_indices=idx), ValueError, "state[0] (S)"
    yield "q needs grad", (q.clone().requires_grad_(), k, v, pq, pk, (S, z)), dict(state_indices=idx), \
        ValueError, "inference-only"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_writes_nothing(case, backend):
    _, args, kw, err, msg = case
    state = args[5]
    before = tuple(t.clone() for t in state) if state is not None else None
    with pytest.raises(err, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        lk.leap_attention_step_(*args, backend=backend, **kw)
    if state is not None:
        assert all(torch.equal(a, b) for a, b in zip(state, before))

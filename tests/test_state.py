"""State: pieces with the state carried equal the whole; decode steps equal the causal op;
varlen equals each sequence alone."""
import pytest
import torch

import leapformer_kernels as lk
from utils import assert_close, make_inputs, make_state

MODES = [dict(causal=True), dict(causal=True, block_size=4), dict(causal=False)]


@pytest.mark.parametrize("mode", MODES, ids=["causal", "block4", "noncausal"])
@pytest.mark.parametrize("T1", [1, 8, 64])
def test_split_equals_whole(backend, mode, T1):
    T2 = 57
    if mode.get("block_size") and T1 % mode["block_size"]:
        pytest.skip("a block-causal piece may only start from a state on a block boundary (DESIGN section 2)")
    q, k, v, pq, pk = make_inputs(2, T1 + T2, None, 2, None, 16, 8, requires_grad=True)
    init = make_state(2, 2, 16, 8, requires_grad=True)
    o, (S, z) = lk.leap_attention(q, k, v, pq, pk, initial_state=init, output_final_state=True, backend=backend, **mode)
    a, b = slice(0, T1), slice(T1, T1 + T2)
    o1, st = lk.leap_attention(q[:, a], k[:, a], v[:, a], pq[:, a], pk[:, a], initial_state=init,
                               output_final_state=True, backend=backend, **mode)
    o2, (S2, z2) = lk.leap_attention(q[:, b], k[:, b], v[:, b], pq[:, b], pk[:, b], initial_state=st,
                                     output_final_state=True, backend=backend, **mode)
    if mode.get("causal"):
        assert_close(torch.cat([o1, o2], 1), o, torch.float32, "o")
    assert_close(S2, S, torch.float32, "S")
    assert_close(z2, z, torch.float32, "z")
    if mode.get("causal"):  # gradients through the carried state
        g = torch.randn_like(o)
        (gw,) = torch.autograd.grad((o * g).sum(), [q], retain_graph=True)
        (gs,) = torch.autograd.grad((torch.cat([o1, o2], 1) * g).sum(), [q])
        assert_close(gs, gw, torch.float32, "dq through the state", factor=2)


@pytest.mark.parametrize("t", [1, 3])
def test_decode_steps_equal_causal(backend, t):
    T = 13
    q, k, v, pq, pk = make_inputs(3, T, None, 4, 2, 16, 16)
    full, (S, z) = lk.leap_attention(q, k, v, pq, pk, causal=True, output_final_state=True, backend=backend)
    state, outs = None, []
    for i in range(0, T, t):
        sl = slice(i, min(i + t, T))
        prev = None if state is None else (state[0].clone(), state[1].clone())
        o, new = lk.leap_attention_step(q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl], state, backend=backend)
        if prev is not None:  # the input state is untouched, the output is fresh
            assert torch.equal(prev[0], state[0]) and torch.equal(prev[1], state[1])
            assert new[0].data_ptr() != state[0].data_ptr()
        outs.append(o)
        state = new
    assert_close(torch.cat(outs, 1), full, torch.float32, "decode")
    assert_close(state[0], S, torch.float32, "S")
    assert_close(state[1], z, torch.float32, "z")


@pytest.mark.parametrize("mode", MODES, ids=["causal", "block4", "noncausal"])
def test_varlen_equals_each_alone(backend, mode):
    lens = [5, 0, 64, 1, 70]
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, pq, pk = make_inputs(1, T, None, 2, 1, 16, 8, requires_grad=True)
    init = make_state(len(lens), 2, 16, 8)
    kpm = torch.rand(1, T) < 0.2
    o, (S, z) = lk.leap_attention(q, k, v, pq, pk, cu_seqlens=cu, initial_state=init, key_padding_mask=kpm,
                                  output_final_state=True, backend=backend, **mode)
    g = torch.randn_like(o)
    (dq,) = torch.autograd.grad((o * g).sum(), [q])
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if b == a:
            assert torch.equal(S[i], init[0][i]) and torch.equal(z[i], init[1][i])
            continue
        sl = slice(a, b)
        oi, (Si, zi) = lk.leap_attention(q[:, sl], k[:, sl], v[:, sl], pq[:, sl], pk[:, sl],
                                         initial_state=(init[0][i:i + 1], init[1][i:i + 1]),
                                         key_padding_mask=kpm[:, sl], output_final_state=True, backend=backend,
                                         **mode)
        assert_close(o[:, sl], oi, torch.float32, f"o of sequence {i}")
        assert_close(S[i:i + 1], Si, torch.float32, f"S of sequence {i}")
        assert_close(z[i:i + 1], zi, torch.float32, f"z of sequence {i}")
        (dqi,) = torch.autograd.grad((oi * g[:, sl]).sum(), [q])
        assert_close(dq[:, sl], dqi[:, sl], torch.float32, f"dq of sequence {i}", factor=2)


def test_left_padding_batches_prompts(backend):
    """Left-padded prompts of different lengths give the same outputs and state as alone."""
    lens, T = [9, 4], 9
    q, k, v, pq, pk = make_inputs(2, T, None, 2, None, 16, 16)
    kpm = torch.zeros(2, T, dtype=torch.bool)
    kpm[1, : T - lens[1]] = True
    o, (S, z) = lk.leap_attention(q, k, v, pq, pk, key_padding_mask=kpm, output_final_state=True, backend=backend)
    sl = slice(T - lens[1], T)
    o1, (S1, z1) = lk.leap_attention(q[1:, sl], k[1:, sl], v[1:, sl], pq[1:, sl], pk[1:, sl],
                                     output_final_state=True, backend=backend)
    assert_close(o[1:, sl], o1, torch.float32)
    assert_close(S[1:], S1, torch.float32)
    assert_close(z[1:], z1, torch.float32)

"""Property-based test (hypothesis): random shapes and modes against the float64 oracle."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leapformer_kernels as lk
from utils import assert_close, make_inputs, reference

BACKENDS = lk.available_backends()


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([h for h in (1, 2, 4) if H % h == 0]))
    T = draw(st.integers(1, 80))
    mode = draw(st.sampled_from(["causal", "block", "noncausal", "cross"]))
    S = draw(st.integers(1, 80)) if mode == "cross" else T
    Dk = draw(st.sampled_from([4, 16, 20, 32]))
    Dv = draw(st.sampled_from([3, 16, 32]))
    kw = dict(causal=mode in ("causal", "block"))
    if mode == "block":
        kw["block_size"] = draw(st.integers(1, 90))
    if draw(st.booleans()):
        kw["key_padding_mask"] = torch.rand(B, S) < 0.25
    kw["normalize"] = draw(st.booleans())
    kw["eps"] = draw(st.sampled_from([1e-6, 0.1]))
    return (B, T, S, H, Hkv, Dk, Dv), kw, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_cases(backend, case):
    (B, T, S, H, Hkv, Dk, Dv), kw, seed = case
    torch.manual_seed(seed)
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv)
    o = lk.leap_attention(q, k, v, pq, pk, backend=backend, **kw)
    base = lk.reference.leap_attention(q, k, v, pq, pk, **kw)  # plain float32 quadratic form
    assert_close(o, reference(q, k, v, pq, pk, **kw), torch.float32, baseline=base)

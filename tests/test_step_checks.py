"""The decode step's fast argument path (``_validate.step_args_ok``, issue 32) accepts only what
``check_step`` accepts: for every bad argument it declines, and the public step raises exactly
the error ``check_step`` raises (same type, same message); unusual but valid arguments (a float
eps given as an int, a Parameter, views, a list state) still run. The backend memo follows
``LEAPFORMER_BACKEND`` / ``TRITON_INTERPRET`` changes between calls."""
import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels import backends
from leapformer_kernels._validate import check_step, step_args_ok
from utils import make_inputs, make_state

B, T, H, HKV, DK, DV = 2, 1, 4, 2, 8, 4


def _args(**change):
    q, k, v, pq, pk = make_inputs(B, T, None, H, HKV, DK, DV)
    a = dict(q=q, k=k, v=v, pq=pq, pk=pk, state=make_state(B, H, DK, DV), eps=1e-6, normalize=True, backend=None)
    a.update(change)
    return a


def _state(S=None, z=None):
    S0, z0 = make_state(B, H, DK, DV)
    return (S0 if S is None else S, z0 if z is None else z)


META = torch.device("meta")
BAD = {
    "q_list": dict(q=torch.randn(B, T, H, DK).tolist()),
    "q_int": dict(q=torch.ones(B, T, H, DK, dtype=torch.int32)),
    "q_rank": dict(q=torch.randn(T, H, DK)),
    "k_rank": dict(k=torch.randn(B, T, HKV)),
    "v_rank": dict(v=torch.randn(B, T, HKV, DV, 1)),
    "pq_rank": dict(pq=torch.rand(B, T)),
    "pk_rank": dict(pk=torch.rand(B, T, HKV, 1)),
    "k_dtype": dict(k=torch.randn(B, T, HKV, DK, dtype=torch.float64)),
    "v_dtype": dict(v=torch.randn(B, T, HKV, DV, dtype=torch.bfloat16)),
    "pq_dtype": dict(pq=torch.rand(B, T, H, dtype=torch.float16)),
    "pk_int": dict(pk=torch.ones(B, T, HKV, dtype=torch.int64)),
    "k_batch": dict(k=torch.randn(B + 1, T, HKV, DK)),
    "k_head_dim": dict(k=torch.randn(B, T, HKV, DK + 1)),
    "v_heads": dict(v=torch.randn(B, T, HKV + 1, DV)),
    "k_tokens": dict(k=torch.randn(B, T + 1, HKV, DK), v=torch.randn(B, T + 1, HKV, DV), pk=torch.rand(B, T + 1, HKV)),
    "hkv_not_dividing": dict(k=torch.randn(B, T, 3, DK), v=torch.randn(B, T, 3, DV), pk=torch.rand(B, T, 3)),
    "empty_dv": dict(v=torch.randn(B, T, HKV, 0)),
    "pq_shape": dict(pq=torch.rand(B, T, H + 1)),
    "pk_shape": dict(pk=torch.rand(B, T, HKV + 1)),
    "k_meta": dict(k=torch.empty(B, T, HKV, DK, device=META)),
    "pk_meta": dict(pk=torch.empty(B, T, HKV, device=META)),
    "eps_negative": dict(eps=-1.0),
    "eps_nan": dict(eps=float("nan")),
    "eps_inf": dict(eps=float("inf")),
    "eps_bool": dict(eps=True),
    "eps_str": dict(eps="1e-6"),
    "normalize_int": dict(normalize=1),
    "backend_unknown": dict(backend="cuda"),
    "state_tensor": dict(state=torch.zeros(B, H, 2 * DK, DV)),
    "state_triple": dict(state=_state() + (None,)),
    "S_list": dict(state=_state(S=[0.0])),
    "S_shape": dict(state=_state(S=torch.zeros(B, H, 2 * DK, DV + 1))),
    "S_rank": dict(state=_state(S=torch.zeros(B, H, 2 * DK))),
    "z_shape": dict(state=_state(z=torch.zeros(B, H, DK))),
    "S_batch": dict(state=_state(S=torch.zeros(B + 1, H, 2 * DK, DV))),
    "z_int": dict(state=_state(z=torch.zeros(B, H, 2 * DK, dtype=torch.int32))),
    "S_meta": dict(state=_state(S=torch.empty(B, H, 2 * DK, DV, device=META))),
    "z_meta": dict(state=_state(z=torch.empty(B, H, 2 * DK, device=META))),
}


def _check(a):
    check_step(a["q"], a["k"], a["v"], a["pq"], a["pk"], a["state"], eps=a["eps"], normalize=a["normalize"],
               backend=a["backend"])


def _ok(a):
    return step_args_ok(a["q"], a["k"], a["v"], a["pq"], a["pk"], a["state"], a["eps"], a["normalize"], a["backend"])


def _step(a):
    return lk.leap_attention_step(a["q"], a["k"], a["v"], a["pq"], a["pk"], a["state"], eps=a["eps"],
                                  normalize=a["normalize"], backend=a["backend"])


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument_same_error_as_check_step(case):
    a = _args(**BAD[case])
    assert not _ok(a)
    with pytest.raises((TypeError, ValueError)) as want:
        _check(a)
    with pytest.raises(type(want.value)) as got:
        _step(a)
    assert str(got.value) == str(want.value)


GOOD = {
    "plain": {},
    "no_state": dict(state=None),
    "list_state": dict(state=list(_state())),
    "tokens_3": dict(q=torch.randn(B, 3, H, DK), k=torch.randn(B, 3, HKV, DK), v=torch.randn(B, 3, HKV, DV),
                     pq=torch.rand(B, 3, H), pk=torch.rand(B, 3, HKV)),
    "bf16_q_fp32_p": dict(q=torch.randn(B, T, H, DK, dtype=torch.bfloat16),
                          k=torch.randn(B, T, HKV, DK, dtype=torch.bfloat16),
                          v=torch.randn(B, T, HKV, DV, dtype=torch.bfloat16)),
    "fp64_p_fp32_q": dict(pq=torch.rand(B, T, H, dtype=torch.float64)),
    "view_q": dict(q=torch.randn(B, T, H, 2 * DK)[..., ::2]),
    "state_fp64": dict(state=_state(S=torch.zeros(B, H, 2 * DK, DV, dtype=torch.float64))),
    "backend_torch": dict(backend="torch"),
    "eps_zero": dict(eps=0.0),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_good_arguments_take_the_fast_path(case):
    a = _args(**GOOD[case])
    assert _ok(a)
    _check(a)
    o, (S, z) = _step(a)
    assert o.shape == a["q"].shape[:3] + (DV,) and torch.isfinite(o).all()


@pytest.mark.parametrize("change", [dict(eps=0), dict(q=torch.nn.Parameter(torch.randn(B, T, H, DK)))],
                         ids=["int_eps", "parameter"])
def test_unusual_arguments_take_the_full_check(change):
    a = _args(**change)
    assert not _ok(a)
    _check(a)
    with torch.no_grad():
        _step(a)


def test_backend_memo_follows_the_environment(monkeypatch):
    monkeypatch.delenv("LEAPFORMER_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    env0 = backends._env_state()
    monkeypatch.setenv("LEAPFORMER_BACKEND", "torch")
    env1 = backends._env_state()
    assert env1 != env0 and env1 == backends._env_state()
    q = torch.randn(1, 1, 1, 4)
    assert backends.choose("leap_attention_step", None, q.device, q.dtype) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends._env_state() not in (env0, env1)
    monkeypatch.delenv("LEAPFORMER_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backends._env_state() == env0
    want = "cpu" if "cpu" in lk.available_backends() else "torch"
    assert backends.choose("leap_attention_step", None, q.device, q.dtype) == want

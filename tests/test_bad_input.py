"""Bad input raises ValueError / TypeError naming the argument, for every backend, and writes
nothing to the caller's tensors."""
import pytest
import torch

import leapformer_kernels as lk
from utils import make_inputs, make_state


def _good(B=2, T=9, H=2, Dk=8, Dv=4):
    q, k, v, pq, pk = make_inputs(B, T, None, H, None, Dk, Dv)
    return dict(q=q, k=k, v=v, pq=pq, pk=pk)


# (name, exception, words the message must hold, changes built from the good arguments)
ATTN_CASES = [
    ("q_rank", ValueError, ["q"], lambda a: dict(q=a["q"][0])),
    ("k_rank", ValueError, ["k"], lambda a: dict(k=a["k"][..., 0])),
    ("pq_rank", ValueError, ["pq"], lambda a: dict(pq=a["pq"][..., None])),
    ("q_not_tensor", TypeError, ["q"], lambda a: dict(q=a["q"].tolist())),
    ("int_dtype", TypeError, ["q"], lambda a: dict(q=a["q"].to(torch.int32))),
    ("dtype_mix", TypeError, ["k", "q"], lambda a: dict(k=a["k"].double())),
    ("pq_dtype", TypeError, ["pq"], lambda a: dict(pq=a["pq"].to(torch.float16))),
    ("k_head_dim", ValueError, ["k", "q", "head dim"], lambda a: dict(k=torch.randn(2, 9, 2, 7))),
    ("k_batch", ValueError, ["k", "q", "batch"], lambda a: dict(k=torch.randn(3, 9, 2, 8))),
    ("v_shape", ValueError, ["v", "k"], lambda a: dict(v=torch.randn(2, 8, 2, 4))),
    ("hkv_not_dividing", ValueError, ["k", "q", "heads"],
     lambda a: dict(q=torch.randn(2, 9, 3, 8), pq=torch.rand(2, 9, 3))),
    ("pq_shape", ValueError, ["pq"], lambda a: dict(pq=torch.rand(2, 9, 3))),
    ("pk_shape", ValueError, ["pk"], lambda a: dict(pk=torch.rand(2, 8, 2))),
    ("causal_cross", ValueError, ["causal", "k", "q"],
     lambda a: dict(k=torch.randn(2, 5, 2, 8), v=torch.randn(2, 5, 2, 4), pk=torch.rand(2, 5, 2))),
    ("block_size_zero", ValueError, ["block_size"], lambda a: dict(block_size=0)),
    ("block_size_float", TypeError, ["block_size"], lambda a: dict(block_size=2.0)),
    ("block_noncausal", ValueError, ["block_size", "causal"], lambda a: dict(block_size=4, causal=False)),
    ("eps_negative", ValueError, ["eps"], lambda a: dict(eps=-1.0)),
    ("eps_nan", ValueError, ["eps"], lambda a: dict(eps=float("nan"))),
    ("causal_not_bool", TypeError, ["causal"], lambda a: dict(causal=1)),
    ("backend_unknown", ValueError, ["backend"], lambda a: dict(backend="cuda")),
    ("kpm_dtype", TypeError, ["key_padding_mask"], lambda a: dict(key_padding_mask=torch.zeros(2, 9))),
    ("kpm_shape", ValueError, ["key_padding_mask"],
     lambda a: dict(key_padding_mask=torch.zeros(2, 8, dtype=torch.bool))),
    ("state_shape", ValueError, ["initial_state"],
     lambda a: dict(initial_state=make_state(2, 2, 8, 5))),
    ("state_not_pair", TypeError, ["initial_state"], lambda a: dict(initial_state=torch.zeros(2, 2, 16, 4))),
    ("state_batch", ValueError, ["initial_state"], lambda a: dict(initial_state=make_state(3, 2, 8, 4))),
    ("cu_batch", ValueError, ["cu_seqlens", "batch"], lambda a: dict(cu_seqlens=torch.tensor([0, 9]))),
    ("empty_T", ValueError, ["q"], lambda a: dict(q=a["q"][:, :0], pq=a["pq"][:, :0])),
]

VARLEN_CASES = [
    ("cu_dtype", TypeError, ["cu_seqlens"], torch.tensor([0, 4, 9], dtype=torch.float32)),
    ("cu_start", ValueError, ["cu_seqlens", "start"], torch.tensor([1, 4, 9], dtype=torch.int32)),
    ("cu_decreasing", ValueError, ["cu_seqlens"], torch.tensor([0, 5, 4, 9], dtype=torch.int32)),
    ("cu_end", ValueError, ["cu_seqlens", "end"], torch.tensor([0, 4, 8], dtype=torch.int64)),
    ("cu_rank", ValueError, ["cu_seqlens"], torch.tensor([[0, 4, 9]], dtype=torch.int64)),
]


def _snapshot(d):
    return {k: v.clone() for k, v in d.items() if isinstance(v, torch.Tensor)}


def _assert_unchanged(d, snap):
    for k, v in snap.items():
        assert torch.equal(d[k], v), f"{k} was modified"


@pytest.mark.parametrize("name,exc,words,make", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_leap_attention_bad_input(backend, name, exc, words, make):
    args = _good()
    args.update(make(args))
    snap = _snapshot(args)
    q, k, v, pq, pk = (args.pop(n) for n in ("q", "k", "v", "pq", "pk"))
    args.setdefault("backend", backend)
    with pytest.raises(exc) as info:
        lk.leap_attention(q, k, v, pq, pk, **args)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} does not name {w!r}"
    _assert_unchanged(dict(q=q, k=k, v=v, pq=pq, pk=pk, **args), snap)


@pytest.mark.parametrize("name,exc,words,cu", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_bad_input(backend, name, exc, words, cu):
    a = _good(B=1)
    with pytest.raises(exc) as info:
        lk.leap_attention(a["q"], a["k"], a["v"], a["pq"], a["pk"], cu_seqlens=cu, backend=backend)
    for w in words:
        assert w in str(info.value)


def test_step_bad_input(backend):
    a = _good()
    st = make_state(2, 2, 8, 4)
    snap = [t.clone() for t in st]
    with pytest.raises(ValueError, match="state"):
        lk.leap_attention_step(a["q"], a["k"], a["v"], a["pq"], a["pk"], (st[0][:1], st[1]), backend=backend)
    with pytest.raises(ValueError, match="k"):
        lk.leap_attention_step(a["q"], a["k"][:, :3], a["v"][:, :3], a["pq"], a["pk"][:, :3], st, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(st, snap))


def test_backend_triton_float64_raises():
    a = _good()
    with pytest.raises(ValueError, match="backend"):
        lk.leap_attention(*(a[n].double() for n in ("q", "k", "v", "pq", "pk")), backend="triton")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = _good()
    with pytest.raises(ValueError, match="backend"):
        lk.leap_attention(a["q"], a["k"], a["v"], a["pq"], a["pk"], backend="triton")


def test_device_mismatch_names_argument():
    a = _good()
    with pytest.raises(ValueError, match="k is on meta"):
        lk.leap_attention(a["q"], a["k"].to("meta"), a["v"], a["pq"], a["pk"])


# window_pool's bad input is tested per backend in test_window_pool.py.


def test_dyadic_windows_bad_input():
    with pytest.raises(ValueError, match="n"):
        lk.dyadic_windows(0)

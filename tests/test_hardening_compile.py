"""Hardening (issue #15): torch.compile, torch.func, and the guards of the test suite itself.

A. No graph break in any op (leap_attention, leap_attention_step, window_pool) or layer (LeaP,
   LeapAttention, WindowPool), with ``dynamic=True`` and with the default; with ``dynamic=True``
   or ``mark_dynamic`` no recompile when T changes; with the default, at most the one recompile
   that automatic dynamic shapes make by design. ``fullgraph=True`` raises on a break; the
   ``aot_eager`` backend (AOT autograd, no inductor) keeps it fast and traces the backward too.
B. ``torch.func.grad`` (and vmap of it) through leap_attention, leap_attention_step and
   window_pool equals autograd; double backward and forward-mode AD raise clear errors.
C. Suite guards: required backends (``LEAPFORMER_REQUIRE_BACKENDS``) end the session when
   missing, NaN poisoning covers every empty-tensor factory, importing the model tests does not
   pin the thread count, determinism tests run on 2 threads.
"""
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_leaves

import leapformer_kernels as lk
from utils import make_inputs, make_state, rel_err, required_backends

TESTS = Path(__file__).resolve().parent
TS = (7, 10, 13)  # >= 2 (dynamo specialises 0 and 1); the first two equal no other size here (duck sizing)
WINDOWS = [(-3, 0), (1, 1), (2, 5)]


# ------------------------------------------------------------------ A. cases
# Each case: a function and make_args(T) -> its arguments at sequence length T (tiny sizes).
def _qkvp(T, S=None, B=2, grad=True):
    return make_inputs(B, T, S, 2, 1, 8, 8, requires_grad=grad)


def _case_attention(be):
    return (lambda q, k, v, pq, pk: lk.leap_attention(q, k, v, pq, pk, backend=be)), _qkvp


def _case_attention_eps_arg(be):
    """eps as an argument of the compiled function (a SymFloat under dynamic=True)."""
    def f(q, k, v, pq, pk, eps):
        return lk.leap_attention(q, k, v, pq, pk, eps=eps, backend=be)
    return f, lambda T: _qkvp(T) + [0.1]


def _case_attention_block_state(be):
    def f(q, k, v, pq, pk, S0, z0):
        return lk.leap_attention(q, k, v, pq, pk, block_size=4, initial_state=(S0, z0), output_final_state=True,
                                 backend=be)
    return f, lambda T: _qkvp(T) + list(make_state(2, 2, 8, 8, requires_grad=True))


def _case_attention_padding(be):
    def f(q, k, v, pq, pk, kpm):
        return lk.leap_attention(q, k, v, pq, pk, causal=False, key_padding_mask=kpm, backend=be)
    return f, lambda T: _qkvp(T) + [torch.rand(2, T) < 0.3]


def _case_attention_cross(be):
    def f(q, k, v, pq, pk):
        return lk.leap_attention(q, k, v, pq, pk, causal=False, backend=be)
    return f, lambda T: _qkvp(T, T + 3)


def _case_attention_varlen(be):
    def f(q, k, v, pq, pk, cu):
        return lk.leap_attention(q, k, v, pq, pk, cu_seqlens=cu, output_final_state=True, backend=be)
    return f, lambda T: _qkvp(T, B=1) + [torch.tensor([0, 2, T])]


def _case_step(be):
    """The inference step (no autograd): its own custom op."""
    def f(q, k, v, pq, pk, S0, z0):
        return lk.leap_attention_step(q, k, v, pq, pk, (S0, z0), backend=be)
    return f, lambda T: _qkvp(T, grad=False) + list(make_state(2, 2, 8, 8))


def _case_step_grad(be):
    """The step with autograd on: the differentiable op."""
    def f(q, k, v, pq, pk, S0, z0):
        return lk.leap_attention_step(q, k, v, pq, pk, (S0, z0), backend=be)
    return f, lambda T: _qkvp(T) + list(make_state(2, 2, 8, 8, requires_grad=True))


def _case_pool(reduce):
    def make(be):
        return (lambda x: lk.window_pool(x, WINDOWS, reduce, backend=be)), \
            (lambda T: [torch.randn(2, T, 4, requires_grad=True)])
    return make


def _case_leap(be):
    m = lk.LeaP(8)
    return m, lambda T: [torch.randn(2, T, 2, 8, requires_grad=True)]


def _case_layer(be, **kw):
    m = lk.LeapAttention(16, 2, backend=be, **kw)
    return m, lambda T: [torch.randn(2, T, 16, requires_grad=True)]


def _case_layer_block_gqa_padding(be):
    m = lk.LeapAttention(16, 2, num_kv_heads=1, block_size=4, backend=be)
    return (lambda x, kpm: m(x, key_padding_mask=kpm)), \
        (lambda T: [torch.randn(2, T, 16, requires_grad=True), torch.rand(2, T) < 0.3])


def _case_layer_cross(be):
    m = lk.LeapAttention(16, 2, cross=True, causal=False, kdim=8, vdim=8, backend=be)
    return (lambda x, ctx: m(x, context=ctx)), \
        (lambda T: [torch.randn(2, T, 16, requires_grad=True), torch.randn(2, T + 3, 8)])


def _case_layer_decode(be):
    """Decoding T new tokens against a carried state (the step kernel, no autograd)."""
    m = lk.LeapAttention(16, 2, backend=be).eval()

    def f(x, S, z):
        with torch.no_grad():
            return m(x, state=(S, z), use_cache=True)
    return f, lambda T: [torch.randn(2, T, 16), torch.rand(2, 2, 16, 8), torch.rand(2, 2, 16) + 1]


def _case_window_pool_layer(be):
    m = lk.WindowPool(lk.dyadic_windows(3), reduce="max", backend=be)
    return m, lambda T: [torch.randn(2, T, 4, requires_grad=True)]


CASES = {
    "leap_attention": _case_attention,
    "leap_attention-eps-arg": _case_attention_eps_arg,
    "leap_attention-block-state": _case_attention_block_state,
    "leap_attention-noncausal-padding": _case_attention_padding,
    "leap_attention-cross": _case_attention_cross,
    "leap_attention-varlen": _case_attention_varlen,
    "leap_attention_step": _case_step,
    "leap_attention_step-grad": _case_step_grad,
    "window_pool-sum": _case_pool("sum"),
    "window_pool-mean": _case_pool("mean"),
    "window_pool-max": _case_pool("max"),
    "LeaP": _case_leap,
    "LeapAttention": lambda be: _case_layer(be),
    "LeapAttention-block-gqa-padding": _case_layer_block_gqa_padding,
    "LeapAttention-cross": _case_layer_cross,
    "LeapAttention-decode": _case_layer_decode,
    "LeapAttention-softmax": lambda be: _case_layer(be, attention="softmax"),
    "WindowPool": _case_window_pool_layer,
}
# With the default (automatic dynamic), every op case and each layer in its main configurations
# (the layer variants trace the same Python as with dynamic=True; a compile costs ~1-5 s).
DEFAULT_CASES = [c for c in CASES if not c.startswith("LeapAttention-") or c == "LeapAttention-decode"]
# The op cases that also run on the other backends (the rest run on the torch backend: tracing
# does not depend on the kernel behind a custom op, and the interpreter is slow).
EVERY_BACKEND = ["leap_attention-block-state", "leap_attention_step", "window_pool-max"]


def _compile_and_run(case, be, dynamic, mark_dynamic=False, Ts=TS):
    """Compile the case with fullgraph=True on aot_eager, run it (and its backward) at each T;
    returns the number of graphs compiled (``unique_graphs``: a restart of the analysis within
    one compile, as dynamo makes when it specialises a float passed to a custom op, is not a
    recompile). Checks outputs and gradients against eager."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    fn, make_args = CASES[case](be)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for T in Ts:
        args = make_args(T)
        if mark_dynamic:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[1] == T:
                    torch._dynamo.mark_dynamic(a, 1)
        outs = [t for t in tree_leaves(compiled(*args)) if isinstance(t, torch.Tensor)]
        ref = [t for t in tree_leaves(fn(*args)) if isinstance(t, torch.Tensor)]
        assert len(outs) == len(ref)
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, equal_nan=False)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        diff = [(o, r) for o, r in zip(outs, ref) if o.requires_grad]
        if leaves and diff:
            w = [torch.randn_like(r) for _, r in diff]
            g = torch.autograd.grad([o for o, _ in diff], leaves, w, allow_unused=True)
            g_ref = torch.autograd.grad([r for _, r in diff], leaves, w, allow_unused=True)
            for a, b in zip(g, g_ref):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_true_no_break_no_recompile(case):
    """dynamic=True: one graph (fullgraph), reused for the next T."""
    assert _compile_and_run(case, "torch", dynamic=True, Ts=TS[:2]) == 1


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_default_at_most_one_recompile(case):
    """The default (automatic dynamic): a static graph for the first T, then at most one
    dynamic recompile, reused for every later T."""
    assert _compile_and_run(case, "torch", dynamic=None) <= 2


@pytest.mark.parametrize("case", ["leap_attention-block-state", "leap_attention_step", "window_pool-max",
                                  "LeapAttention-block-gqa-padding"])
def test_mark_dynamic_no_recompile(case):
    assert _compile_and_run(case, "torch", dynamic=None, mark_dynamic=True) == 1


@pytest.mark.parametrize("case", EVERY_BACKEND)
@pytest.mark.parametrize("backend", [b for b in lk.available_backends() if b != "torch"])
def test_dynamic_true_other_backends(backend, case):
    assert _compile_and_run(case, backend, dynamic=True, Ts=TS[:2]) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3], ids=["nan", "inf", "negative"])
def test_eps_check_still_rejects_bad_values(bad):
    """The compile-friendly eps check (comparisons instead of math.isfinite) rejects what it did."""
    q, k, v, pq, pk = make_inputs(1, 4, None, 1, None, 2, 2)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        lk.leap_attention(q, k, v, pq, pk, eps=bad)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        lk.leap_attention_step(q, k, v, pq, pk, None, eps=bad)


# ------------------------------------------------------------------ B. torch.func
def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def test_func_grad_matches_autograd(backend):
    """torch.func.grad through leap_attention (every input, the initial state included) equals
    torch.autograd."""
    dt = _dtype(backend)
    ins = make_inputs(2, 11, None, 2, 1, 4, 3, dtype=dt) + list(make_state(2, 2, 4, 3, dtype=dt))

    def f(q, k, v, pq, pk, S0, z0):
        o, (S, z) = lk.leap_attention(q, k, v, pq, pk, block_size=3, initial_state=(S0, z0),
                                      output_final_state=True, backend=backend)
        return o.square().sum() + (S * S.detach()).sum() + z.sum()

    g = torch.func.grad(f, argnums=tuple(range(7)))(*ins)
    leaves = [t.clone().requires_grad_() for t in ins]
    g_ref = torch.autograd.grad(f(*leaves), leaves)
    tol = 1e-12 if dt == torch.float64 else 1e-6
    for name, a, b in zip(("q", "k", "v", "pq", "pk", "S0", "z0"), g, g_ref):
        assert rel_err(a, b) <= tol, name


def test_func_grad_step(backend):
    """torch.func.grad through leap_attention_step equals that of leap_attention with the state."""
    dt = _dtype(backend)
    q, k, v, pq, pk = make_inputs(2, 3, None, 2, None, 4, 4, dtype=dt)
    S0, z0 = make_state(2, 2, 4, 4, dtype=dt)

    def step(q, S0):
        o, (S, z) = lk.leap_attention_step(q, k, v, pq, pk, (S0, z0), backend=backend)
        return o.sum() + S.sum()

    def full(q, S0):
        o, (S, z) = lk.leap_attention(q, k, v, pq, pk, initial_state=(S0, z0), output_final_state=True,
                                      backend=backend)
        return o.sum() + S.sum()

    for a, b in zip(torch.func.grad(step, argnums=(0, 1))(q, S0), torch.func.grad(full, argnums=(0, 1))(q, S0)):
        assert rel_err(a, b) <= (1e-12 if dt == torch.float64 else 1e-6)


def test_func_grad_huge_block_size():
    """Block sizes beyond int64 mean one block, under torch.func as in eager."""
    q, k, v, pq, pk = make_inputs(1, 6, None, 2, None, 4, 4, dtype=torch.float64)

    def f(q, block_size):
        return lk.leap_attention(q, k, v, pq, pk, block_size=block_size, backend="torch").square().sum()

    assert rel_err(torch.func.grad(f)(q, 2 ** 64 + 2), torch.func.grad(f)(q, 6)) <= 1e-12


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_func_grad_window_pool(backend, reduce):
    if backend not in lk.available_backends("window_pool"):
        pytest.skip(f"{backend} does not serve window_pool here")
    x = torch.randn(2, 9, 3, dtype=_dtype(backend))

    def f(x):
        return lk.window_pool(x, [(-2, 0), (1, 3), (-20, 20)], reduce, backend=backend)[0].square().sum()

    g = torch.func.grad(f)(x)
    xl = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(f(xl), xl)
    assert torch.equal(g, g_ref)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's loop over the custom op
def test_func_vmap_of_grad_per_sample():
    """Per-sample gradients: vmap(grad(f)) equals grad(f) sample by sample."""
    q, k, v, pq, pk = make_inputs(3, 6, None, 2, None, 4, 4, dtype=torch.float64)

    def f(q, k):  # one sample: [T, H, D]
        return lk.leap_attention(q[None], k[None], v[:1], pq[:1], pk[:1], backend="torch").square().sum()

    per = torch.func.vmap(torch.func.grad(f, argnums=(0, 1)))(q, k)
    for i in range(3):
        one = torch.func.grad(f, argnums=(0, 1))(q[i], k[i])
        for a, b in zip(per, one):
            assert rel_err(a[i], b) <= 1e-12


def test_func_double_backward_raises():
    q, k, v, pq, pk = make_inputs(1, 5, None, 1, None, 2, 2, dtype=torch.float64)

    def f(q):
        return lk.leap_attention(q, k, v, pq, pk, backend="torch").square().sum()

    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda q: torch.func.grad(f)(q).sum())(q)


def test_func_forward_mode_raises():
    q, k, v, pq, pk = make_inputs(1, 5, None, 1, None, 2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda q: lk.leap_attention(q, k, v, pq, pk, backend="torch"), (q,), (q,))


# ------------------------------------------------------------------ C. suite guards
@pytest.mark.parametrize("env,want", [
    ({}, []),
    ({"CI": "true"}, ["torch", "cpu", "triton"]),
    ({"CI": "false"}, []),
    ({"CI": "true", "LEAPFORMER_REQUIRE_BACKENDS": "torch, cpu"}, ["torch", "cpu"]),
    ({"CI": "true", "LEAPFORMER_REQUIRE_BACKENDS": ""}, []),
    ({"LEAPFORMER_REQUIRE_BACKENDS": "triton"}, ["triton"]),
], ids=["unset", "ci", "ci-false", "explicit", "explicit-none", "explicit-no-ci"])
def test_required_backends(env, want):
    assert required_backends(env) == want


def test_required_backends_unknown_name():
    with pytest.raises(ValueError, match="unknown backend.*cuda"):
        required_backends({"LEAPFORMER_REQUIRE_BACKENDS": "torch,cuda"})


PLUGIN = '''
import sys
sys.modules["triton"] = None  # a broken triton install: "import triton" raises ImportError
import torch.utils.cpp_extension as cpp_extension

def _failed_build(*args, **kwargs):
    raise RuntimeError("Error building extension 'leapformer_x':\\n[1/2] c++ -c x.cpp\\n"
                       "x.cpp:1:10: fatal error: simulated-compiler-failure-5678\\nninja: build stopped")

cpp_extension.load = _failed_build
'''


def test_missing_required_backend_fails_the_session(tmp_path):
    """A failed C++ build and a broken triton import end the session at startup with one line
    naming each backend and the build error, instead of dropping their cases."""
    (tmp_path / "lk_broken_backends.py").write_text(textwrap.dedent(PLUGIN))
    env = dict(os.environ, LEAPFORMER_REQUIRE_BACKENDS="torch,cpu,triton",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("CI", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "lk_broken_backends",
                        str(TESTS / "test_dispatch.py")], cwd=TESTS.parent, env=env, capture_output=True,
                       text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, out
    lines = [ln for ln in out.splitlines() if "simulated-compiler-failure-5678" in ln]
    assert len(lines) == 1, out
    assert "required backend(s) unavailable" in lines[0] and "cpu" in lines[0] and "triton" in lines[0], lines[0]
    assert "torch:" not in lines[0]


@pytest.mark.parametrize("factory", ["empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"])
def test_nan_poisoning_covers(factory):
    x = torch.zeros(2, 3)
    made = {
        "empty": lambda: torch.empty(2, 3),
        "empty_like": lambda: torch.empty_like(x),
        "empty_strided": lambda: torch.empty_strided((2, 3), (1, 2)),
        "new_empty": lambda: x.new_empty(2, 3),
        "new_empty_strided": lambda: x.new_empty_strided((2, 3), (1, 2)),
    }[factory]()
    assert made.shape == (2, 3) and bool(made.isnan().all())


@pytest.mark.parametrize("module", ["test_models.py", "test_model_configs.py"])
def test_importing_model_tests_keeps_thread_count(module):
    """A test module that calls torch.set_num_threads at import pins the whole session (the C++
    parallel paths would never run): none may."""
    pytest.importorskip("leapformer_models")
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        want = torch.get_num_threads()
        runpy.run_path(str(TESTS / module))
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_determinism_tests_run_on_two_threads():
    """conftest runs every test named *determin* on 2 threads (this one included)."""
    assert torch.get_num_threads() == 2

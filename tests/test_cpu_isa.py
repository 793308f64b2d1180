"""The instruction-set paths of the C++ kernels (csrc/attention/kernels_*.cpp) and the call
configuration passed from Python.

One build holds the kernels for AVX-512, AVX2 + FMA and the generic baseline; the best one the
CPU supports runs unless ``LEAPFORMER_CPU_ISA`` or ``set_isa()`` forces one. Here: every path this
machine supports is run and compared with the generic path and the float64 reference (fp32
tolerance), forward and backward, in every mode, and with the decode step; each path is
deterministic across drivers and thread counts; the built objects hold zmm registers only in the
AVX-512 unit; the environment variable forces a path in a fresh process; the GIL is released
while a kernel runs.
"""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import leapformer_kernels as lk
from leapformer_kernels import _build
from utils import assert_close, make_inputs, make_state, reference

HAVE_CPU = "cpu" in lk.available_backends()
pytestmark = pytest.mark.skipif(not HAVE_CPU, reason="the C++ cpu backend is not available (build failed?)")
ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@pytest.fixture
def isa():
    """Force one instruction-set path for the duration of a test; restores the automatic choice."""
    from leapformer_kernels.attention import cpu

    yield cpu.set_isa
    cpu.set_isa(None)
    cpu.set_mode(0)


def _paths():
    if not HAVE_CPU:
        return ["generic"]
    from leapformer_kernels.attention import cpu
    return cpu.supported_isas()


def test_supported_paths_follow_the_cpu():
    from leapformer_kernels.attention import cpu

    paths = cpu.supported_isas()
    assert paths[0] == "generic"
    flags = _cpu_flags()
    if flags is not None and os.uname().machine in ("x86_64", "AMD64"):
        assert ("avx2" in paths) == ({"avx2", "fma"} <= flags)
        assert ("avx512" in paths) == ({"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"} <= flags)
    elif os.uname().machine not in ("x86_64", "AMD64", "i686"):
        assert paths == ["generic"]  # aarch64 and others: the generic path only
    assert cpu.get_isa() == paths[-1]  # automatic: the best


def test_bad_configuration_is_refused(isa):
    from leapformer_kernels.attention import cpu

    with pytest.raises(ValueError, match="isa must be one of"):
        isa("sse9")
    with pytest.raises(ValueError, match="mode must be"):
        cpu.set_mode(3)
    q, k, v, pq, pk = make_inputs(1, 9, None, 2, None, 4, 3)
    args = (q, k, v, pq, pk, None, None, None, None, None, True, 0, 1e-6, True)
    with pytest.raises(ValueError, match="instruction-set path"):
        cpu._ext().fwd(*args, torch.empty(1, 9, 2, 3), None, None, 0, 7)
    with pytest.raises(ValueError, match="mode must be"):
        cpu._ext().fwd(*args, torch.empty(1, 9, 2, 3), None, None, 5, -1)
    for code in range(3):  # a path this machine lacks is refused, never replaced
        if not cpu._ext().isa_available(code):
            with pytest.raises(ValueError, match="not available"):
                cpu._ext().fwd(*args, torch.empty(1, 9, 2, 3), None, None, 0, code)
            with pytest.raises(ValueError, match="not supported"):
                isa(cpu.ISAS[code])


CASES = {
    "causal": dict(T=150, causal=True),
    "block": dict(T=150, causal=True, block_size=7),
    "noncausal_gqa_state": dict(T=131, H=4, Hkv=2, causal=False, state=True),
    "cross_padding": dict(T=33, S=97, causal=False, kpm=True, normalize=False),
    "varlen": dict(B=1, T=200, causal=True, block_size=9, cu=[0, 70, 70, 200], state=True),
    "monotone": dict(T=70, S=150, causal=False, nvk=True, kpm=True),
}


def _run(case, dtype=torch.float32, Dk=32, Dv=40):
    c = dict(CASES[case])
    B, T, H, Hkv = c.pop("B", 2), c.pop("T"), c.pop("H", 2), c.pop("Hkv", None)
    S = c.pop("S", T)
    torch.manual_seed(0)
    q, k, v, pq, pk = make_inputs(B, T, S, H, Hkv, Dk, Dv, dtype=torch.float32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if dtype == torch.float64:  # proportions in the state dtype
        pq, pk = pq.double(), pk.double()
    kpm = torch.rand(B, S) < 0.3 if c.pop("kpm", False) else None
    cu = c.pop("cu", None)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    n = B if cu is None else cu.numel() - 1
    st = make_state(n, H, Dk, Dv, dtype=torch.float64 if dtype == torch.float64 else torch.float32) \
        if c.pop("state", False) else None
    if c.pop("nvk", False):
        c["num_visible_keys"] = torch.stack([lk.wait_k(T, S, 3, 1.7), lk.wait_k(T, S, 0, 2.2)])
    ins = [q, k, v, pq, pk] + (list(st) if st else [])
    ins = [t.detach().requires_grad_() for t in ins]
    kw = dict(key_padding_mask=kpm, cu_seqlens=cu, output_final_state=True, **c)
    o, (S_, z_) = lk.leap_attention(*ins[:5], initial_state=tuple(ins[5:]) or None, backend="cpu", **kw)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(t.shape, generator=g).to(t.dtype) for t in (o, S_, z_)]
    grads = torch.autograd.grad((o, S_, z_), ins, cot)
    return (o, S_, z_) + grads, ins, kw, cot


@pytest.mark.parametrize("case", list(CASES))
def test_every_path_matches_generic_and_reference(case, isa):
    names = ["o", "S", "z", "dq", "dk", "dv", "dpq", "dpk", "dS0", "dz0"]
    results = {}
    for path in _paths():
        isa(path)
        for mode in (1, 2):
            from leapformer_kernels.attention import cpu
            cpu.set_mode(mode)
            out, ins, kw, cot = _run(case)
            results[(path, mode)] = out
    # the float64 reference, once
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    o_r, (S_r, z_r) = lk.reference.leap_attention(*ref_ins[:5], initial_state=tuple(ref_ins[5:]) or None, **kw)
    ref = (o_r, S_r, z_r) + torch.autograd.grad((o_r, S_r, z_r), ref_ins, [c.double() for c in cot])
    base = results[("generic", 1)]
    for (path, mode), out in results.items():
        # both drivers of one path agree bitwise
        for a, b in zip(out, results[(path, 1)]):
            assert torch.equal(a, b), (path, mode)
        for name, a, b, r in zip(names, out, base, ref):
            assert torch.isfinite(a).all(), (path, name)
            assert_close(a, r, torch.float32, f"{path} {name}", factor=1 if name in "oSz" else 2)
            err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
            assert err <= 1e-5, (path, name, float(err))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_every_path_other_dtypes(dtype, isa):
    base = None
    for path in _paths():
        isa(path)
        out, ins, kw, cot = _run("block", dtype=dtype, Dk=16, Dv=24)
        if base is None:
            base = out
            ref_ins = [t.detach().double().requires_grad_() for t in ins]
            o_r, (S_r, z_r) = lk.reference.leap_attention(*ref_ins[:5], **kw)
            ref = (o_r, S_r, z_r) + torch.autograd.grad((o_r, S_r, z_r), ref_ins, [c.double() for c in cot])
        for i, (a, r) in enumerate(zip(out, ref)):
            assert_close(a, r, dtype, f"{path} #{i}", factor=1 if i < 3 else 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_path_deterministic_across_threads(dtype, isa):
    from leapformer_kernels.attention import cpu

    threads = torch.get_num_threads()
    try:
        for path in _paths():
            isa(path)
            results = []
            for mode, nt in ((1, threads), (2, threads), (2, 1), (0, threads)):
                cpu.set_mode(mode)
                torch.set_num_threads(nt)
                results.append(_run("block", dtype=dtype)[0])
            for r in results[1:]:
                for a, b in zip(results[0], r):
                    assert torch.equal(a, b), path
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("Dv", [8, 40, 64, 12])  # 8-wide tail, 32 + 8, 64 (one zmm block of 4), scalar rows
def test_step_every_path(Dv, isa):
    B, H, Dk, T0 = 3, 4, 16, 20
    q, k, v, pq, pk = make_inputs(B, T0 + 1, None, H, 2, Dk, Dv, dtype=torch.float32)
    _, state = lk.leap_attention(q[:, :T0], k[:, :T0], v[:, :T0], pq[:, :T0], pk[:, :T0], output_final_state=True,
                                 backend="cpu")
    o_r, (S_r, z_r) = reference(q, k, v, pq, pk, output_final_state=True)
    for path in _paths():
        isa(path)
        o, (S_, z_) = lk.leap_attention_step(q[:, T0:], k[:, T0:], v[:, T0:], pq[:, T0:], pk[:, T0:], state,
                                             backend="cpu")
        assert_close(o, o_r[:, T0:], torch.float32, f"{path} o")
        assert_close(S_, S_r, torch.float32, f"{path} S")
        assert_close(z_, z_r, torch.float32, f"{path} z")


def test_gradcheck_float64_every_path(isa):
    for path in _paths():
        isa(path)
        q, k, v, pq, pk = make_inputs(1, 70, None, 2, 1, 3, 2, dtype=torch.float64, requires_grad=True)

        def f(q, k, v, pq, pk):
            return lk.leap_attention(q, k, v, pq, pk, causal=True, block_size=5, backend="cpu")

        assert torch.autograd.gradcheck(f, (q, k, v, pq, pk), fast_mode=True)


def test_zmm_only_in_the_avx512_unit():
    """objdump of the build: zmm registers appear only in the AVX-512 unit's namespace, ymm only in
    the AVX2 and AVX-512 ones, in the objects and in the linked module (so the linker kept no
    target code for a function that other paths share); the entry points and the generic path are
    baseline code."""
    if os.uname().machine != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("x86-64 with objdump only")
    d = next((_build.build_dir("leap_attention", omp) for omp in (True, False)
              if (_build.build_dir("leap_attention", omp) / "kernels_avx512.o").is_file()), None)
    if d is None:
        pytest.skip("the build's object files are not in the cache")

    def functions_using(path, reg):
        out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(path)], capture_output=True,
                             text=True, check=True).stdout
        found, fn = set(), None
        for line in out.splitlines():
            if line.endswith(">:") and "<" in line:
                fn = line.split("<", 1)[1][:-2]
            elif f"%{reg}" in line and fn is not None:
                found.add(fn)
        return found

    assert functions_using(d / "kernels_avx512.o", "zmm")
    assert functions_using(d / "kernels_avx2.o", "ymm")
    for obj in ("kernels_avx2.o", "kernels_generic.o", "leap_attention.o"):
        assert not functions_using(d / obj, "zmm"), obj
    for obj in ("kernels_generic.o", "leap_attention.o"):
        assert not functions_using(d / obj, "ymm"), obj
    so = d / "leapformer_leap_attention.so"
    zmm = functions_using(so, "zmm")
    ymm = functions_using(so, "ymm")
    assert zmm and all("lk::isa_avx512::" in f for f in zmm), sorted(f for f in zmm if "isa_avx512" not in f)[:5]
    bad = sorted(f for f in ymm if "lk::isa_avx512::" not in f and "lk::isa_avx2::" not in f)
    assert not bad, bad[:5]


def test_environment_forces_a_path():
    code = ("import torch, leapformer_kernels as lk\n"
            "from leapformer_kernels.attention import cpu\n"
            "print(cpu.get_isa())\n"
            "q, k, v = torch.randn(3, 1, 70, 2, 8).unbind(0); p = torch.rand(2, 1, 70, 2).unbind(0)\n"
            "o = lk.leap_attention(q, k, v, *p, backend='cpu'); assert torch.isfinite(o).all()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPFORMER_BACKEND")}
    for path in ("generic", _paths()[-1]):
        r = subprocess.run([sys.executable, "-c", code], env=dict(env, LEAPFORMER_CPU_ISA=path), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] == path
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, LEAPFORMER_CPU_ISA="sse9"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "LEAPFORMER_CPU_ISA" in r.stderr


def test_gil_released_while_a_kernel_runs():
    """Another Python thread keeps running while the C++ forward runs (the GIL is released)."""
    from leapformer_kernels.attention import cpu

    q, k, v, pq, pk = make_inputs(1, 32768, None, 8, None, 64, 64)
    span = {}

    def work():
        span["t0"] = time.perf_counter()
        cpu.fwd(q, k, v, pq, pk, None, None, None, None, None, True, 0, 1e-6, True, False)
        span["t1"] = time.perf_counter()

    th = threading.Thread(target=work)
    ticks = []
    th.start()
    while th.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    th.join()
    inside = [t for t in ticks if span["t0"] + 0.01 < t < span["t1"] - 0.01]
    if span["t1"] - span["t0"] < 0.1:
        pytest.skip("the kernel ran too fast to observe")
    assert len(inside) >= 5, (len(inside), span["t1"] - span["t0"])

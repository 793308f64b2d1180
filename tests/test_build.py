"""Packaging and the C++ build: the cache key, the fallbacks, the package without triton."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leapformer_kernels import _build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A private copy of csrc/ that the build module reads instead of the real one."""
    d = tmp_path / "csrc"
    shutil.copytree(_build.csrc_dir(), d)
    monkeypatch.setattr(_build, "csrc_dir", lambda: d)
    monkeypatch.setenv("LEAPFORMER_CACHE", str(tmp_path / "cache"))
    return d


def test_key_follows_sources_flags_and_compiler(sources, monkeypatch):
    name = "window_pool"
    k0 = _build.build_key(name)
    assert _build.build_key(name) == k0  # deterministic
    assert _build.build_dir(name).name == f"{name}-{k0}"
    src = sources / "pooling" / "window_pool.cpp"
    src.write_text(src.read_text() + "\n// edit\n")
    k1 = _build.build_key(name)
    assert k1 != k0
    (sources / "extra.h").write_text("#pragma once\n")  # every header counts, in any folder
    k2 = _build.build_key(name)
    assert k2 != k1
    hdr = sources / "common" / "task_runner.h"  # a shared header in a subfolder
    hdr.write_text(hdr.read_text() + "\n// edit\n")
    k3 = _build.build_key(name)
    assert k3 != k2
    (sources / "attention" / "new_header.h").write_text("#pragma once\n")
    k4 = _build.build_key(name)
    assert k4 != k3
    assert _build.build_key(name, openmp=False) != k4
    # portable binaries: the CPU's features do not enter the key (the ISA is chosen at run time)
    monkeypatch.setattr(_build, "cpu_features", lambda: "sse2 a-different-cpu")
    assert _build.build_key(name) == k4
    monkeypatch.setenv("CXX", "clang++")
    assert _build.build_key(name) != k4


def test_no_march_native():
    flags = _build._flags()
    assert not any(f.startswith(("-march", "-mcpu", "-mavx", "-mtune")) for f in flags), flags


def test_sources_listed_exist_and_ship():
    """Every translation unit exists; the wheel's package data and the sdist's manifest cover every
    source and header under csrc/ (subfolders included)."""
    import fnmatch
    import re
    d = _build.csrc_dir()
    files = [p.relative_to(d).as_posix() for p in d.rglob("*") if p.suffix in (".cpp", ".h")]
    assert files and any("/" in f for f in files)
    for name in _build.EXTENSIONS:
        assert all(p.is_file() for p in _build._sources(name))
    setup = (ROOT / "setup.py").read_text()
    patterns = re.search(r'"leapformer_kernels.csrc": \[([^\]]*)\]', setup.split("package_data=")[1]).group(1)
    patterns = [p.strip().strip('"') for p in patterns.split(",")]
    for f in files:
        assert any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns), f
    assert "recursive-include csrc *.cpp *.h" in (ROOT / "MANIFEST.in").read_text()


def test_cpu_features_are_read():
    feats = _build.cpu_features()
    assert isinstance(feats, str) and feats
    if sys.platform.startswith("linux") and os.path.exists("/proc/cpuinfo"):
        assert len(feats.split()) > 5  # the flags line, not the fallback


def test_openmp_fallback(monkeypatch, capsys):
    """A compiler without OpenMP: the second attempt builds without -fopenmp, and says so."""
    calls = []

    def fake_compile(name, openmp):
        calls.append((name, openmp))
        if openmp:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return f"module {name}"

    monkeypatch.setattr(_build, "_compile", fake_compile)
    monkeypatch.setattr(_build, "_cached", lambda name: False)
    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setattr(_build, "_failed", {})
    monkeypatch.setattr(_build, "_no_openmp", {})
    assert _build.load("window_pool") == "module window_pool"
    assert ("window_pool", True) in calls and ("window_pool", False) in calls
    err = capsys.readouterr().err
    assert "building the C++ CPU kernels once" in err and "without OpenMP" in err


def test_other_errors_are_not_retried(monkeypatch):
    calls = []

    def fake_compile(name, openmp):
        calls.append(openmp)
        raise RuntimeError("error: expected ';' before '}' token")

    monkeypatch.setattr(_build, "_compile", fake_compile)
    monkeypatch.setattr(_build, "_cached", lambda name: False)
    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setattr(_build, "_failed", {})
    with pytest.raises(_build.BuildError, match="expected ';'"):
        _build.build(["window_pool"])
    assert calls == [True]
    with pytest.raises(_build.BuildError):  # remembered: no second attempt in this process
        _build.load("window_pool")
    assert calls == [True]


def _py(code, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPFORMER_BACKEND")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_no_compiler_falls_back_with_the_log(tmp_path):
    code = (
        "import warnings, torch, leapformer_kernels as lk\n"
        "q, k, v = torch.randn(3, 1, 9, 2, 8).unbind(0); p = torch.rand(2, 1, 9, 2).unbind(0)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    o = lk.leap_attention(q, k, v, *p)\n"
        "assert torch.isfinite(o).all()\n"
        "msgs = [str(x.message) for x in w if 'cpu backend is unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'no-such-compiler' in msgs[0], [str(x.message) for x in w]\n"
        "try:\n"
        "    lk.leap_attention(q, k, v, *p, backend='cpu')\n"
        "except ValueError as e:\n"
        "    assert \"backend='cpu'\" in str(e) and 'no-such-compiler' in str(e)\n"
        "else:\n"
        "    raise AssertionError('backend=cpu should raise')\n"
        "assert 'cpu' not in lk.available_backends()\n"
    )
    r = _py(code, {"CXX": str(tmp_path / "no-such-compiler"), "LEAPFORMER_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "building the C++ CPU kernels once" in r.stderr and "failed" in r.stderr


def test_package_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, leapformer_kernels as lk\n"
        "b = lk.available_backends(); assert 'triton' not in b and 'torch' in b, b\n"
        "q, k, v = torch.randn(3, 1, 9, 2, 8).unbind(0); p = torch.rand(2, 1, 9, 2).unbind(0)\n"
        "o = lk.leap_attention(q, k, v, *p, backend='torch')\n"
        "pooled, valid = lk.window_pool(torch.randn(1, 9, 4), lk.dyadic_windows(2), backend='torch')\n"
        "assert torch.isfinite(o).all() and pooled.shape == (1, 9, 2, 4)\n"
        "try:\n"
        "    lk.leap_attention(q, k, v, *p, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError\n"
    )
    r = _py(code, {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_installed_requirements():
    """The core install is torch + numpy + ninja; tqdm / matplotlib only with [zoo], triton only
    with [triton] (both pulled by [test])."""
    from importlib.metadata import requires
    core, extras = set(), {}
    for req in requires("leapformer-kernels"):
        name = req.split(";")[0].split(">")[0].split("=")[0].strip()
        if "extra ==" in req:
            extras.setdefault(req.split("extra ==")[1].strip().strip("'\""), set()).add(name)
        else:
            core.add(name)
    assert core == {"torch", "numpy", "ninja"}, core
    assert extras["zoo"] == {"tqdm", "matplotlib"}
    assert extras["triton"] == {"triton"}
    assert {"tqdm", "matplotlib", "triton", "pytest"} <= extras["test"]

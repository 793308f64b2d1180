"""Build and load the C++ CPU kernels in ``csrc/`` (JIT with ninja, cached).

Each extension module (``leapformer_<name>``) is built from the sources ``EXTENSIONS[name]`` lists
(paths under ``csrc/``, one folder per op family: ``attention/``, ``pooling/``, with the shared
headers in ``common/``), compiled by ``torch.utils.cpp_extension.load`` into
``<cache>/<name>-<key>`` where ``<cache>`` is ``$LEAPFORMER_CACHE`` or
``~/.cache/leapformer_kernels`` and ``<key>`` hashes everything the binary depends on: every
source and header under ``csrc/`` (so an edited header triggers a rebuild), the full compile and
link flags, the compiler (``$CXX``), torch's and Python's versions and the machine's
architecture. Two checkouts or two source versions therefore never rebuild each other's binary.

The binaries are portable across CPUs of one architecture: nothing is built with
``-march=native``. The attention kernels are compiled for AVX-512, AVX2 + FMA and the
baseline ISA in one build (``csrc/attention/kernels_*.cpp``, each unit with its own target) and
chosen at run time from the CPU's features (``attention/cpu.py``: ``LEAPFORMER_CPU_ISA`` or
``set_isa()`` force a path). ``LEAPFORMER_NO_NATIVE`` is accepted and no longer changes anything.

The first use builds every extension that is not cached yet, in parallel (one ninja per
extension), with one line on stderr before ("building the C++ CPU kernels once ...") and one
after (the time it took); ``leapformer_kernels.build()`` or ``leapformer build`` does it ahead
of time. A compiler without OpenMP (Apple clang) gets a second attempt without ``-fopenmp``:
the kernels' task runner is ``at::parallel_for``, which then runs them on one thread.

A failed build is remembered: ``load`` raises ``BuildError`` carrying the tail of the build log,
which the dispatch turns into a fallback warning (automatic choice) or a ``ValueError``
(explicit ``backend="cpu"``).
"""
from __future__ import annotations

import hashlib
import io
import os
import platform
import re
import shutil
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# extension name -> its translation units (paths under csrc/); the first holds the Python module
EXTENSIONS: Dict[str, Tuple[str, ...]] = {
    # the kernels' units in increasing ISA order (the generic one right after the entry points)
    "leap_attention": ("attention/leap_attention.cpp", "attention/kernels_generic.cpp", "attention/kernels_avx2.cpp",
                       "attention/kernels_avx512.cpp"),
    "window_pool": ("pooling/window_pool.cpp",),
}
_loaded: Dict[str, object] = {}
_failed: Dict[str, str] = {}
_no_openmp: Dict[str, bool] = {}


class BuildError(RuntimeError):
    """The C++ extension could not be built; the message ends with the build log's tail."""


def csrc_dir() -> Path:
    """The C++ sources: ``leapformer_kernels/csrc`` in an installed wheel, ``<repo>/csrc`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / EXTENSIONS["leap_attention"][0]).is_file():
            return cand
    raise BuildError(f"the C++ sources (csrc/) are missing beside {here}: reinstall leapformer-kernels "
                     "(pip install leapformer-kernels, or pip install -e . in a checkout)")


def cache_root() -> Path:
    return Path(os.environ.get("LEAPFORMER_CACHE") or (Path.home() / ".cache" / "leapformer_kernels"))


def _flags(openmp: bool = True) -> List[str]:
    # no -march: the binary runs on any CPU of the architecture (the attention kernels pick
    # their instruction set at run time)
    return ["-O3", "-std=c++17"] + (["-fopenmp"] if openmp else [])


def _ldflags(openmp: bool = True) -> List[str]:
    return ["-fopenmp"] if openmp else []


def cpu_features() -> str:
    """The CPU's instruction-set features, as one string (reported; the build does not depend on them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):  # x86 / arm64
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess
        try:
            out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10).stdout
            return " ".join(sorted(ln for ln in out.splitlines() if ln.startswith(("machdep.cpu.", "hw.optional."))))
        except Exception:
            pass
    return f"{platform.machine()} {platform.processor()}"


def _sources(name: str) -> List[Path]:
    """The translation units of extension ``name`` (the first defines the Python module)."""
    if name not in EXTENSIONS:
        raise BuildError(f"unknown C++ extension {name!r} (known: {', '.join(EXTENSIONS)})")
    d = csrc_dir()
    srcs = [d / rel for rel in EXTENSIONS[name]]
    for src in srcs:
        if not src.is_file():
            raise BuildError(f"{src} does not exist")
    return srcs


def _hashed_files(name: str) -> List[Path]:
    """What the key of ``name`` hashes: its translation units and every source and header under
    ``csrc/`` (any folder: a header may be included from anywhere)."""
    d = csrc_dir()
    extra = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in (".h", ".hpp", ".cpp", ".cc", ".inc"))
    srcs = _sources(name)
    return srcs + [p for p in extra if p not in srcs]


def build_key(name: str, openmp: bool = True) -> str:
    """Hex digest of everything the binary of ``name`` depends on (see the module docstring)."""
    import torch

    h = hashlib.sha256()
    d = csrc_dir()
    for p in _hashed_files(name):
        h.update(p.relative_to(d).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    parts = [" ".join(_flags(openmp)), " ".join(_ldflags(openmp)), os.environ.get("CXX", "c++"), torch.__version__,
             sys.version, str(sysconfig.get_config_var("EXT_SUFFIX")), platform.machine(), sys.platform]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:16]


def build_dir(name: str, openmp: bool = True) -> Path:
    return cache_root() / f"{name}-{build_key(name, openmp)}"


def _cached(name: str) -> bool:
    return any((build_dir(name, omp) / f"leapformer_{name}.so").is_file() for omp in (True, False))


def _ensure_ninja() -> None:
    if shutil.which("ninja") is None:
        try:
            import ninja  # the pip package puts ninja in its bin dir
        except ImportError as e:
            raise BuildError(f"ninja is not installed ({e}): pip install ninja") from None
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _compile(name: str, openmp: bool):
    from torch.utils.cpp_extension import load as cpp_load

    d = build_dir(name, openmp)
    d.mkdir(parents=True, exist_ok=True)
    return cpp_load(name=f"leapformer_{name}", sources=[str(p) for p in _sources(name)], extra_cflags=_flags(openmp),
                    extra_ldflags=_ldflags(openmp), build_directory=str(d), verbose=False)


_OPENMP_ERROR = re.compile(r"openmp|omp\.h|gomp|libomp", re.IGNORECASE)


def _build_one(name: str):
    """-> (module, None) or (None, error message ending with the build log's tail)."""
    try:
        if (build_dir(name, False) / f"leapformer_{name}.so").is_file() and \
                not (build_dir(name, True) / f"leapformer_{name}.so").is_file():
            _no_openmp[name] = True
            return _compile(name, False), None
        try:
            return _compile(name, True), None
        except Exception as e:  # a compiler without OpenMP: build without it (at::parallel_for runs serially)
            if not _OPENMP_ERROR.search(str(e)):
                raise
            _no_openmp[name] = True
            return _compile(name, False), None
    except BuildError as e:
        return None, str(e)
    except Exception as e:  # cpp_extension's error holds the compiler's output
        return None, f"building csrc/{EXTENSIONS[name][0]} failed:\n{str(e).strip()[-3000:]}"


def _build_many(names: Sequence[str]) -> None:
    """Build (or load from the cache) ``names`` in parallel; fills ``_loaded`` / ``_failed``."""
    names = [n for n in names if n not in _loaded and n not in _failed]
    if not names:
        return
    try:
        _ensure_ninja()
        cold = [n for n in names if not _cached(n)]
    except BuildError as e:
        for n in names:
            _failed[n] = str(e)
        return
    t0 = time.perf_counter()
    if cold:
        print(f"leapformer_kernels: building the C++ CPU kernels once ({', '.join(cold)}; about a minute); "
              f"cached in {cache_root()}", file=sys.stderr, flush=True)
    quiet = io.StringIO()
    with redirect_stdout(quiet), redirect_stderr(quiet):  # process-wide: set once, around every thread
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            results = dict(zip(names, pool.map(_build_one, names)))
    printed = quiet.getvalue().strip()  # what the compiler or cpp_extension printed, if anything
    for n, (mod, err) in results.items():
        if mod is not None:
            _loaded[n] = mod
        else:
            _failed[n] = err if not printed or printed[-500:] in err else f"{err}\n{printed[-2000:]}"
    if cold:
        ok = [n for n in cold if n in _loaded]
        serial = [n for n in ok if _no_openmp.get(n)]
        msg = f"leapformer_kernels: built {', '.join(ok) or 'nothing'} in {time.perf_counter() - t0:.0f} s"
        if serial:
            msg += f" (without OpenMP: the compiler does not support it; {', '.join(serial)} run on one thread)"
        failed = [n for n in cold if n in _failed]
        if failed:
            msg += f"; {', '.join(failed)} failed (the torch backend is used instead)"
        print(msg, file=sys.stderr, flush=True)


def load(name: str):
    """Import extension ``name`` (``EXTENSIONS``), building every uncached extension first if needed;
    raises ``BuildError`` on failure (remembered for the process)."""
    mod = _loaded.get(name)
    if mod is not None:
        return mod
    if name not in _failed:
        _build_many([name] + [n for n in EXTENSIONS if n != name])
    if name in _failed:
        raise BuildError(_failed[name])
    return _loaded[name]


def build(names: Optional[Sequence[str]] = None) -> List[str]:
    """Build every C++ extension ahead of time (in parallel); returns the names built or found in
    the cache. Raises ``BuildError`` naming each extension that failed, with its log's tail."""
    names = list(EXTENSIONS if names is None else names)
    _build_many(names)
    bad = [n for n in names if n in _failed]
    if bad:
        raise BuildError("\n".join(_failed[n] for n in bad))
    return names


def cpu_unavailable(device, dtype, name: str):
    """The ``unavailable(device, dtype)`` of a C++ kernel module (``attention/cpu.py``,
    ``pooling/cpu.py``) whose extension is ``name``: None if it can run, else the reason."""
    import torch

    if device.type != "cpu":
        return f"the cpu backend serves CPU tensors only, got {device}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the C++ kernels take float16, bfloat16, float32 or float64, not {dtype}"
    try:
        load(name)
    except BuildError as e:
        return f"the C++ extension could not be built: {e}"
    return None

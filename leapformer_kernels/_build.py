"""Build and load the C++ CPU kernels in ``csrc/`` (JIT with ninja, cached).

Each ``csrc/<name>.cpp`` is its own extension module (``leapformer_<name>``), compiled on
first use by ``torch.utils.cpp_extension.load`` into a cache directory keyed by the torch
version (``$LEAPFORMER_CACHE`` or ``~/.cache/leapformer_kernels``). A failed build is
remembered: ``load`` raises ``BuildError`` carrying the tail of the build log, which the
dispatch turns into a fallback warning (automatic choice) or a ``ValueError`` (explicit
``backend="cpu"``).
"""
from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, List

EXTENSIONS = ("leap_attention", "window_pool")
_loaded: Dict[str, object] = {}
_failed: Dict[str, str] = {}


class BuildError(RuntimeError):
    """The C++ extension could not be built; the message ends with the build log's tail."""


def csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if cand.is_dir():
            return cand
    raise BuildError("csrc/ not found beside the package (install from a source checkout: pip install -e .)")


def cache_dir() -> Path:
    import torch

    root = Path(os.environ.get("LEAPFORMER_CACHE", Path.home() / ".cache" / "leapformer_kernels"))
    d = root / f"torch-{torch.__version__.replace('+', '_')}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _flags() -> List[str]:
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("LEAPFORMER_NO_NATIVE", "0") == "0":
        flags.append("-march=native")  # JIT builds run on the machine that uses them
    return flags


def load(name: str):
    """Build (first time) and import ``csrc/<name>.cpp``; raises ``BuildError`` on failure."""
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise BuildError(_failed[name])
    try:
        if shutil.which("ninja") is None:
            try:
                import ninja  # noqa: F401  (the pip package puts ninja on PATH via its bin dir)
                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except Exception as e:
                raise BuildError(f"ninja is not installed ({e}); pip install ninja") from None
        from torch.utils.cpp_extension import load as cpp_load

        src = csrc_dir() / f"{name}.cpp"
        if not src.exists():
            raise BuildError(f"{src} does not exist")
        build_dir = cache_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        log = io.StringIO()
        try:
            with redirect_stdout(log), redirect_stderr(log):
                mod = cpp_load(name=f"leapformer_{name}", sources=[str(src)], extra_cflags=_flags(),
                               extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)
        except Exception as e:
            tail = (log.getvalue() + "\n" + str(e))[-3000:]
            raise BuildError(f"building csrc/{name}.cpp failed:\n{tail}") from None
    except BuildError as e:
        _failed[name] = str(e)
        raise
    _loaded[name] = mod
    return mod


def build() -> List[str]:
    """Build every C++ extension ahead of time; returns the names built. Raises ``BuildError``."""
    built = []
    for name in EXTENSIONS:
        if (csrc_dir() / f"{name}.cpp").exists():
            load(name)
            built.append(name)
    return built

"""Smoke test of the benchmark command on tiny sizes: JSON fields and the PNG; --quick leaves the
committed results alone; a missing [zoo] extra is one line on stderr and exit code 1."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPFORMER_BACKEND")}
    env.update(extra)
    return env


def _snapshot(folder):
    """name -> (mtime_ns, sha256) of every file in folder."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_benchmark_quick(tmp_path):
    env = _env()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path), "--name", "smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert {"device", "versions", "copy_bandwidth_GBps"} <= set(data["meta"])
    assert {"torch", "triton"} <= set(data["meta"]["versions"])
    methods = {r["method"] for r in data["attention"]}
    assert "sdpa" in methods and "leap[torch]" in methods
    for r in data["attention"]:
        for key in ("fwd_ms", "fwdbwd_ms", "fwd_floor_ms", "fwdbwd_floor_ms", "fwd_speedup_vs_sdpa",
                    "fwdbwd_speedup_vs_sdpa", "fwdbwd_x_floor"):
            assert r[key] > 0, key
    assert data["decode"] and "sdpa_kv_cache_ms" in data["decode"][0] and "state_copy_ms" in data["decode"][0]
    png = tmp_path / "smoke.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SDPA" in proc.stdout


def test_quick_writes_to_scratch_not_results(tmp_path):
    """--quick without --out: <tempfile.gettempdir()>/leapformer-benchmarks, and the committed
    benchmarks/results/ unchanged (same files, mtimes and contents)."""
    before = _snapshot(RESULTS)
    assert before, "benchmarks/results/ should hold the committed figures"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT,
                          env=_env(TMPDIR=str(tmp_path), TEMP=str(tmp_path), TMP=str(tmp_path)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _snapshot(RESULTS) == before
    scratch = tmp_path / "leapformer-benchmarks"
    written = sorted(p.name for p in scratch.iterdir())
    assert any(n.endswith(".json") for n in written) and any(n.endswith(".png") for n in written), written
    assert str(scratch) in proc.stdout


@pytest.mark.parametrize("module", ["matplotlib", "tqdm"])
def test_missing_zoo_extra_is_one_line(module):
    code = (f"import sys; sys.modules[{module!r}] = None; import runpy; sys.argv = ['benchmarks', '--quick']; "
            "runpy.run_module('benchmarks', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, (proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f'python -m benchmarks needs {module}: pip install "leapformer-kernels[zoo]"']
    assert "SDPA" not in proc.stdout  # nothing was timed

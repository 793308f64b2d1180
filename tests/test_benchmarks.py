"""Smoke test of the benchmark command on tiny sizes: JSON fields and the PNG."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPFORMER_BACKEND")}
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

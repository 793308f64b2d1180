"""The GPU reports without a GPU: ``benchmarks.triton_report`` compiles one kernel for sm_90 ahead
of time, ``benchmarks.gpu_report`` rehearses end to end under the interpreter at tiny sizes, and
``benchmarks.aot.record`` captures the host wrappers' launches (grid, constexprs) on meta tensors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, interpret):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPFORMER_BACKEND")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a cold cache: the compile really runs
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_triton_report_one_kernel(tmp_path):
    from triton.backends.nvidia import compiler as nv

    if not os.path.exists(nv.get_ptxas(90).path):
        pytest.skip("this triton wheel has no ptxas")
    proc = _run(["benchmarks.triton_report", "--archs", "sm_90", "--dtypes", "bfloat16", "--dims", "64",
                 "--kernels", "fwd", "--configs", "0", "--jobs", "1", "--out", str(tmp_path), "--name", "one"],
                tmp_path, interpret=False)
    data = json.loads((tmp_path / "one.json").read_text())
    rows = {r["kernel"]: r for r in data["compiles"]}
    assert sorted(rows) == ["fwd", "fwd.segment_sums"]  # "fwd" is a prefix: the segment sums too
    row = rows["fwd"]
    assert row["arch"] == "sm_90" and row["num_warps"] == 8  # the only warp count the autotuner keeps
    assert 0 < row["regs"] <= 255 and row["ptxas_regs"] == row["regs"]
    assert row["spill_stores"] is not None and row["stack"] is not None and row["shared"] > 0
    assert row["wgmma"] + row["mma_sync"] > 0  # the dots became MMA instructions
    # B*H x 9 segments of 960 rows at D = 64 (one value tile), planned for 132 SMs
    assert row["programs"] == 4 * 16 * 9 and rows["fwd.segment_sums"]["programs"] == 4 * 16 * 9
    assert "| fwd | sm_90 | bf16 | 64 |" in (tmp_path / "one.md").read_text()
    assert "wrote" in proc.stdout


def test_gpu_report_rehearsal(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the rehearsal is for machines without a GPU")
    out = tmp_path / "report"
    proc = _run(["benchmarks.gpu_report", "--out", str(out), "--tiny-compiles", "1"], tmp_path, interpret=True)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"report.json", "report.md", "log.txt"} <= set(files), files
    data = json.loads((out / "report.json").read_text())
    assert data["meta"]["tiny"] and data["meta"]["exit_code"] == 0
    assert {"torch", "triton"} <= set(data["meta"]["versions"])
    stages = data["stages"]
    assert set(stages) >= {"smoke", "parity", "anchor", "decode", "pool"}
    for name in ("smoke", "parity"):
        assert stages[name]["status"] == "done" and stages[name]["failed"] == 0 and stages[name]["passed"] > 0
    assert {r["method"] for r in stages["anchor"]["results"]} >= {"leap[triton]", "sdpa"}
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_x_floor"] > 0 for r in stages["anchor"]["results"])
    assert stages["decode"]["results"][0]["step[triton]_ms"] > 0
    assert all(r["fwd_x_floor"] > 0 for r in stages["pool"]["results"])
    assert data["meta"]["precompile"]["done"] == 1 and not data["meta"]["precompile"]["failed"]
    assert "## Anchor" in (out / "report.md").read_text() and "done in" in proc.stdout


def test_gpu_report_variant_defaults():
    """gpu_report restores triton_chunk's backward switches to DEFAULTS after each variant: they must be
    the module's own values, and every variant must change one."""
    from benchmarks import gpu_report
    from leapformer_kernels.attention import triton_chunk as tc

    assert gpu_report.DEFAULTS == {n: getattr(tc, n) for n in gpu_report.DEFAULTS}
    for sets in gpu_report.VARIANTS.values():
        assert sets and all(gpu_report.DEFAULTS[n] != v for n, v in sets.items())


def test_record_launches_on_meta_tensors():
    from benchmarks import aot
    from leapformer_kernels.attention import triton_chunk as tc

    B, T, H, D = 4, 8192, 16, 128
    q = torch.empty(B, T, H, D, dtype=torch.bfloat16, device="meta")
    p = torch.empty(B, T, H, device="meta")
    with aot.record() as launches:
        o, _, _, den = tc.fwd(q, q, q, p, p, None, None, None, None, None, True, None, 1e-6, True, False)
        tc.bwd(q, None, None, q, q, q, p, p, None, None, None, None, None, True, None, 1e-6, True, o=o, den=den)
    # the backward reads the forward's o and den (dden = -(do . o) / den per row): no recomputation
    # pass. Dk = 128: dq and dk over key blocks (every value column), dv over value tiles (every key column)
    assert [L.label for L in launches] == ["fwd", "bwd.dden", "bwd.dq", "bwd.dkv", "bwd.dkv"]
    assert [(L.kwargs.get("DO_DK"), L.kwargs.get("DO_DV")) for L in launches[3:]] == [(True, False), (False, True)]
    assert launches[1].grid == (-(-B * T * H // launches[1].kwargs["BR"]),)
    launches = launches[:1] + launches[2:]
    nv = launches[0].kwargs["V"] // launches[0].kwargs["BV"]
    nk = tc._bwd_tiles(D, D)[1]
    # 256 programs fill a meta device's 4 "SMs": one program per sequence, no segments
    assert [L.grid[:2] for L in launches] == [(B * H, nv), (B * H, nk), (B * H, nk), (B * H, nv)]
    assert all(L.grid[2:] in ((), (1,)) for L in launches)
    assert launches[0].kwargs["K"] == D and launches[0].args[0].dtype == torch.bfloat16

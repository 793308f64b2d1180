"""The README's commands are what CI runs, and the Python snippets of README.md and
models/README.md run verbatim."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.startswith("    pip install torch==2.13.0")]
    assert len(lines) == 2, lines
    return lines  # main job, tests


def test_ci_runs_the_readme_commands():
    main_job, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    install = main_job.split(" && ")[0]
    assert any(ln.strip().startswith("pip install") and ln.strip().replace(" -q", "") == install
               for ln in ci.splitlines()), install
    assert ".[test]" not in install and ".[zoo]" in install


def _snippets(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("doc", ["README.md", "models/README.md"])
def test_python_snippets_run(tmp_path, doc):
    snippets = _snippets(ROOT / doc)
    assert snippets, doc
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LEAPFORMER_BACKEND")}
    for code in snippets:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, env=env)
        assert r.returncode == 0, f"{doc} snippet failed:\n{code}\n{r.stderr[-3000:]}"

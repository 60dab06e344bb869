"""bench/gpu_check.py cannot rot: its --dry-run walks every check on tiny models on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RLHF_NO_PROGRESS="1")
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                        str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["env"]["dry_run"] and len(result["checks"]) >= 14
    assert all(c["ok"] for c in result["checks"]), [c for c in result["checks"] if not c["ok"]]
    assert result["resume"]["max_abs_diff"] == 0.0  # the CPU resumes bitwise
    assert {"mfu_generate", "mfu_experience", "mfu_train", "tokens_per_s_generate"} <= set(result["ppo_phases_bf16"])

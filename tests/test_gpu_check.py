"""bench/gpu_check.py cannot rot: its --dry-run walks every check on tiny models on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE")  # (what an earlier in-process test of this worker may have left)
    env = {k: v for k, v in os.environ.items() if k not in launcher} | dict(PYTHONPATH=str(ROOT), RLHF_NO_PROGRESS="1")
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                        str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["env"]["dry_run"] and len(result["checks"]) >= 14
    assert all(c["ok"] for c in result["checks"]), [c for c in result["checks"] if not c["ok"]]
    assert result["resume"]["max_abs_diff"] == 0.0  # the CPU resumes bitwise
    assert {"mfu_generate", "mfu_experience", "mfu_train", "tokens_per_s_generate"} <= set(result["ppo_phases_bf16"])


def test_a_part_that_raises_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    """On the GPU the check runs once, under a time limit: an exception in one part (say inductor
    on a bare machine) must not lose the parts after it, and the JSON must exist after every check."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    monkeypatch.setattr(gpu_check, "OUT_PATH", out)
    s = SimpleNamespace(t0=time.time(), skip={"skipped_part"}, made=None)

    def first(s):
        gpu_check.check("first: fine", True)
        assert json.loads(out.read_text())["checks"][0]["ok"]  # written at once, not at the end

    def boom(s):
        raise RuntimeError("inductor failed")

    gpu_check.section("first", first, s)
    gpu_check.section("second", boom, s)
    gpu_check.section("third", lambda s: gpu_check.check("third: fine", True), s)
    gpu_check.section("needs_second", lambda s: gpu_check.check("never", True), s, needs=("made",))
    gpu_check.section("skipped_part", lambda s: gpu_check.check("never", True), s)
    checks = json.loads(out.read_text())["checks"]
    assert [c["name"] for c in checks] == ["first: fine", "second: ran", "third: fine", "needs_second",
                                           "skipped_part"]
    assert checks[1]["ok"] is False and "inductor failed" in checks[1]["error"]
    assert checks[3]["ok"] is None and "needs made" in checks[3]["skipped"]
    assert checks[4]["ok"] is None and checks[4]["skipped"] == "--skip"

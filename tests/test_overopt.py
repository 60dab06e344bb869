"""Reward over-optimisation in PPO: gold beside proxy, the hacking alarm, best_gold/, and the
online RM refresh (kill -9 during a refresh, then exact resume; the human-judge round trip)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_rm(sft_checkpoint, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("overopt") / "rm"
    run_cli("rm", "recipes/tiny/rm.yaml", "--output_dir", out, "--model.name_or_path", sft_checkpoint,
            "--data.train", task_dir / "prefs.jsonl", "--data.eval", "null", "--data.eval_split", "0.1",
            "--sample", "null", "--train.max_steps", "10", "--normalize_data", "null")
    return out


def _ppo(sft_checkpoint, tiny_rm, task_dir):
    return ["ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", sft_checkpoint, "--reward_model", tiny_rm,
            "--data.train", task_dir / "rl_prompts.jsonl", "--data.eval", task_dir / "eval_prompts.jsonl",
            "--rollout_batch_size", "16", "--minibatch_size", "8", "--micro_batch_size", "8", "--ppo_epochs", "1",
            "--max_new_tokens", "8", "--eval_samples", "16", "--sample_every", "0"]


def test_gold_beside_proxy_alarm_stop_and_best_gold(tmp_path, sft_checkpoint, tiny_rm, task_dir):
    out = tmp_path / "ppo"
    p = run_cli(*_ppo(sft_checkpoint, tiny_rm, task_dir), "--output_dir", out, "--steps", "4", "--eval_every", "1",
                "--gold_reward_fns", "[{fn: gold}]", "--kl_budget", "1e-9", "--stop_on_alarm", "true",
                "--lr", "1e-3", "--save_every", "1")
    s = json.loads(p.stdout)
    assert s["stopped_by_alarm"] == 1 and s["hacking_alarms"][0] == 1  # KL > budget at the first evaluation
    assert "iteration 1: reward hacking alarm: KL to the SFT policy" in p.stderr
    assert "eval_gold_reward" in s and "initial_eval_gold_reward" in s and "best_gold_iteration" in s
    m = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert any("gold_reward" in r for r in m) and any(r.get("hacking_alarm") == 1.0 for r in m)
    assert (out / "best_gold" / "model.safetensors").exists() and (out / "report" / "gao_proxy_vs_gold.png").exists()
    assert json.loads((out / "best_gold" / "best_gold.json").read_text()) == {"value": s["best_gold"],
                                                                              "iteration": s["best_gold_iteration"]}
    state = json.loads((out / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert state["stopped_by_alarm"] == 1  # in the checkpoint: a crash while finishing resumes to a stop
    assert (out / "checkpoints" / "step-00000001").is_dir() or not list((out / "checkpoints").glob("*"))


def _refresh_args(sft_checkpoint, tiny_rm, task_dir, judge="judge", steps=5):
    spec = (f"{{every: 2, num_prompts: 8, k: 2, steps: 3, batch_size: 4, judge: {judge}, "
            f"data: {task_dir / 'prefs.jsonl'}}}")
    return [*_ppo(sft_checkpoint, tiny_rm, task_dir), "--steps", str(steps), "--save_every", "2", "--rm_refresh",
            spec]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_rm_refresh_kill9_during_a_refresh_resumes_exactly(tmp_path, sft_checkpoint, tiny_rm, task_dir):
    args = _refresh_args(sft_checkpoint, tiny_rm, task_dir)
    p = run_cli(*args, "--output_dir", tmp_path / "full")
    assert "could not build the report" not in p.stderr  # (the refresh's metric names hold a '/')
    assert (tmp_path / "full" / "report" / "13_rm_refresh_accuracy_before.png").exists()
    m = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl") if "rm_refresh/loss" in l]
    assert [r["step"] for r in m] == [2, 4] and 0 <= m[0]["rm_refresh/accuracy_before"] <= 1
    rm_before, rm_after = _weights(tiny_rm / "model.safetensors"), _weights(tmp_path / "full" / "reward_model" /
                                                                             "model.safetensors")
    assert any(not torch.equal(rm_before[k], rm_after[k]) for k in rm_before)  # the RM learnt
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT), RLHF_FAULT="refresh:5")  # 2nd refresh
    cut = subprocess.run([sys.executable, "-m", "rlhf", *map(str, args), "--output_dir", str(tmp_path / "cut")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert cut.returncode == -9, cut.stderr[-2000:]
    run_cli(*args, "--output_dir", tmp_path / "cut", "--resume")
    for f in ("model.safetensors", "reward_model/model.safetensors"):
        a, b = _weights(tmp_path / "full" / f), _weights(tmp_path / "cut" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads(p.stdout)["eval_reward"] == json.loads((tmp_path / "cut" / "summary.json").read_text())[
        "eval_reward"]


def test_human_judge_round_trip(tmp_path, sft_checkpoint, tiny_rm, task_dir):
    """judge: human pauses the run (exit 3) with the samples written; a person's ranks, joined by
    `rlhf data join-ranks`, let --resume continue from there."""
    from rlhf.data.tasks import judge_one
    from rlhf.rundir import staging_path

    args = _refresh_args(sft_checkpoint, tiny_rm, task_dir, judge="human", steps=3)
    out = tmp_path / "ppo"
    p = run_cli(*args, "--output_dir", out, check=False)
    assert p.returncode == 3 and "paused for human ranking at iteration 2" in p.stderr, p.stderr[-2000:]
    staged = staging_path(out)
    samples = staged / "rm_refresh" / "iter000002-samples.jsonl"
    rows = [json.loads(l) for l in open(samples)]
    assert len(rows) == 8 and all(len(r["responses"]) == 2 for r in rows)
    ranks = tmp_path / "ranks.jsonl"  # the "person": the task judge's order, 1 = best
    with open(ranks, "w") as f:
        for r in rows:
            score = [judge_one(r["task"], r["input"], x) for x in r["responses"]]
            f.write(json.dumps({"id": r["id"], "ranks": [1, 2] if score[0] >= score[1] else [2, 1]}) + "\n")
    run_cli("data", "join-ranks", samples, ranks, "--out", staged / "rm_refresh" / "iter000002-rankings.jsonl")
    run_cli(*args, "--output_dir", out, "--resume")
    m = [json.loads(l) for l in open(out / "metrics.jsonl") if "rm_refresh/loss" in l]
    assert [r["step"] for r in m] == [2]  # the person's rankings were learnt from, then the run finished
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_resumed_run_reports_the_policy_best_gold_holds(tmp_path):
    """best_gold/ is written when an evaluation beats the best, checkpoints only every save_every:
    a run that stops between the two resumes with the record written beside the folder's weights
    (on a GPU the re-run may not reproduce that evaluation), so summary and folder agree."""
    from rlhf.algos import core
    from rlhf.engine import NonFiniteGuard
    from rlhf.stages.ppo import BEST_GOLD_RECORD, PPOState

    def state():
        return PPOState(core.FixedKLController(0.1), core.RunningMoments(), NonFiniteGuard(5), torch.Generator())

    saved = state()
    saved.best_gold = {"value": 0.8, "iteration": 8}
    ckpt = tmp_path / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    resumed = state()
    resumed.load(saved.state_dict(), ckpt, 0)
    assert resumed.best_gold == {"value": 0.8, "iteration": 8}  # no record: the checkpoint's
    (tmp_path / "best_gold").mkdir()
    (tmp_path / "best_gold" / BEST_GOLD_RECORD).write_text(json.dumps({"value": 0.9, "iteration": 12}))
    resumed.load(saved.state_dict(), ckpt, 0)
    assert resumed.best_gold == {"value": 0.9, "iteration": 12}


def test_rankings_after_a_pause_must_be_that_pauses_samples(tmp_path, caplog):
    """A human-judge pause resumes only on rankings of its own samples: an empty file, an id the
    samples file does not have, or other responses under a known id are one line naming the row
    (they would skip the ranking round, or train the RM on other samples); a partial file warns."""
    from rlhf.data.formats import Row
    from rlhf.errors import DataError
    from rlhf.rm_refresh import check_ranked_samples

    samples = [Row({"id": f"it1-0-{j}", "prompt": f"q{j}", "responses": ["a", "b", "c"]}, "s.jsonl", j + 1)
               for j in range(3)]
    ranked = [Row(dict(s.data, ranks=[1, 2, 3]), "r.jsonl", i + 1) for i, s in enumerate(samples)]
    check_ranked_samples(ranked, samples, tmp_path / "r.jsonl")
    with pytest.raises(DataError, match="r.jsonl: no ranked rows"):
        check_ranked_samples([], samples, tmp_path / "r.jsonl")
    foreign = Row({"id": 77, "prompt": "q0", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]}, "r.jsonl", 2)
    with pytest.raises(DataError, match=r"r\.jsonl:2: field 'id': 77 is not a row of this pause's samples \(s\.jsonl\)"):
        check_ranked_samples([ranked[0], foreign], samples, tmp_path / "r.jsonl")
    other = Row(dict(samples[1].data, responses=["x", "b", "c"], ranks=[1, 2, 3]), "r.jsonl", 1)
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'responses': not the responses of sample 'it1-0-1'"):
        check_ranked_samples([other], samples, tmp_path / "r.jsonl")
    check_ranked_samples(ranked[:2], samples, tmp_path / "r.jsonl")
    assert "2 of the 3 sampled rows are ranked" in caplog.text

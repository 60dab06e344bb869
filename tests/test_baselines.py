"""Critic-free estimators in the PPO loop, DPO through TRL, and `rlhf compare`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_ARCH, run_cli

pytestmark = pytest.mark.slow


def _ppo(sft_checkpoint, task_dir, **over):
    from rlhf.config import load_stage_config

    base = {"model.name_or_path": str(sft_checkpoint), "reward_fns": [{"fn": "gold"}], "value_init": "policy",
            "data.train": str(task_dir / "rl_prompts.jsonl"), "data.eval": str(task_dir / "eval_prompts.jsonl"),
            "steps": 3, "rollout_batch_size": 16, "minibatch_size": 8, "micro_batch_size": 8, "ppo_epochs": 1,
            "max_new_tokens": 8, "eval_samples": 16, "sample_every": 0}
    return load_stage_config("ppo", None, {**base, **over})


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_run_never_builds_a_value_model(estimator, sft_checkpoint, task_dir, tmp_path, monkeypatch):
    import rlhf.stages.ppo_setup as setup
    from rlhf.stages import run

    def no_value_model(*a, **k):
        raise AssertionError("a critic-free estimator built a value model")

    monkeypatch.setattr(setup, "load_value_model", no_value_model)
    s = run("ppo", _ppo(sft_checkpoint, task_dir, advantage_estimator=estimator, samples_per_prompt=4,
                        save_every=3), str(tmp_path / "run"))
    m = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"pg_loss"' in l]
    assert len(m) == 3 and "vf_loss" not in m[-1] and ("kl_loss" in m[-1]) == (estimator == "grpo")
    assert s["steps"] == 3 and s["eval_kl"] == pytest.approx(s["eval_kl"])  # finite
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert (ckpt / "policy.safetensors").exists() and not (ckpt / "value.safetensors").exists()


def test_group_samples_share_their_prompt(sft_checkpoint, task_dir):
    """samples_per_prompt = K: every prompt of an iteration appears K times in a row, on one process."""
    from types import SimpleNamespace

    from rlhf.stages.ppo import batch_split, rollout_prompts

    cfg = _ppo(sft_checkpoint, task_dir, advantage_estimator="grpo", samples_per_prompt=4)
    prompts = list(range(40))
    run = SimpleNamespace(cfg=cfg, data=SimpleNamespace(prompts=prompts), split=batch_split(cfg, 1),
                          acc=SimpleNamespace(process_index=0))
    batch = rollout_prompts(run, 1)
    assert len(batch) == 16 and all(batch[i] == batch[i - i % 4] for i in range(16)) and len(set(batch)) == 4


def _dpo_recipe(tmp_path, sft_checkpoint, task_dir, **extra):
    import yaml

    doc = {"model": {"name_or_path": str(sft_checkpoint)},
           "data": {"train": str(task_dir / "prefs.jsonl"), "max_length": 48, "max_samples": 200},
           "train": {"max_steps": 8, "batch_size": 16, "micro_batch_size": 8, "lr": 1e-4, "log_every": 2,
                     "save_every": 3},
           "eval_prompts": str(task_dir / "eval_prompts.jsonl"), "eval_samples": 16, "max_new_tokens": 8, **extra}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_dpo_stage_run_folder_and_exact_resume_after_kill9(tmp_path, sft_checkpoint, task_dir):
    recipe = _dpo_recipe(tmp_path, sft_checkpoint, task_dir)
    p = run_cli("dpo", recipe, "--output_dir", tmp_path / "full")
    s = json.loads(p.stdout)
    assert s["stage"] == "dpo" and s["steps"] == 8 and s["train_pairs"] > 0
    for k in ("eval_gold_accuracy", "eval_kl", "initial_eval_gold_accuracy"):
        assert k in s, k
    assert s["initial_eval_kl"] == 0.0 and s["eval_kl"] != 0.0  # the policy moved away from the SFT reference
    full = tmp_path / "full"
    for f in ("model.safetensors", "recipe.yaml", "metrics.jsonl", "summary.json", "report/index.html"):
        assert (full / f).exists(), f
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT), RLHF_FAULT="step:5")
    cut = subprocess.run([sys.executable, "-m", "rlhf", "dpo", str(recipe), "--output_dir", str(tmp_path / "cut")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert cut.returncode == -9  # killed after step 5; the checkpoint of step 3 is the one to resume
    run_cli("dpo", recipe, "--output_dir", tmp_path / "cut", "--resume")
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, tmp_path / "cut"))
    assert {k: v for k, v in sa.items() if k not in ("train_seconds", "peak_rss_mb")} == \
        {k: v for k, v in sb.items() if k not in ("train_seconds", "peak_rss_mb")}


def test_dpo_has_the_rm_stage_input_checks(tmp_path, sft_checkpoint, task_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
                               "rejected": "\n\nHuman: What is 3+3?\n\nAssistant: 6"}) + "\n")
    p = run_cli("dpo", _dpo_recipe(tmp_path, sft_checkpoint, task_dir), "--data.train", bad, "--output_dir",
                tmp_path / "out", check=False)
    assert p.returncode == 2 and f"{bad}:1: field 'chosen': chosen and rejected do not share their prompt" in p.stderr
    assert not (tmp_path / "out").exists()


def test_compare_runs_methods_x_seeds_and_reuses_complete_runs(tmp_path, task_dir):
    import yaml

    doc = {"seeds": [0, 1],
           "sft": {"model": {"init": "from_config", "arch": TINY_ARCH, "tokenizer_vocab_size": 300},
                   "data": {"train": str(task_dir / "sft.jsonl"), "max_length": 48},
                   "train": {"max_steps": 10, "batch_size": 32, "micro_batch_size": 32, "lr": 3e-3},
                   "max_new_tokens": 8, "gen_eval_samples": 8},
           "ppo": {"reward_fns": [{"fn": "gold"}], "value_init": "policy",
                   "data": {"train": str(task_dir / "rl_prompts.jsonl"), "eval": str(task_dir / "eval_prompts.jsonl")},
                   "steps": 2, "rollout_batch_size": 8, "minibatch_size": 8, "micro_batch_size": 8,
                   "ppo_epochs": 1, "max_new_tokens": 8, "eval_samples": 8, "sample_every": 0},
           "dpo": {"data": {"train": str(task_dir / "prefs.jsonl"), "max_length": 48, "max_samples": 64},
                   "train": {"max_steps": 2, "batch_size": 16, "micro_batch_size": 16},
                   "eval_prompts": str(task_dir / "eval_prompts.jsonl"), "eval_samples": 8, "max_new_tokens": 8},
           "methods": {"ppo": {}, "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": 4},
                       "dpo": {"stage": "dpo"}}}
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "cmp"
    run_cli("compare", recipe, "--output_dir", out)
    result = json.loads((out / "compare.json").read_text())
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {(m, s) for m in ("ppo", "grpo", "dpo") for s in (0, 1)}
    assert result["table"]["grpo"]["eval_kl"]["n"] == 2 and result["samples_per_run"]["ppo"] == 16
    assert "| grpo |" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 1000
    stamp = (out / "runs" / "ppo" / "seed0" / "summary.json").stat().st_mtime_ns
    run_cli("compare", recipe, "--output_dir", out)  # complete runs are reused, not trained again
    assert (out / "runs" / "ppo" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    # a changed sft section is not answered with the SFT policy of the old one (before: reused without a word),
    # and the folder it reuses by design is not called a problem ("pass --overwrite", which compare refuses)
    p = run_cli("compare", recipe, "--output_dir", out, "--sft.train.lr", "1e-3", check=False)
    assert p.returncode == 2 and f"{out / 'sft'}: made from another recipe than this comparison's sft section " \
        "(train.lr: 0.003 -> 0.001)" in p.stderr and "--overwrite" not in p.stderr
    doc["methods"]["grpo"]["steps"] = 3  # an unequal sampling budget is refused before anything runs
    recipe.write_text(yaml.safe_dump(doc))
    p = run_cli("compare", recipe, "--output_dir", tmp_path / "cmp2", check=False)
    assert p.returncode == 2 and "must generate the same number of samples" in p.stderr
    doc["methods"]["grpo"]["steps"] = 2
    doc["methods"]["grpo"]["temperature"] = 0.7  # evaluated otherwise: not comparable, refused
    recipe.write_text(yaml.safe_dump(doc))
    p = run_cli("compare", recipe, "--output_dir", tmp_path / "cmp3", check=False)
    assert p.returncode == 2 and "every method must be evaluated alike" in p.stderr and "grpo: (" in p.stderr
    del doc["methods"]["grpo"]["temperature"]
    doc["dpo"]["eval_samples"] = 16
    recipe.write_text(yaml.safe_dump(doc))
    p = run_cli("compare", recipe, "--output_dir", tmp_path / "cmp4", check=False)
    assert p.returncode == 2 and "every method must be evaluated alike" in p.stderr


def test_compare_writes_only_a_new_empty_or_comparison_folder_and_holds_it_while_it_runs(tmp_path):
    """rlhf compare wrote into any folder: a finished SFT run's (its summary.json replaced), a folder
    of the user's, or one a live run was writing, whose swap-in then deleted the comparison's runs;
    and a run given the folder of a live comparison was accepted and deleted its finished stages."""
    from rlhf.rundir import KIND, RunFolder, busy, compare_folder_problem, hold, hold_compare, release

    assert compare_folder_problem(tmp_path / "new") is None
    (tmp_path / "f").write_text("")
    assert compare_folder_problem(tmp_path / "f") == f"{tmp_path / 'f'}: exists and is not a folder"
    assert compare_folder_problem(tmp_path / "f" / "x") == f"{tmp_path / 'f' / 'x'}: {tmp_path / 'f'} is a file, not a folder"
    (tmp_path / "empty").mkdir()
    assert compare_folder_problem(tmp_path / "empty") is None
    sft = tmp_path / "sft_run"
    sft.mkdir()
    (sft / KIND).write_text('{"command": "sft"}\n')
    (sft / "summary.json").write_text('{"stage": "sft"}')
    assert compare_folder_problem(sft) == (f"{sft}: holds an rlhf sft run, not a comparison; give rlhf compare a new "
                                           f"or empty --output_dir")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert "exists, is not empty and holds no comparison" in compare_folder_problem(mine)
    old = tmp_path / "old_compare"  # a comparison from before the KIND file, interrupted in its runs
    (old / "runs" / "ppo").mkdir(parents=True)
    (old / "sft").mkdir()
    assert compare_folder_problem(old) is None
    live = tmp_path / "live"  # a run a live process writes (staged beside its folder)
    (tmp_path / ".live.staging").mkdir()
    (tmp_path / ".live.staging" / KIND).write_text('{"command": "ppo"}\n')
    other = RunFolder(live, tmp_path / ".live.staging", command="ppo")
    hold(other)
    try:
        assert "another running rlhf is writing this run" in compare_folder_problem(live)
    finally:
        release(other)
    assert compare_folder_problem(live) is None
    root = tmp_path / "cmp"
    held = hold_compare(root)  # a live comparison: any other run into its folder is refused
    try:
        assert "another running rlhf is writing this run" in busy(root)
        assert "another running rlhf is writing this run" in compare_folder_problem(root)
    finally:
        release(held)
    assert busy(root) is None and compare_folder_problem(root) is None  # its own folder, to continue


@pytest.mark.slow  # (through rlhf.stages.run; refused before anything trains)
def test_compare_into_another_runs_folder_is_refused_in_one_line(tmp_path, capsys):
    from rlhf.cli import main

    sft = tmp_path / "sft_run"
    sft.mkdir()
    (sft / ".rlhf-run").write_text('{"command": "sft"}\n')
    (sft / "summary.json").write_text('{"stage": "sft"}')
    assert main(["compare", "recipes/tiny/compare.yaml", "--output_dir", str(sft)]) == 2
    assert f"rlhf compare: error: {sft}: holds an rlhf sft run, not a comparison" in capsys.readouterr().err
    assert sorted(p.name for p in sft.iterdir()) == [".rlhf-run", "summary.json"]
    assert main(["compare", "recipes/tiny/compare.yaml", "--output_dir", str(sft), "--methods.ppo.lrr", "1"]) == 2
    err = capsys.readouterr().err  # a bad input and the folder, named at once
    assert "unknown key 'lrr'" in err and "; and " in err and "holds an rlhf sft run" in err


def test_compare_gives_dpo_the_preferences_the_rm_learnt_from(tmp_path):
    """With `rm.sample`, the RM (and through it every PPO-family method) learns from rankings of
    the SFT policy's own samples: DPO trains on them too, besides its own pairs; every method is
    evaluated alike."""
    from rlhf.config import load_stage_config
    from rlhf.stages.compare import method_configs

    cfg = load_stage_config("compare", "recipes/tiny/compare.yaml")
    runs = method_configs(cfg, tmp_path / "sft", tmp_path / "rm")
    stage, dpo = runs[("dpo", 0)]
    assert stage == "dpo"
    assert dpo.data.train == ["recipes/tiny/data/prefs.jsonl", str(tmp_path / "rm" / "sampled_rankings.jsonl")]
    assert runs[("ppo", 0)][1].data.train == "recipes/tiny/data/rl_prompts.jsonl"


def test_compare_table_shows_the_rm_score_for_every_method_and_ppos_reward_apart():
    """The RM score (eval_rm_score) is the one reward measure DPO and the PPO family share; a PPO
    method's whole recipe reward has its own column, and DPO, which has none, shows '–' there."""
    from rlhf.stages.compare import comparison_markdown

    s = lambda x: {"mean": x, "std": 0.0, "n": 1}  # noqa: E731
    out = {"seeds": [0], "sft_eval_gold_accuracy": 0.5, "samples_per_run": {"ppo": 16, "dpo": None},
           "table": {"ppo": {"eval_gold_accuracy": s(0.9), "eval_rm_score": s(1.25), "eval_reward": s(0.75)},
                     "dpo": {"eval_gold_accuracy": s(0.8), "eval_rm_score": s(1.5), "eval_reward": s(1.5)}}}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in comparison_markdown(out).splitlines() if line.startswith("| ppo") or line.startswith("| dpo")}
    assert rows["ppo"][:3] == ["0.900 ± 0.000", "1.250 ± 0.000", "0.750 ± 0.000"]
    assert rows["dpo"][:3] == ["0.800 ± 0.000", "1.500 ± 0.000", "–"]


def test_an_interrupted_comparison_lets_its_current_run_stop_as_itself(tmp_path):
    """Ctrl-C or SIGTERM on rlhf compare: its current run, a child process, is given time to stop by
    itself (it usually got the same signal), then one SIGTERM (rlhf's runs mark their folder on it),
    and is killed only if it still has not exited; subprocess.run killed it at once, unmarked."""
    import subprocess
    import sys
    import time

    from rlhf.stages.compare import stop_child

    marked = tmp_path / "marked"
    child = ("import signal, sys, time\n"
             "def stop(*_):\n"
             f"    open({str(marked)!r}, 'w').write('FAILED')\n"
             "    sys.exit(143)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "print('x' * 200000, file=sys.stderr)\n"  # (more than a pipe holds: it must be read meanwhile)
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.monotonic()
    stop_child(p, grace=1.0, patience=30.0)
    assert p.returncode == 143 and marked.read_text() == "FAILED" and time.monotonic() - t < 20
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop_child(stubborn, grace=0.5, patience=0.5)
    assert stubborn.returncode == -9  # killed, after its SIGTERM was ignored

"""Every CLI command as a user runs it (subprocess), and the one-line errors."""

import json
import os

import pytest

from conftest import ROOT, run_cli

SMALL = ["--sft.train.epochs", "2", "--sft.gen_eval_samples", "16", "--rm.sample.max_prompts", "16",
         "--rm.data.max_samples", "300", "--ppo.steps", "2", "--ppo.eval_samples", "16",
         "--ppo.rollout_batch_size", "16", "--ppo.minibatch_size", "8", "--ppo.micro_batch_size", "8"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    p = run_cli("pipeline", "recipes/tiny/pipeline.yaml", "--output_dir", out, *SMALL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == ["sft", "rm", "ppo"]
    assert json.loads(p.stdout)["stages"] == ["sft", "rm", "ppo"]
    return out


@pytest.mark.slow
def test_pipeline_layout(pipeline_dir):
    for stage in ("sft", "rm", "ppo"):
        d = pipeline_dir / stage
        for f in ("model.safetensors", "config.json", "recipe.yaml", "metrics.jsonl", "summary.json"):
            assert (d / f).exists(), d / f
    ppo = json.loads((pipeline_dir / "ppo" / "summary.json").read_text())
    for k in ("eval_reward", "eval_kl", "eval_gold_accuracy", "initial_eval_gold_accuracy"):
        assert k in ppo
    rm = json.loads((pipeline_dir / "rm" / "summary.json").read_text())
    for k in ("eval_accuracy", "eval_margin", "eval_chosen_mean", "eval_rejected_mean", "reward_bias"):
        assert k in rm
    assert (pipeline_dir / "rm" / "sampled_rankings.jsonl").exists()
    sft = json.loads((pipeline_dir / "sft" / "summary.json").read_text())
    for k in ("eval_loss", "eval_perplexity", "eval_gold_accuracy", "eval_gold_accuracy_greedy"):
        assert k in sft


@pytest.mark.slow
def test_data_make(tmp_path):
    p = run_cli("data", "make", "reverse,add", "--out", tmp_path, "--n_sft", "50", "--n_pref", "20", "--n_rank", "5",
                "--n_rl", "10", "--n_eval", "10")
    assert "sft.jsonl: 50 rows" in p.stdout
    assert len((tmp_path / "rankings.jsonl").read_text().splitlines()) == 5


@pytest.mark.slow
def test_sft_rm_ppo_commands(tmp_path, pipeline_dir):
    sft = tmp_path / "sft"
    run_cli("sft", "recipes/tiny/sft.yaml", "--output_dir", sft, "--train.max_steps", "3", "--gen_eval_samples", "8")
    assert json.loads((sft / "summary.json").read_text())["steps"] == 3
    rm = tmp_path / "rm"
    run_cli("rm", "recipes/tiny/rm.yaml", "--output_dir", rm, "--model.name_or_path", sft, "--train.max_steps", "2",
            "--sample.checkpoint", sft, "--sample.max_prompts", "4")
    assert "eval_accuracy" in json.loads((rm / "summary.json").read_text())
    ppo = tmp_path / "ppo"
    run_cli("ppo", "recipes/tiny/ppo.yaml", "--output_dir", ppo, "--model.name_or_path", sft, "--reward_model", rm,
            "--steps", "1", "--rollout_batch_size", "16", "--eval_samples", "8", "--ppo.kl_coef", "0.05")
    s = json.loads((ppo / "summary.json").read_text())
    assert s["steps"] == 1 and "eval_kl" in s


@pytest.mark.slow
def test_ppo_reward_fn_recipe(tmp_path, pipeline_dir):
    out = tmp_path / "fn"
    run_cli("ppo", "recipes/tiny/ppo_reward_fn.yaml", "--output_dir", out, "--model.name_or_path",
            pipeline_dir / "sft", "--steps", "2", "--rollout_batch_size", "16", "--eval_samples", "8")
    m = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert any("reward_fn/rlhf.data.tasks:gold_reward" in r for r in m)


@pytest.mark.slow
def test_generate_chat_sample_score(tmp_path, pipeline_dir):
    sft, rm = pipeline_dir / "sft", pipeline_dir / "rm"
    prompts = ROOT / "recipes/tiny/data/eval_prompts.jsonl"
    p = run_cli("generate", sft, "--prompts", prompts, "--max_new_tokens", "8", "--greedy")
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert len(rows) == 500 and all("completion" in r for r in rows)
    import subprocess, sys, os

    env = dict(os.environ, PYTHONPATH=str(ROOT), RLHF_NO_PROGRESS="1")
    chat = subprocess.run([sys.executable, "-m", "rlhf", "chat", str(sft), "--max_new_tokens", "8"],
                          input="Sort the digits: 31415\n\n/exti\nSort the digits: 27182\n/exit\n", capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    # an empty line and a mistyped command are no messages to the model (both were sent as user turns)
    assert chat.returncode == 0 and len(chat.stdout.strip().splitlines()) == 2, chat.stdout
    assert "error: unknown command /exti; the commands are /reset, /exit, /quit" in chat.stderr
    out = tmp_path / "rank.jsonl"
    run_cli("sample", sft, prompts, "--k", "3", "--max_prompts", "5", "--max_new_tokens", "8", "--out", out)
    ranked = [json.loads(l) for l in open(out)]
    assert len(ranked) == 5 and all(len(r["responses"]) == 3 == len(r["scores"]) for r in ranked)
    unranked = tmp_path / "unranked.jsonl"  # for human labellers: ids, no scores
    run_cli("sample", sft, prompts, "--k", "2", "--max_prompts", "3", "--max_new_tokens", "8", "--judge", "none",
            "--out", unranked)
    rows = [json.loads(l) for l in open(unranked)]
    assert all("scores" not in r and "id" in r for r in rows)
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps({"id": r["id"], "ranks": [2, 1]}) + "\n" for r in rows))
    p = run_cli("data", "join-ranks", unranked, human, "--out", tmp_path / "joined.jsonl")
    assert "3 ranked rows" in p.stdout
    scored = tmp_path / "scored.jsonl"
    run_cli("score", rm, ROOT / "recipes/tiny/data/prefs_eval.jsonl", "--out", scored)
    rows = [json.loads(l) for l in open(scored)]
    assert all("score_chosen" in r and "score_rejected" in r for r in rows)
    acc = sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows)
    assert acc > 0.5
    (tmp_path / "empty.jsonl").write_text("\n")  # (it wrote "0 scored rows" and an empty --out)
    p = run_cli("score", rm, tmp_path / "empty.jsonl", "--out", tmp_path / "none.jsonl", check=False)
    assert p.returncode == 2 and "empty.jsonl: no rows to score" in p.stderr and not (tmp_path / "none.jsonl").exists()
    p = run_cli("report", scored, check=False)
    assert p.returncode == 2 and "scored.jsonl: a file, not a run folder" in p.stderr
    ev = tmp_path / "ev.json"
    run_cli("eval", rm, "--pairs", ROOT / "recipes/tiny/data/prefs_eval.jsonl", "--max_samples", "50", "--out", ev)
    res = json.loads(ev.read_text())["checkpoints"][str(rm)]
    assert res["rm_pairs"] == 50 and 0.0 <= res["rm_accuracy"] <= 1.0
    report = pipeline_dir / "report.html"
    assert report.exists() and (pipeline_dir / "ppo" / "report" / "index.html").exists()


@pytest.mark.parametrize("args,needle", [
    (["sft", "recipes/tiny/sft.yaml", "--train.lrr", "1"], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (["sft", "recipes/tiny/sft.yaml", "--train.batch_size", "x"], "train.batch_size: expected an integer"),
    (["sft", "recipes/tiny/sft.yaml", "--data.train", "missing.jsonl"], "missing.jsonl: data file not found"),
    (["rm", "recipes/tiny/rm.yaml", "--model.name_or_path", "./no/such/ckpt"], "missing checkpoint"),
    (["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--reward_fns", "[{fn: nowhere.py:f}]"], "nowhere.py not found"),
    (["sft", "nope.yaml"], "recipe file not found"),
])
@pytest.mark.slow
def test_errors_are_one_line_with_exit_2(tmp_path, args, needle):
    p = run_cli(*args, "--output_dir", tmp_path / "out", check=False)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if "error" in l]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_bad_data_row_error_names_file_line_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n')
    p = run_cli("sft", "recipes/tiny/sft.yaml", "--data.train", bad, "--output_dir", tmp_path / "o", check=False)
    assert p.returncode == 2 and f"{bad}:2: field 'completion'" in p.stderr


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, pipeline_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"keep": true}')
    p = run_cli("sft", "recipes/tiny/sft.yaml", "--output_dir", out, check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert json.loads((out / "summary.json").read_text()) == {"keep": True}


def test_the_deepspeed_launchers_local_rank_argument_is_dropped():
    from rlhf.cli import _drop_local_rank

    assert _drop_local_rank(["--local_rank=1", "sft", "r.yaml", "--train.lr", "1"]) == ["sft", "r.yaml", "--train.lr", "1"]
    assert _drop_local_rank(["sft", "--local_rank", "0", "r.yaml"]) == ["sft", "r.yaml"]


@pytest.mark.slow
def test_a_process_other_than_the_first_tags_its_lines_and_leaves_the_recipe_to_the_first():
    """Under a launcher every process reads the same recipe and command line: a recipe warning (a
    whole section given on the command line) is said by the first only; the others' warnings name
    their rank."""
    import subprocess
    import sys

    code = ("import logging; from rlhf.cli import _setup_logging; _setup_logging(False, 1); "
            "logging.getLogger('rlhf.config').warning('recipe'); logging.getLogger('rlhf.engine').warning('run')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "[rank 1] rlhf.engine: run" in p.stderr and "recipe" not in p.stderr, p.stderr


def test_the_cli_tears_the_process_group_down_before_exit(tmp_path):
    """Every `rlhf` command ends (success or error) with torch.distributed torn down, so that no
    backend thread is left to the interpreter's exit (a CPU rank could abort there)."""
    import torch.distributed as dist

    from rlhf.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    assert main(["sft", str(tmp_path / "missing.yaml")]) == 2  # a user error: the group goes all the same
    assert not dist.is_initialized()


_EXIT_PROBE = """
import atexit, concurrent.futures, ctypes, os, sys, threading, time
from pathlib import Path

libc = ctypes.CDLL(None)
libc.__cxa_atexit(ctypes.cast(libc.abort, ctypes.c_void_p), None, None)  # a C++ static destructor that aborts
atexit.register(lambda: Path(sys.argv[1], "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), Path(sys.argv[1], "thread").write_text("ran"))).start()
pool = concurrent.futures.ThreadPoolExecutor(1)  # an idle worker (inductor keeps such a pool)
pool.submit(int).result()
import rlhf.cli as cli


def main(argv=None):
    if sys.argv[3] == "in-process":  # what rlhf does for one-process DeepSpeed (engine.make_accelerator)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    libc.printf(b"C stdio, ")  # buffered by C, not Python, when stdout is a pipe
    print("stage done", end="")
    return int(sys.argv[2])


cli.main = main
cli.run()
"""


@pytest.mark.slow
@pytest.mark.parametrize("rc,how", [(0, "launcher"), (2, "launcher"), (0, "in-process")])
def test_a_distributed_rank_exits_with_its_status_before_static_destructors(tmp_path, rc, how):
    """A process that ran torch.distributed (under a launcher, or one-process DeepSpeed) ends with
    os._exit after Python's exit steps (non-daemon threads, idle pool workers, atexit) and every
    stream flushed, C's included: a C++ destructor that would abort the finished rank (seen at exit
    under ZeRO-3 on CPU) never runs. Without either, the exit is Python's own, which the probe shows
    aborts."""
    import subprocess
    import sys

    def probe(out, mode, **launcher):
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "PYTHONUNBUFFERED")}
        out.mkdir()
        p = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(out), str(rc), mode], capture_output=True,
                           text=True, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), **launcher}, timeout=60)
        return p, out

    launcher = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"} if how == "launcher" else {}
    p, out = probe(tmp_path / "a", how, **launcher)
    assert p.returncode == rc, p.stderr[-2000:]
    assert sorted(p.stdout.partition("stage done")[::2]) == ["", "C stdio, "]  # both flushed, neither ends its line
    assert (out / "atexit").read_text() == "ran" and (out / "thread").read_text() == "ran"
    p, out = probe(tmp_path / "b", "plain")  # the same process left to the interpreter's exit: it aborts
    assert p.returncode == -6 and p.stdout.endswith("stage done") and (out / "atexit").is_file()


def test_commands_of_one_process_refuse_a_launcher(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank ran `rlhf generate` / `data make` whole: the files were written
    twice, or the second rank found the first's and failed. Only the training commands take
    several processes; the others say so in one line."""
    from rlhf.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["data", "make", "sort", "--out", str(tmp_path / "d")]) == 2
    assert "rlhf data: error: rlhf data runs as one process, but WORLD_SIZE=2 says this process is one of several" \
        in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.slow  # (through rlhf.stages.run, which refuses before anything trains)
def test_rewards_that_all_weigh_zero_are_refused_before_a_stage_runs(tmp_path, capsys):
    """`--ppo.reward_model_weight 0` with no reward function (an ablation typed on the command line)
    trained PPO on the KL penalty alone: every score 0, the policy pulled only toward the SFT one."""
    from rlhf.cli import main
    from rlhf.config import PPOConfig, RewardSpec
    from rlhf.errors import RunError
    from rlhf.stages.ppo import batch_split

    rc = main(["pipeline", str(ROOT / "recipes/tiny/pipeline.yaml"), "--output_dir", str(tmp_path / "run"),
               "--ppo.reward_model_weight", "0"])
    assert rc == 2 and not (tmp_path / "run").exists()
    assert "every reward has weight 0 (ppo.reward_model_weight 0)" in capsys.readouterr().err
    fns = [RewardSpec(fn="gold", weight=0.0), RewardSpec(fn="a.py:f", weight=0.0)]
    with pytest.raises(RunError, match=r"\(reward_fns\[0\]\.weight 0, reward_fns\[1\]\.weight 0\)"):
        batch_split(PPOConfig(reward_fns=fns), 1)
    batch_split(PPOConfig(reward_model="rm", reward_model_weight=0.0, reward_fns=fns[:1] + [RewardSpec(fn="g")]), 1)
    batch_split(PPOConfig(reward_model="rm", reward_model_weight=-0.5), 1)  # a negative weight is a reward too


@pytest.mark.parametrize("value", ["", "abc", "0", "-2"])
def test_a_world_size_that_is_no_process_count_is_one_line(monkeypatch, capsys, value):
    """WORLD_SIZE='' or 'abc' (a job script's typo) was a ValueError traceback from int() in the
    first stage that read it, for every training command; the one-process commands already said so."""
    from rlhf.cli import main

    monkeypatch.setenv("WORLD_SIZE", value)
    for command in ("sft", "compare"):
        assert main([command, str(ROOT / f"recipes/tiny/{command}.yaml"), "--output_dir", "/nonexistent/x"]) == 2
        err = capsys.readouterr().err
        assert f"rlhf {command}: error: environment variable WORLD_SIZE={value!r}: expected the number of processes " \
               f"(a launcher sets it); unset it to run one process" in err and "Traceback" not in err

"""Multi-process runs on the CPU (gloo): DDP for every stage, DeepSpeed ZeRO-2 and ZeRO-3, and
agreement with a 1-process run at the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

from rlhf.engine import RunError, global_batches, grad_accum_steps


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_batch_and_steps_do_not_depend_on_process_count(world):
    accum, micro = grad_accum_steps(64, 16, world)
    assert accum * micro * world == 64  # the global batch
    assert len(global_batches(3800, 64, 0, 2.0)) == 118  # optimizer steps: data and batch only
    assert micro <= 16


def test_batch_that_cannot_split_is_an_error():
    with pytest.raises(RunError, match="multiple of the 3 processes"):
        grad_accum_steps(64, 8, 3)
    with pytest.raises(RunError, match="must be a multiple of 'train.micro_batch_size'"):
        grad_accum_steps(64, 24, 1)


def free_port() -> int:
    """A port nothing listens on now (tests may run in parallel workers: no fixed ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc, *args, timeout=900):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RLHF_NO_PROGRESS="1",
               PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "rlhf", *map(str, args)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), "-m", "rlhf", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def _final(out):
    s = json.loads((out / "summary.json").read_text())
    train = [json.loads(l) for l in open(out / "metrics.jsonl") if '"loss"' in l]
    return s, train[-1]["loss"]


SFT = ["sft", "recipes/tiny/sft.yaml", "--train.max_steps", "8", "--train.micro_batch_size", "16",
       "--gen_eval_samples", "8", "--train.log_every", "4"]


@pytest.fixture(scope="module")
def sft_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "sft1"
    _launch(1, *SFT, "--output_dir", out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "zero3_offload"])
def test_sft_two_processes_agree_with_one(tmp_path, sft_one, engine):
    out = tmp_path / engine
    extra = [] if engine == "ddp" else ["--train.deepspeed", f"recipes/deepspeed/{engine}.json"]
    p = _launch(2, *SFT, "--output_dir", out, *extra)
    # one voice per job: one summary, INFO lines from the main process only, no progress bars elsewhere
    assert p.stdout.count('"stage": "sft"') == 1
    assert p.stderr.count("INFO rlhf.stages.sft: SFT:") == 1
    assert not [line for line in p.stderr.splitlines() if "[rank 1]" in line and " INFO " in line]
    assert "Loading weights" not in p.stderr or p.stderr.count("Loading weights: 100%") <= 1
    s1, loss1 = _final(sft_one)
    s2, loss2 = _final(out)
    assert s2["num_processes"] == 2 and s2["steps"] == s1["steps"] == 8
    assert s2["initial_eval_loss"] == pytest.approx(s1["initial_eval_loss"], rel=1e-6)  # same initial weights
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == s1["parameters"]


@pytest.mark.slow
def test_dpo_two_processes_agree_with_one_when_the_pairs_leave_a_partial_batch(tmp_path, sft_one):
    """67 pairs at a batch of 8: the last 3 pairs were a ninth step whose gradient depended on how
    they split over the processes (loss 0.6885 on one, 0.6889 on two). DPO drops the partial batch
    as SFT and RM do: 8 steps either way, the same losses; fewer pairs than one batch is one line."""
    import yaml

    rows = (ROOT / "recipes/tiny/data/prefs.jsonl").read_text().splitlines(keepends=True)[:67]
    (tmp_path / "p67.jsonl").write_text("".join(rows))
    (tmp_path / "p3.jsonl").write_text("".join(rows[:3]))
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(sft_one)}, "data": {"train": str(tmp_path / "p67.jsonl"), "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-4, "log_every": 1}}))
    losses = {}
    for n in (1, 2):
        out = tmp_path / f"dpo{n}"
        _launch(n, "dpo", recipe, "--output_dir", out)
        s = json.loads((out / "summary.json").read_text())
        assert s["steps"] == 8 and s["train_pairs"] == 67, s
        losses[n] = [json.loads(l)["loss"] for l in open(out / "metrics.jsonl") if '"loss"' in l]
    assert len(losses[1]) == 8 and losses[2] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "rlhf", "dpo", str(recipe), "--data.train", str(tmp_path / "p3.jsonl"),
                        "--output_dir", str(tmp_path / "few")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 2 and "'train.batch_size' (8) is more than the 3 preference pairs: not one full batch" \
        in p.stderr and not (tmp_path / "few").exists(), p.stderr[-2000:]


@pytest.mark.slow
def test_held_out_evaluation_under_zero3_with_an_uneven_split(tmp_path):
    """9 held-out rows on 2 processes in micro-batches of 4: one process runs 2 forwards, the other
    1. Under ZeRO-3 every forward gathers the weights collectively (persistence threshold 0: the
    tiny model's layers are below the recipe's 1e5), so the process with fewer forwards must run
    filler ones or both hang; the fillers count for nothing (the loss equals 1 process's)."""
    cfg = json.loads((ROOT / "recipes/deepspeed/zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(cfg))
    rows = (ROOT / "recipes/tiny/data/sft.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[:9]) + "\n")
    args = [*SFT, "--train.max_steps", "2", "--train.micro_batch_size", "4", "--gen_eval_samples", "0",
            "--data.eval", tmp_path / "eval.jsonl"]
    _launch(1, *args, "--output_dir", tmp_path / "one", timeout=300)
    _launch(2, *args, "--output_dir", tmp_path / "two", "--train.deepspeed", tmp_path / "zero3.json", timeout=300)
    (s1, _), (s2, _) = _final(tmp_path / "one"), _final(tmp_path / "two")
    assert s2["num_processes"] == 2
    assert s2["initial_eval_loss"] == pytest.approx(s1["initial_eval_loss"], rel=1e-6)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_sft_under_the_deepspeed_launcher_agrees_with_one_process(tmp_path, sft_one):
    """`deepspeed --num_gpus 2 --module rlhf ...` (the launcher adds --local_rank=N to each process)."""
    import shutil

    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher script is not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    p = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                        "rlhf", *SFT, "--train.deepspeed", "recipes/deepspeed/zero2.json", "--output_dir",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "DeepSpeed ZeRO-2 on 2 processes" in p.stdout + p.stderr
    (s1, loss1), (s2, loss2) = _final(sft_one), _final(tmp_path / "o")
    assert s2["num_processes"] == 2 and loss2 == pytest.approx(loss1, rel=1e-4)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)


def RM_ARGS(sft):
    return ["rm", "recipes/tiny/rm.yaml", "--model.name_or_path", sft, "--train.max_steps", "6",
            "--train.micro_batch_size", "8", "--sample.checkpoint", sft, "--sample.max_prompts", "8",
            "--train.log_every", "3"]


@pytest.mark.slow
def test_rm_and_ppo_under_ddp_and_rm_under_zero3(tmp_path, sft_one, rm_one):
    rm_args = RM_ARGS(sft_one)
    (tmp_path / "rm1").symlink_to(rm_one)
    _launch(2, *rm_args, "--output_dir", tmp_path / "rm2")
    _launch(2, *rm_args, "--output_dir", tmp_path / "rm3", "--train.deepspeed", "recipes/deepspeed/zero3.json")
    (s1, l1), (s2, l2), (s3, l3) = (_final(tmp_path / d) for d in ("rm1", "rm2", "rm3"))
    for s, l in ((s2, l2), (s3, l3)):
        assert s["num_processes"] == 2
        assert l == pytest.approx(l1, rel=1e-4)
        assert s["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)
        assert s["reward_bias"] == pytest.approx(s1["reward_bias"], rel=1e-4, abs=1e-5)
    ppo_args = ["ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", sft_one, "--reward_model", tmp_path / "rm1",
                "--steps", "2", "--rollout_batch_size", "16", "--minibatch_size", "8", "--eval_samples", "16"]
    _launch(1, *ppo_args, "--output_dir", tmp_path / "ppo1")
    _launch(2, *ppo_args, "--output_dir", tmp_path / "ppo2")
    p1 = json.loads((tmp_path / "ppo1" / "summary.json").read_text())
    p2 = json.loads((tmp_path / "ppo2" / "summary.json").read_text())
    assert p1["optimizer_steps"] == p2["optimizer_steps"]
    # before training both evaluate the same policy on the same prompts with the same seed
    assert p2["initial_eval_reward"] == pytest.approx(p1["initial_eval_reward"], rel=1e-5)
    m = [json.loads(l) for l in open(tmp_path / "ppo2" / "metrics.jsonl") if '"pg_loss"' in l]
    assert len(m) == 2 and all(r["tokens_generated"] > 0 for r in m)


@pytest.mark.slow
def test_ppo_two_processes_from_config_with_prompts_without_gold(tmp_path, sft_one):
    """2 processes whose rollouts differ in having the gold task fields (some prompts are plain
    questions): every process reduces the same metrics in the same order (a mismatch pairs
    unrelated values and then hangs); the policy made from a config starts with the same weights
    on both (the reference equals the policy: KL exactly 0 before any update); tokens_generated
    counts both processes' tokens; rewards are whitened over the whole batch."""
    rows = (ROOT / "recipes/tiny/data/rl_prompts.jsonl").read_text().splitlines()[:30]
    rows += [json.dumps({"prompt": "Say something."}), json.dumps({"prompt": "Count to three."})]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "reward.py").write_text("def length(prompts, completions, **fields):\n"
                                        "    return [len(c) / 10 for c in completions]\n")
    arch = ("{model_type: llama, hidden_size: 64, intermediate_size: 256, num_hidden_layers: 2, "
            "num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 64, tie_word_embeddings: true}")
    out = tmp_path / "ppo"
    _launch(2, "ppo", "recipes/tiny/ppo.yaml", "--model", f"{{init: from_config, arch: {arch}, tokenizer: {sft_one}}}",
            "--reward_model", "null", "--reward_fns", f"[{{fn: '{tmp_path / 'reward.py'}:length'}}]",
            "--value_init", "policy", "--data.train", tmp_path / "train.jsonl", "--steps", "4",
            "--rollout_batch_size", "16", "--minibatch_size", "8", "--eval_samples", "8", "--whiten_rewards", "true",
            "--old_logprobs", "recompute",  # (old log-probs from the same pass as the reference's: KL exactly 0)
            "--output_dir", out, timeout=300)
    m = [json.loads(l) for l in open(out / "metrics.jsonl") if '"pg_loss"' in l]
    assert len(m) == 4 and m[0]["kl"] == 0.0
    assert all(r["tokens_generated"] == round(r["response_length"] * 16) for r in m)
    assert any("gold_accuracy" not in r for r in m)  # some rollout held a prompt without gold fields


def _failing_on_two(*args) -> subprocess.CompletedProcess:
    """`rlhf ARGS` on 2 CPU processes under torchrun, expected to fail: its exit status is not checked."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "rlhf", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
def test_an_rm_judge_failing_in_the_sampling_stops_every_process_with_its_message(tmp_path, sft_one):
    """The RM stage samples its rankings on process 0: a judge raising there left process 1 in a
    collective, which then said only that a peer had gone. Now it points at process 0's error, as
    PPO's reward functions do."""
    (tmp_path / "j.py").write_text("def j(prompts, completions, **fields):\n"
                                   "    if len(completions) > 4:  # (not in the 4-sample check before the run)\n"
                                   "        raise ValueError('judge broke')\n"
                                   "    return [float(len(c)) for c in completions]\n")
    p = _failing_on_two(*RM_ARGS(sft_one), "--sample.judge", f"{tmp_path / 'j.py'}:j", "--output_dir", tmp_path / "rm")
    assert p.returncode != 0 and "raised ValueError: judge broke" in p.stderr, p.stderr[-3000:]
    assert "[rank 1] the RM's sampling (sample:) failed on another process" in p.stderr, p.stderr[-3000:]
    assert "Connection closed" not in p.stderr and not (tmp_path / "rm").exists()


@pytest.mark.slow
def test_a_gold_reward_failing_on_one_process_stops_every_process_with_its_message(tmp_path, sft_one):
    """A held-out gold reward that raises on process 1 only (its own rollouts): both processes stop
    at once with the error (process 0 pointing at process 1), not process 0 left in a collective
    until the launcher kills it."""
    (tmp_path / "gold.py").write_text(
        "import os\n\ndef g(prompts, completions, **fields):\n"
        "    if os.environ.get('RANK') == '1' and len(completions) == 8:\n"
        "        raise ValueError('gold broke on rank 1')\n"
        "    return [0.0] * len(completions)\n")
    args = ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", sft_one, "--gold_reward_fns",
            f"[{{fn: '{tmp_path / 'gold.py'}:g'}}]", "--steps", "2", "--rollout_batch_size", "16", "--minibatch_size",
            "8", "--eval_samples", "4", "--output_dir", tmp_path / "ppo"]
    p = _failing_on_two(*args)
    assert p.returncode != 0
    assert "raised ValueError: gold broke on rank 1" in p.stderr
    assert "a reward function failed on another process" in p.stderr, p.stderr[-3000:]
    # the same at the check before the run (process 0 had gone on into DDP's setup and died of a
    # gloo "Connection closed by peer" traceback)
    (tmp_path / "gold.py").write_text(
        "import os\n\ndef g(prompts, completions, **fields):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise ValueError('gold broke on rank 1')\n"
        "    return [0.0] * len(completions)\n")
    p = _failing_on_two(*args)
    assert p.returncode != 0 and "[at the check before the run" in p.stderr
    assert "a reward function, or a check of the inputs, failed on another process" in p.stderr, p.stderr[-3000:]
    assert "Connection closed" not in p.stderr


@pytest.fixture(scope="module")
def rm_one(sft_one):
    out = sft_one.parent / "rm1"
    _launch(1, *RM_ARGS(sft_one), "--output_dir", out)
    return out


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _max_diff(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


PPO_DS = ["ppo", "recipes/tiny/ppo.yaml", "--steps", "2", "--rollout_batch_size", "16", "--minibatch_size", "8",
          "--micro_batch_size", "4", "--eval_samples", "16", "--ema_decay", "0.5"]


@pytest.mark.slow
def test_ppo_under_zero2_and_zero3_with_sharded_reference_and_rm(tmp_path, sft_one, rm_one):
    """Policy and value as one DeepSpeed engine on 2 processes, the frozen reference and RM as
    ZeRO-3 inference engines (sharded, or offloaded to CPU memory). ZeRO-3 (policy gathered once
    per rollout, EMA kept per partition) reproduces ZeRO-2 with whole frozen models; offloading
    the frozen models changes nothing; all start from DDP's evaluation (same seeds and weights)
    and differ from DDP later only through DeepSpeed's clipping of the joint policy+value norm."""
    args = [*PPO_DS, "--model.name_or_path", sft_one, "--reward_model", rm_one]
    runs = {"ddp": [], "zero2": ["--deepspeed", "recipes/deepspeed/zero2.json"],
            "zero3": ["--deepspeed", "recipes/deepspeed/zero3.json"],
            "zero2_offload": ["--deepspeed", "recipes/deepspeed/zero2.json", "--frozen_models", "offload"]}
    summary = {}
    for name, extra in runs.items():
        p = _launch(2, *args, "--output_dir", tmp_path / name, *extra)
        if name != "ddp":
            assert f"DeepSpeed ZeRO-{name[4]} on 2 processes" in p.stderr
        frozen = {"zero3": "sharded", "zero2_offload": "offloaded to CPU"}.get(name)
        for model in ("LlamaForCausalLM", "LlamaForSequenceClassification"):  # reference, RM
            line = f"frozen {model}: ZeRO-3 {frozen}, 74"
            assert (line in p.stderr) == (frozen is not None), (name, model)
        if name == "zero3":  # no process ever held a whole model
            assert "read straight into partitions: policy, reference, RM, value model; loaded whole" in p.stderr
        summary[name] = json.loads((tmp_path / name / "summary.json").read_text())
    for name in ("zero2", "zero3", "zero2_offload"):
        assert summary[name]["initial_eval_reward"] == pytest.approx(summary["ddp"]["initial_eval_reward"], abs=1e-6)
        assert summary[name]["optimizer_steps"] == summary["ddp"]["optimizer_steps"]
    moved = _max_diff(tmp_path / "zero2" / "model.safetensors", sft_one / "model.safetensors")
    assert moved > 1e-5  # the policy trained
    for name in ("zero3", "zero2_offload"):
        for k in ("eval_reward", "eval_kl"):
            assert summary[name][k] == pytest.approx(summary["zero2"][k], rel=1e-4, abs=1e-5), (name, k)
        for f in ("model.safetensors", "ema/model.safetensors"):  # consolidated policy and EMA
            assert _max_diff(tmp_path / name / f, tmp_path / "zero2" / f) < 1e-3 * moved, (name, f)
    assert _max_diff(tmp_path / "zero3" / "ema/model.safetensors", tmp_path / "zero3" / "model.safetensors") > 0


def _kill_resume_2proc(tmp_path, args, fault):
    """2-process run vs the same run SIGKILLed at `fault` and resumed: bit-identical weights."""
    _launch(2, *args, "--output_dir", tmp_path / "full")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RLHF_NO_PROGRESS="1",
               PYTHONPATH=str(ROOT), RLHF_FAULT=fault)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "rlhf", *map(str, args), "--output_dir",
                        str(tmp_path / "cut")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
                       check=False)
    assert p.returncode != 0 and not (tmp_path / "cut" / "summary.json").exists(), p.stderr[-2000:]
    _launch(2, *args, "--output_dir", tmp_path / "cut", "--resume")
    return tmp_path / "full", tmp_path / "cut"


def _metrics(path):
    timing = ("time", "tokens_per_s", "mfu", "peak_tflops")
    return [{k: v for k, v in json.loads(l).items() if not k.startswith(timing)} for l in open(path)]


@pytest.mark.slow
def test_sft_under_zero2_kill9_mid_checkpoint_resumes_exactly(tmp_path):
    args = [*SFT, "--train.save_every", "3", "--train.log_every", "2", "--train.deepspeed",
            "recipes/deepspeed/zero2.json"]
    full, cut = _kill_resume_2proc(tmp_path, args, "checkpoint:2")  # killed while writing step 6
    assert (cut / "checkpoints" / "step-00000008" / "model").is_dir()  # the engine's own (sharded) checkpoint
    assert _max_diff(full / "model.safetensors", cut / "model.safetensors") == 0
    assert _metrics(full / "metrics.jsonl") == _metrics(cut / "metrics.jsonl")


@pytest.mark.slow
def test_ppo_under_zero3_kill9_resumes_exactly_and_refuses_another_process_count(tmp_path, sft_one, rm_one):
    args = [*PPO_DS, "--steps", "4", "--model.name_or_path", sft_one, "--reward_model", rm_one, "--save_every", "1",
            "--deepspeed", "recipes/deepspeed/zero3.json"]
    full, cut = _kill_resume_2proc(tmp_path, args, "step:2")
    ckpt = cut / "checkpoints" / "step-00000004"
    assert {"engine", "ema-rank0.safetensors", "ema-rank1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    for f in ("model.safetensors", "ema/model.safetensors"):
        assert _max_diff(full / f, cut / f) == 0, f
    assert _metrics(full / "metrics.jsonl") == _metrics(cut / "metrics.jsonl")
    # a sharded checkpoint resumes only on the process count that wrote it
    (cut / "summary.json").unlink()
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "rlhf", *map(str, args), "--output_dir", str(cut), "--resume"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, check=False)
    assert p.returncode == 2 and "a DeepSpeed checkpoint written by 2 processes cannot resume on 1" in p.stderr, \
        p.stderr[-2000:]
    assert (ckpt / "engine").is_dir()  # untouched


@pytest.mark.slow
def test_nonfinite_loss_under_deepspeed_never_reaches_the_weights(tmp_path, sft_one, rm_one):
    """Under DeepSpeed the engine steps inside backward; a NaN loss must still not update: the
    engine skips the step (its non-finite norm check), the guard reads `was_step_applied` and
    counts it, and the schedule and EMA do not move."""
    args = [*PPO_DS, "--model.name_or_path", sft_one, "--reward_model", rm_one, "--deepspeed",
            "recipes/deepspeed/zero2.json", "--output_dir", tmp_path / "nan"]
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT), RLHF_FAULT="nan:1")
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "rlhf", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DeepSpeed ZeRO-2 on 1 processes" in p.stderr
    s = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert s["skipped_nonfinite_steps"] == 1
    for f in ("model.safetensors", "ema/model.safetensors"):
        assert all(w.isfinite().all() for w in _weights(tmp_path / "nan" / f).values()), f
    m = [json.loads(l) for l in open(tmp_path / "nan" / "metrics.jsonl") if '"pg_loss"' in l]
    assert "grad_norm_joint" in m[0] and "policy_grad_norm" not in m[0]  # DeepSpeed clips policy + value jointly


@pytest.mark.slow
def test_a_cpu_launch_without_accelerate_use_cpu_is_one_line_per_rank(tmp_path):
    """torchrun of 2 processes on a machine without a GPU and without ACCELERATE_USE_CPU: accelerate
    set up no process group (DistributedType.NO on 2 processes) and rank 1 died of an
    AttributeError. Now each rank says what to set, and nothing is written."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    for k in ("ACCELERATE_USE_CPU", "WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "rlhf", *SFT, "--output_dir", tmp_path / "out"]
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    said = "a launcher started 2 processes (WORLD_SIZE), but accelerate set up no process group " \
           "for them: on a machine without a GPU, launch with ACCELERATE_USE_CPU=1 torchrun ..."
    assert p.returncode != 0 and p.stderr.count(said) == 2, p.stderr[-3000:]  # (the two lines may interleave)
    assert "rlhf sft: error: [rank 1] a launcher" in p.stderr  # (each line names its process, as its log does)
    assert "AttributeError" not in p.stderr and not (tmp_path / "out").exists()


PIPE = ["pipeline", "recipes/tiny/pipeline.yaml", "--sft.train.max_steps", "2", "--sft.gen_eval_samples", "4",
        "--rm.train.max_steps", "2", "--rm.sample.max_prompts", "8", "--ppo.steps", "1", "--ppo.rollout_batch_size", "8",
        "--ppo.minibatch_size", "4", "--ppo.micro_batch_size", "2", "--ppo.ppo_epochs", "1", "--ppo.eval_samples", "4",
        "--ppo.sample_every", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,engines", [
    (1, {"sft": "zero3"}),  # DeepSpeed first in one process: "Default process group has not been initialized"
    (1, {"rm": "zero3"}),   # a stage without DeepSpeed after one with it: "no attribute 'mixed_precision'"
    (2, {"ppo": "zero3"}),  # ZeRO-3 after DDP stages: zero.Init saw 1 process, "train_batch_size is not equal ..."
])
def test_a_pipeline_switches_engines_between_stages(tmp_path, nproc, engines):
    """docs/scaling.md: a pipeline may mix engines per stage. Each of these failed at the stage
    after the switch, once the earlier stages had trained (and so did --resume of them)."""
    keys = {"sft": "--sft.train.deepspeed", "rm": "--rm.train.deepspeed", "ppo": "--ppo.deepspeed"}
    ds = [a for stage, e in engines.items() for a in (keys[stage], f"recipes/deepspeed/{e}.json")]
    _launch(nproc, *PIPE, *ds, "--output_dir", tmp_path / "p")
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["stages"] == ["sft", "rm", "ppo"] and s["ppo"]["steps"] == 1


@pytest.mark.slow
def test_a_deepspeed_checkpoint_resumed_under_another_layout_is_one_line(tmp_path):
    """A ZeRO-3 checkpoint resumed under ZeRO-2, with optimizer offload switched on, or with a
    changed layer width: a bare AssertionError from DeepSpeed's loader, a KeyError at the first
    step after resuming, and a tensor-size RuntimeError. Each is one line now; the run stays
    resumable with the JSON and recipe that wrote it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    args = [sys.executable, "-m", "rlhf", *SFT, "--train.save_every", "2", "--output_dir", str(tmp_path / "k")]
    z3 = ["--train.deepspeed", "recipes/deepspeed/zero3.json"]
    p = subprocess.run(args + z3, capture_output=True, text=True, cwd=ROOT, env=dict(env, RLHF_FAULT="step:3"),
                       timeout=600)
    assert p.returncode != 0 and (tmp_path / ".k.staging" / "checkpoints" / "step-00000002").exists(), p.stderr[-2000:]
    for extra, said in [
            (["--train.deepspeed", "recipes/deepspeed/zero2.json"], "written under ZeRO-3 (offload_optimizer: none, "
             "offload_param: none), resumed under ZeRO-2 (offload_optimizer: none, offload_param: none)"),
            (["--train.deepspeed", "recipes/deepspeed/zero3_offload.json"], "resumed under ZeRO-3 (offload_optimizer: "
             "cpu, offload_param: cpu); resume with the DeepSpeed JSON that wrote it"),
            (z3 + ["--model.arch.intermediate_size", "128"], "does not match this run's models (The size of tensor")]:
        p = subprocess.run(args + extra + ["--resume"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        err = [line for line in p.stderr.splitlines() if "error:" in line]
        assert p.returncode == 2 and len(err) == 1 and said in err[0] and "Traceback" not in p.stderr, p.stderr[-3000:]
    p = subprocess.run(args + z3 + ["--resume"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0 and json.loads((tmp_path / "k" / "summary.json").read_text())["steps"] == 8, p.stderr[-2000:]


@pytest.mark.slow
def test_a_model_dtype_zero3_does_not_train_in_is_warned_of(tmp_path):
    """Under ZeRO-3 DeepSpeed partitions the weights in its own precision: `model.dtype: bfloat16`
    with mixed_precision off trained and saved fp32 (twice the weight memory) without a word."""
    p = _launch(1, "sft", "recipes/tiny/sft.yaml", "--train.max_steps", "1", "--gen_eval_samples", "0",
                "--train.deepspeed", "recipes/deepspeed/zero3.json", "--model.dtype", "bfloat16",
                "--output_dir", tmp_path / "o")
    assert "model.dtype bfloat16 is not what ZeRO-3 trains in: DeepSpeed partitions the weights in float32" in \
        p.stderr and "set mixed_precision: bf16 for bfloat16 weights" in p.stderr


@pytest.mark.slow
def test_a_disk_that_fills_during_a_zero3_checkpoint_is_one_line_per_process(tmp_path):
    """DeepSpeed's engine saves with torch.save to a file name: a full disk was "basic_ios::clear:
    iostream error" on one process and a gloo "Connection closed by peer" traceback on the other,
    with no resume advice. Now the process that met the disk names it, the other says it stopped
    with it, and the run stays resumable (a 3 MB tmpfs; skipped where it cannot be mounted)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3000K", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "rlhf", "sft", "recipes/tiny/sft.yaml", "--train.max_steps", "4",
               "--train.save_every", "1", "--train.save_total_limit", "5", "--gen_eval_samples", "4",
               "--data.eval_split", "0.01", "--train.deepspeed", "recipes/deepspeed/zero3.json",
               "--output_dir", str(small / "out")]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        err = [line for line in p.stderr.splitlines() if "rlhf sft: error:" in line]
        assert p.returncode != 0 and "No space left on device (ENOSPC)" in p.stderr, p.stderr[-3000:]
        # (no traceback of ours: torch's writer error and gloo's are each read into one line; the launcher's own
        # ChildFailedError traceback follows any failed worker)
        assert not any(line.startswith(("RuntimeError", "torch.distributed.DistBackendError"))
                       for line in p.stderr.splitlines()) and "basic_ios" not in p.stderr, p.stderr[-3000:]
        assert (small / ".out.staging" / "checkpoints" / "step-00000001").is_dir(), err  # (resumable from it)
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)

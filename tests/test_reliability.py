"""kill -9 and exact resume for each stage, malformed input table, non-finite guard, safe loading."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

from rlhf.rundir import staging_path


def _rlhf(*args, env_extra=None, check=True):
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    env.pop("RLHF_FAULT", None)
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, "-m", "rlhf", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-3000:]}")
    return p


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


TIMING = ("time", "tokens_per_s", "mfu", "peak_tflops")  # wall-clock measurements differ run to run


def _metrics(path):
    return [{k: v for k, v in json.loads(l).items() if not k.startswith(TIMING)} for l in open(path)]


def _assert_same_run(a: Path, b: Path, files=("model.safetensors",)):
    for f in files:
        wa, wb = _weights(a / f), _weights(b / f)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{f}:{k} differs"
    assert _metrics(a / "metrics.jsonl") == _metrics(b / "metrics.jsonl")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for k in sa:
        if k not in ("train_seconds", "peak_rss_mb", "peak_gpu_mb"):  # measurements of this process
            assert sa[k] == sb[k], k


def _kill_and_resume(tmp_path, args, total_steps, save_every, files=("model.safetensors",)):
    """Uninterrupted run vs a run SIGKILLed at a random point (after a step, or in the middle of
    writing a checkpoint) and resumed with --resume: bit-identical weights, same metrics."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    _rlhf(*args, "--output_dir", full)
    seed = int(os.environ.get("RLHF_TEST_SEED", "0"))  # the kill point reproduces: RLHF_TEST_SEED=N to vary it
    rng = random.Random(seed)
    if rng.random() < 0.5:
        fault = f"step:{rng.randint(1, total_steps - 1)}"
    else:
        fault = f"checkpoint:{rng.randint(1, total_steps // save_every)}"
    print(f"fault injected: {fault} (RLHF_TEST_SEED={seed})")
    p = _rlhf(*args, "--output_dir", cut, env_extra={"RLHF_FAULT": fault}, check=False)
    assert p.returncode == -9, (seed, fault, p.returncode, p.stderr[-2000:])  # killed by SIGKILL
    assert not (cut / "summary.json").exists()
    _rlhf(*args, "--output_dir", cut, "--resume")
    _assert_same_run(full, cut, files)


@pytest.mark.slow
def test_sft_kill9_resume_is_exact(tmp_path):
    args = ["sft", "recipes/tiny/sft.yaml", "--train.max_steps", "24", "--train.save_every", "5",
            "--train.log_every", "3", "--gen_eval_samples", "8"]
    _kill_and_resume(tmp_path, args, 24, 5)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "sft"
    _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "40", "--gen_eval_samples", "8")
    return out


@pytest.mark.slow
def test_rm_kill9_resume_is_exact(tmp_path, tiny_sft):
    args = ["rm", "recipes/tiny/rm.yaml", "--model.name_or_path", tiny_sft, "--sample.checkpoint", tiny_sft,
            "--sample.max_prompts", "16", "--train.max_steps", "20", "--train.save_every", "4",
            "--train.log_every", "3"]
    _kill_and_resume(tmp_path, args, 20, 4)


@pytest.mark.slow
def test_ppo_kill9_resume_is_exact(tmp_path, tiny_sft):
    args = ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", tiny_sft, "--steps", "8",
            "--save_every", "2", "--rollout_batch_size", "16", "--eval_samples", "16", "--sample_every", "3",
            "--ema_decay", "0.9", "--ptx_coef", "0.1", "--ptx_data", "recipes/tiny/data/sft.jsonl",
            "--adaptive_kl", "true", "--scale_reward", "running_std"]
    _kill_and_resume(tmp_path, args, 8, 2, files=("model.safetensors", "ema/model.safetensors"))


@pytest.mark.slow
def test_checkpoints_are_kept_k_and_never_half_written(tmp_path):
    out = tmp_path / "run"
    p = _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "12", "--train.save_every", "2",
              "--train.save_total_limit", "2", "--gen_eval_samples", "4", env_extra={"RLHF_FAULT": "checkpoint:4"},
              check=False)
    assert p.returncode == -9 and not out.exists()  # a new run lives in its staging folder until it finishes
    staged = staging_path(out)
    ckpts = sorted(d.name for d in (staged / "checkpoints").iterdir())
    # step 8's checkpoint was being written: its temporary folder is there, the last complete ones are intact
    assert ckpts == [".tmp-step-00000008", "step-00000004", "step-00000006"], ckpts
    for d in ("step-00000004", "step-00000006"):
        assert (staged / "checkpoints" / d / "state.json").exists()
    _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "12", "--train.save_every", "2",
          "--train.save_total_limit", "2", "--gen_eval_samples", "4", "--resume")
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-00000010", "step-00000012"]


def test_only_a_damaged_checkpoint_is_called_damaged(tmp_path):
    """The advice to delete a checkpoint is for damage only. A checkpoint of other models (the
    recipe changed: every older one would fail too) says to restore the recipe; an error that is
    neither (out of memory, a bug) propagates as it is."""
    from safetensors import SafetensorError

    from rlhf.checkpoint import _unrestorable

    ckpt = tmp_path / "checkpoints" / "step-00000004"
    damaged = _unrestorable(SafetensorError("invalid header length"), ckpt, tmp_path)
    assert "damaged, cannot be restored" in str(damaged) and "delete this checkpoint folder" in str(damaged)
    other = _unrestorable(RuntimeError("Error(s) in loading state_dict for LlamaForCausalLM: Missing key(s)"), ckpt,
                          tmp_path)
    assert "does not match this run's models" in str(other) and "delete" not in str(other)
    assert _unrestorable(torch.OutOfMemoryError("CUDA out of memory"), ckpt, tmp_path) is None


def test_damaged_run_files_are_named_not_tracebacks(tmp_path):
    """A run folder's own files, damaged or edited: a state.json of another shape is a damaged
    checkpoint; a file manager's copy of a checkpoint folder is not a checkpoint; a metrics line
    that is JSON but not a record is named by its line (resume and report read it)."""
    from types import SimpleNamespace

    from rlhf.checkpoint import CheckpointParts, _unrestorable, list_checkpoints, load_checkpoint, save_checkpoint
    from rlhf.errors import RunError
    from rlhf.textio import log_records

    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    model = torch.nn.Linear(2, 2)
    ckpt = save_checkpoint(acc, tmp_path, 2, CheckpointParts({"model": model}), state={})
    shutil.copytree(ckpt, ckpt.with_name(ckpt.name + " copy"))
    assert list_checkpoints(tmp_path) == [ckpt]
    for text in ("[1, 2]", '{"step": "2"}'):
        (ckpt / "state.json").write_text(text)
        with pytest.raises(Exception) as e:
            load_checkpoint(acc, ckpt, CheckpointParts({"model": model}))
        assert "damaged, cannot be restored (DamagedCheckpoint: state.json holds no checkpoint state" in \
            str(_unrestorable(e.value, ckpt, tmp_path))
    for line, what in (("[1, 2]", "a JSON list"), ('{"step": "x"}', "'step' is 'x'")):
        (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1}}\n{line}\n{{"step": 3}}\n')
        with pytest.raises(RunError, match=rf"metrics\.jsonl:2: not a record of this log \({re.escape(what)}"):
            log_records(tmp_path / "metrics.jsonl", RunError)


def test_imports_and_returns_a_reward_module_cannot_use_are_one_line(tmp_path, monkeypatch):
    """A reward module that calls sys.exit when imported (a script's main() without a __main__
    guard: before, rlhf exited with its status, 0 included, having run nothing), a builtin given
    as the function, and an integer too large for a float: each a RewardError naming it."""
    from rlhf.errors import RewardError
    from rlhf.rewards import call_reward_fn, load_reward_fn

    script = tmp_path / "script.py"
    script.write_text("import sys\ndef r(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
                      "sys.exit(0)\n")
    with pytest.raises(RewardError, match=r"importing .*script\.py called sys\.exit\(0\); guard"):
        load_reward_fn(f"{script}:r")
    fn = load_reward_fn("builtins:print")
    with pytest.raises(RewardError, match=r"reward function 'builtins:print' raised TypeError"):
        call_reward_fn(fn, ["p"], ["c"], {"task": ["x"]})
    with pytest.raises(RewardError, match=r"returned an integer of 1329 bits for sample 0, too large for a float"):
        call_reward_fn(lambda prompts, completions, **kw: [10**400], ["p"], ["c"], {})


def test_a_reward_function_sees_copies_and_its_values_must_fit_float32(tok):
    """A reward function that edits its arguments in place (normalises the completions, pops the
    list, changes a prompt's messages or a field) changes nothing the run holds: before, later reward
    functions, the gold check and samples.jsonl read the edited texts, and a consumed list read as a
    wrong count. A value finite in float64 but not in float32 (1e39), or a weight x value that
    overflows, is a RewardError naming it: before, the rewards became inf and every step was skipped."""
    from rlhf.data.formats import PromptExample
    from rlhf.errors import RewardError
    from rlhf.rewards import call_reward_fn
    from rlhf.rollout import Generation
    from rlhf.stages.ppo import Rollout, sequence_scores

    prompts = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    completions, fields = ["a", "b"], {"answer": [["1"], ["2"]]}

    def rude(prompts, completions, **kw):
        completions[0] = "XX"
        prompts[0][0]["content"] = "edited"
        kw["answer"][1].append("3")
        values = []
        while completions:
            values.append(float(len(completions.pop())))
        return values

    assert call_reward_fn(rude, prompts, completions, fields) == [1.0, 2.0]
    assert completions == ["a", "b"] and prompts[0][0]["content"] == "q1" and fields["answer"][1] == ["2"]
    with pytest.raises(RewardError, match=r"returned 1e\+39 for sample 1, outside float32's range"):
        call_reward_fn(lambda p, c, **kw: [0.0, 1e39], prompts, completions, fields)

    gen = Generation(prompt_ids=torch.tensor([[5], [6]]), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                     response_ids=torch.tensor([[8], [9]]), response_mask=torch.ones(2, 1, dtype=torch.long),
                     has_eos=torch.tensor([False, False]))
    ro = Rollout(gen, [PromptExample(p, {}, p[0]["content"]) for p in prompts], completions)

    class Spec:
        fn, weight = "big.py:r", 1e30

    big = (Spec(), lambda p, c, **kw: [1.0, 1e10])
    with pytest.raises(RewardError, match=r"the reward of sample 1 is inf, the weighted sum of reward_fn/big.py:r "
                                          r"1e\+10 .*outside float32's range"):
        sequence_scores(ro, tok, None, [big], 1.0, 0.0, "cpu")
    Spec.weight = 1.0
    score, parts = sequence_scores(ro, tok, None, [big], 1.0, 0.0, "cpu")
    assert score.tolist() == [1.0, 1e10]


@pytest.mark.slow
def test_eval_names_the_checkpoint_a_reward_function_fails_on_and_keeps_the_ones_before(tmp_path, capsys,
                                                                                        sft_checkpoint, task_dir):
    """rlhf eval of two checkpoints, a reward function that raises on the second one's samples:
    before, one line naming neither the checkpoint nor the row, and the first checkpoint's finished
    evaluation thrown away. Now the checkpoint and the row are named and the first one's table is
    printed."""
    f = tmp_path / "r.py"
    f.write_text("CALLS = []\n"
                 "def r(prompts, completions, **kw):\n"
                 "    CALLS.append(1)\n"
                 "    if len(CALLS) > 2:  # the dry call, then the first checkpoint's samples\n"
                 "        raise ValueError('cannot parse this completion')\n"
                 "    return [0.0] * len(completions)\n")
    second = tmp_path / "second"
    import shutil

    shutil.copytree(sft_checkpoint, second)
    from rlhf.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in ("eval", sft_checkpoint, second, "--prompts", task_dir / "eval_prompts.jsonl",
                                "--max_samples", "4", "--max_new_tokens", "4", "--reward_fn", f"{f}:r")])
    stdout, stderr = capsys.readouterr()
    assert rc == 2 and "Traceback" not in stderr
    assert str(sft_checkpoint) in stdout and "eos_rate" in stdout and str(second) not in stdout, stdout
    assert re.search(rf"error: {re.escape(str(second))}: reward function '.*r\.py:r' raised ValueError: cannot parse "
                     rf"this completion on a batch of 4 samples \(first row .*eval_prompts\.jsonl:1\).*\(the results of "
                     rf"{re.escape(str(sft_checkpoint))}, evaluated before it, are printed above\)", stderr), stderr


def test_reward_fields_are_every_rows_columns_whatever_row_comes_first(tok):
    """fields were the columns of a batch's first row: a batch whose first row lacked `answer` gave
    the rows that had one no `answer` (rewards decided by row order: 0.00 against 0.95 in rlhf eval)."""
    from rlhf.data.formats import PromptExample
    from rlhf.rewards import reward_fields
    from rlhf.rollout import Generation
    from rlhf.stages.ppo import Rollout, sequence_scores

    rows = [PromptExample([{"role": "user", "content": "q"}], meta, "q")
            for meta in ({}, {"answer": "1", "task": "sort"}, {"task": "sort", "answer": "2", "extra": 5})]
    assert reward_fields(rows) == {"answer": [None, "1", "2"], "task": [None, "sort", "sort"], "extra": [None, None, 5]}
    seen = []
    gen = Generation(prompt_ids=torch.tensor([[5]] * 3), prompt_mask=torch.ones(3, 1, dtype=torch.long),
                     response_ids=torch.tensor([[8]] * 3), response_mask=torch.ones(3, 1, dtype=torch.long),
                     has_eos=torch.tensor([True] * 3))

    class Spec:
        fn, weight = "r.py:r", 1.0

    fn = (Spec(), lambda p, c, answer=None, **kw: seen.append(answer) or [float(a is not None) for a in answer])
    score, _ = sequence_scores(Rollout(gen, rows, ["1", "1", "2"]), tok, None, [fn], 1.0, 0.0, "cpu")
    assert seen == [[None, "1", "2"]] and score.tolist() == [0.0, 1.0, 1.0]


def test_a_hub_dataset_that_cannot_load_is_one_line(tmp_path, monkeypatch):
    """A data spec that is no local file and no reachable hub dataset: one line, not datasets'
    traceback; a mistyped local path under a folder that is here is not looked up on the hub."""
    import datasets

    from rlhf.data.formats import read_rows
    from rlhf.errors import DataError

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'someuser/nope' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"someuser/nope: no such local file, and the hub dataset cannot be loaded "
                                        r"\(ConnectionError: Couldn't reach"):
        read_rows("someuser/nope")
    with pytest.raises(DataError, match=r"^recipes/tiny/data/nope: data file not found$"):
        read_rows("recipes/tiny/data/nope")


@pytest.mark.slow
def test_a_run_folder_is_resumed_only_by_its_own_command(tmp_path, finished_run, capsys):
    """--resume of a run by another command (rm, pipeline on an SFT run) is one line naming the
    command that wrote it, before anything loads; a finished run resumed with another recipe says
    it is not run again and names each changed key; a damaged summary.json is one line; a folder
    that merely holds a recipe.yaml (the user's own) is no run, and --overwrite leaves it alone."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _tree(run)
    dpo = _bad(tmp_path, "dpo.yaml", f"model: {{name_or_path: {finished_run}}}\n"
                                     f"data: {{train: recipes/tiny/data/prefs.jsonl}}\n")
    for cmd, recipe in (("rm", "recipes/tiny/rm.yaml"), ("pipeline", "recipes/tiny/pipeline.yaml"), ("dpo", dpo)):
        rc, stderr = _rlhf_here(capsys, cmd, recipe, "--output_dir", run, "--resume")
        assert rc == 2 and f"{run}: holds an rlhf sft run, not an rlhf {cmd} run; resume it with 'rlhf sft" \
            in stderr, stderr[-1500:]
    assert _tree(run) == before
    rc, stderr = _rlhf_here(capsys, "sft", "recipes/tiny/sft.yaml", "--output_dir", run, "--resume",
                            "--train.max_steps", "9", "--gen_eval_samples", "2", "--train.log_every", "1")
    assert rc == 0 and "--resume of a finished run: it is not run again" in stderr and \
        "train.max_steps: 2 -> 9" in stderr, stderr[-1500:]
    (run / "summary.json").write_text('{"stage": "sf')
    rc, stderr = _rlhf_here(capsys, "sft", "recipes/tiny/sft.yaml", "--output_dir", run, "--resume")
    assert rc == 2 and re.search(r"summary\.json: damaged, cannot be read \(JSONDecodeError", stderr), stderr[-1500:]
    rc, stderr = _rlhf_here(capsys, "report", run)
    assert rc == 2 and "summary.json: damaged, cannot be read" in stderr, stderr[-1500:]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text(Path("recipes/tiny/sft.yaml").read_text())
    (mine / "notes.txt").write_text("mine")
    for flag in ("--overwrite", "--resume"):
        rc, stderr = _rlhf_here(capsys, "sft", mine / "recipe.yaml", "--output_dir", mine, flag)
        assert rc == 2 and ("holds no run" in stderr or "no run to resume" in stderr), stderr[-1500:]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "recipe.yaml"]


def test_dpo_refuses_a_launchers_deepspeed_config(monkeypatch):
    """`accelerate launch --config_file recipes/accelerate/zero3.yaml -m rlhf dpo` loaded the model
    as ZeRO-3 shards and failed at the first evaluation; the launcher's DeepSpeed is refused as the
    recipe's is (checked without building an accelerator: that would set up DeepSpeed in this process)."""
    from rlhf.config import DPOConfig
    from rlhf.engine import launcher_deepspeed
    from rlhf.errors import RunError
    from rlhf.stages.dpo import check_dpo_engine

    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)
    assert not launcher_deepspeed()
    check_dpo_engine(DPOConfig())
    for k, v in (("ACCELERATE_USE_DEEPSPEED", "true"), ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "z3.json")):
        with monkeypatch.context() as m:
            m.setenv(k, v)
            assert launcher_deepspeed()
            with pytest.raises(RunError, match=r"^the launcher's DeepSpeed config \(ACCELERATE_USE_DEEPSPEED / "
                                               r"ACCELERATE_DEEPSPEED_CONFIG_FILE\) is not supported by rlhf dpo"):
                check_dpo_engine(DPOConfig())


@pytest.mark.slow
def test_a_pipeline_checks_its_later_stages_inputs_before_the_first_trains(tmp_path, capsys):
    """A typo in the ppo: or rm: section of a pipeline is one line before SFT trains (it was found
    when that stage started, after SFT and the RM had trained): nothing is left behind."""
    out, policy = tmp_path / "p", _model_folder(tmp_path, "sft", "LlamaForCausalLM")
    cases = [(["--ppo.data.train", tmp_path / "nope.jsonl"], r"nope\.jsonl: data file not found"),
             (["--ppo.reward_fns", f"[{{fn: '{tmp_path / 'r.py'}:f'}}]"], r"r\.py:f': file .*r\.py not found"),
             (["--ppo.reward_model", policy], r"'ppo\.reward_model' is not a reward model"),
             (["--rm.normalize_data", _rows(tmp_path, "n.jsonl", {"prompt": "a"})],
              r"n\.jsonl:1: field 'completion': missing"),
             (["--ppo.data.eval", _rows(tmp_path, "e.jsonl", {"prompt": None})], r"e\.jsonl:1: field 'prompt': is null"),
             (["--rm.sample.mix_with", _rows(tmp_path, "m.jsonl", {"prompt": "a", "chosen": "b"})],
              r"m\.jsonl:1: field 'rejected': missing"),
             (["--ppo.micro_batch_size", "3"], r"command line --ppo\.micro_batch_size: 'ppo\.minibatch_size' per "
                                               r"process \(16\) must be a multiple of 'ppo\.micro_batch_size' \(3\)"),
             (["--rm.train.micro_batch_size", "3"], r"'rm\.train\.batch_size' per process \(32\) must be a multiple"),
             (["--ppo.deepspeed", tmp_path / "nope.json"], r"'ppo\.deepspeed' config not found"),
             (["--rm.train.deepspeed", _bad(tmp_path, "ds.json", '{"zero_optimization": {"stage": 2, "x": 1}}')],
              r"ds\.json: 'zero_optimization\.x': Extra inputs are not permitted"),
             # refused when that stage started, after the others had trained
             (["--ppo.compile", "true", "--ppo.deepspeed", "recipes/deepspeed/zero3.json"],
              r"'ppo\.compile: true' is not supported under DeepSpeed"),
             (["--dpo.data.train", "recipes/tiny/data/prefs.jsonl", "--dpo.train.deepspeed",
               "recipes/deepspeed/zero2.json"], r"'dpo\.train\.deepspeed' is not supported by rlhf dpo yet")]
    for args, pattern in cases:
        rc, stderr = _rlhf_here(capsys, "pipeline", "recipes/tiny/pipeline.yaml", "--output_dir", out, *args)
        err = [l for l in stderr.strip().splitlines() if "error:" in l]
        assert rc == 2 and len(err) == 1 and re.search(pattern, err[0]), (args, stderr[-1500:])
        assert not out.exists() and not staging_path(out).exists()


def test_a_disk_that_cannot_be_written_is_one_line():
    """A full disk or quota, a read-only file system, no permission: the user fixes it outside
    rlhf, so it is one line naming the path (rlhf.stages.run turns it into a RunError), not a
    traceback; any other OSError (a bug) propagates as it is."""
    import errno

    from rlhf.stages import unwritable

    assert unwritable(OSError(errno.ENOSPC, "No space left on device", "/d/model.safetensors")) == \
        "cannot write /d/model.safetensors: No space left on device (ENOSPC)"
    assert unwritable(OSError(errno.EROFS, "Read-only file system", "/mnt/r")).endswith("(EROFS)")
    assert unwritable(FileNotFoundError(errno.ENOENT, "No such file or directory", "x")) is None
    assert unwritable(ValueError("x")) is None
    from rlhf.errors import RunError
    from rlhf.rundir import make_folder

    # a disk that fills while a checkpoint is written: torch.save's zip writer raised "unexpected pos"
    # (a RuntimeError, over the OSError), safetensors "os error 28" in an error of its own: a traceback
    from rlhf.textio import disk_errors

    def raised(error: BaseException, context: BaseException | None = None) -> BaseException:
        with pytest.raises(BaseException) as got:
            with disk_errors(Path("/d/ckpt")):
                try:
                    raise context or ValueError("-")
                except BaseException:
                    raise error
        return got.value

    torch_full = raised(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5120 vs 5012"),
                        OSError(errno.ENOSPC, "No space left on device"))
    st_full = raised(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    for e in (torch_full, st_full, raised(OSError(errno.ENOSPC, "No space left on device"))):
        assert unwritable(e) == "cannot write /d/ckpt: No space left on device (ENOSPC)", e
    assert isinstance(raised(RuntimeError("a bug")), RuntimeError)  # anything else is left as it is
    # a bug raised while some handled OSError is its context is no disk error (it became "No such file")
    assert isinstance(raised(TypeError("a bug"), FileNotFoundError(errno.ENOENT, "gone")), TypeError)
    assert isinstance(raised(OSError(errno.ECONNRESET, "reset")), ConnectionResetError)
    # torch.save to a file name (DeepSpeed's engine) fails with no errno: a disk error only where the disk is full
    # (/d does not exist: its nearest folder, /, has room)
    assert isinstance(raised(RuntimeError("basic_ios::clear: iostream error")), RuntimeError)
    # another process's failure, met inside a collective (a gloo traceback beside that process's own line)
    from rlhf.stages import peer_gone

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:22415")
    assert not peer_gone(gone)  # (only among several processes: test_distributed's full-disk test has one)
    assert not peer_gone(RuntimeError("a bug")) and not peer_gone(ValueError("Connection closed by peer"))
    if Path("/proc/self").is_dir():  # a file system that makes no folders: ENOENT though /proc exists
        with pytest.raises(RunError, match=r"^cannot create the folder /proc/x/y: No such file or directory at /proc/x"):
            make_folder(Path("/proc/x/y"))


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_resumable(tmp_path, capsys):
    """On a real full disk (a 2.5 MB tmpfs; skipped where it cannot be mounted): the second
    checkpoint fails to write. It was torch's RuntimeError traceback, and writing FAILED failed
    too, so the message lost its resume advice and the run kept its own lock. Now one line that
    names the folder and says the run is resumable from the first checkpoint."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500K", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        rc, stderr = _rlhf_here(capsys, "sft", "recipes/tiny/sft.yaml", "--train.max_steps", "3", "--train.save_every",
                                "1", "--train.save_total_limit", "5", "--gen_eval_samples", "4", "--data.eval_split",
                                "0.01", "--output_dir", small / "out")
        err = [l for l in stderr.strip().splitlines() if "error:" in l]
        assert rc == 2 and len(err) == 1 and "Traceback" not in stderr, stderr[-2000:]
        assert re.search(r"cannot write .*/checkpoints/\.tmp-step-0000000[23]: No space left on device \(ENOSPC\) "
                         r"\(the run stays resumable from step-0000000[12] in ", err[0]), err[0]
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)  # (lazy: a log the failed run left open)


def test_what_counts_as_a_run_folder(tmp_path):
    """A run is its .rlhf-run file, or (older runs) a summary, a metrics log, a real checkpoint or
    a pipeline's stage folders: a user's folder with a checkpoints/ folder of its own is not one
    (--overwrite would delete it); a pipeline stage opened but killed before writing anything else
    resumes in place; an older pipeline root (stage folders only) is still a run."""
    from rlhf.rundir import KIND, MARK, holds_run, plan, run_command

    mine = tmp_path / "mine"
    (mine / "checkpoints" / "epoch1").mkdir(parents=True)
    assert not holds_run(mine) and "holds no run" in plan(mine, overwrite=True, command="sft").problem
    old_pipeline = tmp_path / "old"
    (old_pipeline / "sft").mkdir(parents=True)
    (old_pipeline / "sft" / "recipe.yaml").write_text("seed: 0\n")
    assert holds_run(old_pipeline) and run_command(old_pipeline) == "pipeline"
    assert plan(old_pipeline, resume=True, command="pipeline").problem is None
    staged = tmp_path / ".p.staging"
    (staged / "rm").mkdir(parents=True)
    (staged / MARK).write_text("{}")
    (staged / "rm" / KIND).write_text('{"command": "rm"}\n')
    rf = plan(staged / "rm", resume=True, command="rm")
    assert rf.problem is None and rf.work == staged / "rm"
    assert "not an rlhf ppo run" in plan(staged / "rm", resume=True, command="ppo").problem


def test_the_early_check_of_later_stages_reads_what_each_stage_reads(tmp_path):
    """check_later_stages reads a stage's data only as far as the stage does (data.max_samples),
    and a stage section built from its config (model.init: from_config) is not given the SFT
    folder as a checkpoint it would refuse."""
    from rlhf.config import load_stage_config
    from rlhf.errors import DataError
    from rlhf.stages.pipeline import check_later_stages

    rows = _rows(tmp_path, "q.jsonl", {"prompt": "a"}, {"prompt": None})
    cfg = load_stage_config("pipeline", "recipes/tiny/pipeline.yaml", {"ppo.data.train": str(rows),
                                                                         "ppo.data.max_samples": 1})
    check_later_stages(cfg, ["sft", "rm", "ppo"])
    cfg.ppo.data.max_samples = None
    with pytest.raises(DataError, match=r"q\.jsonl:2: field 'prompt': is null"):
        check_later_stages(cfg, ["sft", "rm", "ppo"])
    check_later_stages(cfg, ["ppo"])  # (the first stage in the list checks its own inputs when it starts)


def test_a_resume_with_another_recipe_names_each_changed_key(tmp_path, caplog):
    """--resume keeps the run's recipe.yaml and warns of each key the recipe it was given changes
    (a longer max_steps, another lr: the run goes on, but not as the uninterrupted one would)."""
    from types import SimpleNamespace

    from rlhf.config import load_stage_config
    from rlhf.engine import save_recipe

    acc = SimpleNamespace(is_main_process=True)
    cfg = load_stage_config("sft", "recipes/tiny/sft.yaml", {})
    save_recipe(acc, cfg, tmp_path, resume=False)
    written = (tmp_path / "recipe.yaml").read_text()
    save_recipe(acc, cfg, tmp_path, resume=True)
    assert "differs" not in caplog.text
    changed = load_stage_config("sft", "recipes/tiny/sft.yaml", {"train.max_steps": 12, "train.lr": 0.5})
    save_recipe(acc, changed, tmp_path, resume=True)
    assert f"train.max_steps: {cfg.train.max_steps} -> 12" in caplog.text
    assert f"train.lr: {cfg.train.lr!r} -> 0.5" in caplog.text and "model." not in caplog.text
    assert (tmp_path / "recipe.yaml").read_text() == written


@pytest.mark.slow
def test_a_ppo_resume_that_switches_on_ema_or_ptx_is_one_line(tmp_path, capsys, sft_checkpoint, task_dir):
    """A PPO run interrupted after a checkpoint, resumed with ema_decay (or PPO-ptx) the run did not
    have: before, a FileNotFoundError traceback for the checkpoint's ema.safetensors. Now one line,
    and the run stays resumable with its own recipe."""
    f = tmp_path / "r.py"
    f.write_text("import os\n"
                 "def r(prompts, completions, **kw):\n"
                 "    if os.path.exists(os.environ['STOP_FILE']):\n"
                 "        raise ValueError('stopped')\n"
                 "    return [float(len(c) % 2) for c in completions]\n"
                 "def stop_after(prompts, completions, **kw):\n"
                 "    n = int(os.environ.get('CALLS', '0')) + 1\n"
                 "    os.environ['CALLS'] = str(n)\n"
                 "    if n == 4:  # the dry call, then iterations 1 and 2: iteration 3 stops the run\n"
                 "        open(os.environ['STOP_FILE'], 'w').close()\n"
                 "    return r(prompts, completions)\n")
    stop = tmp_path / "stop"
    out = tmp_path / "ppo"
    base = ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", sft_checkpoint, "--output_dir", out,
            "--data.train", task_dir / "rl_prompts.jsonl", "--data.eval", task_dir / "eval_prompts.jsonl",
            "--steps", "3", "--save_every", "1", "--rollout_batch_size", "8", "--minibatch_size", "8",
            "--micro_batch_size", "8", "--ppo_epochs", "1", "--eval_samples", "0", "--sample_every", "0"]
    os.environ["STOP_FILE"] = str(stop)
    try:
        rc, stderr = _rlhf_here(capsys, *base, "--reward_fns", f"[{{fn: '{f}:stop_after'}}]")
        assert rc == 2 and "resumable from step-00000002" in stderr, stderr[-2000:]
        stop.unlink()
        for extra, pattern in ((["--ema_decay", "0.9"], r"step-00000002: has no EMA of the policy \(the run was started "
                                                         r"without ema_decay\); resume with the run's recipe"),
                               (["--ptx_coef", "0.5", "--ptx_data", task_dir / "sft.jsonl"],
                                r"step-00000002: has no PPO-ptx data position")):
            rc, stderr = _rlhf_here(capsys, *base, "--reward_fns", f"[{{fn: '{f}:r'}}]", "--resume", *extra)
            assert rc == 2 and re.search(pattern, stderr) and "Traceback" not in stderr, stderr[-2000:]
        rc, stderr = _rlhf_here(capsys, *base, "--reward_fns", f"[{{fn: '{f}:r'}}]", "--resume")
        assert rc == 0 and json.loads((out / "summary.json").read_text())["steps"] == 3, stderr[-2000:]
    finally:
        os.environ.pop("STOP_FILE", None)
        os.environ.pop("CALLS", None)


def test_a_checkpoint_without_a_model_this_run_trains_is_a_recipe_change_not_damage(tmp_path):
    """A critic-free PPO run's checkpoint resumed with GAE (which adds the value model): before, "damaged,
    cannot be restored ... delete this checkpoint folder", and deleting it lost the run. Now the
    recipe change is named; checkpoints from before state.json listed its models are judged by their
    files (neither weights nor optimizer state of a model: absent); a missing file of a model the
    checkpoint has is still damage."""
    from types import SimpleNamespace

    from rlhf.checkpoint import CheckpointParts, load_checkpoint, save_checkpoint
    from rlhf.errors import RunError

    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    policy, value = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opts = {n: torch.optim.AdamW(m.parameters()) for n, m in (("policy", policy), ("value", value))}
    ckpt = save_checkpoint(acc, tmp_path, 2, CheckpointParts({"policy": policy}, {"policy": opts["policy"]}), state={})
    both = CheckpointParts({"policy": policy, "value": value}, opts)
    with pytest.raises(RunError, match=r"step-00000002: holds no value model, which this run trains \(the recipe "
                                       r"changed since it was written: advantage_estimator"):
        load_checkpoint(acc, ckpt, both)
    state = json.loads((ckpt / "state.json").read_text())
    assert state.pop("models") == ["policy"]
    (ckpt / "state.json").write_text(json.dumps(state))  # as written before the record
    with pytest.raises(RunError, match=r"holds no value model"):
        load_checkpoint(acc, ckpt, both)
    full = save_checkpoint(acc, tmp_path / "full", 2, both, state={})
    (full / "value.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(acc, full, both)


def test_a_resume_whose_recipe_ends_before_the_checkpoint_is_one_line(tmp_path):
    """--resume --steps 1 of a run checkpointed at step 2: before, exit 0 with the step-2 model, a
    summary saying 1 step and metrics.jsonl's step counter going backwards."""
    from types import SimpleNamespace

    from rlhf.checkpoint import CheckpointParts, resume_state, save_checkpoint
    from rlhf.errors import RunError

    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    parts = CheckpointParts({"policy": torch.nn.Linear(2, 2)})
    save_checkpoint(acc, tmp_path, 2, parts, state={})
    with pytest.raises(RunError, match=r"step-00000002: step 2 is past this run's last step, 1 \(steps\); resume "
                                       r"with steps of at least 2, or start a new run"):
        resume_state(acc, tmp_path, True, parts, total=(1, "steps"))
    assert resume_state(acc, tmp_path, True, parts, total=(2, "steps"))[0] == 2


def test_a_missing_rng_file_is_damage_unless_more_processes_resume(tmp_path, caplog):
    """Each process's RNG file makes the resume exact: missing on the process count that wrote the
    checkpoint, the checkpoint is damaged; a plain checkpoint resumed on more processes has none for
    the new ones, which go on with fresh random streams, and a warning says the resume is not exact."""
    from types import SimpleNamespace

    from rlhf.checkpoint import CheckpointParts, load_checkpoint, save_checkpoint

    def acc(rank, world):
        return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                               wait_for_everyone=lambda: None)

    model = torch.nn.Linear(2, 2)
    ckpt = save_checkpoint(acc(0, 1), tmp_path, 2, CheckpointParts({"model": model}), state={})
    assert load_checkpoint(acc(1, 2), ckpt, CheckpointParts({"model": model}))["step"] == 2
    assert "written by 1 processes, resumed on 2" in caplog.text and "not as an uninterrupted one" in caplog.text
    caplog.clear()  # fewer processes than wrote it: the others' random state and sums are dropped (it was silent)
    two = save_checkpoint(acc(0, 1), tmp_path / "two", 2, CheckpointParts({"model": model}), state={})
    shutil.copy(two / "rng-rank0.pt", two / "rng-rank1.pt")  # as 2 processes write it
    (two / "state.json").write_text(json.dumps({**json.loads((two / "state.json").read_text()), "num_processes": 2}))
    assert load_checkpoint(acc(0, 1), two, CheckpointParts({"model": model}))["step"] == 2
    assert "written by 2 processes, resumed on 1: the random state and running sums of process(es) 1 are not " \
           "restored" in caplog.text
    (ckpt / "rng-rank0.pt").unlink()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(acc(0, 1), ckpt, CheckpointParts({"model": model}))


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does_and_it_resumes_exactly(tmp_path):
    """SIGTERM (torchrun passing on its own SIGTERM or Ctrl-C to its workers, a cluster's preemption)
    ended the process by the signal's default action: no word, no FAILED mark. It now stops the run
    as Ctrl-C does: one line saying where it resumes, exit 143, and --resume finishes it exactly."""
    args = ["sft", "recipes/tiny/sft.yaml", "--train.max_steps", "6", "--train.save_every", "2",
            "--train.log_every", "1", "--gen_eval_samples", "4"]
    out = tmp_path / "run"
    p = _rlhf(*args, "--output_dir", out, env_extra={"RLHF_FAULT": "term:3"}, check=False)
    staged = staging_path(out)
    assert p.returncode == 143, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (f"rlhf sft: interrupted (SIGTERM) (the run stays resumable from "
                                                 f"step-00000002 in {staged}: pass --resume to continue it)")
    assert (staged / "FAILED").read_text().startswith("Terminated") and not out.exists()
    _rlhf(*args, "--output_dir", out, "--resume")
    _rlhf(*args, "--output_dir", tmp_path / "whole")
    _assert_same_run(out, tmp_path / "whole")


@pytest.mark.slow
def test_resume_past_a_damaged_checkpoint_and_a_metrics_line_cut_short(tmp_path):
    """A metrics line cut short by the kill is dropped on resume; a checkpoint damaged on disk is a
    one-line error naming it and the checkpoint to fall back to (no traceback); without it the
    run resumes from the one before and finishes."""
    out = tmp_path / "run"
    args = ["sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "8", "--train.save_every", "2",
            "--train.log_every", "1", "--gen_eval_samples", "4"]
    p = _rlhf(*args, env_extra={"RLHF_FAULT": "step:7"}, check=False)
    assert p.returncode == -9
    staged = staging_path(out)
    with open(staged / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # the record being written when the process died
    weights = staged / "checkpoints" / "step-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    p = _rlhf(*args, "--resume", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "step-00000006: damaged, cannot be restored (" in p.stderr and "continues from step-00000004" in p.stderr
    assert "stays resumable from step-00000004" in p.stderr, p.stderr[-2000:]
    import shutil

    shutil.rmtree(staged / "checkpoints" / "step-00000006")
    rng = staged / "checkpoints" / "step-00000004" / "rng-rank0.pt"  # without it the resume would not be exact
    rng.rename(tmp_path / "rng")
    p = _rlhf(*args, "--resume", check=False)
    assert p.returncode == 2 and "step-00000004: damaged, cannot be restored (FileNotFoundError" in p.stderr, \
        p.stderr[-2000:]
    (tmp_path / "rng").rename(rng)
    _rlhf(*args, "--resume")
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_pipeline_resume_continues_the_stage_it_stopped_in(tmp_path):
    out = tmp_path / "pipe"
    small = ["--sft.train.max_steps", "6", "--sft.gen_eval_samples", "4", "--rm.sample.max_prompts", "8",
             "--rm.train.max_steps", "6", "--rm.train.save_every", "2", "--ppo.steps", "2",
             "--ppo.rollout_batch_size", "16", "--ppo.eval_samples", "8"]
    p = _rlhf("pipeline", "recipes/tiny/pipeline.yaml", "--output_dir", out, *small,
              env_extra={"RLHF_FAULT": "checkpoint:2"}, check=False)  # dies in the RM stage's 2nd checkpoint
    staged = staging_path(out)  # the pipeline is one run: staged whole until its last stage finishes
    assert p.returncode == -9 and (staged / "sft" / "summary.json").exists()
    assert not (staged / "rm" / "summary.json").exists() and not out.exists()
    sft_before = (staged / "sft" / "model.safetensors").stat().st_mtime_ns
    p = _rlhf("pipeline", "recipes/tiny/pipeline.yaml", "--output_dir", out, *small[:-6], "--ppo.steps", "3",
              *small[-4:], "--resume")
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_before  # the finished stage was kept
    # the pipeline's recipe.yaml is kept as the run began, and the change named (it was kept silently)
    assert f"resumed with a recipe that differs from {staged / 'recipe.yaml'}: ppo.steps: 2 -> 3" in p.stderr
    assert json.loads((out / "ppo" / "summary.json").read_text())["steps"] == 3
    assert json.loads((out / "summary.json").read_text())["stages"] == ["sft", "rm", "ppo"]


# ----------------------------------------------------------------------------- malformed inputs


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def _reward(tmp_path, body):
    f = tmp_path / "reward.py"
    f.write_text("import math, time\n\ndef helper(x):\n    return x\n\n\ndef r(prompts, completions, **kw):\n"
                 + "".join(f"    {line}\n" for line in body.splitlines()))
    return ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--reward_fns", f"[{{fn: '{f}:r'}}]", "--reward_timeout", "2"]


def _model_folder(tmp_path, name, architecture=None):
    """A folder that reads as a checkpoint of `architecture` (its config.json only), or, with
    None, a folder with no config.json at all."""
    d = tmp_path / name
    d.mkdir()
    if architecture:
        (d / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))
    return d


def _long_prompt_last(n):
    """The tiny task's first n - 1 RL prompt rows, then one whose prompt is far over 128 tokens."""
    rows = [json.loads(line) for line in (ROOT / "recipes/tiny/data/rl_prompts.jsonl").open()][: n - 1]
    return rows + [dict(rows[0], prompt="sort " + " ".join(str(i % 10) for i in range(300)))]


def _msgs(*roles):
    return [{"role": r, "content": f"{r} says {i}"} for i, r in enumerate(roles)]


def _rows(tmp_path, name, *rows):
    return _bad(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


HH = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 3+3?\n\nAssistant: 6"}

CASES = [
    # (id, builder(tmp) -> args, expected message regex)
    ("malformed-jsonl", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                   _bad(t, "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n')],
     r"d\.jsonl:2: malformed JSON"),
    ("missing-field", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                 _bad(t, "d.jsonl", '{"prompt": "a"}\n')], r"d\.jsonl:1: field 'completion': missing"),
    ("null-field", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                              _bad(t, "d.jsonl", '{"prompt": "a", "completion": null}\n')],
     r"d\.jsonl:1: field 'completion': is null"),
    ("mistyped-field", lambda t: ["rm", "recipes/tiny/rm.yaml", "--data.train",
                                  _bad(t, "p.jsonl", '{"prompt": "a", "chosen": 1, "rejected": "b"}\n')],
     r"p\.jsonl:1: field 'chosen': expected a string"),
    ("empty-dataset", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train", _bad(t, "e.jsonl", "")],
     r"e\.jsonl: empty dataset"),
    ("row-too-long", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.max_length", "8"],
     r"sft\.jsonl:1: field 'completion': \d+ tokens with the prompt, more than data\.max_length \(8\)"),
    ("rm-row-too-long-before-model-and-sampling", lambda t: [
        "rm", "recipes/tiny/rm.yaml", "--model.name_or_path", t / "out", "--data.train",
        _rows(t, "p.jsonl", {"prompt": "a", "chosen": "b", "rejected": "c " * 60})],
     r"p\.jsonl:1: field 'rejected': \d+ tokens with the prompt, more than data\.max_length \(48\)"),
    ("rm-mix-with-checked-before-sampling", lambda t: [
        "rm", "recipes/tiny/rm.yaml", "--model.name_or_path", t / "out", "--sample.checkpoint", t / "out",
        "--sample.mix_with", _rows(t, "m.jsonl", {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a"})],
     r"m\.jsonl:2: field 'chosen': missing"),
    ("rm-mix-with-row-too-long-before-sampling", lambda t: [
        "rm", "recipes/tiny/rm.yaml", "--model.name_or_path", t / "out", "--sample.checkpoint", t / "out",
        "--sample.mix_with", _rows(t, "m.jsonl", {"prompt": "a", "chosen": "b", "rejected": "c " * 60})],
     r"m\.jsonl:1: field 'rejected': \d+ tokens with the prompt, more than data\.max_length \(48\)"),
    ("unknown-role", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                _rows(t, "c.jsonl", {"messages": _msgs("human", "assistant")})],
     r"c\.jsonl:1: field 'messages\[0\]\.role': unknown role 'human' .*did you mean 'user'"),
    ("two-user-turns", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                  _rows(t, "c.jsonl", {"messages": _msgs("user", "user", "assistant")})],
     r"c\.jsonl:1: field 'messages\[1\]\.role': two user turns in a row"),
    ("sft-ends-on-user", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                    _rows(t, "c.jsonl", {"messages": _msgs("system", "user", "assistant", "user")})],
     r"c\.jsonl:1: field 'messages\[3\]\.role': the conversation ends on a user turn"),
    ("system-not-first", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                    _rows(t, "c.jsonl", {"messages": _msgs("user", "system", "assistant")})],
     r"c\.jsonl:1: field 'messages\[1\]\.role': a system message may only come first"),
    ("prompt-ends-on-assistant", lambda t: ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--data.train",
                                            _rows(t, "q.jsonl", {"prompt": _msgs("user", "assistant")})],
     r"q\.jsonl:1: field 'prompt\[1\]\.role': the conversation ends on an assistant turn"),
    ("prompt-too-long", lambda t: ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", _tiny_policy(t),
                                   "--rollout_batch_size", "8", "--minibatch_size", "8", "--data.train",
                                   _rows(t, "q.jsonl", *_long_prompt_last(9))],
     r"q\.jsonl:9: field 'prompt': \d+ tokens, more than data\.max_prompt_length \(128\); raise it or set "
     r"data\.skip_bad_rows"),
    ("dpo-field-it-never-reads", lambda t: ["dpo", _bad(t, "d.yaml", "data:\n  train: recipes/tiny/data/prefs.jsonl\n"
                                                                   "  eval: recipes/tiny/data/prefs.jsonl\n")],
     r"d\.yaml:3: data\.eval: not read by rlhf dpo \(DPO trains on all of data\.train"),
    ("non-finite-number", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train.warmup_ratio", ".nan"],
     r"command line --train\.warmup_ratio: expected a finite number, got nan"),
    ("non-finite-in-list-item", lambda t: ["ppo", _bad(t, "r.yaml", "steps: 5\nreward_fns:\n  - {fn: gold, weight: .inf}\n")],
     r"r\.yaml:2: reward_fns\[0\]\.weight: expected a finite number, got inf"),
    ("required-key-missing-in-list-item", lambda t: ["ppo", _bad(t, "r.yaml", "steps: 5\nreward_fns:\n  - {weight: 1}\n")],
     r"r\.yaml:2: reward_fns\[0\]\.fn: required, and missing"),
    ("compare-method-typo", lambda t: ["compare", _bad(t, "c.yaml", Path("recipes/tiny/compare.yaml").read_text().replace(
        "grpo: {advantage_estimator", "grpo: {advantage_estimater"))],
     r"c\.yaml:\d+: methods\.grpo: unknown key 'advantage_estimater' \(did you mean 'advantage_estimator'\?\)"),
    ("compare-method-not-a-mapping", lambda t: ["compare", _bad(t, "c.yaml", Path("recipes/tiny/compare.yaml")
                                                                .read_text().replace("  dpo: {stage: dpo}", "  dpo: [1, 2]"))],
     r"c\.yaml:\d+: methods\.dpo: expected a mapping of the fields it changes, got \[1, 2\]"),
    ("override-with-an-empty-part", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train..lr", "1"],
     r"command line --train\.\.lr: not a dotted key \(an empty part between dots\)"),
    ("error-named-where-its-key-was-just-set", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train.micro_batch_size", "48"],
     r"command line --train\.micro_batch_size: 'train\.batch_size' per process \(64\) must be a multiple of "
     r"'train\.micro_batch_size' \(48\)"),
    ("deepspeed-json-not-an-object", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train.deepspeed",
                                                _bad(t, "ds.json", "[1, 2]")],
     r"ds\.json: a DeepSpeed config is a JSON object, got list"),
    ("deepspeed-zero-stage", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train.deepspeed",
                                        _bad(t, "ds.json", '{"zero_optimization": {"stage": 7}}')],
     r"ds\.json: 'zero_optimization\.stage' must be 0, 1, 2 or 3, got 7"),
    ("compare-seed-twice", lambda t: ["compare", "recipes/tiny/compare.yaml", "--seeds", "[1, 1]"],
     r"command line --seeds: a seed given twice runs once, yet the table would average over it: \[1, 1\]"),
    ("seed-out-of-range", lambda t: ["compare", "recipes/tiny/compare.yaml", "--seeds", f"[0, {2**64}]"],
     r"command line --seeds: a seed must be in \[0, 4294967295\], got 18446744073709551616"),
    ("compare-no-seeds", lambda t: ["compare", "recipes/tiny/compare.yaml", "--seeds", "[]"],
     r"command line --seeds: a compare recipe needs at least one \(got \[\]\)"),
    ("rm-normalize-data-before-training", lambda t: ["rm", "recipes/tiny/rm.yaml", "--model.name_or_path", t / "out",
                                                     "--normalize_data", _rows(t, "n.jsonl", {"prompt": "a"})],
     r"n\.jsonl:1: field 'completion': missing"),
    ("rm-sample-judge-none", lambda t: ["rm", _bad(t, "r.yaml", "seed: 0\nsample: {judge: none}\n")],
     r"r\.yaml:2: sample\.judge: 'none' writes unranked rows for people to rank"),
    ("yaml-key-not-a-name", lambda t: ["sft", _bad(t, "r.yaml", "seed: 0\n[a, b]: 1\n")],
     r"r\.yaml:2: invalid YAML \(a key must be a name, got \['a', 'b'\]"),
    ("json-integer-too-long", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train", _bad(
        t, "d.jsonl", '{"prompt": "a", "completion": "b", "x": ' + "9" * 5000 + "}\n")],
     r"d\.jsonl:1: malformed JSON \(Exceeds the limit \(4300 digits\)"),
    ("dpo-unknown-loss-type", lambda t: ["dpo", _bad(t, "d.yaml", "data: {train: recipes/tiny/data/prefs.jsonl}\n"
                                                             "loss_type: sigmod\n")],
     r"d\.yaml:2: loss_type: TRL [\d.]+'s DPOTrainer has no loss 'sigmod' \(it has: sigmoid"),
    ("compare-method-name-is-a-path", lambda t: ["compare", "recipes/tiny/compare.yaml", "--methods",
                                                 '{"../../x": {}}'],
     r"command line --methods: method name '\.\./\.\./x' must be a plain folder name"),
    ("compare-method-sets-its-seed", lambda t: ["compare", "recipes/tiny/compare.yaml", "--methods", "{ppo: {seed: 3}}"],
     r"methods\.ppo\.seed: set by rlhf compare for every run"),
    ("pipeline-stage-output-dir", lambda t: ["pipeline", "recipes/tiny/pipeline.yaml", "--sft.output_dir", t / "x"],
     r"command line --sft\.output_dir: the stages of a pipeline write to its folder's sft/"),
    ("from-config-names-a-checkpoint", lambda t: ["sft", "recipes/tiny/sft.yaml", "--model.name_or_path", t],
     r"command line --model\.name_or_path: not read with model\.init: from_config"),
    ("chat-template-does-not-parse", lambda t: ["sft", "recipes/tiny/sft.yaml", "--model.chat_template", "{{ x"],
     r"model\.chat_template: does not render a conversation \(TemplateSyntaxError"),
    ("chat-template-a-constant", lambda t: ["sft", "recipes/tiny/sft.yaml", "--model.chat_template", "t.jinja"],
     r"model\.chat_template: what it renders leaves out the messages' content"),
    ("hh-prompts-differ", lambda t: ["rm", "recipes/tiny/rm.yaml", "--data.train", _rows(t, "hh.jsonl", HH)],
     r"hh\.jsonl:1: field 'chosen': chosen and rejected do not share their prompt"),
    ("invalid-utf8", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                _bad_bytes(t, "u.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n')],
     r"u\.jsonl:2:16: not UTF-8 \(byte 0xe9\)"),
    ("duplicate-recipe-key", lambda t: ["sft", _bad(t, "r.yaml", Path("recipes/tiny/sft.yaml").read_text()
                                                    + "seed: 3\n")],
     r"r\.yaml:\d+: invalid YAML \(duplicate key 'seed' \(first at line \d+, again at line \d+\)\)"),
    ("unknown-key", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--kl_coeff", "0.1"],
     r"command line --kl_coeff: unknown key 'kl_coeff' \(did you mean 'kl_coef'\?\)"),
    ("unknown-key-in-recipe", lambda t: ["sft", _bad(t, "r.yaml", "seed: 0\ntrain:\n  learnig_rate: 0.1\n")],
     r"r\.yaml:3: unknown key 'train\.learnig_rate' \(did you mean 'train\.lr'\?\)"),
    ("unknown-key-in-optional-section", lambda t: ["rm", _bad(t, "r.yaml", "seed: 0\nsample:\n  k: 4\n  kk: 4\n")],
     r"r\.yaml:4: unknown key 'sample\.kk' \(did you mean 'sample\.k'\?\)"),
    ("out-of-range-in-optional-section", lambda t: ["ppo", _bad(t, "r.yaml", "steps: 5\nrm_refresh: {every: 0}\n")],
     r"r\.yaml:2: rm_refresh\.every: must be >= 1, got 0"),
    ("unknown-key-in-list-item", lambda t: ["ppo", _bad(t, "r.yaml", "steps: 5\nreward_fns:\n  - {fnn: gold}\n")],
     r"r\.yaml:2: unknown key 'reward_fns\[0\]\.fnn' \(did you mean 'reward_fns\[0\]\.fn'\?\)"),
    ("reward-model-is-a-policy", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", _tiny_policy(t),
                                            "--reward_model", _model_folder(t, "sft", "LlamaForCausalLM")],
     r"command line --reward_model: 'reward_model' is not a reward model \(architecture LlamaForCausalLM; a reward "
     r"model is a \*ForSequenceClassification with one label"),
    ("policy-is-a-reward-model", lambda t: ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path",
                                            _model_folder(t, "rm", "LlamaForSequenceClassification")],
     r"command line --model\.name_or_path: 'model\.name_or_path' is a reward model \(architecture "
     r"LlamaForSequenceClassification\), not a policy"),
    ("reward-model-not-a-model", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", _tiny_policy(t),
                                            "--reward_model", _model_folder(t, "e")],
     r"command line --reward_model: 'reward_model' is not a model folder \(no config\.json in it\)"),
    ("batch-larger-than-the-data", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train.batch_size", "8192",
                                              "--train.micro_batch_size", "64"],
     r"command line --train\.batch_size: 'train\.batch_size' \(8192\) is more than the 3800 training examples"),
    ("pipeline-with-no-stage", lambda t: ["pipeline", _bad(t, "p.yaml", "seed: 0\nsft: {}\n")],
     r"recipe: no stage to run: give at least one of sft, rm, ppo, dpo a 'data\.train'"),
    ("rm-refresh-judge-wrong-count", lambda t: _reward(t, "return [0.0] * len(completions)")
     + ["--reward_model", _model_folder(t, "rm", "LlamaForSequenceClassification"), "--rm_refresh",
        f"{{judge: '{t / 'judge.py'}:j'}}"] if _bad(t, "judge.py", "def j(prompts, completions, **kw):\n"
                                                                 "    return [0.0]\n") else None,
     r"reward function '.*judge\.py:j' returned 1 values for 4 samples \[at the check before the run"),
    ("mistyped-key", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--steps", "ten"],
     r"command line --steps: expected an integer"),
    ("out-of-range-in-recipe", lambda t: ["ppo", _bad(t, "r.yaml", "steps: 5\ntemperature: 0\n")],
     r"r\.yaml:2: temperature: must be > 0"),
    ("missing-checkpoint", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", "./runs/nope"],
     r"command line --model\.name_or_path: 'model\.name_or_path' points at a missing checkpoint: \./runs/nope"),
    ("missing-checkpoint-in-recipe", lambda t: ["ppo", "recipes/tiny/ppo.yaml"],
     r"recipes/tiny/ppo\.yaml:5: 'model\.name_or_path' points at a missing checkpoint: runs/tiny/sft"),
    ("reward-import", lambda t: ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--reward_fns", "[{fn: no_such_mod_x:f}]"],
     r"reward function 'no_such_mod_x:f': cannot import"),
    ("reward-no-such-function", lambda t: _reward(t, "return [0.0] * len(completions)")[:2]
     + ["--reward_fns", f"[{{fn: '{t / 'reward.py'}:score'}}]"],
     r"reward\.py has no function 'score'; it has: helper, r"),
    ("reward-raises", lambda t: _reward(t, "raise ValueError('boom')"),
     r"reward function '.*reward\.py:r' raised ValueError: boom .*\[at the check before the run"),
    ("reward-wrong-count", lambda t: _reward(t, "return [0.0]"),
     r"returned 1 values for 4 samples \[at the check before the run"),
    ("reward-wrong-type", lambda t: _reward(t, "return ['high'] * len(completions)"),
     r"returned 'high' for sample 0, expected a float"),
    ("reward-returns-a-string", lambda t: _reward(t, "return 'good'"), r"returned str, expected a list of floats"),
    ("reward-returns-number-strings", lambda t: _reward(t, "return ['1.0'] * len(completions)"),
     r"returned '1\.0' for sample 0, expected a float"),
    ("reward-exits", lambda t: _reward(t, "raise SystemExit(3)"), r"raised SystemExit: 3 on a batch of 4 samples"),
    ("reward-nan", lambda t: _reward(t, "return [math.nan] * len(completions)"),
     r"returned nan for sample 0"),
    ("reward-hangs", lambda t: _reward(t, "time.sleep(60)\nreturn [0.0] * len(completions)"),
     r"took longer than reward_timeout \(2 s\) \[at the check before the run"),
    ("bad-yaml", lambda t: ["sft", _bad(t, "r.yaml", "train: [1,\n")], r"r\.yaml:\d+: invalid YAML"),
    ("bad-deepspeed-json", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train.deepspeed", _bad(t, "ds.json", "{")],
     r"ds\.json:1: invalid JSON"),
]


def _bad_bytes(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed run folder (the tiny SFT), the earlier run every bad input must leave intact."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "2", "--gen_eval_samples", "2",
          "--train.log_every", "1")
    return out


def _rlhf_here(capsys, *args) -> tuple[int, str]:
    """`rlhf ARGS` in this process (the CLI's own entry point; no interpreter start per case):
    (exit status, stderr). An exception that escapes the CLI -- a traceback -- fails the test."""
    from rlhf.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_one_line_exit_2_earlier_run_untouched(tmp_path, case, overwrite, finished_run, capsys,
                                                              monkeypatch):
    """Every bad input: exit 2, one line naming file:line:field, no traceback, and the finished
    run it would replace byte-identical, with --overwrite and without (then the message also says
    the folder holds a run: inputs are validated first, and both problems are named)."""
    import shutil

    # run where the recipes' relative paths (runs/tiny/sft) point at nothing, whatever the checkout
    # holds: the README's first command leaves a real runs/tiny/ in it
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path / "cwd")
    _, build, pattern = case
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = _tree(out)
    args = build(tmp_path)
    rc, stderr = _rlhf_here(capsys, *args, "--output_dir", out, *(["--overwrite"] if overwrite else []))
    err = [l for l in stderr.strip().splitlines() if "error:" in l]
    assert rc == 2, stderr[-2000:]
    assert len(err) == 1 and re.search(pattern, err[0]), stderr[-2000:]
    assert "Traceback" not in stderr
    if args[0] == "compare":  # (compare never replaces a run: another one's folder is named either way)
        assert "holds an rlhf sft run, not a comparison" in err[0], err[0]
    else:
        assert ("already holds a run" in err[0]) == (not overwrite), err[0]
    assert _tree(out) == before  # nothing already written was lost
    assert not staging_path(out).exists()  # and nothing half-made was left beside it


@pytest.mark.slow
def test_model_fields_that_fit_no_model_are_one_line(tmp_path, capsys):
    """What only the model can refuse (it is built after the run folder is planned): a misspelled
    or unknown `model.arch` field, LoRA target modules the model does not have."""
    cases = [(["--model.arch.hiden_size", "32"], r"command line --model\.arch\.hiden_size: 'model\.arch\.hiden_size' "
                                                 r"is not a field of transformers' LlamaConfig \(did you mean 'hidden_size'\?\)"),
             (["--model.arch.model_type", "lama"], r"'model\.arch\.model_type' 'lama' is not a model type transformers "
                                                   r"knows \(did you mean 'llama'\?\)"),
             (["--model.lora.enabled", "true", "--model.lora.target_modules", "[q_proj, nope_proj]"],
              r"command line --model\.lora\.target_modules: 'model\.lora\.target_modules' names no module of this model: "
              r"nope_proj"),
             (["--model.lora.enabled", "true", "--model.lora.target_modules", "[input_layernorm]"],
              r"'model\.lora\.target_modules' names modules peft cannot adapt"),
             (["--model.arch.hidden_size", "abc"], r"'model\.arch' does not make a valid LlamaConfig \(Validation error "
                                                   r"for field 'hidden_size'"),
             (["--model.arch.hidden_size", "-4"], r"command line --model\.arch\.hidden_size: 'model\.arch\.hidden_size' "
                                                  r"must be >= 1, got -4")]
    for i, (args, pattern) in enumerate(cases):
        rc, stderr = _rlhf_here(capsys, "sft", "recipes/tiny/sft.yaml", "--output_dir", tmp_path / str(i), *args)
        err = [l for l in stderr.strip().splitlines() if "error:" in l]
        assert rc == 2 and len(err) == 1 and re.search(pattern, err[0]) and "Traceback" not in stderr, stderr[-2000:]
        assert not (tmp_path / str(i)).exists()


@pytest.mark.slow
def test_rows_longer_than_a_models_learned_positions_are_refused_before_training(tmp_path, capsys, monkeypatch):
    """A model with a learned position table (GPT-2's n_positions) indexes past it on a longer
    row: an IndexError at the first step, or after SFT's training at its gold evaluation, and in
    PPO at the first rollout. Each stage now refuses it before training, in one line."""
    gpt2 = "{model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2, n_positions: %d, bos_token_id: 1, eos_token_id: 1}"
    sft = ["sft", "recipes/tiny/sft.yaml", "--train.max_steps", "1"]
    cases = [(sft + ["--model.arch", gpt2 % 16], r"the longest training row: 18 tokens, but the model has learned "
                                                  r"positions for only 16 \(max_position_embeddings / n_positions\)"),
             (sft + ["--model.arch", gpt2 % 20, "--max_new_tokens", "16"],
              r"the longest gold-evaluation prompt with max_new_tokens: \d+ tokens, but the model has learned "
              r"positions for only 20 \(.*\); lower max_new_tokens or gen_eval_samples: 0")]
    for i, (args, pattern) in enumerate(cases):
        rc, stderr = _rlhf_here(capsys, *args, "--output_dir", tmp_path / str(i))
        err = [l for l in stderr.strip().splitlines() if "error:" in l]
        assert rc == 2 and len(err) == 1 and re.search(pattern, err[0]) and "Traceback" not in stderr, stderr[-2000:]
        assert not (tmp_path / str(i)).exists()
    policy = tmp_path / "policy"
    assert _rlhf_here(capsys, *sft, "--model.arch", gpt2 % 30, "--gen_eval_samples", "0", "--output_dir", policy)[0] == 0
    # the commands that only sample (an IndexError traceback before; rlhf chat lost the conversation)
    prompts = "recipes/tiny/data/eval_prompts.jsonl"
    for args in (["generate", policy, "--prompts", prompts], ["eval", policy, "--prompts", prompts, "--max_samples", "4"],
                 ["sample", policy, prompts, "--k", "2", "--max_prompts", "4", "--out", tmp_path / "s.jsonl"]):
        rc, stderr = _rlhf_here(capsys, *args, "--max_new_tokens", "40")
        assert rc == 2 and re.search(r"error: (\S+: )?prompt \d+ \(\d+ tokens\) with max_new_tokens 40, less the last "
                                     r"token \(never fed back\): \d+ tokens, but the model has learned positions for "
                                     r"only 30 .*; lower max_new_tokens", stderr), (args[0], stderr[-2000:])
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Sort the digits: 12345 and then 67890 please\nhi\n/exit\n"))
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    from rlhf.cli import main

    capsys.readouterr()
    rc = main(["chat", str(policy), "--max_new_tokens", "20"])  # 31 tokens + 20 > 30; then 4 + 20 fits
    out, stderr = capsys.readouterr()
    assert rc == 0 and re.search(r"error: the conversation \(31 tokens\) with max_new_tokens 20, less the last token "
                                 r"\(never fed back\): 50 tokens, .*start over with /reset; message not sent",
                                 stderr) and "Traceback" not in stderr, stderr
    assert "\n" in out  # the second message's reply: the session went on
    ppo = ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", policy, "--output_dir", tmp_path / "ppo"]
    rc, stderr = _rlhf_here(capsys, *ppo, "--max_new_tokens", "40")
    assert rc == 2 and re.search(r"error: the longest prompt with max_new_tokens: \d+ tokens, but the model has "
                                 r"learned positions for only 30 \(.*\); lower data\.max_prompt_length", stderr), stderr[-2000:]
    assert not (tmp_path / "ppo").exists()
    # a reward model that reads the sampled ids, with fewer positions than the policy (it failed mid-rollout)
    long_policy, rm = tmp_path / "policy64", tmp_path / "rm30"
    assert _rlhf_here(capsys, *sft, "--model.arch", gpt2 % 64, "--gen_eval_samples", "0", "--output_dir",
                      long_policy)[0] == 0
    assert _rlhf_here(capsys, "rm", "recipes/tiny/rm.yaml", "--model.name_or_path", policy, "--sample", "null",
                      "--train.max_steps", "1", "--data.max_length", "30", "--data.skip_bad_rows", "true",
                      "--output_dir", rm)[0] == 0
    rc, stderr = _rlhf_here(capsys, "ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", long_policy,
                            "--reward_model", rm, "--value_init", "policy", "--max_new_tokens", "24", "--output_dir",
                            tmp_path / "ppo2")
    assert rc == 2 and re.search(r"error: the longest prompt with max_new_tokens, as reward_model reads it: \d+ "
                                 r"tokens, but the model has learned positions for only 30", stderr), stderr[-2000:]
    # rm_refresh samples with its own max_new_tokens: checked with the rest (found at its first refresh before)
    rc, stderr = _rlhf_here(capsys, "ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", policy,
                            "--reward_model", rm, "--value_init", "policy", "--max_new_tokens", "4", "--rm_refresh",
                            "{every: 1, k: 2, max_new_tokens: 40}", "--output_dir", tmp_path / "ppo3")
    assert rc == 2 and re.search(r"error: the longest prompt with rm_refresh\.max_new_tokens \(sampled\): \d+ tokens, "
                                 r"but the model has learned positions for only 30", stderr), stderr[-2000:]
    # an RM that ranks its policy's samples: the longest sample prompt + sample.max_new_tokens must fit (it was
    # data.max_length, which refused a generous bound although the samples would fit)
    sample = ["rm", "recipes/tiny/rm.yaml", "--model.name_or_path", policy, "--sample.checkpoint", policy,
              "--data.train", "null", "--data.eval", "null", "--sample.max_prompts", "32", "--train.max_steps", "1",
              "--train.batch_size", "2", "--train.micro_batch_size", "2", "--data.max_length", "100"]
    rc, stderr = _rlhf_here(capsys, *sample, "--sample.max_new_tokens", "24", "--output_dir", tmp_path / "rm_s")
    assert rc == 2 and re.search(r"error: the longest sample\.prompts prompt with sample\.max_new_tokens: \d+ tokens, "
                                 r"but the model has learned positions for only 30", stderr), stderr[-2000:]
    assert _rlhf_here(capsys, *sample, "--sample.max_new_tokens", "4", "--output_dir", tmp_path / "rm_s")[0] == 0
    # sample.mix_with's rows are appended to the sampled ones: checked before sampling (found after it otherwise)
    mix = _rows(tmp_path, "mix.jsonl", {"prompt": "sort 3 1 2", "chosen": "1 2 3 " * 10, "rejected": "3 2 1"})
    rc, stderr = _rlhf_here(capsys, *sample, "--sample.max_new_tokens", "4", "--sample.mix_with", mix,
                            "--output_dir", tmp_path / "rm_m")
    assert rc == 2 and re.search(r"error: the longest sample\.mix_with row: \d+ tokens, but the model has learned "
                                 r"positions for only 30", stderr), stderr[-2000:]
    # `rlhf score` names the row a reward model cannot read whole (it was an IndexError traceback)
    for args in (["score", rm, mix], ["eval", rm, "--pairs", mix]):  # (and `rlhf eval --pairs`)
        rc, stderr = _rlhf_here(capsys, *args)
        assert rc == 2 and re.search(r"error: .*mix\.jsonl:1: field 'chosen': \d+ tokens with the prompt, more than "
                                     r"the reward model's 30 learned positions", stderr), (args, stderr[-2000:])
    # the same RM with a tokenizer of its own (another template): it re-encodes the text, counted in its tokens
    from transformers import AutoTokenizer

    foreign = AutoTokenizer.from_pretrained(rm)
    foreign.chat_template += "{# the RM's own template #}"
    foreign.save_pretrained(rm)
    rc, stderr = _rlhf_here(capsys, "ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", long_policy,
                            "--reward_model", rm, "--value_init", "policy", "--max_new_tokens", "24", "--output_dir",
                            tmp_path / "ppo3")
    assert rc == 2 and re.search(r"error: the longest prompt in reward_model's own tokens with max_new_tokens: \d+ "
                                 r"tokens, but the model has learned positions for only 30", stderr), stderr[-2000:]
    assert not (tmp_path / "ppo3").exists()


@pytest.mark.slow
def test_overwrite_never_deletes_the_runs_own_inputs(tmp_path, finished_run, capsys):
    """`rlhf ppo --model.name_or_path D --output_dir D --overwrite` trained, then replaced the SFT
    checkpoint it started from with the PPO run (the SFT model was gone); the same for a data file
    kept in the folder. Refused in one line before anything loads; the folder is untouched."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    shutil.copy("recipes/tiny/data/sft.jsonl", out / "d.jsonl")
    before = _tree(out)
    cases = [(["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", out, "--steps", "1"],
              rf"{out}: --overwrite would delete this run's own input model\.name_or_path \({out}\)"),
             (["sft", "recipes/tiny/sft.yaml", "--data.train", out / "d.jsonl"],
              rf"--overwrite would delete this run's own input data\.train \({out / 'd.jsonl'}\)")]
    for args, pattern in cases:
        rc, stderr = _rlhf_here(capsys, *args, "--output_dir", out, "--overwrite")
        err = [l for l in stderr.strip().splitlines() if "error:" in l]
        assert rc == 2 and len(err) == 1 and re.search(pattern, err[0]) and "Traceback" not in stderr, stderr[-2000:]
        assert _tree(out) == before and not staging_path(out).exists()


@pytest.mark.slow
def test_a_run_folder_a_live_process_writes_is_refused(tmp_path, finished_run, capsys):
    """A second run into the folder a live run writes was told "an interrupted run is in
    .D.staging; pass --resume ... or --overwrite": --overwrite then deleted the live run's staging
    folder (checkpoints and all), and the first run crashed when it came to promote it. The live
    run holds a flock on its .rlhf-run file (the kernel drops it when the process dies), and
    every other run into the folder is refused, --overwrite and --resume included."""
    from rlhf.errors import RunError
    from rlhf.rundir import KIND, MARK, RunFolder, busy, hold, open_folder, release

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    live = staging_path(out)
    live.mkdir()
    (live / MARK).write_text("{}")
    (live / KIND).write_text('{"command": "sft"}\n')
    rf = RunFolder(out, live)
    hold(rf)  # (a flock is per open file: this process's own CLI runs see it as another's)
    try:
        for flag in ([], ["--overwrite"], ["--resume"]):
            rc, stderr = _rlhf_here(capsys, "sft", "recipes/tiny/sft.yaml", "--output_dir", out, *flag)
            err = [l for l in stderr.strip().splitlines() if "error:" in l]
            assert rc == 2 and len(err) == 1, stderr[-2000:]
            assert err[0].endswith(f"{out}: another running rlhf is writing this run ({live}); wait for it to "
                                   f"finish, or give this run another --output_dir"), err[0]
        assert (live / KIND).exists() and busy(out)
        (tmp_path / "link").symlink_to(out)  # (a run through a link is staged beside the target)
        assert busy(tmp_path / "link") and "another running rlhf" in busy(tmp_path / "link")
        # two runs that planned the folder before either opened it: the later one does not clear the live one's
        with pytest.raises(RunError, match="another running rlhf is writing this run"):
            open_folder(RunFolder(out, live, command="sft"), overwrite=True, resume=False)
        assert (live / MARK).exists()
    finally:
        release(rf)
    inner = out / ".sft.staging"  # a live run inside the folder (rlhf sft --output_dir out/sft): not replaced
    inner.mkdir()
    (inner / KIND).write_text('{"command": "sft"}\n')
    rf = RunFolder(out / "sft", inner)
    hold(rf)
    try:
        assert f"{out}: a running rlhf is writing a run inside it ({inner})" in busy(out)
    finally:
        release(rf)
    shutil.rmtree(inner)
    assert busy(out) is None  # the process that held it is gone: an interrupted run, resumable as before
    rc, stderr = _rlhf_here(capsys, "sft", "recipes/tiny/sft.yaml", "--output_dir", out)
    assert rc == 2 and "an interrupted run is in" in stderr


def test_commands_name_a_folder_that_is_not_the_model_they_need(tmp_path, capsys):
    """`rlhf score` on a policy (it would load a fresh random head and score noise), `generate` and
    `eval` on a folder that is not a model or does not exist, prompts that are not UTF-8 or not a
    file, a judge that returns the wrong count: exit 2 and one line naming the path or function,
    never a traceback or a hub lookup, and before any sampling."""
    policy, empty = _model_folder(tmp_path, "sft", "LlamaForCausalLM"), _model_folder(tmp_path, "empty")
    rm = _model_folder(tmp_path, "rm", "LlamaForSequenceClassification")
    rows = _rows(tmp_path, "rows.jsonl", {"prompt": "a", "response": "b"})
    prompts = _bad_bytes(tmp_path, "p.txt", b"caf\xe9\n")
    judge = _bad(tmp_path, "judge.py", "def j(prompts, completions, **kw):\n    return [0.0]\n")
    wrong_count = r"judge\.py:j' returned 1 values for 3 samples \[at the check before the run"
    three = _rows(tmp_path, "three.jsonl", *[{"prompt": f"q{i}"} for i in range(3)])
    cases = [(["score", policy, rows], rf"{policy}: not a reward model \(architecture LlamaForCausalLM"),
             (["generate", empty, "--prompts", rows], rf"{empty}: not a model folder \(no config\.json in it\)"),
             (["eval", tmp_path / "nope", "--prompts", rows], rf"{tmp_path / 'nope'}: no such checkpoint folder"),
             (["eval", policy, "--prompts", rows, "--reward_model", policy], rf"{policy}: not a reward model"),
             (["generate", tmp_path, "--prompts", prompts], r"p\.txt:1:4: not UTF-8 \(byte 0xe9\)"),
             (["generate", tmp_path, "--prompts", tmp_path], rf"{tmp_path}: not a file"),
             # a judge is called once before any sampling, as PPO's reward functions are
             (["sample", policy, three, "--judge", f"{judge}:j", "--out", tmp_path / "s.jsonl"], wrong_count),
             (["eval", policy, "--prompts", three, "--judge", f"{judge}:j"], wrong_count),
             # a reward model where a policy is needed, and a checkpoint with nothing to measure it on
             (["generate", rm, "--prompts", rows], rf"{rm}: a reward model \(architecture "
                                                   r"LlamaForSequenceClassification\), not a policy"),
             (["sample", rm, three, "--out", tmp_path / "s2.jsonl"],
              r"'sample\.checkpoint' is a reward model \(architecture LlamaForSequenceClassification\)"),
             (["eval", policy], rf"{policy}: a policy, and nothing to measure it on: give --prompts"),
             (["eval", rm, "--prompts", three], rf"{rm}: a reward model, and nothing to measure it on: give --pairs"),
             # the inputs before any model loads (this policy folder has no weights: loading it would fail)
             (["eval", policy, "--perplexity", tmp_path / "nope.jsonl"], r"nope\.jsonl: data file not found"),
             (["generate", policy, "--prompts", _bad(tmp_path, "e.txt", "\n \n")], r"e\.txt: no prompts in it")]
    for args, pattern in cases:
        if args[0] == "generate" and args[1] == tmp_path:  # (a real model, so the prompts are what is wrong)
            args[1] = _tiny_policy(tmp_path)
        rc, stderr = _rlhf_here(capsys, *args)
        err = [l for l in stderr.strip().splitlines() if "error:" in l]
        assert rc == 2 and len(err) == 1 and re.search(pattern, err[0]), (args, stderr[-2000:])


@pytest.mark.parametrize("args,needle", [
    (["sample", "x", "p.jsonl", "--out", "s.jsonl", "--k", "1"], "--k: must be >= 2, got 1"),
    (["score", "x", "f.jsonl", "--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["generate", "x", "--max_new_tokens", "-1"], "--max_new_tokens: must be >= 1, got -1"),
    (["generate", "x", "--top_p", "5"], "--top_p: must be in (0, 1], got 5.0"),
    (["generate", "x", "--greedy", "--temperature", "0", "--top_k", "-1"], "--top_k: must be >= 0, got -1"),
    (["chat", "x", "--temperature", "nan"], "--temperature: expected a finite number, got nan"),
    (["eval", "x", "--max_samples", "0"], "--max_samples: must be >= 1, got 0"),
    (["report", "no_such_run_folder"], "no_such_run_folder: no such run folder"),
    (["generate", "x", "--seed", str(2**64)], "--seed: must be <= 4294967295, got 18446744073709551616"),
    (["chat", "x", "--system", "caf\udce9"], "--system: not UTF-8 text"),  # (bytes the OS passed as they were)
    (["report", "recipes"], "recipes: holds no run (no summary.json or metrics.jsonl"),
])
def test_value_flags_are_checked_before_anything_loads(capsys, args, needle):
    """The commands without a recipe check their value flags as a recipe's fields are checked:
    one line and exit 2 before the checkpoint (here a missing one) is even looked at; `report`
    of a folder that holds no run writes nothing into it."""
    rc, stderr = _rlhf_here(capsys, *args)
    assert rc == 2 and f"error: {needle}" in stderr and "Traceback" not in stderr, stderr


def test_out_files_are_checked_before_anything_loads_and_never_replaced_unasked(tmp_path, capsys):
    """--out of sample / score / generate / eval / join-ranks, and data make's folder: a folder, a
    path under a file, or a file already there (without --overwrite) is one line and exit 2,
    before any model loads (the checkpoint named here does not exist), and the file is untouched."""
    kept = tmp_path / "ranked.jsonl"
    kept.write_text('{"id": 0, "prompt": "q", "responses": ["a", "b"], "ranks": [1, 2]}\n')
    (tmp_path / "afile").write_text("x")
    commands = {"sample": ["sample", tmp_path / "nope", tmp_path / "p.jsonl"],
                "score": ["score", tmp_path / "nope", tmp_path / "rows.jsonl"],
                "generate": ["generate", tmp_path / "nope"],
                "eval": ["eval", tmp_path / "nope"],
                "join-ranks": ["data", "join-ranks", kept, kept]}
    for name, args in commands.items():
        for out, pattern in ((tmp_path, r"--out .*: is a folder; name a file"),
                             (tmp_path / "afile" / "o.jsonl", r"--out .*o\.jsonl: .*afile is a file, not a folder"),
                             (kept, r"--out .*ranked\.jsonl: already exists; pass --overwrite to replace it")):
            rc, stderr = _rlhf_here(capsys, *args, "--out", out)
            assert rc == 2 and re.search(pattern, stderr) and "Traceback" not in stderr, (name, out, stderr[-1500:])
    assert kept.read_text().endswith('"ranks": [1, 2]}\n')
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        rc, stderr = _rlhf_here(capsys, "data", "make", "sort", "--out", out)
        assert rc == 2 and "is a file, not a folder" in stderr and "Traceback" not in stderr, stderr
    small = ["--n_sft", "5", "--n_pref", "5", "--n_rl", "5", "--n_eval", "5"]
    assert _rlhf_here(capsys, "data", "make", "sort", "--out", tmp_path / "d", *small)[0] == 0
    (tmp_path / "d" / "sft.jsonl").write_text("mine\n")
    rc, stderr = _rlhf_here(capsys, "data", "make", "sort", "--out", tmp_path / "d", *small)
    assert rc == 2 and re.search(r"already holds sft\.jsonl, .*; pass --overwrite to replace them", stderr), stderr
    assert (tmp_path / "d" / "sft.jsonl").read_text() == "mine\n"
    assert _rlhf_here(capsys, "data", "make", "sort", "--out", tmp_path / "d", *small, "--overwrite")[0] == 0
    assert len((tmp_path / "d" / "sft.jsonl").read_text().splitlines()) == 5
    assert not list(tmp_path.rglob("*.tmp"))
    from rlhf.rundir import plan

    assert re.search(r"afile/run: .*afile is a file, not a folder", plan(tmp_path / "afile" / "run").problem)


def _tiny_rm(tmp_path):
    """A reward model of the tiny shape, from a config (untrained: these tests check the rows, not the scores)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from conftest import TINY_ARCH
    from rlhf.models import train_tokenizer

    out = tmp_path / "rm"
    tok = train_tokenizer(["sort the digits 0123456789"] * 4, 300)
    cfg = dict(TINY_ARCH)
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tok), num_labels=1,
                                  pad_token_id=tok.pad_token_id, **cfg)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_score_checks_each_row_as_a_preference_row_and_loses_no_score(tmp_path, capsys):
    """`rlhf score`: a row with both 'response' and 'completion' (both would land in 'score'), a
    response of user turns, or of two replies, is one line naming its row; a row's own 'score'
    is replaced with a warning that says so; chosen and rejected each get their own field."""
    rm = _tiny_rm(tmp_path)
    bad = [({"prompt": "q", "response": "a", "completion": "b"},
            r"r\.jsonl:2: field 'completion': a row with both 'response' and 'completion'"),
           ({"prompt": "q", "response": [{"role": "user", "content": "more?"}]},
            r"r\.jsonl:2: field 'response\[0\]\.role': two user turns in a row"),
           ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                                       {"role": "assistant", "content": "c"}], "rejected": "d"},
            r"r\.jsonl:2: field 'chosen': a response of 3 messages"),
           ({"prompt": "q", "response": 3}, r"r\.jsonl:2: field 'response': expected a string")]
    for row, pattern in bad:
        rows = _rows(tmp_path, "r.jsonl", {"prompt": "q", "response": "fine"}, row)
        rc, stderr = _rlhf_here(capsys, "score", rm, rows, "--out", tmp_path / "o.jsonl", "--overwrite")
        err = [l for l in stderr.strip().splitlines() if "error:" in l]
        assert rc == 2 and len(err) == 1 and re.search(pattern, err[0]), (row, stderr[-1500:])
    assert not (tmp_path / "o.jsonl").exists()
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = _rows(tmp_path, "r.jsonl", {"prompt": "q", "completion": "a", "score": 99.0},
                 {"prompt": "q", "chosen": "a", "rejected": ""}, {"prompt": "q", "response": "a"},
                 {"prompt": "q", "chosen": conversation, "rejected": conversation[:1] + [{"role": "assistant",
                                                                                           "content": "b"}]})
    rc, stderr = _rlhf_here(capsys, "score", rm, rows, "--out", tmp_path / "o.jsonl", "--overwrite")
    assert rc == 0 and "1 rows already have the score fields written here" in stderr, stderr[-1500:]
    out = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert out[0]["score"] != 99.0 and out[0]["score"] == pytest.approx(out[2]["score"])  # same prompt and reply
    assert set(out[1]) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    # whole conversations (UltraFeedback-binarized) are split at their shared prefix, as in RM training
    assert out[3]["score_chosen"] == pytest.approx(out[1]["score_chosen"])


@pytest.mark.slow
def test_chat_and_stdin_prompts_that_are_not_utf8_are_one_line(tmp_path):
    """Piped input that is not UTF-8 is one line naming its stdin line (chat) or position (generate's
    prompts), not a tokenizer traceback; Windows line ends are not part of a chat turn."""
    policy = _tiny_policy(tmp_path)
    cmd = [sys.executable, "-m", "rlhf"]
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd + ["chat", str(policy), "--max_new_tokens", "2"], input=b"hello\ncaf\xe9\n",
                       capture_output=True, env=env, timeout=300)
    assert p.returncode == 2 and b"error: <stdin>:2:4: not UTF-8 (byte 0xe9)" in p.stderr, p.stderr[-1500:]
    p = subprocess.run(cmd + ["generate", str(policy), "--max_new_tokens", "2"], input=b"ok\ncaf\xe9\n",
                       capture_output=True, env=env, timeout=300)
    assert p.returncode == 2 and b"error: <stdin>:2:4: not UTF-8 (byte 0xe9)" in p.stderr, p.stderr[-1500:]
    from rlhf import cli

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rlhf.evaluate.sample_texts", lambda model, tok, prompts, **kw: (seen.append(prompts) or ["x"], [1]))
        mp.setattr(cli, "_load_policy", lambda path: (None, None))
        mp.setattr(sys, "stdin", type("In", (), {"buffer": __import__("io").BytesIO(b"hi\r\n"),
                                                 "isatty": lambda self: False})())
        assert cli.main(["chat", str(policy)]) == 0
    assert seen[0][0][0] == {"role": "user", "content": "hi"}  # (the history, the reply appended since)


def test_eval_reference_field_is_checked_row_by_row_before_sampling(tmp_path, capsys):
    """--reference_field: the first prompt row without it (or with a non-string) is named by its
    line, before any checkpoint samples; without --prompts it has nothing to compare."""
    policy = _tiny_policy(tmp_path)
    rows = _rows(tmp_path, "p.jsonl", {"prompt": "a", "ref": "x"}, {"prompt": "b"}, {"prompt": "c", "ref": 3})
    rc, stderr = _rlhf_here(capsys, "eval", policy, "--prompts", rows, "--reference_field", "ref")
    assert rc == 2 and "error: " + f"{rows}:2: field 'ref': missing (--reference_field" in stderr, stderr[-1500:]
    rows = _rows(tmp_path, "p.jsonl", {"prompt": "a", "ref": "x"}, {"prompt": "c", "ref": 3})
    rc, stderr = _rlhf_here(capsys, "eval", policy, "--prompts", rows, "--reference_field", "ref")
    assert rc == 2 and f"{rows}:2: field 'ref': expected a string, got int" in stderr, stderr[-1500:]
    rc, stderr = _rlhf_here(capsys, "eval", policy, "--perplexity", "recipes/tiny/data/sft.jsonl",
                            "--reference_field", "ref")
    assert rc == 2 and "--reference_field ref: BLEU/chrF compare sampled responses" in stderr, stderr[-1500:]


def test_environment_switches_take_the_usual_spellings_and_refuse_others(monkeypatch, capsys):
    from rlhf.engine import env_flag, retain_freed_cpu_memory
    from rlhf.errors import ConfigError

    for value, want in (("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("false", False),
                        ("", False), ("Off", False)):
        monkeypatch.setenv("RLHF_NO_PROGRESS", value)
        assert env_flag("RLHF_NO_PROGRESS") is want, value
    monkeypatch.setenv("RLHF_NO_PROGRESS", "ture")
    with pytest.raises(ConfigError, match="RLHF_NO_PROGRESS='ture': expected 1/true/yes/on or 0/false/no/off"):
        env_flag("RLHF_NO_PROGRESS")
    monkeypatch.delenv("RLHF_NO_PROGRESS")
    assert env_flag("RLHF_NO_PROGRESS") is False
    monkeypatch.setenv("RLHF_MALLOC", "sytem")
    monkeypatch.setattr("rlhf.engine._MALLOC_SET", [])
    with pytest.raises(ConfigError, match="RLHF_MALLOC='sytem': expected 'retain' \\(the default\\) or 'system'"):
        retain_freed_cpu_memory()
    rc, stderr = _rlhf_here(capsys, "generate", "no_such_checkpoint")  # at the start, before anything else
    assert rc == 2 and "error: environment variable RLHF_MALLOC='sytem'" in stderr, stderr


def _tiny_policy(tmp_path):
    out = tmp_path / "policy"
    if not out.exists():
        from transformers import AutoModelForCausalLM

        from conftest import TINY_ARCH
        from rlhf.models import train_tokenizer

        tok = train_tokenizer(["sort the digits 0123456789"] * 4, 300)
        cfg = dict(TINY_ARCH)
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tok),
                                                                      **cfg))
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_malformed_input_exits_2_from_the_command_line_too(tmp_path):
    """The same contract through a real `rlhf` process (the table above runs the CLI in-process)."""
    out = tmp_path / "new"
    p = _rlhf(*_reward(tmp_path, "raise ValueError('boom')"), "--output_dir", out, check=False)
    err = [l for l in p.stderr.strip().splitlines() if "error:" in l]
    assert p.returncode == 2 and len(err) == 1 and "raised ValueError: boom" in err[0] and "Traceback" not in p.stderr
    assert not out.exists() and not staging_path(out).exists()  # a fresh run that fails leaves no folder


def test_byte_order_mark_is_accepted(tmp_path):
    from rlhf.config import read_yaml
    from rlhf.data.formats import read_rows

    d = _bad_bytes(tmp_path, "b.jsonl", b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert read_rows(str(d))[0].data == {"prompt": "a", "completion": "b"}
    r = _bad_bytes(tmp_path, "r.yaml", b"\xef\xbb\xbfseed: 3\n")
    assert read_yaml(r) == {"seed": 3}


def test_identical_pair_is_warned_once_with_its_line(tmp_path, caplog):
    from rlhf.data.formats import load_examples, parse_preference

    f = _rows(tmp_path, "p.jsonl", {"prompt": "q", "chosen": "a", "rejected": "b"},
              {"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "x", "rejected": "x"})
    with caplog.at_level("WARNING"):
        groups, stats = load_examples(str(f), parse_preference)
    warned = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert stats["duplicate_pairs"] == 2 and len(groups) == 1
    assert len(warned) == 1 and f"{f}:2: field 'rejected': chosen and rejected are the same" in warned[0]


@pytest.mark.slow
def test_reward_failure_mid_run_names_the_row_and_resumes_exactly(tmp_path, tiny_sft):
    """A reward function that fails at iteration 3 stops the run with its name and the prompt's
    file:line, after saving the state before iteration 3; once fixed, --resume finishes the run
    exactly as an uninterrupted one."""
    f = tmp_path / "flaky.py"
    f.write_text("import os\nCALLS = [0]\n\ndef r(prompts, completions, **kw):\n    CALLS[0] += 1\n"
                 "    if CALLS[0] == int(os.environ.get('FAIL_AT_CALL', 0)):\n        raise RuntimeError('judge down')\n"
                 "    return [float(len(c) % 3) for c in completions]\n")
    args = ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", tiny_sft, "--reward_fns",
            f"[{{fn: '{f}:r'}}]", "--steps", "4", "--save_every", "5", "--rollout_batch_size", "16",
            "--eval_samples", "16", "--sample_every", "0"]
    _rlhf(*args, "--output_dir", tmp_path / "full")
    # calls: 1 the check before the run, 2 the initial evaluation, 3 and 4 iterations 1 and 2, 5 iteration 3
    p = _rlhf(*args, "--output_dir", tmp_path / "cut", env_extra={"FAIL_AT_CALL": "5"}, check=False)
    err = [l for l in p.stderr.splitlines() if "error:" in l]
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert re.search(r"iteration 3: reward function '.*flaky\.py:r' raised RuntimeError: judge down on a batch of "
                     r"16 samples \(first row recipes/tiny/data/rl_prompts\.jsonl:\d+\).*resumable from step-00000002",
                     err[0]), err[0]
    staged = staging_path(tmp_path / "cut")
    assert (staged / "FAILED").exists() and (staged / "checkpoints" / "step-00000002").is_dir()
    _rlhf(*args, "--output_dir", tmp_path / "cut", "--resume")
    _assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_tokenizer_without_eos_is_an_error():
    from rlhf.models import ModelError, prepare_tokenizer
    from rlhf.models import train_tokenizer

    tok = train_tokenizer(["abc"], 270)
    tok.eos_token = None
    with pytest.raises(ModelError, match="has no EOS token"):
        prepare_tokenizer(tok)


# ----------------------------------------------------------------------------- non-finite guard


def test_nan_loss_never_reaches_the_weights(tiny_lm):
    from accelerate import Accelerator

    from rlhf.config import OptimConfig
    from rlhf.engine import make_optimizer, make_scheduler, optimizer_step

    acc = Accelerator(cpu=True)
    opt = make_optimizer(tiny_lm.parameters(), OptimConfig(lr=1e-2))
    sched = make_scheduler(opt, "linear", 10, 0.0)
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = tiny_lm(input_ids=ids, labels=ids).loss * float("nan")
    loss.backward()
    stepped, _ = optimizer_step(acc, tiny_lm, opt, sched, 1.0, loss_ok=bool(torch.isfinite(loss)))
    assert not stepped
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.state_dict().items())
    assert not opt.state and sched.last_epoch == 0  # no Adam moments, no schedule step
    assert all(p.grad is None for p in tiny_lm.parameters())
    loss = tiny_lm(input_ids=ids, labels=ids).loss  # a finite step afterwards works
    loss.backward()
    stepped, norm = optimizer_step(acc, tiny_lm, opt, sched, 1.0)
    assert stepped and norm > 0 and not torch.equal(before["model.embed_tokens.weight"],
                                                    tiny_lm.model.embed_tokens.weight)


def test_nonfinite_guard_stops_after_k_in_a_row():
    from rlhf.engine import NonFiniteGuard, RunError

    g = NonFiniteGuard(3)
    g.update(False, 1)
    g.update(True, 2)
    g.update(False, 3)
    g.update(False, 4)
    with pytest.raises(RunError, match="3 optimizer steps in a row"):
        g.update(False, 5)
    assert g.skipped == 4
    # fewer steps than the streak limit, every one skipped: the run trained nothing (it ended as a success)
    g = NonFiniteGuard(5)
    g.update(False, 1)
    g.update(False, 2)
    g.check_trained(3)
    g.update(False, 3)
    with pytest.raises(RunError, match="every one of this run's 3 optimizer steps had a non-finite loss or gradient: "
                                       "nothing was trained, and no model is saved as its result; lower"):
        g.check_trained(3)


@pytest.mark.slow
def test_a_run_whose_every_step_was_skipped_is_no_result(tmp_path):
    """An SFT run of one step, that step non-finite: before, exit 0 and the initial model saved as
    the trained one; now one line, exit 2, and no run folder."""
    out = tmp_path / "sft"
    p = _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "1", "--gen_eval_samples", "0",
              "--train.save_every", "1", env_extra={"RLHF_FAULT": "nan:1"}, check=False)
    assert p.returncode == 2 and "error: every one of this run's 1 optimizer steps had a non-finite" in p.stderr, \
        p.stderr[-2000:]
    assert "resumable" not in p.stderr  # (no last checkpoint to resume from: that resume could only fail again)
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


@pytest.mark.slow
def test_injected_nan_step_is_skipped_and_counted(tmp_path):
    out = tmp_path / "sft"
    _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "6", "--gen_eval_samples", "4",
          env_extra={"RLHF_FAULT": "nan:3"})
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in _weights(out / "model.safetensors").values())


# ----------------------------------------------------------------------------- safety


def test_no_unsafe_loading_in_the_code():
    src = "\n".join(p.read_text() for p in (ROOT / "rlhf").rglob("*.py"))
    for call in re.findall(r"torch\.load\([^)]*\)", src):
        assert "weights_only=True" in call, call
    assert "import pickle" not in src and "pickle.load" not in src
    assert "trust_remote_code=True" not in src
    from rlhf.config import ModelConfig

    assert ModelConfig().trust_remote_code is False


@pytest.mark.slow
def test_overwrite_killed_at_any_moment_keeps_the_old_run_or_the_new_one(tmp_path, finished_run):
    """kill -9 at random moments of a run that overwrites a finished run (fault points after a
    step, in a checkpoint write, between the two halves of the promotion, and at random times):
    afterwards the old run is intact, or the new run is complete, or it is resumable and
    `--resume` completes it -- never neither. The kill points are seeded (RLHF_TEST_SEED)."""
    import shutil
    import signal
    import time

    seed = int(os.environ.get("RLHF_TEST_SEED", "0"))
    rng = random.Random(seed)
    new = ["sft", "recipes/tiny/sft.yaml", "--train.max_steps", "6", "--train.save_every", "2", "--seed", "7",
           "--gen_eval_samples", "2", "--train.log_every", "1"]
    kills = ["promote:1", f"step:{rng.randint(1, 5)}", f"checkpoint:{rng.randint(1, 3)}",
             f"time:{rng.uniform(1.0, 6.0):.2f}"]
    old = _tree(finished_run)
    for i, kill in enumerate(kills):
        out = tmp_path / f"run{i}"
        shutil.copytree(finished_run, out)
        env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "rlhf", *new, "--output_dir", str(out), "--overwrite"]
        if kill.startswith("time:"):
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(float(kill[5:]))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            rc = subprocess.run(cmd, cwd=ROOT, env={**env, "RLHF_FAULT": kill}, capture_output=True).returncode
            assert rc == -9, (seed, kill, rc)
        old_intact = _tree(out) == old
        new_complete = (out / "summary.json").exists() and "seed: 7" in (out / "recipe.yaml").read_text()
        assert old_intact or new_complete, (seed, kill)
        resumable = staging_path(out).exists() and not new_complete
        _rlhf(*new, "--output_dir", out, "--resume")  # finishes a resumable run; cleans up an interrupted promotion
        if resumable:
            assert "seed: 7" in (out / "recipe.yaml").read_text(), (seed, kill)
        assert (out / "summary.json").exists() and not staging_path(out).exists(), (seed, kill)

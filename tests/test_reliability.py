"""kill -9 and exact resume for each stage, malformed input table, non-finite guard, safe loading."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT


def _rlhf(*args, env_extra=None, check=True):
    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT / "src"))
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
    rng = random.Random(os.environ.get("RLHF_TEST_SEED") or None)
    if rng.random() < 0.5:
        fault = f"step:{rng.randint(1, total_steps - 1)}"
    else:
        fault = f"checkpoint:{rng.randint(1, total_steps // save_every)}"
    print("fault injected:", fault)
    p = _rlhf(*args, "--output_dir", cut, env_extra={"RLHF_FAULT": fault}, check=False)
    assert p.returncode == -9, (fault, p.returncode, p.stderr[-2000:])  # killed by SIGKILL
    assert not (cut / "summary.json").exists()
    _rlhf(*args, "--output_dir", cut, "--resume")
    _assert_same_run(full, cut, files)


def test_sft_kill9_resume_is_exact(tmp_path):
    args = ["sft", "recipes/tiny/sft.yaml", "--train.max_steps", "24", "--train.save_every", "5",
            "--train.log_every", "3", "--gen_eval_samples", "8"]
    _kill_and_resume(tmp_path, args, 24, 5)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "sft"
    _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "40", "--gen_eval_samples", "8")
    return out


def test_rm_kill9_resume_is_exact(tmp_path, tiny_sft):
    args = ["rm", "recipes/tiny/rm.yaml", "--model.name_or_path", tiny_sft, "--sample.checkpoint", tiny_sft,
            "--sample.max_prompts", "16", "--train.max_steps", "20", "--train.save_every", "4",
            "--train.log_every", "3"]
    _kill_and_resume(tmp_path, args, 20, 4)


def test_ppo_kill9_resume_is_exact(tmp_path, tiny_sft):
    args = ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--model.name_or_path", tiny_sft, "--steps", "8",
            "--save_every", "2", "--rollout_batch_size", "16", "--eval_samples", "16", "--sample_every", "3",
            "--ema_decay", "0.9", "--ptx_coef", "0.1", "--ptx_data", "recipes/tiny/data/sft.jsonl",
            "--adaptive_kl", "true", "--scale_reward", "running_std"]
    _kill_and_resume(tmp_path, args, 8, 2, files=("model.safetensors", "ema/model.safetensors"))


def test_checkpoints_are_kept_k_and_never_half_written(tmp_path):
    out = tmp_path / "run"
    p = _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "12", "--train.save_every", "2",
              "--train.save_total_limit", "2", "--gen_eval_samples", "4", env_extra={"RLHF_FAULT": "checkpoint:4"},
              check=False)
    assert p.returncode == -9
    ckpts = sorted(d.name for d in (out / "checkpoints").iterdir())
    # step 8's checkpoint was being written: its temporary folder is there, the last complete ones are intact
    assert ckpts == [".tmp-step-00000008", "step-00000004", "step-00000006"], ckpts
    for d in ("step-00000004", "step-00000006"):
        assert (out / "checkpoints" / d / "state.json").exists()
    _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "12", "--train.save_every", "2",
          "--train.save_total_limit", "2", "--gen_eval_samples", "4", "--resume")
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-00000010", "step-00000012"]


def test_pipeline_resume_continues_the_stage_it_stopped_in(tmp_path):
    out = tmp_path / "pipe"
    small = ["--sft.train.max_steps", "6", "--sft.gen_eval_samples", "4", "--rm.sample.max_prompts", "8",
             "--rm.train.max_steps", "6", "--rm.train.save_every", "2", "--ppo.steps", "2",
             "--ppo.rollout_batch_size", "16", "--ppo.eval_samples", "8"]
    p = _rlhf("pipeline", "recipes/tiny/pipeline.yaml", "--output_dir", out, *small,
              env_extra={"RLHF_FAULT": "checkpoint:2"}, check=False)  # dies in the RM stage's 2nd checkpoint
    assert p.returncode == -9 and (out / "sft" / "summary.json").exists() and not (out / "rm" / "summary.json").exists()
    sft_before = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    _rlhf("pipeline", "recipes/tiny/pipeline.yaml", "--output_dir", out, *small, "--resume")
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == sft_before  # the finished stage was kept
    assert json.loads((out / "summary.json").read_text())["stages"] == ["sft", "rm", "ppo"]


# ----------------------------------------------------------------------------- malformed inputs


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


CASES = [
    # (id, builder(tmp) -> args, expected message regex)
    ("malformed-jsonl", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                   _bad(t, "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n')],
     r"d\.jsonl:2: malformed JSON"),
    ("missing-field", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train",
                                 _bad(t, "d.jsonl", '{"prompt": "a"}\n')], r"d\.jsonl:1: field 'completion': missing"),
    ("mistyped-field", lambda t: ["rm", "recipes/tiny/rm.yaml", "--data.train",
                                  _bad(t, "p.jsonl", '{"prompt": "a", "chosen": 1, "rejected": "b"}\n')],
     r"p\.jsonl:1: field 'chosen': expected a string"),
    ("empty-dataset", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.train", _bad(t, "e.jsonl", "")],
     r"e\.jsonl: empty dataset"),
    ("prompt-too-long", lambda t: ["sft", "recipes/tiny/sft.yaml", "--data.max_length", "8"],
     r"sft\.jsonl:\d+: \d+ tokens exceed data\.max_length \(8\)"),
    ("unknown-key", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--kl_coeff", "0.1"],
     r"unknown key 'kl_coeff' \(did you mean 'kl_coef'\?\)"),
    ("mistyped-key", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--steps", "ten"], r"steps: expected an integer"),
    ("missing-checkpoint", lambda t: ["ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", "./runs/nope"],
     r"points at a missing checkpoint: \./runs/nope"),
    ("reward-import", lambda t: ["ppo", "recipes/tiny/ppo_reward_fn.yaml", "--reward_fns", "[{fn: no_such_mod_x:f}]"],
     r"reward function 'no_such_mod_x:f': cannot import"),
    ("bad-yaml", lambda t: ["sft", _bad(t, "r.yaml", "train: [1,\n")], r"r\.yaml:\d+: invalid YAML"),
    ("bad-deepspeed-json", lambda t: ["sft", "recipes/tiny/sft.yaml", "--train.deepspeed", _bad(t, "ds.json", "{")],
     r"ds\.json:1: invalid JSON"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_one_line_exit_2_output_untouched(tmp_path, case):
    _, build, pattern = case
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": "run"}')  # an earlier run that --overwrite would replace
    (out / "model.safetensors").write_bytes(b"weights")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = build(tmp_path)
    p = _rlhf(*args, "--output_dir", out, "--overwrite", check=False)
    err = [l for l in p.stderr.strip().splitlines() if "error:" in l]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(err) == 1 and re.search(pattern, err[0]), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing already written was lost


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

    from rlhf.engine import make_optimizer, make_scheduler, optimizer_step

    acc = Accelerator(cpu=True)
    opt = make_optimizer(tiny_lm.parameters(), 1e-2)
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


def test_injected_nan_step_is_skipped_and_counted(tmp_path):
    out = tmp_path / "sft"
    _rlhf("sft", "recipes/tiny/sft.yaml", "--output_dir", out, "--train.max_steps", "6", "--gen_eval_samples", "4",
          env_extra={"RLHF_FAULT": "nan:3"})
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in _weights(out / "model.safetensors").values())


# ----------------------------------------------------------------------------- safety


def test_no_unsafe_loading_in_the_code():
    src = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    for call in re.findall(r"torch\.load\([^)]*\)", src):
        assert "weights_only=True" in call, call
    assert "import pickle" not in src and "pickle.load" not in src
    assert "trust_remote_code=True" not in src
    from rlhf.config import ModelConfig

    assert ModelConfig().trust_remote_code is False

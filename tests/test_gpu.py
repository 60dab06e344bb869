"""The GPU tier: run only where CUDA is present (`pytest -m gpu`); skipped on CPU machines and in
CI. bench/gpu_check.py covers the same ground at SmolLM2 size with figures."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sampling_on_cuda_is_reproducible_from_the_seed(tiny_lm, tok):
    from rlhf.rollout import generate

    model = tiny_lm.cuda()
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=12)
    runs = [generate(model, [[5, 6, 7], [8, 9]] * 4, generator=torch.Generator("cuda").manual_seed(1), **kw)
            for _ in range(2)]
    assert runs[0].response_ids.is_cuda and torch.equal(runs[0].response_ids, runs[1].response_ids)


def test_sampler_rejects_a_cpu_generator_for_a_cuda_model(tiny_lm):
    from rlhf.rollout import generate

    with pytest.raises(ValueError, match="generator on cpu"):
        generate(tiny_lm.cuda(), [[5, 6]], eos_token_id=1, pad_token_id=0, max_new_tokens=2,
                 generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_ppo_on_cuda(precision, sft_checkpoint, task_dir, tmp_path):
    from rlhf.config import load_stage_config
    from rlhf.stages import run

    cfg = load_stage_config("ppo", None, {
        "model.name_or_path": str(sft_checkpoint), "reward_fns": [{"fn": "gold"}], "value_init": "policy",
        "data.train": str(task_dir / "rl_prompts.jsonl"), "data.eval": str(task_dir / "eval_prompts.jsonl"),
        "steps": 3, "rollout_batch_size": 16, "minibatch_size": 8, "micro_batch_size": 4, "ppo_epochs": 2,
        "max_new_tokens": 8, "eval_samples": 16, "mixed_precision": precision, "sample_every": 0, "save_every": 1})
    s = run("ppo", cfg, str(tmp_path / "ppo"))
    assert s["initial_eval_kl"] == 0.0 and math.isfinite(s["eval_reward"]) and s["peak_gpu_mb"] > 0
    assert s["mfu_peak_dtype"] == {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[precision]
    if precision == "fp16":
        state = json.loads((tmp_path / "ppo" / "checkpoints" / "step-00000003" / "state.json").read_text())
        assert state["grad_scaler"]["scale"] > 0


def test_commands_use_the_gpu(sft_checkpoint, task_dir, tmp_path):
    from rlhf.cli import main

    torch.cuda.reset_peak_memory_stats()
    assert main(["generate", str(sft_checkpoint), "--prompts", str(task_dir / "eval_prompts.jsonl"),
                 "--max_new_tokens", "4", "--out", str(tmp_path / "g.jsonl")]) == 0
    assert torch.cuda.max_memory_allocated() > 0

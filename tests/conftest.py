"""Shared fixtures: a locally trained tokenizer, tiny models built from a config, task data.

No test touches the network: models are 2-layer Llama configs (d = 32) with random weights,
the tokenizer is trained here on the built-in task data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RLHF_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers (pytest -n 2): one thread each, processes they start too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
class WeightCasts:
    """Counts the bf16 copies made of the given tensors while entered: autocast's weight casts."""

    def __init__(self, tensors):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                        and args[0].data_ptr() in counter.ptrs):
                    counter.n += 1
                return func(*args, **kwargs)

        self.n, self.ptrs, self.mode = 0, {t.data_ptr() for t in tensors}, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


TINY_ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
             "tie_word_embeddings": True}


# the files that take longest, started first when `pytest -n 2` runs files in parallel workers (the
# workers then finish together instead of one waiting for the other's last long file)
LONGEST_FIRST = ("test_distributed.py", "test_reliability.py", "test_real_models.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts the same way (xdist compares the collections)
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


TRAINING_FIXTURES = {"sft_checkpoint", "finished_run", "tiny_sft", "sft_one", "rm_one", "pipeline_dir", "smol"}


@pytest.fixture(autouse=True)
def _slow_marker_is_honest(request, monkeypatch):
    """Tiers: a test that trains a model or spawns a process must be marked `slow`, so that
    `pytest -m "not slow"` stays a sub-minute loop. A test without the mark that tries either fails."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("gpu"):
        return
    trains = TRAINING_FIXTURES & set(request.fixturenames)
    assert not trains, f"uses {sorted(trains)}, which train a model: mark the test @pytest.mark.slow"

    def refuse(*args, **kwargs):
        raise AssertionError("this test trains a model or spawns a process: mark it @pytest.mark.slow")

    import subprocess

    import rlhf.stages

    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(rlhf.stages, "_run", refuse)


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    from rlhf.data.tasks import make_task_data

    d = tmp_path_factory.mktemp("sortdata")
    make_task_data("sort", d, n_sft=600, n_pref=400, n_rank=40, n_rl=300, n_eval=60, seed=0)
    return d


@pytest.fixture(scope="session")
def tok(task_dir):
    import json

    from rlhf.models import train_tokenizer

    texts = []
    for line in open(task_dir / "sft.jsonl"):
        r = json.loads(line)
        texts += [r["prompt"], r["completion"]]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture
def tiny_lm(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(TINY_ARCH)
    cfg = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, **arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory, task_dir) -> Path:
    """A tiny SFT run (trained for real, ~5 s) that RM/PPO/CLI tests start from."""
    from rlhf.config import load_stage_config
    from rlhf.stages import run

    out = tmp_path_factory.mktemp("sft_run")
    cfg = load_stage_config("sft", None, {
        "model.init": "from_config", "model.arch": TINY_ARCH, "model.tokenizer_vocab_size": 300,
        "data.train": str(task_dir / "sft.jsonl"), "data.eval_split": 0.1, "data.max_length": 48,
        "train.epochs": 3, "train.batch_size": 32, "train.micro_batch_size": 16, "train.lr": 3e-3,
        "train.log_every": 5, "max_new_tokens": 10, "gen_eval_samples": 32})
    run("sft", cfg, str(out), overwrite=True)
    return out


def run_cli(*args, cwd=None, check=True):
    import subprocess

    env = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "rlhf", *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                       env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(map(str, args))} exited {p.returncode}\n{p.stderr[-3000:]}")
    return p

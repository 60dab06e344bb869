"""Where PPO's models live: everything the loop needs, built once, so the loop never asks which engine runs.

:func:`setup_models` loads the policy, the frozen reference, the reward model and the value
model (when the advantage estimator uses one), places them for the run's engine -- one process,
DDP, DeepSpeed ZeRO-2/3, with the frozen models whole, sharded or offloaded, the LoRA policy
being its own reference -- builds the optimizers and schedules, and returns a
:class:`PPOModels`. The loop calls its methods: `gathered()` around a generation, `reference()`
for the reference log-probs, `step_parts()` for the optimizer step, `checkpoint_parts()` for
resumable checkpoints.

Under ZeRO-3 the checkpoints are read straight into partitions (transformers' zero.Init path: no
process ever holds a whole model) -- the policy, the value model and, when they are sharded, the
reference and the RM. Otherwise a model is loaded whole and partitioned as it is handed to
DeepSpeed (models built from a config always are: the same random init as a 1-process run).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..algos.advantages import ADVANTAGE_ESTIMATORS
from ..checkpoint import CheckpointParts
from ..config import PPOConfig
from ..cpu_linear import apply_onednn_linear, check_onednn_linear
from ..errors import RunError
from ..engine import (compute_dtype, frozen_placement, gathered_params, is_deepspeed, make_optimizer, make_scheduler,
                      prepare_frozen, run_autocast, zero_stage)
from ..flops import count_flop_params, count_head_params
from ..models import (compile_blocks, count_parameters, disable_dropout, load_causal_lm, outside_zero3_init, rng_fork,
                      unwrap)
from ..rewards import RewardModel
from ..value import load_value_model

log = logging.getLogger(__name__)


class PolicyValue(nn.Module):
    """Policy and value model as one module, so one DeepSpeed engine trains both (their forward
    passes are called on the submodules)."""

    def __init__(self, policy: nn.Module, value: nn.Module | None):
        super().__init__()
        self.policy, self.value = policy, value


@dataclass
class BatchSplit:
    """A PPO batch as this process sees it: rollouts, minibatch and micro-batch sizes."""

    rollouts: int
    minibatch: int
    micro: int


@dataclass
class PPOModels:
    """The run's models, placed for its engine, and their optimizers and schedules."""

    policy: nn.Module
    """The trained policy as prepared (DDP-wrapped, or the engine's submodule)."""
    value: nn.Module | None
    """The trained value model, or None for a critic-free advantage estimator."""
    ref: nn.Module | None
    """The frozen reference; None when it is the LoRA policy with its adapters off."""
    reward_model: RewardModel | None
    optimizers: list
    schedulers: list
    engine: object = None
    """The DeepSpeed engine training policy (+ value), or None."""
    collective: bool = False
    """Every process takes part in every forward of a sharded model (evaluation too)."""
    flop_params: dict = field(default_factory=dict)
    """Matmul parameters per model (policy, value, rm): the MFU's FLOP counts."""
    gathered: Callable = contextlib.nullcontext
    """Context in which the policy's full weights are present (ZeRO-3: gathered once per generation)."""
    gold_reward_model: RewardModel | None = None
    """A held-out reward model that measures (gold), never trains."""
    compiled: bool = False
    """The policy's and value model's blocks are compiled for training (PPOConfig.compile)."""
    autocast: Callable = contextlib.nullcontext
    """The run's mixed-precision autocast (accelerate's; a no-op in fp32 and under DeepSpeed, which
    casts the weights itself), entered once around a whole generation. The prepared models enter
    it in every forward, and autocast caches each trained weight's bf16/fp16 copy until the
    outermost region exits: inside this one a weight is cast once per rollout, not once per
    token. (The frozen models hold their linear weights in that dtype instead:
    rlhf.engine.hold_linear_weights. The experience forwards are not put in one region: that
    would save one cast of the policy and value model per micro-batch after the first, for a
    bf16 copy of both held at once, and on a GPU the memory is the dearer of the two.)"""

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference: a separate copy, or the LoRA policy with its adapters disabled."""
        if self.ref is not None:
            yield self.ref
        else:
            with unwrap(self.policy).disable_adapter():
                yield unwrap(self.policy)  # (not the DDP wrapper: no-grad forwards need no collective)

    def step_parts(self) -> list[tuple]:
        """(model, optimizer, schedule) per optimizer step; under DeepSpeed one engine trains both."""
        models = [self.policy] if self.engine is not None else [m for m in (self.policy, self.value) if m is not None]
        return list(zip(models, self.optimizers, self.schedulers))

    def checkpoint_parts(self, **extra) -> CheckpointParts:
        """What a resumable checkpoint holds of the models (plus `extra` CheckpointParts fields):
        under DeepSpeed the engine saves policy + value and the (partitioned) optimizer states itself."""
        if self.engine is not None:
            return CheckpointParts({"engine": self.engine}, {}, {"policy": self.schedulers[0]}, **extra)
        names = ["policy", "value"][: len(self.optimizers)]
        models = [m for m in (self.policy, self.value) if m is not None]
        return CheckpointParts(dict(zip(names, models)), dict(zip(names, self.optimizers)),
                               dict(zip(names, self.schedulers)), **extra)

    def train(self, mode: bool = True) -> None:
        """Training mode for the trained models (dropout is off; activation checkpointing needs it)."""
        for m in (self.policy, self.value):
            if m is not None:
                unwrap(m).train(mode)


COMPILE_DEEPSPEED = "recipe: 'compile: true' is not supported under DeepSpeed yet (run without it, or with DDP)"


AUTO_COMPILE_MIN_PARAMS = 100_000_000
"""``compile: auto`` compiles policies of at least this many parameters: SmolLM2-135M's training
phase ran ~10% faster compiled (docs/performance.md); smaller models were not measured to gain."""


def compile_pays_here(cfg: PPOConfig, acc, policy: nn.Module) -> bool:
    """What ``compile: auto`` decides for this run: a CPU run without DeepSpeed, LoRA or gradient
    checkpointing (combinations not measured), a policy of at least :data:`AUTO_COMPILE_MIN_PARAMS`
    parameters, and a torch that can compile here (dynamo supported, inductor's C++ compiler found)."""
    if acc.device.type != "cpu" or is_deepspeed(acc) or cfg.model.lora.enabled or cfg.model.gradient_checkpointing:
        return False
    if count_parameters(unwrap(policy)) < AUTO_COMPILE_MIN_PARAMS:
        return False
    try:
        import torch._dynamo
        from torch._inductor.cpp_builder import get_cpp_compiler

        return torch._dynamo.is_dynamo_supported() and bool(get_cpp_compiler())
    except Exception:  # (no compiler: inductor raises its own error types)
        return False


def setup_models(cfg: PPOConfig, acc, tok, split: BatchSplit) -> PPOModels:
    """Load, place and prepare every model of the run; build the optimizers and schedules."""
    if cfg.compile is True and is_deepspeed(acc):
        raise RunError(COMPILE_DEEPSPEED)
    if cfg.onednn_linear is True:
        check_onednn_linear(acc)
    zero3 = zero_stage(acc) == 3
    placement = frozen_placement(acc, cfg.frozen_models)
    if cfg.rm_refresh is not None:
        if placement != "whole":
            raise RunError(f"recipe: 'rm_refresh' trains the reward model, which needs it whole on every process "
                           f"('frozen_models: whole'), not {placement}")
        if compute_dtype(acc) == torch.float16:  # (bf16 autocast needs no scaler: fp32's range)
            raise RunError("recipe: 'rm_refresh' trains the reward model without a loss scaler, and under fp16 its "
                           "gradients underflow or overflow (run with mixed_precision: bf16 or no)")
        if is_deepspeed(acc) and compute_dtype(acc) != torch.float32:  # DeepSpeed casts the frozen RM to half
            raise RunError("recipe: 'rm_refresh' trains the reward model in fp32; under DeepSpeed bf16/fp16 the RM is "
                           "cast to half precision (run with mixed_precision: no, or without DeepSpeed)")
        n = acc.num_processes
        if cfg.rm_refresh.batch_size < n or cfg.rm_refresh.num_prompts < n:
            raise RunError(f"recipe: rm_refresh.batch_size and rm_refresh.num_prompts must be >= the {n} processes")
    into_parts = zero3 and cfg.model.init == "pretrained" and not cfg.model.gguf_file
    whole = contextlib.nullcontext if into_parts else outside_zero3_init  # "load whole, partition later"
    with whole(), rng_fork():  # init: from_config gets the same weights on every process
        policy = load_causal_lm(cfg.model, tok, seed=cfg.seed)  # (and each process keeps its own sampling RNG)
    disable_dropout(policy)
    read = [("policy", _partitioned(policy))]
    ref = None
    if not cfg.model.lora.enabled:  # (with LoRA the reference is the policy with its adapters off)
        if into_parts:  # the policy is partitioned: read the reference from its checkpoint again
            with contextlib.nullcontext() if placement == "sharded" else outside_zero3_init():
                ref = load_causal_lm(cfg.model, tok)
            disable_dropout(ref)
            read.append(("reference", _partitioned(ref)))
        else:
            ref = copy.deepcopy(policy)
        ref = prepare_frozen(acc, ref, placement)
    reward_model = None
    if cfg.reward_model:
        with contextlib.nullcontext() if zero3 and placement == "sharded" else outside_zero3_init():
            reward_model = RewardModel(cfg.reward_model)
        read.append(("RM", _partitioned(reward_model.model)))
    flops = {"rm": count_flop_params(reward_model.model) if reward_model is not None else 0}
    value = None
    if ADVANTAGE_ESTIMATORS[cfg.advantage_estimator].info["needs_values"]:
        with whole():
            value = load_value_model(cfg, tok, reward_model)
        read.append(("value model", _partitioned(value.backbone)))
    if reward_model is not None:
        refreshed = cfg.rm_refresh is not None  # (trained online: it keeps its fp32 weights)
        reward_model.model = prepare_frozen(acc, reward_model.model, placement, trained_later=refreshed)
        reward_model.device = acc.device
    if zero3:
        log.info("ZeRO-3: read straight into partitions: %s; loaded whole, then partitioned: %s",
                 ", ".join(n for n, yes in read if yes) or "-", ", ".join(n for n, yes in read if not yes) or "-")
    gold = None
    if cfg.gold_reward_model:  # measured like the RM, never trained: placed as the frozen models are
        with contextlib.nullcontext() if zero3 and placement == "sharded" else outside_zero3_init():
            gold = RewardModel(cfg.gold_reward_model)
        gold.model, gold.device = prepare_frozen(acc, gold.model, placement), acc.device
    m = _prepare(cfg, acc, policy, value, split)
    m.ref, m.reward_model, m.collective = ref, reward_model, zero3 or placement != "whole"
    m.gold_reward_model = gold
    # before compiling: the compiled blocks trace the oneDNN layers
    models = (m.policy, m.ref, m.value, reward_model and reward_model.model, gold and gold.model)
    n = apply_onednn_linear(cfg.onednn_linear, acc, [unwrap(x) for x in models if x is not None])
    if n:
        log.info("onednn_linear (%s): %d linear layers run through oneDNN", cfg.onednn_linear, n)
    if cfg.compile is True or (cfg.compile == "auto" and compile_pays_here(cfg, acc, m.policy)):
        if cfg.compile == "auto":  # (a block inductor cannot compile runs eagerly, with a warning)
            import torch._dynamo as dynamo

            dynamo.config.suppress_errors = True
        n = sum(compile_blocks(unwrap(x)) for x in (m.policy, m.value) if x is not None)  # the trained ones
        m.compiled = n > 0
        log.info("compile (%s): %d transformer blocks of the policy and value model compiled for the training "
                 "passes (the first iteration pays for it)", cfg.compile, n)
    head = count_head_params(unwrap(m.policy))  # counted only where logits are read (rlhf.flops)
    m.flop_params = {"policy": count_flop_params(unwrap(m.policy)) - head, "policy_head": head, **flops,
                     "value": count_flop_params(unwrap(m.value).backbone) + 1 if m.value is not None else 0}
    return m


def _prepare(cfg: PPOConfig, acc, policy, value, split: BatchSplit) -> PPOModels:
    """Optimizers, accelerate / DeepSpeed preparation, then the schedules on the prepared optimizers."""
    n_updates = cfg.steps * cfg.ppo_epochs * (split.rollouts // split.minibatch)
    value_lr = cfg.value_lr or cfg.lr
    opt_p = make_optimizer(policy.parameters(), cfg)
    if is_deepspeed(acc):  # one engine trains both: the value model's parameters join with their own lr
        if value is not None:
            for g in make_optimizer(value.parameters(), cfg, value_lr).param_groups:
                opt_p.add_param_group({"params": g["params"], "weight_decay": g["weight_decay"], "lr": value_lr})
        engine, opt_p = acc.prepare(PolicyValue(policy, value), opt_p)
        sched = make_scheduler(opt_p, cfg.lr_scheduler, n_updates, cfg.warmup_ratio)  # on the prepared optimizer
        gathered = (lambda: gathered_params(acc, engine.module.policy)) if zero_stage(acc) == 3 \
            else contextlib.nullcontext
        return PPOModels(engine.module.policy, engine.module.value, None, None, [opt_p], [sched], engine,
                         gathered=gathered)
    models, opts = [policy], [opt_p]
    if value is not None:
        models.append(value)
        opts.append(make_optimizer(value.parameters(), cfg, value_lr))
    prepared = acc.prepare(*models, *opts)
    models, opts = list(prepared[: len(models)]), list(prepared[len(models):])
    scheds = [make_scheduler(o, cfg.lr_scheduler, n_updates, cfg.warmup_ratio) for o in opts]
    return PPOModels(models[0], models[1] if value is not None else None, None, None, opts, scheds,
                     autocast=run_autocast(acc))


def _partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())

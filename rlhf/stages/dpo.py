"""Stage 2', DPO from the SFT policy [Rafailov et al. 2023, eq. 7], trained by TRL's DPOTrainer.

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

The data is read and checked exactly as the RM stage reads it (the same formats and file:line
errors; a K-way ranking becomes all its C(K, 2) pairs) and tokenized by the chat-template path
that SFT, the RM and PPO share; TRL receives the token ids (`prompt_ids`, `chosen_ids`,
`rejected_ids`) and trains: its DPOTrainer is a transformers Trainer, so DDP works as usual.

The run folder is every stage's: the HF model, recipe.yaml, metrics.jsonl (TRL's logs, one record
per `log_every` steps), summary.json and a report, staged until it finishes, and resumable with
`--resume` from the Trainer's latest complete checkpoint in checkpoints/ (`save_every`). Held-out
prompts (`eval_prompts`) are sampled before and after training by PPO's own evaluation, so
eval_gold_accuracy, eval_kl (to the SFT policy, per sequence) and eval_reward compare with PPO's.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from ..checkpoint import truncate_jsonl
from ..config import ConfigError, DPOConfig, PPOConfig, to_dict
from ..data.formats import load_examples, parse_preference, parse_prompt
from ..engine import (MetricsLogger, RunError, atomic_write_text, env_flag, finish_run, finished_summary,
                      grad_accum_steps, inputs_first, launcher_deepspeed, make_accelerator, open_run, peak_memory,
                      prepare_output_dir, resolve_mixed_precision, save_recipe, set_seed, world_size, write_summary)
from ..faults import fault_point_step
from ..models import (check_policy_model, check_positions, count_parameters, disable_dropout, load_causal_lm,
                      load_tokenizer, save_model_files)
from ..rewards import RewardModel
from ..tokenization import encode_prompt, encode_response
from .ppo import PPOInputs, evaluate_policy
from .ppo_setup import PPOModels
from .rm import encode_groups

log = logging.getLogger(__name__)


def preference_rows(tok, cfg: DPOConfig) -> tuple[list[dict], dict]:
    """Token-id rows for TRL, one per preference pair, checked as the RM stage checks them."""
    groups, stats = load_examples(cfg.data.train, parse_preference, split=cfg.data.split,
                                  skip_bad_rows=cfg.data.skip_bad_rows, max_samples=cfg.data.max_samples,
                                  what="preference rows")
    rows = []
    for g, _ in encode_groups(tok, groups, cfg.data.max_length, cfg.data.skip_bad_rows, stats):
        prompt = encode_prompt(tok, g.prompt)
        responses = [encode_response(tok, g.prompt, r) for r in g.responses]
        rows += [{"prompt_ids": prompt, "chosen_ids": responses[w], "rejected_ids": responses[l]} for w, l, _ in g.pairs]
    return rows, stats


PROCESS_TOTALS = ("num_tokens", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
                  "train_steps_per_second")
"""The Trainer's running totals since its process started: after a resume they describe only the resumed part."""


def check_loss_type(loss_type: str) -> None:
    """`loss_type` is one TRL's DPOTrainer has (it checks only at its first loss, after the models
    have loaded): the list TRL's DPOConfig documents for this TRL version."""
    import re

    import trl
    from trl import DPOConfig as TRLConfig

    field = TRLConfig.__dataclass_fields__.get("loss_type")
    known = re.findall(r"`'([a-z0-9_]+)'`", field.metadata.get("help", "")) if field is not None else []
    if known and loss_type not in known:
        raise ConfigError(f"loss_type: TRL {trl.__version__}'s DPOTrainer has no loss {loss_type!r} (it has: "
                          f"{', '.join(known)})", "loss_type")


def dpo_trainer(cfg: DPOConfig, policy, ref, tok, rows: list[dict], out: Path, logger: MetricsLogger):
    """TRL's DPOTrainer on pre-tokenized rows, its TrainingArguments filled from the recipe."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig as TRLConfig, DPOTrainer

    class Tokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized by rlhf (the same ids as the RM and PPO)

    class LogMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # (not the Trainer's per-process totals)
            logger.log(state.global_step, {k: v for k, v in (logs or {}).items()
                                           if isinstance(v, (int, float)) and k not in PROCESS_TOTALS})

        def on_step_end(self, args, state, control, **kwargs):
            fault_point_step(state.global_step)  # (test hook: RLHF_FAULT=step:N)

    tc = cfg.train
    accum, micro = grad_accum_steps(tc.batch_size, tc.micro_batch_size, world_size(), "train")
    mp = resolve_mixed_precision(tc.mixed_precision)
    args = TRLConfig(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        learning_rate=tc.lr, lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=min(tc.warmup_ratio, 0.999999),  # (a value < 1 is a share of the steps)
        num_train_epochs=tc.epochs, max_steps=tc.max_steps, weight_decay=tc.weight_decay, adam_beta1=tc.adam_beta1,
        adam_beta2=tc.adam_beta2, adam_epsilon=tc.adam_eps, max_grad_norm=tc.max_grad_norm if tc.max_grad_norm > 0
        else 0.0, logging_steps=tc.log_every, save_strategy="steps" if tc.save_every else "no",
        save_steps=tc.save_every or 500, save_total_limit=tc.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        bf16=mp == "bf16", fp16=mp == "fp16", use_cpu=not torch.cuda.is_available(), report_to="none",
        disable_tqdm=env_flag("RLHF_NO_PROGRESS"), deepspeed=tc.deepspeed, beta=cfg.beta,
        loss_type=[cfg.loss_type], max_length=None, gradient_checkpointing=cfg.model.gradient_checkpointing,
        remove_unused_columns=False, dataloader_drop_last=True)  # (as SFT and RM: a last partial batch was split
    # unevenly over the processes, and the run differed with their number)
    return Tokenized(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                     processing_class=tok, callbacks=[LogMetrics()])


def last_complete_checkpoint(out: Path) -> Path | None:
    """The Trainer's newest checkpoint whose trainer_state.json (written last) exists: a kill while
    a checkpoint was being written leaves it incomplete, and resume takes the one before."""
    done = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def evaluate(cfg: DPOConfig, policy, ref, reward_model, tok, prompts: list, device) -> dict:
    """PPO's held-out evaluation of `policy` against the SFT reference (the same seeds, so DPO's
    eval_* compare with PPO's): gold accuracy, KL per sequence, reward-model score."""
    ecfg = PPOConfig(seed=cfg.seed, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                     reward_model=cfg.reward_model, rollout_batch_size=64)
    m = PPOModels(policy, None, ref, reward_model, [], [])
    res = evaluate_policy(m, PPOInputs([], prompts, [], tok), ecfg, device)
    return res if reward_model is not None else {k: v for k, v in res.items() if k not in ("eval_reward",
                                                                                          "eval_rm_score")}


def check_dpo_engine(cfg: DPOConfig, section: str = "") -> None:
    """DDP only: our evaluation and saving read the whole model on the main process (a ZeRO-3
    shard failed at the first evaluation: "'weight' must be 2-D"). A launcher's DeepSpeed config
    (`accelerate launch --config_file recipes/accelerate/zero3.yaml`) is refused as the recipe's is."""
    what = f"recipe: '{section}train.deepspeed'" if cfg.train.deepspeed else \
        "the launcher's DeepSpeed config (ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_CONFIG_FILE)" if launcher_deepspeed() else None
    if what:
        raise RunError(f"{what} is not supported by rlhf dpo yet; run it under DDP (torchrun, or accelerate launch "
                       f"without a DeepSpeed config)")


def run_dpo(cfg: DPOConfig, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    t_start = time.time()
    check_dpo_engine(cfg)
    acc = make_accelerator(cfg.train.mixed_precision, matmul_precision=cfg.train.matmul_precision)
    rf = open_run(acc, output_dir or cfg.output_dir, overwrite, resume, "dpo", cfg)
    if rf.done:
        return finished_summary(rf, cfg)
    set_seed(cfg.seed)
    with inputs_first(rf):  # data, lengths and prompts checked as the RM stage does, before any model
        check_loss_type(cfg.loss_type)
        check_policy_model(None if cfg.model.init != "pretrained" or cfg.model.gguf_file else cfg.model.name_or_path)
        tok = load_tokenizer(cfg.model)
        rows, stats = preference_rows(tok, cfg)
        if len(rows) < cfg.train.batch_size:  # (the partial batch is dropped, as SFT and RM drop it)
            raise RunError(f"recipe: 'train.batch_size' ({cfg.train.batch_size}) is more than the {len(rows)} "
                           f"preference pairs: not one full batch (lower it, or add data)")
        prompts = load_examples(cfg.eval_prompts, parse_prompt, what="prompts", field_name="eval_prompts",
                                max_samples=cfg.eval_samples)[0] if cfg.eval_prompts else []
    policy = load_causal_lm(cfg.model, tok)
    longest = max((len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows), default=0)
    check_positions(policy, longest, "the longest preference pair")
    if prompts:  # (its held-out evaluation generates after training)
        check_positions(policy, max(len(encode_prompt(tok, p.prompt)) for p in prompts) + cfg.max_new_tokens,
                        "the longest eval_prompts prompt with max_new_tokens", "lower max_new_tokens")
    disable_dropout(policy)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = RewardModel(cfg.reward_model, device=acc.device) if cfg.reward_model else None
    out = prepare_output_dir(acc, rf, overwrite, resume)
    save_recipe(acc, cfg, out, resume)
    ckpt = last_complete_checkpoint(out) if resume else None
    if acc.is_main_process:  # records logged after the checkpoint are logged again (the step-0 evaluation kept)
        truncate_jsonl(out / "metrics.jsonl", int(ckpt.name.split("-")[1]) if ckpt else 0)
    logger = MetricsLogger(out, enabled=acc.is_main_process, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    log.info("DPO: %d pairs, beta %g, %d held-out prompts, policy %.2fM params%s", len(rows), cfg.beta, len(prompts),
             count_parameters(policy) / 1e6, f", resuming from {ckpt.name}" if ckpt else "")
    summary = {"stage": "dpo", "train_pairs": len(rows), **{k: v for k, v in stats.items() if k != "rows"}}
    initial_path = out / "initial_eval.json"  # the SFT policy's evaluation, kept across a resume
    if prompts and acc.is_main_process:
        if not initial_path.exists():
            initial = evaluate(cfg, policy.to(acc.device), ref.to(acc.device), reward_model, tok, prompts, acc.device)
            atomic_write_text(initial_path, json.dumps(initial))
            logger.log(0, initial)
        summary.update({"initial_" + k: v for k, v in json.loads(initial_path.read_text()).items()})
    trainer = dpo_trainer(cfg, policy, ref, tok, rows, out, logger)
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # (restored from the checkpoint)
    summary.update({"steps": trainer.state.global_step, "train_loss_last": losses[-1] if losses else None})
    if prompts and acc.is_main_process:
        final = evaluate(cfg, policy, ref.to(acc.device), reward_model, tok, prompts, acc.device)
        summary.update(final)
        logger.log(trainer.state.global_step, final)
    summary.update({"train_seconds": round(time.time() - t_start, 1), "num_processes": acc.num_processes,
                    "parameters": count_parameters(policy)})
    summary.update(peak_memory(acc))  # collective
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model_files(policy, tok, out)
        write_summary(out, summary)
    finish_run(acc, logger, out)
    return summary

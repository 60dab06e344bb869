"""Stage 2, the reward model: pairwise preference loss on a scalar head [IGPT §3.5, eq. 1].

loss = -mean over pairs of log sigmoid(r(x, y_w) - r(x, y_l) - margin). All C(K, 2) pairs of a
K-way ranking stay in one batch, and each distinct response is scored once per step (K forward
passes, not C(K, 2) x 2) — the InstructGPT trick against over-fitting and for speed. The head
reads the last non-pad token (the EOS) and starts from N(0, 1/sqrt(d + 1)) [N+]. After training
a bias is stored so the reference set (demonstrations) scores mean 0 [IGPT]; any loader of the
checkpoint finds it in ``config.rlhf_reward_bias`` and :class:`rlhf.rewards.RewardModel` adds it.

Why not TRL's RewardTrainer: it takes only pairs (no K-way groups in one batch, no per-step
deduplication of responses) and has no normalisation; this loop is short and shares the
tokenization of SFT and PPO.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..algos.core import pairwise_rm_loss, reward_bias
from ..config import ModelConfig, RMConfig, SampleConfig, dump_yaml, to_dict
from ..data.formats import DataError, PrefGroup, load_examples, parse_preference, parse_sft, split_train_eval
from ..engine import (MetricsLogger, chunks, global_batches, inputs_first, make_optimizer, make_scheduler, prepare_output_dir,
                      peak_memory, progress, set_seed, shard, write_summary)
from ..checkpoint import fault_point_step, inject_fault, resume_state, save_checkpoint
from ..engine import NonFiniteGuard, finish_run, start_run, atomic_write_text, backward, gathered_params, loss_scale, optimizer_step, zero_stage
from ..models import _outside_zero3_init
from ..models import (ModelError, count_parameters, disable_dropout, enable_gradient_checkpointing, load_tokenizer,
                      torch_dtype, unwrap)
from ..rewards import BIAS_KEY, forward_scores, score_head, score_sequences
from ..rollout import right_pad
from ..tokenization import encode_scored

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model


def load_reward_backbone(cfg: ModelConfig, tok, seed: int):
    """A sequence-classification model with one output; a fresh head gets N(0, 1/sqrt(d+1)) [N+]."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if cfg.init != "pretrained" or not cfg.name_or_path:
        raise ModelError("recipe: the reward model needs 'model.name_or_path' (the SFT output or a classifier)")
    if not Path(cfg.name_or_path).exists() and cfg.name_or_path.startswith((".", "/")):
        raise ModelError(f"recipe: 'model.name_or_path' points at a missing checkpoint: {cfg.name_or_path}")
    hf_cfg = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code,
                                        revision=cfg.revision)
    fresh_head = not any(a.endswith("ForSequenceClassification") for a in (hf_cfg.architectures or [])) \
        or getattr(hf_cfg, "num_labels", 1) != 1
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.name_or_path, num_labels=1, dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision, ignore_mismatched_sizes=True)
    model.config.pad_token_id = tok.pad_token_id
    emb = model.get_input_embeddings().weight
    if getattr(emb, "ds_shape", emb.shape)[0] < len(tok):  # ds_shape: the full shape of a ZeRO-3 partition
        model.resize_token_embeddings(len(tok))
    if fresh_head:
        head = score_head(model)
        params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
        partitioned = hasattr(head.weight, "ds_id")  # loaded under ZeRO-3: gather, initialise, re-partition
        ctx = _gathered_for_init(params) if partitioned else contextlib.nullcontext()
        with ctx:
            torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
            if getattr(head, "bias", None) is not None:
                torch.nn.init.zeros_(head.bias)
    model.config.architectures = [type(model).__name__]
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _gathered_for_init(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


# ----------------------------------------------------------------------------- data


def encode_group(tok, g: PrefGroup, max_length: int) -> list[list[int]]:
    seqs = [encode_scored(tok, g.prompt, r) for r in g.responses]
    longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
    if len(seqs[longest]) > max_length:
        raise DataError(f"{g.source}: field '{g.fields[longest]}': {len(seqs[longest])} tokens with the prompt, more "
                        f"than data.max_length ({max_length}); raise it or set data.skip_bad_rows")
    return seqs


def encode_groups(tok, groups: list[PrefGroup], max_length: int, skip_bad_rows: bool, stats: dict) -> list[tuple]:
    """[(group, token sequences)]; a group longer than max_length is an error naming its row and
    field, or with skip_bad_rows skipped and counted (stats['skipped_bad_rows'])."""
    out = []
    for g in groups:
        try:
            out.append((g, encode_group(tok, g, max_length)))
        except DataError as e:
            if not skip_bad_rows:
                raise
            stats["skipped_bad_rows"] = stats.get("skipped_bad_rows", 0) + 1
            log.warning("skipping: %s", e)
    return out


def group_loss(model, groups: list[tuple[list[list[int]], list[tuple[int, int, float]]]], pad_id: int, device,
               use_margin: bool = True):
    """Scores each distinct sequence of the groups once, then the pairwise losses. Returns
    (per-pair losses (P,), chosen scores (P,), rejected scores (P,))."""
    seqs, offsets = [], []
    for s, _ in groups:
        offsets.append(len(seqs))
        seqs.extend(s)
    ids = right_pad(seqs, pad_id, device)
    mask = right_pad([[1] * len(s) for s in seqs], 0, device)
    scores = forward_scores(model, ids, mask)
    w = torch.tensor([o + i for o, (_, pairs) in zip(offsets, groups) for i, _, _ in pairs], device=device)
    l = torch.tensor([o + j for o, (_, pairs) in zip(offsets, groups) for _, j, _ in pairs], device=device)
    margin = torch.tensor([m for _, pairs in groups for _, _, m in pairs], device=device, dtype=scores.dtype)
    chosen, rejected = scores[w], scores[l]
    return pairwise_rm_loss(chosen, rejected, margin if use_margin else None), chosen, rejected


@torch.no_grad()
def evaluate_pairs(model, groups, pad_id: int, micro_batch_size: int, acc) -> dict:
    """Held-out pair metrics; each process scores every world-th group, sums are reduced."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=acc.device)
    for mb in chunks(groups[acc.process_index :: acc.num_processes], micro_batch_size):
        _, c, r = group_loss(model, mb, pad_id, acc.device)
        correct = (c > r).float() + 0.5 * (c == r).float()
        sums += torch.stack([correct.sum(), (c - r).sum(), c.sum(), r.sum(), pairwise_rm_loss(c, r).sum(),
                             torch.tensor(float(c.numel()), device=c.device)]).double()
    model.train()
    sums = acc.reduce(sums, "sum")
    n = float(sums[5])
    if n == 0:
        return {}
    acc_, margin, ch, rj, loss = (float(x) / n for x in sums[:5])
    return {"eval_accuracy": acc_, "eval_margin": margin, "eval_chosen_mean": ch, "eval_rejected_mean": rj,
            "eval_loss": loss, "eval_pairs": int(n)}


# ----------------------------------------------------------------------------- sampling K-way rankings


def check_sample_config(sc: SampleConfig) -> None:
    """Fail before anything is written: the sampling policy and prompt file must exist."""
    if not sc.checkpoint or not sc.prompts:
        raise DataError("recipe: 'sample.checkpoint' and 'sample.prompts' are required for sampling")
    if not Path(sc.checkpoint).exists():
        raise ModelError(f"recipe: 'sample.checkpoint' points at a missing checkpoint: {sc.checkpoint}")
    from ..data.formats import parse_prompt

    load_examples(sc.prompts, parse_prompt, max_samples=sc.max_prompts, what="prompts", field_name="sample.prompts")
    if sc.judge and sc.judge != "none":
        from ..rewards import load_reward_fn

        load_reward_fn(sc.judge)


def sample_rankings(sc: SampleConfig, out_path: str | Path, seed: int = 0, device=None) -> dict:
    """InstructGPT §3.4: K samples of the policy per prompt, scored by a judge -> K-way rankings."""
    from ..data.formats import load_examples as _load, parse_prompt
    from ..data.tasks import write_jsonl
    from ..evaluate import sample_texts
    from ..models import load_causal_lm
    from ..rewards import call_reward_fn, load_reward_fn

    if not sc.checkpoint or not sc.prompts:
        raise DataError("recipe: 'sample.checkpoint' and 'sample.prompts' are required for sampling")
    prompts, _ = _load(sc.prompts, parse_prompt, max_samples=sc.max_prompts, what="prompts", field_name="sample.prompts")
    judge = None if sc.judge == "none" else load_reward_fn(sc.judge or "judge")
    mc = ModelConfig(name_or_path=sc.checkpoint)
    tok = load_tokenizer(mc)
    with _outside_zero3_init():  # sampled by one process: a ZeRO-3-partitioned copy would wait on the others
        policy = load_causal_lm(mc, tok)
    disable_dropout(policy)
    if device is not None:
        policy.to(device)
    expanded = [p for p in prompts for _ in range(sc.k)]
    texts, _ = sample_texts(policy, tok, [p.prompt for p in expanded], max_new_tokens=sc.max_new_tokens,
                            temperature=sc.temperature, batch_size=sc.batch_size, seed=seed, device=device,
                            progress_desc=f"sampling K={sc.k}")
    fields = {k: [p.meta.get(k) for p in expanded] for k in expanded[0].meta}
    scores = call_reward_fn(judge, [p.raw_prompt for p in expanded], texts, fields) if judge else None
    rows = []
    for i, p in enumerate(prompts):
        sl = slice(i * sc.k, (i + 1) * sc.k)
        row = {"id": p.meta.get("id", i), **p.meta, "prompt": p.raw_prompt, "responses": texts[sl]}
        if scores is not None:
            row["scores"] = scores[sl]
        rows.append(row)
    if sc.mix_with:
        from ..data.formats import read_rows

        rows += [r.data for r in read_rows(sc.mix_with)]
    write_jsonl(out_path, rows)
    distinct = sum(len(set(r["responses"])) for r in rows[: len(prompts)]) / max(len(prompts), 1)
    out = {"sampled_prompts": len(prompts), "k": sc.k, "mean_distinct_responses": distinct}
    if scores is not None:
        out["mean_judge_score"] = sum(scores) / len(scores)
    return out


# ----------------------------------------------------------------------------- the stage


def run_rm(cfg: RMConfig, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    t_start = time.time()
    tc = cfg.train
    acc, accum, micro_bs, rf, done = start_run(tc, output_dir or cfg.output_dir, overwrite, resume)
    if done is not None:
        return done
    set_seed(cfg.seed)
    with inputs_first(rf):  # data, tokenizer, lengths and the sampling setup, before any model or folder
        train_specs = [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train or [])
        if not train_specs and cfg.sample is None:
            raise DataError("recipe: 'data.train' is not set (and there is no 'sample' section)")
        groups, stats = load_examples(train_specs, parse_preference, split=cfg.data.split,
                                      skip_bad_rows=cfg.data.skip_bad_rows, max_samples=cfg.data.max_samples,
                                      what="preference rows") if train_specs else ([], {"skipped_bad_rows": 0})
        eval_groups = []
        if cfg.data.eval:
            eval_groups, _ = load_examples(cfg.data.eval, parse_preference, skip_bad_rows=cfg.data.skip_bad_rows,
                                           what="preference rows", field_name="data.eval")
        tok = load_tokenizer(cfg.model)
        encoded = encode_groups(tok, groups, cfg.data.max_length, cfg.data.skip_bad_rows, stats)
        eval_encoded = encode_groups(tok, eval_groups, cfg.data.max_length, cfg.data.skip_bad_rows, {})
        if cfg.sample is not None:
            check_sample_config(cfg.sample)
    model = load_reward_backbone(cfg.model, tok, cfg.seed)
    out = prepare_output_dir(acc, rf, overwrite, resume)

    summary: dict = {"stage": "rm"}
    if cfg.sample is not None:  # rankings of the policy's own samples, made before training
        path, stats_path = out / "sampled_rankings.jsonl", out / "sampled_rankings.summary.json"
        if acc.is_main_process and not (resume and stats_path.exists()):  # a resumed run keeps its samples
            atomic_write_text(stats_path, json.dumps(sample_rankings(cfg.sample, path, seed=cfg.seed,
                                                                     device=acc.device)))
        acc.wait_for_everyone()
        summary.update(json.loads(stats_path.read_text()))
        sampled, sstats = load_examples(str(path), parse_preference, skip_bad_rows=cfg.data.skip_bad_rows,
                                        what="sampled rankings")
        encoded += encode_groups(tok, sampled, cfg.data.max_length, cfg.data.skip_bad_rows, sstats)
        for k, v in sstats.items():
            if k != "rows":
                stats[k] = stats.get(k, 0) + v
    if not cfg.data.eval:
        encoded, eval_encoded = split_train_eval(encoded, cfg.data.eval_split, cfg.seed)
    groups = [g for g, _ in encoded]
    enc = [(seqs, g.pairs) for g, seqs in encoded]
    eval_enc = [(seqs, g.pairs) for g, seqs in eval_encoded]

    batches = global_batches(len(enc), tc.batch_size, cfg.seed, tc.epochs, tc.max_steps)
    optimizer = make_optimizer(model.parameters(), tc.lr, tc.weight_decay, (tc.adam_beta1, tc.adam_beta2), tc.adam_eps)
    model, optimizer = acc.prepare(model, optimizer)
    # after prepare: ZeRO-3 regroups the optimizer's parameters, the schedule must see its groups
    scheduler = make_scheduler(optimizer, tc.lr_scheduler, len(batches), tc.warmup_ratio)
    guard = NonFiniteGuard(tc.max_nonfinite_steps)
    start, state = resume_state(acc, out, resume, {"model": model}, {"model": optimizer}, {"model": scheduler})
    if acc.is_main_process and not resume:
        dump_yaml(cfg, out / "recipe.yaml")
    logger = MetricsLogger(out, enabled=acc.is_main_process, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    n_pairs = sum(len(p) for _, p in enc)
    log.info("RM: %d groups (%d pairs) train, %d groups eval, %d steps, %.2fM parameters%s", len(enc), n_pairs,
             len(eval_enc), len(batches), count_parameters(unwrap(model)) / 1e6,
             f", resuming after step {start}" if start else "")

    model.train()
    bar = progress(total=len(batches), initial=start, desc="rm", disable=not acc.is_main_process)
    win = state.get("rank", {}).get("window", {"loss": 0.0, "acc": 0.0, "pairs": 0})  # this process's sums
    if state:
        guard.load_state_dict(state["guard"])
    for step, idx in enumerate(batches, 1):
        if step <= start:  # the data position of a resumed run is its step count
            continue
        batch = [enc[i] for i in idx]
        pairs_in_batch = sum(len(p) for _, p in batch)  # global: loss is a mean over every pair
        micro = chunks(shard(batch, acc.process_index, acc.num_processes), micro_bs)
        assert len(micro) == accum
        step_loss, step_acc = 0.0, 0.0
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):
                losses, c, r = group_loss(model, mb, tok.pad_token_id, acc.device, cfg.margin)
                loss = inject_fault(losses.sum(), step)
                backward(acc, loss / pairs_in_batch * acc.num_processes, accum, last)
            step_loss += loss.item()
            step_acc += (c > r).float().sum().item()
        res = optimizer_step(acc, model, optimizer, scheduler, tc.max_grad_norm, math.isfinite(step_loss))
        stepped, grad_norm = res
        guard.update(stepped, step, overflow=res.overflow, scale=loss_scale(acc))
        if stepped:
            win["loss"] += step_loss
            win["acc"] += step_acc
            win["pairs"] += pairs_in_batch
        bar.update(1)
        if step % tc.log_every == 0 or step == len(batches):
            tot = acc.reduce(torch.tensor([win["loss"], win["acc"]], device=acc.device), "sum")
            rec = {"loss": tot[0].item() / max(win["pairs"], 1), "accuracy": tot[1].item() / max(win["pairs"], 1),
                   "lr": scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            logger.log(step, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}")
            win = {"loss": 0.0, "acc": 0.0, "pairs": 0}
        if tc.eval_every and step % tc.eval_every == 0 and step != len(batches):
            logger.log(step, evaluate_pairs(model, eval_enc, tok.pad_token_id, micro_bs, acc))
        if tc.save_every and (step % tc.save_every == 0 or step == len(batches)):
            save_checkpoint(acc, out, step, models={"model": model}, optimizers={"model": optimizer},
                            schedulers={"model": scheduler}, keep=tc.save_total_limit,
                            state={"guard": guard.state_dict()}, rank_state={"window": win})
        fault_point_step(step)
    bar.close()

    summary.update({"steps": len(batches), "train_groups": len(enc), "train_pairs": n_pairs,
                    "parameters": count_parameters(unwrap(model)), "skipped_nonfinite_steps": guard.skipped,
                    **guard.summary(),
                    **{k: v for k, v in stats.items() if k != "rows"}})
    summary.update(evaluate_pairs(model, eval_enc, tok.pad_token_id, micro_bs, acc))
    bias = 0.0
    if cfg.normalize:
        ref = reference_sequences(cfg, tok, groups)
        with gathered_params(acc, unwrap(model)):  # every rank scores the reference set (cheap, simple)
            raw = score_sequences(unwrap(model).eval(), ref, tok.pad_token_id, micro_bs, acc.device)
        bias = reward_bias(raw)
        summary["normalize_reference_size"] = len(ref)
    summary["reward_bias"] = bias
    for k in ("eval_chosen_mean", "eval_rejected_mean"):
        if k in summary:
            summary[k + "_normalized"] = summary[k] + bias
    summary["train_seconds"] = round(time.time() - t_start, 1)
    summary["num_processes"] = acc.num_processes
    summary.update(peak_memory(acc))  # collective
    state_dict = acc.get_state_dict(model) if zero_stage(acc) == 3 else None  # collective under ZeRO-3
    acc.wait_for_everyone()
    if acc.is_main_process:
        from .sft import save_model_files

        save_model_files(model, tok, out, extra_config={BIAS_KEY: bias}, state_dict=state_dict)
        logger.log(len(batches), {k: v for k, v in summary.items() if k.startswith("eval_")})
        write_summary(out, summary)
    finish_run(acc, logger, out)
    return summary


def reference_sequences(cfg: RMConfig, tok, groups: list[PrefGroup]) -> list[list[int]]:
    """Sequences whose mean score becomes 0: `normalize_data` (demonstrations) or the chosen responses."""
    if cfg.normalize_data:
        demos, _ = load_examples(cfg.normalize_data, parse_sft, skip_bad_rows=True, what="SFT rows",
                                 field_name="normalize_data", max_samples=cfg.normalize_max_samples)
        return [encode_scored(tok, d.prompt, d.completion) for d in demos]
    seqs = [encode_scored(tok, g.prompt, g.responses[i]) for g in groups for i in sorted({w for w, _, _ in g.pairs})]
    return seqs[: cfg.normalize_max_samples] if cfg.normalize_max_samples else seqs

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
from ..config import ModelConfig, RMConfig, to_dict
from ..cpu_linear import apply_onednn_linear, check_onednn_linear
from ..data.formats import DataError, PrefGroup, load_examples, parse_preference, parse_sft, split_train_eval
from ..engine import (MetricsLogger, chunks, rank_chunks, global_batches, inputs_first, prepare_output_dir,
                      peak_memory, progress, save_recipe, set_seed, shard, write_summary)
from ..checkpoint import save_checkpoint
from ..faults import fault_point_step, inject_fault
from ..engine import (atomic_write_text, backpropagated_attention, backward, compute_dtype, finish_run,
                      gathered_params, loss_scale, optimizer_step, prepare_training, start_run, user_errors,
                      zero_stage)
from ..models import (ModelError, check_positions, count_parameters, disable_dropout, enable_gradient_checkpointing,
                      load_tokenizer, position_limit, save_model_files, torch_dtype, unwrap)
from ..rewards import BIAS_KEY, group_loss, on_every_process, score_head, score_sequences
from ..sampling import check_sample_config, sample_rankings
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
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if not cfg.trust_remote_code and type(hf_cfg) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:  # (Mamba)
        raise ModelError(f"{cfg.name_or_path}: model type '{hf_cfg.model_type}' has no sequence-classification class "
                         f"in transformers (AutoModelForSequenceClassification): it cannot be a reward model")
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


def encode_group(tok, g: PrefGroup, max_length: int, over: str | None = None) -> list[list[int]]:
    """The group's token sequences; one over max_length tokens is a DataError naming its row, field
    and `over` (what the bound is and what to do; by default data.max_length's)."""
    seqs = [encode_scored(tok, g.prompt, r) for r in g.responses]
    longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
    if len(seqs[longest]) > max_length:
        over = over or f"data.max_length ({max_length}); raise it or set data.skip_bad_rows"
        raise DataError(f"{g.source}: field '{g.fields[longest]}': {len(seqs[longest])} tokens with the prompt, more "
                        f"than {over}")
    return seqs


def encode_groups(tok, groups: list[PrefGroup], max_length: int, skip_bad_rows: bool, stats: dict,
                  over: str | None = None) -> list[tuple]:
    """[(group, token sequences)]; a group longer than max_length is an error naming its row and
    field, or with skip_bad_rows skipped and counted (stats['skipped_bad_rows'])."""
    out = []
    for g in groups:
        try:
            out.append((g, encode_group(tok, g, max_length, over)))
        except DataError as e:
            if not skip_bad_rows:
                raise
            stats["skipped_bad_rows"] = stats.get("skipped_bad_rows", 0) + 1
            log.warning("skipping: %s", e)
    return out


@torch.no_grad()
def evaluate_pairs(model, groups, pad_id: int, micro_batch_size: int, acc) -> dict:
    """Held-out pair metrics; each process scores every world-th group (:func:`rank_chunks`), sums are
    reduced."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=acc.device)
    for mb, real in rank_chunks(groups, acc, micro_batch_size):
        _, c, r = group_loss(model, mb, pad_id, acc.device)
        if not real:
            continue
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


# ----------------------------------------------------------------------------- the stage


def run_rm(cfg: RMConfig, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    t_start = time.time()
    tc = cfg.train
    acc, accum, micro_bs, rf, done = start_run(tc, output_dir or cfg.output_dir, overwrite, resume, "rm", cfg)
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
        demos = reference_demos(cfg, stats)  # read now: a bad normalize_data file must not cost the training
        tok = load_tokenizer(cfg.model)
        encoded = encode_groups(tok, groups, cfg.data.max_length, cfg.data.skip_bad_rows, stats)
        eval_encoded = encode_groups(tok, eval_groups, cfg.data.max_length, cfg.data.skip_bad_rows, {})
        sampled_bound, mixed_enc = 0, []  # the longest sampled row: a prompt + sample.max_new_tokens (<= max_length)
        if cfg.sample is not None:
            mixed, sample_prompts = check_sample_config(cfg.sample, cfg.data.skip_bad_rows)  # (before sampling)
            mixed_enc = encode_groups(tok, mixed, cfg.data.max_length, cfg.data.skip_bad_rows, {})
            sampled_bound = min(cfg.data.max_length, cfg.sample.max_new_tokens + max(
                (len(encode_scored(tok, p.prompt, "")) for p in sample_prompts), default=0))
        else:  # the training set is known now (with sampling, only once the rankings are in)
            n = len(encoded) if cfg.data.eval else len(split_train_eval(encoded, cfg.data.eval_split, cfg.seed)[0])
            global_batches(n, tc.batch_size, cfg.seed, tc.epochs, tc.max_steps)
    if cfg.onednn_linear is True:
        check_onednn_linear(acc)
    model = load_reward_backbone(cfg.model, tok, cfg.seed)
    rows = [s for _, seqs in encoded + eval_encoded for s in seqs]
    if rows:
        check_positions(model, max(map(len, rows)), "the longest preference row")
    if cfg.sample is not None:  # (its rows are sampled later; sample.mix_with's rows are appended to them)
        by_max_length = sampled_bound == cfg.data.max_length
        check_positions(model, sampled_bound, "data.max_length, which bounds the sampled rows" if by_max_length else
                        "the longest sample.prompts prompt with sample.max_new_tokens",
                        f"lower {'data.max_length' if by_max_length else 'sample.max_new_tokens'} or use a model "
                        f"with more positions")
        if mixed_enc:
            check_positions(model, max(len(s) for _, seqs in mixed_enc for s in seqs), "the longest sample.mix_with "
                            "row", "lower data.max_length and set data.skip_bad_rows, or use a model with more "
                            "positions")
    n = apply_onednn_linear(cfg.onednn_linear, acc, [model])
    if n:
        log.info("onednn_linear: %d linear layers run through oneDNN", n)
    out = prepare_output_dir(acc, rf, overwrite, resume)

    summary: dict = {"stage": "rm"}
    if cfg.sample is not None:  # rankings of the policy's own samples, made before training
        path, stats_path = out / "sampled_rankings.jsonl", out / "sampled_rankings.summary.json"
        def sample() -> None:  # on the main process; a resumed run keeps its samples
            if acc.is_main_process and not (resume and stats_path.exists()):
                atomic_write_text(stats_path, json.dumps(sample_rankings(cfg.sample, path, seed=cfg.seed,
                                                                         device=acc.device)))

        # (a judge that fails stops every process with its message, not the others in a collective)
        on_every_process(acc, sample, user_errors(), "the RM's sampling (sample:)")
        acc.wait_for_everyone()
        summary.update(json.loads(stats_path.read_text()))
        sampled, sstats = load_examples(str(path), parse_preference, skip_bad_rows=cfg.data.skip_bad_rows,
                                        what="sampled rankings")
        n = min(cfg.data.max_length, position_limit(model) or cfg.data.max_length)  # (a response can re-encode
        over = None if n == cfg.data.max_length else (  # longer than sample.max_new_tokens in the RM's tokens)
            f"the model's {n} learned positions; set data.skip_bad_rows or lower sample.max_new_tokens")
        encoded += encode_groups(tok, sampled, n, cfg.data.skip_bad_rows, sstats, over)
        for k, v in sstats.items():
            if k != "rows":
                stats[k] = stats.get(k, 0) + v
    if not cfg.data.eval:
        encoded, eval_encoded = split_train_eval(encoded, cfg.data.eval_split, cfg.seed)
    groups = [g for g, _ in encoded]
    enc = [(seqs, g.pairs) for g, seqs in encoded]
    eval_enc = [(seqs, g.pairs) for g, seqs in eval_encoded]

    batches = global_batches(len(enc), tc.batch_size, cfg.seed, tc.epochs, tc.max_steps)
    t = prepare_training(acc, model, tc, len(batches), out, resume)
    model, optimizer, scheduler, guard, parts, start, state = (t.model, t.optimizer, t.scheduler, t.guard, t.parts,
                                                               t.start, t.state)
    save_recipe(acc, cfg, out, resume)
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
    dtype = compute_dtype(acc, cfg.model.dtype)  # (on the CPU in half precision: SDPA's math path, see engine)
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
            with contextlib.nullcontext() if last else acc.no_sync(model), \
                    backpropagated_attention(acc.device, dtype):
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
        if step == len(batches):  # (before the last checkpoint: resuming from it could only fail again)
            guard.check_trained(len(batches))
        if tc.save_every and (step % tc.save_every == 0 or step == len(batches)):
            save_checkpoint(acc, out, step, parts, keep=tc.save_total_limit,
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
        ref = reference_sequences(cfg, tok, groups, demos)
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
        save_model_files(model, tok, out, extra_config={BIAS_KEY: bias}, state_dict=state_dict)
        logger.log(len(batches), {k: v for k, v in summary.items() if k.startswith("eval_")})
        write_summary(out, summary)
    finish_run(acc, logger, out)
    return summary


def reference_demos(cfg: RMConfig, stats: dict) -> list | None:
    """`normalize_data`'s demonstrations (None without it, or without `normalize`), read with the
    other inputs. A bad row stops the run, naming it, unless data.skip_bad_rows: then it is skipped
    and counted in `stats` (summary.json's skipped_bad_rows)."""
    if not (cfg.normalize and cfg.normalize_data):
        return None
    demos, st = load_examples(cfg.normalize_data, parse_sft, skip_bad_rows=cfg.data.skip_bad_rows,
                              what="normalize_data rows (prompt/completion demonstrations)",
                              field_name="normalize_data", max_samples=cfg.normalize_max_samples)
    stats["skipped_bad_rows"] = stats.get("skipped_bad_rows", 0) + st["skipped_bad_rows"]
    return demos


def reference_sequences(cfg: RMConfig, tok, groups: list[PrefGroup], demos: list | None = None) -> list[list[int]]:
    """Sequences whose mean score becomes 0: `normalize_data`'s demonstrations (`demos`, from
    :func:`reference_demos`) or the chosen responses."""
    if demos is not None:
        return [encode_scored(tok, d.prompt, d.completion) for d in demos]
    seqs = [encode_scored(tok, g.prompt, g.responses[i]) for g in groups for i in sorted({w for w, _, _ in g.pairs})]
    return seqs[: cfg.normalize_max_samples] if cfg.normalize_max_samples else seqs

"""Stage 1, SFT: next-token loss on the assistant tokens of demonstrations [IGPT §3.5].

One flat loop: tokenize (prompt tokens get no loss) -> global batches -> micro-batches with
gradient accumulation -> AdamW + warmup/cosine -> evaluate (loss, perplexity, gold accuracy
sampled at T = 1.0 and greedy) -> save an HF folder.

Why not TRL's SFTTrainer: the same tokenization code must serve SFT, the RM and PPO(-ptx), so
that the prompt tokens the policy was trained on are exactly those it is prompted with in RL;
SFTTrainer's assistant-only loss needs ``{% generation %}`` markers that most chat templates
lack, and its checkpoints are neither atomic nor shared with our PPO's resume. Our loop is
~100 lines and uses accelerate for DDP/DeepSpeed like TRL does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch

from ..algos.core import lm_loss_sum
from ..config import ModelConfig, SFTConfig, to_dict
from ..data.formats import DataError, load_examples, parse_sft, split_train_eval
from ..errors import RunError
from ..engine import (MetricsLogger, chunks, rank_chunks, global_batches, inputs_first, prepare_output_dir,
                      peak_memory, progress, save_recipe, set_seed, shard, write_summary)
from ..engine import (backpropagated_attention, backward, compute_dtype, finish_run, gathered_params, loss_scale,
                      optimizer_step, prepare_training, run_autocast, start_run, zero_stage)
from ..checkpoint import save_checkpoint
from ..faults import fault_point_step, inject_fault
from ..evaluate import gold_accuracy, gold_examples
from ..cpu_linear import apply_onednn_linear, check_onednn_linear
from ..models import (check_policy_model, check_positions, count_parameters, load_causal_lm, load_tokenizer,
                      mixes_tokens_by_convolution, save_model_files, unwrap)
from ..rollout import right_pad
from ..tokenization import IGNORE_INDEX, collate_sft, encode_prompt, encode_sft

log = logging.getLogger(__name__)


def _texts(examples) -> list[str]:
    out = []
    for e in examples:
        for m in e.prompt + e.completion:
            out.append(m["content"])
    return out


def encode_examples(tok, examples, max_length: int, skip_bad_rows: bool = False) -> list[tuple[list[int], list[int]]]:
    feats, skipped = [], 0
    for e in examples:
        ids, labels = encode_sft(tok, e.prompt, e.completion)
        if len(ids) > max_length:
            if skip_bad_rows:
                skipped += 1
                continue
            fld = e.fields[1] if e.fields[1] != "messages" else "messages"
            raise DataError(f"{e.where}: field '{fld}': {len(ids)} tokens with the prompt, more than data.max_length "
                            f"({max_length}); raise it or set data.skip_bad_rows")
        feats.append((ids, labels))
    if skipped:
        log.warning("skipped %d rows longer than data.max_length", skipped)
    return feats


def pack(feats: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Concatenate examples into rows of at most max_length tokens (no example is split), as
    (ids, labels, position ids). Each example's positions restart at 0 and its first label is
    ignored (unpacked, position 0 is never a target either). Fed with position ids and no 2D
    attention mask, transformers' masking (`masking_utils.find_packed_sequence_indices`) gives each
    example its own causal block, so no token attends across a boundary; `check_packed_attention`
    confirms that the model at hand does."""
    out, ids, labels, pos = [], [], [], []
    for i, lab in feats:
        if ids and len(ids) + len(i) > max_length:
            out.append((ids, labels, pos))
            ids, labels, pos = [], [], []
        ids, labels, pos = ids + i, labels + [IGNORE_INDEX] + lab[1:], pos + list(range(len(i)))
    if ids:
        out.append((ids, labels, pos))
    return out


@torch.no_grad()
def check_packed_attention(model, feats: list[tuple[list[int], list[int]]], pad_id: int, device,
                           flatten: bool = False) -> None:
    """Refuse `packing: true` for a model that does not keep packed examples apart (an attention
    implementation or remote code that ignores packed position ids), or one with convolution or
    state-space layers (:func:`rlhf.models.mixes_tokens_by_convolution`: their state runs on from
    one example into the next; in Jamba, Falcon-H1 and LFM2 by only ~1e-3 of the logits on a random
    model, which the comparison below would let through). Run on the prepared model, on the
    training device, through the training path (:func:`sft_inputs`): a
    micro-batch of two rows, the first packing two examples, the second padded; the logits of the
    second example must be those of it alone, to rounding: closer to them by 10x than the logits
    with the boundary ignored (an all-ones mask)."""
    if mixes_tokens_by_convolution(model):
        raise RunError("recipe: packing: true, but this model has convolution / state-space layers (Mamba, hybrid "
                       "or short-convolution decoders), which carry their state from one packed example into the "
                       "next; set packing: false")
    a, b = feats[0][0], feats[1][0]
    rows = pack(feats[:2], len(a) + len(b)) + pack(feats[2:3] or feats[:1], len(a) + len(b))
    inputs, _ = sft_inputs(rows, pad_id, device, flatten)
    was_training = model.training
    model.eval()
    alone = model(**sft_inputs([feats[1]], pad_id, device)[0]).logits[0].float()
    packed = model(**inputs).logits[0, len(a):len(a) + len(b)].float()
    crossed = model(**{**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}).logits
    crossed = crossed[0, len(a):len(a) + len(b)].float()
    model.train(was_training)
    err, leak = (packed - alone).abs().max().item(), (crossed - alone).abs().max().item()
    if not err <= 0.1 * leak:
        raise RunError(f"recipe: packing: true, but this model lets packed examples see each other (logits of a "
                       f"packed example off by {err:.3g}; {leak:.3g} with no boundary at all): its attention "
                       f"implementation ignores packed position ids, or its state-space / linear-attention layers "
                       f"carry their state from one example into the next; set packing: false")


def flash_attention(model) -> bool:
    """Whether the model runs a flash-attention kernel (flash_attention_2/3, a hub kernel): those
    keep packed examples apart by their position ids only in a batch of one row."""
    return "flash" in str(getattr(getattr(unwrap(model), "config", None), "_attn_implementation", "") or "")


def sft_inputs(feats, pad_id: int, device, flatten: bool = False) -> tuple[dict, torch.Tensor]:
    """(the model's keyword inputs, labels) of a micro-batch: ids and attention mask, or, for packed
    rows (:func:`pack`), ids and position ids (no mask: the packed masking; the right padding is a
    segment of its own, positions from 0, and no label). No KV cache: transformers applies the
    packed masking only to forwards without one. `flatten` (flash attention): the packed rows
    become one row, since transformers reads flash attention's sequence boundaries from position
    ids only in a batch of one row."""
    if len(feats[0]) == 2:
        ids, mask, labels = collate_sft(feats, pad_id, device)
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, labels
    if flatten:
        feats = [tuple(sum((list(f[i]) for f in feats), []) for i in range(3))]
    ids = right_pad([f[0] for f in feats], pad_id, device)
    labels = right_pad([f[1] for f in feats], IGNORE_INDEX, device)
    pos = right_pad([f[2] + list(range(ids.shape[1] - len(f[2]))) for f in feats], 0, device)
    return {"input_ids": ids, "position_ids": pos, "use_cache": False}, labels


def n_loss_tokens(feats) -> int:
    return sum(sum(1 for x in f[1][1:] if x != IGNORE_INDEX) for f in feats)


@torch.no_grad()
def evaluate_loss(model, feats, pad_id: int, micro_batch_size: int, acc) -> float:
    """Token-mean loss over `feats`; each process takes every world-th example (:func:`rank_chunks`), sums are
    reduced."""
    model.eval()
    total, count = 0.0, 0
    for mb, real in rank_chunks(feats, acc, micro_batch_size):
        ids, mask, labels = collate_sft(mb, pad_id, acc.device)
        s, n = lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
        if real:
            total, count = total + float(s), count + n
    model.train()
    sums = acc.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=acc.device), "sum")
    return float(sums[0] / sums[1].clamp(min=1))


def _check_positions(model, tok, feats, gold: list, cfg: SFTConfig) -> None:
    """The longest row, and the longest gold prompt with max_new_tokens, fit a model with learned
    positions (before training: the gold evaluation runs after it)."""
    if feats:
        check_positions(model, max(len(ids) for ids, _ in feats), "the longest training row")
    if gold:
        longest = max(len(encode_prompt(tok, e.prompt)) for e in gold) + cfg.max_new_tokens
        check_positions(model, longest, "the longest gold-evaluation prompt with max_new_tokens",
                        "lower max_new_tokens or gen_eval_samples: 0")


def run_sft(cfg: SFTConfig, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    t_start = time.time()
    tc = cfg.train
    acc, accum, micro_bs, rf, done = start_run(tc, output_dir or cfg.output_dir, overwrite, resume, "sft", cfg)
    if done is not None:
        return done
    set_seed(cfg.seed)
    with inputs_first(rf):  # every input is read and checked before the run folder is judged or touched
        train_ex, stats = load_examples(cfg.data.train, parse_sft, split=cfg.data.split,
                                        skip_bad_rows=cfg.data.skip_bad_rows, max_samples=cfg.data.max_samples,
                                        what="SFT rows")
        if cfg.data.eval:
            eval_ex, _ = load_examples(cfg.data.eval, parse_sft, skip_bad_rows=cfg.data.skip_bad_rows, what="SFT rows",
                                       field_name="data.eval")
        else:
            train_ex, eval_ex = split_train_eval(train_ex, cfg.data.eval_split, cfg.seed)
        trained_tok = rf.work / "tokenizer.json"
        if resume and cfg.model.init == "from_config" and not cfg.model.tokenizer and trained_tok.exists():
            tok = load_tokenizer(ModelConfig(name_or_path=str(rf.work)))  # the tokenizer this run trained
        else:
            check_policy_model(None if cfg.model.init != "pretrained" or cfg.model.gguf_file else cfg.model.name_or_path)
            tok = load_tokenizer(cfg.model, train_texts=_texts(train_ex))
        train_feats = encode_examples(tok, train_ex, cfg.data.max_length, cfg.data.skip_bad_rows)
        eval_feats = encode_examples(tok, eval_ex, cfg.data.max_length, cfg.data.skip_bad_rows)
        unpacked = train_feats
        if cfg.packing:
            train_feats = pack(train_feats, cfg.data.max_length)
        batches = global_batches(len(train_feats), tc.batch_size, cfg.seed, tc.epochs, tc.max_steps)
    if cfg.onednn_linear is True:
        check_onednn_linear(acc)
    model = load_causal_lm(cfg.model, tok, seed=cfg.seed)
    gold = gold_examples(eval_ex, cfg.gen_eval_samples)
    _check_positions(model, tok, unpacked + eval_feats, gold, cfg)
    n = apply_onednn_linear(cfg.onednn_linear, acc, [model])
    if n:
        log.info("onednn_linear: %d linear layers run through oneDNN", n)

    out = prepare_output_dir(acc, rf, overwrite, resume)
    t = prepare_training(acc, model, tc, len(batches), out, resume)
    model, optimizer, scheduler, guard, parts, start, state = (t.model, t.optimizer, t.scheduler, t.guard, t.parts,
                                                               t.start, t.state)
    flatten = cfg.packing and flash_attention(model)
    if cfg.packing and len(unpacked) >= 2:  # (every process: a ZeRO-3 forward is collective)
        check_packed_attention(model, unpacked, tok.pad_token_id, acc.device, flatten)
    if acc.is_main_process and (not resume or not (out / "recipe.yaml").exists()):  # (killed before it was written)
        tok.save_pretrained(out)
    save_recipe(acc, cfg, out, resume)
    logger = MetricsLogger(out, enabled=acc.is_main_process, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    log.info("SFT: %d train / %d eval examples, %d steps, %.2fM parameters%s", len(train_feats), len(eval_feats),
             len(batches), count_parameters(unwrap(model)) / 1e6, f", resuming after step {start}" if start else "")

    if state:
        initial_eval_loss = state["initial_eval_loss"]
        window_loss, window_tokens = state.get("rank", {}).get("window_loss", 0.0), state["window_tokens"]
        guard.load_state_dict(state["guard"])
    else:
        initial_eval_loss = evaluate_loss(model, eval_feats, tok.pad_token_id, micro_bs, acc) if eval_feats else None
        window_loss, window_tokens = 0.0, 0
    model.train()
    bar = progress(total=len(batches), initial=start, desc="sft", disable=not acc.is_main_process)
    micro_losses: list[float] = []
    dtype = compute_dtype(acc, cfg.model.dtype)  # (on the CPU in half precision: SDPA's math path, see engine)
    for step, idx in enumerate(batches, 1):
        if step <= start:  # the data position of a resumed run is its step count
            continue
        batch = [train_feats[i] for i in idx]
        n_tokens = n_loss_tokens(batch)  # over the global batch: the loss is a true token mean
        micro = chunks(shard(batch, acc.process_index, acc.num_processes), micro_bs)
        assert len(micro) == accum
        for k, mb in enumerate(micro):
            inputs, labels = sft_inputs(mb, tok.pad_token_id, acc.device, flatten)
            last = k == len(micro) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model), \
                    backpropagated_attention(acc.device, dtype):
                loss_sum, _ = lm_loss_sum(model(**inputs).logits, labels)
                loss_sum = inject_fault(loss_sum, step)
                backward(acc, loss_sum / max(n_tokens, 1) * acc.num_processes, accum, last)
            micro_losses.append(loss_sum.item())
        loss_ok = all(math.isfinite(x) for x in micro_losses)
        res = optimizer_step(acc, model, optimizer, scheduler, tc.max_grad_norm, loss_ok)
        stepped, grad_norm = res
        guard.update(stepped, step, overflow=res.overflow, scale=loss_scale(acc))
        if stepped:
            window_loss += sum(micro_losses)
            window_tokens += n_tokens
        micro_losses.clear()
        bar.update(1)
        if step % tc.log_every == 0 or step == len(batches):
            loss = acc.reduce(torch.tensor(window_loss, device=acc.device), "sum").item() / max(window_tokens, 1)
            rec = {"loss": loss, "lr": scheduler.get_last_lr()[0], "epoch": step * tc.batch_size / len(train_feats)}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            logger.log(step, rec)
            bar.set_postfix(loss=f"{loss:.4f}")
            window_loss, window_tokens = 0.0, 0
        if tc.eval_every and step % tc.eval_every == 0 and step != len(batches):
            logger.log(step, {"eval_loss": evaluate_loss(model, eval_feats, tok.pad_token_id, micro_bs, acc)})
        if step == len(batches):  # (before the last checkpoint: resuming from it could only fail again)
            guard.check_trained(len(batches))
        if tc.save_every and (step % tc.save_every == 0 or step == len(batches)):
            save_checkpoint(acc, out, step, parts, keep=tc.save_total_limit,
                            state={"initial_eval_loss": initial_eval_loss, "window_tokens": window_tokens,
                                   "guard": guard.state_dict()}, rank_state={"window_loss": window_loss})
        fault_point_step(step)
    bar.close()

    summary = {"stage": "sft", "steps": len(batches), "train_examples": len(train_feats),
               "eval_examples": len(eval_feats), "parameters": count_parameters(unwrap(model)),
               "skipped_bad_rows": stats["skipped_bad_rows"], "skipped_nonfinite_steps": guard.skipped,
                    **guard.summary()}
    if eval_feats:
        eval_loss = evaluate_loss(model, eval_feats, tok.pad_token_id, micro_bs, acc)
        summary.update(initial_eval_loss=initial_eval_loss, eval_loss=eval_loss,
                       eval_perplexity=math.exp(min(eval_loss, 50)))
    sharded = zero_stage(acc) == 3  # every rank takes part in a ZeRO-3 forward
    if gold and (acc.is_main_process or sharded):
        m = unwrap(model)
        with gathered_params(acc, m), run_autocast(acc)():  # (one region: each weight cast once, not per token)
            for key, greedy in (("eval_gold_accuracy", False), ("eval_gold_accuracy_greedy", True)):
                summary[key] = gold_accuracy(m, tok, gold, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                             greedy=greedy, seed=cfg.seed + 1, device=acc.device)
        summary["eval_gold_prompts"] = len(gold)
    summary["train_seconds"] = round(time.time() - t_start, 1)
    summary["num_processes"] = acc.num_processes
    summary.update(peak_memory(acc))  # collective
    state_dict = acc.get_state_dict(model) if sharded else None  # collective under ZeRO-3
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model_files(model, tok, out, state_dict=state_dict)
        logger.log(len(batches), {k: v for k, v in summary.items() if k.startswith("eval_")})
        write_summary(out, summary)
    finish_run(acc, logger, out)
    return summary

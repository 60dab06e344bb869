"""Stage 3, PPO with a KL penalty against the SFT policy [IGPT §3.5 eq. 2, N, N+].

One iteration (:func:`ppo_iteration`) is InstructGPT's algorithm, one call per step:

    rollout    = make_rollout(...)      # sample responses (KV cache, left padding, stop at EOS)
    scores     = compute_scores(...)    # RM (normalised) and/or Python reward functions, EOS penalty,
                                        # scaled and clipped
    experience = make_experience(...)   # old log-probs, reference log-probs, values (once per
                                        # rollout), per-token reward -beta*KL + score at the end,
                                        # advantages (the registered estimator, GAE by default)
    stats      = ppo_update(...)        # ppo_epochs x shuffled minibatches x micro-batches of the
                                        # clipped surrogate + clipped value loss (+ ptx, entropy)
    log_iteration(...); checkpoint      # metrics, samples, held-out evaluation, resumable state

Where the models live (DDP, ZeRO-2/3, sharded or offloaded frozen models, the LoRA reference)
is built once by :func:`rlhf.stages.ppo_setup.setup_models`; the math lives in
:mod:`rlhf.algos` as pure functions, its choices in registries (KL estimator, advantage
estimator, reward scaling, value initialisation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..algos import core
from ..algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
from ..algos.overopt import Evaluation, alarm_checkable, hacking_alarm
from ..checkpoint import CheckpointParts, latest_checkpoint, load_tensors, resume_state, rng_snapshot, save_checkpoint
from ..faults import fault_point_step, inject_fault
from ..config import PPOConfig, to_dict
from ..data.formats import DataError, load_examples, parse_prompt, parse_sft, split_train_eval
from ..data.tasks import gold_reward, has_gold
from ..ema import EMA
from ..engine import (MetricsLogger, NonFiniteGuard, RunError, Timer, atomic_write_text, backpropagated_attention,
                      backward, chunks, compute_dtype, epoch_permutation, finish_run, finished_summary, inputs_first,
                      loss_scale, make_accelerator, open_run, peak_memory, prepare_output_dir, progress, save_recipe,
                      set_seed, step_models, user_errors, warn_zero3_dtype, world_size, write_summary, zero_stage)
from ..flops import forward_flops, measure_matmul_peak, mfu, train_flops
from ..models import (check_policy_model, check_positions, check_reward_model, count_parameters, eager_blocks,
                      load_tokenizer, save_model_files, unwrap)
from ..ptx import PtxIterator
from ..rm_refresh import Paused, RMRefresher
from ..rewards import (RewardError, RewardModel, call_reward_fn, dry_call_on, load_reward_fn, on_every_process,
                       reward_fields)
from ..rollout import (Generation, generate, position_ids_from_mask, response_logprobs, row_extents,
                       trim_columns)
from ..tokenization import decode_response, encode_prompt, encode_sft
from ..value import response_values
from .ppo_setup import BatchSplit, PPOModels, setup_models

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- inputs


@dataclass
class PPOInputs:
    """Everything a run reads before any model loads."""

    prompts: list
    eval_prompts: list
    reward_fns: list
    """[(RewardSpec, function)], each imported and called once on real prompts."""
    tok: object
    ptx_feats: list = field(default_factory=list)
    """Encoded PPO-ptx demonstrations (empty without ptx_coef)."""
    gold_fns: list = field(default_factory=list)
    """[(RewardSpec, function)] of the held-out gold reward (measured, never trained on)."""
    skipped_bad_rows: int = 0
    """Prompt rows skipped under data.skip_bad_rows (malformed, or over data.max_prompt_length)."""
    longest_rollout: int = 0
    """Tokens of the longest prompt kept plus max_new_tokens: the longest sequence a rollout makes."""


def read_inputs(cfg: PPOConfig) -> PPOInputs:
    """Prompts, reward functions (imported, then dry-called), tokenizer, prompt lengths, ptx rows."""
    prompts, stats = load_examples(cfg.data.train, parse_prompt, split=cfg.data.split,
                                   skip_bad_rows=cfg.data.skip_bad_rows, max_samples=cfg.data.max_samples,
                                   what="prompts")
    skipped = stats["skipped_bad_rows"]
    if cfg.data.eval:
        eval_prompts, stats = load_examples(cfg.data.eval, parse_prompt, skip_bad_rows=cfg.data.skip_bad_rows,
                                            what="prompts", field_name="data.eval")
        skipped += stats["skipped_bad_rows"]
    else:
        prompts, eval_prompts = split_train_eval(prompts, cfg.data.eval_split, cfg.seed)
    _check_rollout_batch(cfg, prompts)
    reward_fns = [(spec, load_reward_fn(spec.fn)) for spec in cfg.reward_fns]
    gold_fns = [(spec, load_reward_fn(spec.fn)) for spec in cfg.gold_reward_fns]
    refresh = cfg.rm_refresh  # its judge too, when it ranks samples of these prompts
    judge = [load_reward_fn(refresh.judge)] if refresh and refresh.judge != "human" and not refresh.prompts else []
    dry_call_on([fn for _, fn in reward_fns + gold_fns] + judge, prompts, cfg.reward_timeout)
    check_policy_model(None if cfg.model.init != "pretrained" or cfg.model.gguf_file else cfg.model.name_or_path)
    tok = load_tokenizer(cfg.model)
    for fld in ("reward_model", "gold_reward_model"):  # before any model loads, not after the policy
        if getattr(cfg, fld):
            check_reward_model(getattr(cfg, fld), fld)
    prompts, too_long, longest = fitting_prompts(tok, prompts, cfg.data.max_prompt_length, cfg.data.skip_bad_rows)
    # the first eval_samples held-out prompts that fit: those left out on the way are counted, no more are read
    eval_prompts, n, longest_eval = fitting_prompts(tok, eval_prompts, cfg.data.max_prompt_length,
                                                    cfg.data.skip_bad_rows, cfg.eval_samples)
    too_long += n
    if too_long:
        skipped += too_long
        log.warning("skipped %d prompts longer than data.max_prompt_length (%d tokens)", too_long,
                    cfg.data.max_prompt_length)
        _check_rollout_batch(cfg, prompts, " once the prompts over data.max_prompt_length were skipped")
    feats = []
    if cfg.ptx_data and cfg.ptx_coef == 0:
        log.warning("ptx_data is set but ptx_coef is 0: the pretraining term is off and %s is not read", cfg.ptx_data)
    if cfg.ptx_coef > 0:
        demos, st = load_examples(cfg.ptx_data, parse_sft, skip_bad_rows=cfg.data.skip_bad_rows, what="ptx rows",
                                  field_name="ptx_data")
        skipped += st["skipped_bad_rows"]
        feats = [encode_sft(tok, d.prompt, d.completion) for d in demos]
    return PPOInputs(prompts, eval_prompts, reward_fns, tok, feats, gold_fns, skipped,
                     max(longest, longest_eval) + cfg.max_new_tokens)


def _check_positions(m, data: PPOInputs, cfg: PPOConfig) -> None:
    """The longest rollout fits the learned positions of the policy, the value model and the reward
    models that read the sampled ids (PPO-ptx rows the policy)."""
    fix = "lower data.max_prompt_length (with data.skip_bad_rows) or max_new_tokens"
    for model in (m.policy, m.value and unwrap(m.value).backbone):
        if model is not None:
            check_positions(model, data.longest_rollout, "the longest prompt with max_new_tokens", fix)
    for rm, fld in ((m.reward_model, "reward_model"), (m.gold_reward_model, "gold_reward_model")):
        if rm is None or rm.positions is None:
            continue
        if rm.same_tokenizer(data.tok):  # (it reads the sampled ids, and an EOS after a cut)
            check_positions(rm.model, data.longest_rollout + 1, f"the longest prompt with max_new_tokens, as {fld} "
                            f"reads it", fix)
        else:  # its own tokens: the prompt exactly, a response counted as max_new_tokens of them (a longer one is cut)
            longest = max(len(rm.encode(p.prompt, "")) for p in data.prompts + data.eval_prompts)
            check_positions(rm.model, longest + cfg.max_new_tokens, f"the longest prompt in {fld}'s own tokens "
                            f"with max_new_tokens", fix)
    refresh = cfg.rm_refresh.max_new_tokens if cfg.rm_refresh is not None else None
    if refresh and refresh > cfg.max_new_tokens:  # (rm_refresh samples longer; found at its first refresh before)
        check_positions(m.policy, data.longest_rollout - cfg.max_new_tokens + refresh - 1,
                        "the longest prompt with rm_refresh.max_new_tokens (sampled)",
                        "lower rm_refresh.max_new_tokens or data.max_prompt_length")
    if data.ptx_feats:
        check_positions(m.policy, max(len(ids) for ids, _ in data.ptx_feats), "the longest ptx_data row",
                        "shorten those rows or use a model with more positions")


def _check_rollout_batch(cfg: PPOConfig, prompts: list, after: str = "") -> None:
    if len(prompts) < cfg.rollout_batch_size // cfg.samples_per_prompt:
        raise DataError(f"{cfg.data.train}: {len(prompts)} training prompts{after}, fewer than one rollout batch "
                        f"({cfg.rollout_batch_size // cfg.samples_per_prompt} prompts)")


def fitting_prompts(tok, prompts: list, max_prompt_length: int, skip_bad_rows: bool,
                    limit: int | None = None) -> tuple[list, int, int]:
    """The prompts whose chat-formatted tokens fit in `max_prompt_length` (the first `limit` of
    them), how many were left out on the way, and the longest kept (tokens): a longer one is an
    error naming its row, or with `skip_bad_rows` left out."""
    out, left_out, longest = [], 0, 0
    for p in prompts:
        if limit is not None and len(out) == limit:
            break
        n = len(encode_prompt(tok, p.prompt))
        if n <= max_prompt_length:
            out.append(p)
            longest = max(longest, n)
        elif skip_bad_rows:
            left_out += 1
        else:
            raise DataError(f"{p.where}: field 'prompt': {n} tokens, more than data.max_prompt_length "
                            f"({max_prompt_length}); raise it or set data.skip_bad_rows")
    return out, left_out, longest


def batch_split(cfg: PPOConfig, world: int, section: str = "") -> BatchSplit:
    """Each process's rollouts, minibatch and micro-batch (the global sizes are the recipe's).
    `section`: where the keys are, for the error ('ppo.' in a pipeline)."""
    if cfg.reward_model is None and not cfg.reward_fns:
        raise RunError("recipe: PPO needs a reward: set 'reward_model' and/or 'reward_fns'")
    weights = ([cfg.reward_model_weight] if cfg.reward_model is not None else []) + [s.weight for s in cfg.reward_fns]
    if not any(weights):  # (the score would be 0 for every response: PPO would follow the KL penalty alone)
        given = ([f"{section}reward_model_weight 0"] if cfg.reward_model is not None else []) + \
            [f"{section}reward_fns[{i}].weight 0" for i in range(len(cfg.reward_fns))]
        raise RunError(f"recipe: every reward has weight 0 ({', '.join(given)}): the score would be 0 for every "
                       f"response and PPO would train on the KL penalty alone; give one a nonzero weight")
    if cfg.rm_refresh is not None and cfg.reward_model is None:
        raise RunError("recipe: 'rm_refresh' needs 'reward_model': the reward model it refreshes")
    for key in ("rollout_batch_size", "minibatch_size"):
        if getattr(cfg, key) % world:
            raise RunError(f"recipe: '{section}{key}' ({getattr(cfg, key)}) must be a multiple of the {world} "
                           f"processes")
    b_local, mb_local = cfg.rollout_batch_size // world, cfg.minibatch_size // world
    if b_local % cfg.samples_per_prompt:
        raise RunError(f"recipe: '{section}rollout_batch_size': the {b_local} rollouts of each process must be a "
                       f"multiple of samples_per_prompt ({cfg.samples_per_prompt}): the samples of one prompt stay "
                       f"on one process")
    micro = min(cfg.micro_batch_size, mb_local)
    if mb_local % micro:
        raise RunError(f"recipe: '{section}minibatch_size' per process ({mb_local}) must be a multiple of "
                       f"'{section}micro_batch_size' ({micro})")
    return BatchSplit(b_local, mb_local, micro)


# ----------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    gen: Generation
    prompts: list
    """PromptExample per row."""
    texts: list[str]


def make_rollout(policy, tok, prompts: list, cfg: PPOConfig, generator: torch.Generator, device,
                 autocast=contextlib.nullcontext) -> Rollout:
    """Sample a response to each prompt; `autocast` (PPOModels.autocast) is entered around the whole
    generation, so that under mixed precision each weight is cast once, not once per token."""
    encoded = [encode_prompt(tok, p.prompt) for p in prompts]
    with autocast():
        gen = generate(policy, encoded, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator,
                       device=device, return_logprobs=cfg.old_logprobs == "sampling")
    texts = decode_responses(tok, gen)
    return Rollout(gen, prompts, texts)


def decode_responses(tok, gen: Generation) -> list[str]:
    """Each row's response text up to its EOS (copied to the host once, not row by row)."""
    ids, mask = gen.response_ids.cpu(), gen.response_mask.cpu().bool()
    return [decode_response(tok, r[m].tolist()) for r, m in zip(ids, mask)]


def sequence_scores(ro: Rollout, tok, reward_model: RewardModel | None, reward_fns: list, rm_weight: float,
                    timeout: float, device) -> tuple[torch.Tensor, dict]:
    """(B,) weighted sum of an RM's score and reward functions' values, and each part by name."""
    score = torch.zeros(len(ro.texts), device=device)
    parts: dict[str, torch.Tensor] = {}
    if reward_model is not None:
        if reward_model.same_tokenizer(tok):  # reuse the sampled tokens: exactly what the RM was trained on
            g, eos = ro.gen, [tok.eos_token_id]  # (copied to the host once)
            # a response cut at max_new_tokens gets the EOS the RM always read in training (as the text path)
            seqs = [p[pm].tolist() + r[rm].tolist() + ([] if done else eos) for p, pm, r, rm, done in
                    zip(g.prompt_ids.cpu(), g.prompt_mask.cpu().bool(), g.response_ids.cpu(),
                        g.response_mask.cpu().bool(), g.has_eos.cpu().tolist())]
            rm_score = reward_model.score_ids(seqs).to(device)
        else:  # the text re-encoded, which may run past its positions: cut to fit, and counted
            seqs, cut = reward_model.fit([reward_model.encode(p.prompt, t) for p, t in zip(ro.prompts, ro.texts)])
            rm_score = reward_model.score_ids(seqs).to(device)
            if reward_model.positions is not None:
                parts["rm_truncated"] = torch.tensor(cut, device=device, dtype=torch.float32)
        parts["rm_score"] = rm_score
        score = score + rm_weight * rm_score
    for spec, fn in reward_fns:
        fields = reward_fields(ro.prompts)
        vals = torch.tensor(call_reward_fn(fn, [p.raw_prompt for p in ro.prompts], ro.texts, fields,
                                           where=[getattr(p, "where", "?") for p in ro.prompts],
                                           timeout=timeout), device=device)
        parts[f"reward_fn/{spec.fn}"] = vals
        score = score + spec.weight * vals
    parts_finite = torch.stack([torch.isfinite(v) for v in parts.values()]).all(0) if parts else torch.isfinite(score)
    bad = (~torch.isfinite(score) & parts_finite).nonzero()
    if len(bad):  # each part is finite: a weight times a part, or their sum, overflowed float32
        i = int(bad[0])
        terms = ", ".join(f"{k} {float(v[i]):g}" for k, v in parts.items() if k != "rm_truncated")
        raise RewardError(f"the reward of sample {i} is {float(score[i])}, the weighted sum of {terms} "
                          f"(reward_model_weight {rm_weight:g}; reward_fns weights "
                          f"{[spec.weight for spec, _ in reward_fns]}): outside float32's range")
    return score, parts


def compute_scores(ro: Rollout, tok, reward_model: RewardModel | None, reward_fns: list, cfg: PPOConfig,
                   device) -> tuple[torch.Tensor, dict]:
    """The proxy reward (B,): weighted RM score + reward functions; EOS-less responses penalised [N+]."""
    score, parts = sequence_scores(ro, tok, reward_model, reward_fns, cfg.reward_model_weight, cfg.reward_timeout,
                                   device)
    if cfg.penalize_missing_eos:
        score = torch.where(ro.gen.has_eos.to(device), score, torch.full_like(score, cfg.missing_eos_penalty))
    return score, parts


def gold_scores(ro: Rollout, m: PPOModels, data: PPOInputs, cfg: PPOConfig, device) -> torch.Tensor | None:
    """The held-out gold reward (B,) of the same samples, or None without one: it is measured and
    logged, never trained on [Gao et al. 2022]."""
    if m.gold_reward_model is None and not data.gold_fns:
        return None
    return sequence_scores(ro, data.tok, m.gold_reward_model, data.gold_fns, 1.0, cfg.reward_timeout, device)[0]


# ----------------------------------------------------------------------------- experience


@dataclass
class Experience:
    input_ids: torch.Tensor      # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R)
    old_logprobs: torch.Tensor   # (B, R)
    ref_logprobs: torch.Tensor   # (B, R)
    old_values: torch.Tensor     # (B, R) (0 for a critic-free estimator)
    advantages: torch.Tensor     # (B, R)
    returns: torch.Tensor        # (B, R)
    rewards: torch.Tensor        # (B, R)
    kl: torch.Tensor             # (B, R) the estimator used in the reward
    non_score: torch.Tensor      # (B, R)
    kl_loss_coef: float = 0.0    # beta of the KL loss term (kl_penalty: loss), 0 when the KL is in the reward
    row_start: list[int] = field(default_factory=list)   # per row: the column its prompt starts in
    row_length: list[int] = field(default_factory=list)  # per row: its response length

    def rows(self, rows: list[int]) -> tuple[torch.Tensor, slice, int]:
        """Index tensor of `rows`, the sequence columns they need and their response width
        (padding shared by all of them is cut: rollout.trim_columns)."""
        prompt_width = self.input_ids.shape[1] - self.response_mask.shape[1]
        cols, width = trim_columns(self.row_start, self.row_length, rows, prompt_width)
        return torch.tensor(rows, device=self.input_ids.device), cols, width


def sequence_batch(g: Generation) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([g.prompt_ids, g.response_ids], dim=1)
    mask = torch.cat([g.prompt_mask, g.response_mask], dim=1)
    return ids, mask


def kl_placement(cfg: PPOConfig) -> tuple[str, bool]:
    """(where the KL goes: 'reward' or 'loss', whether advantages are whitened): the recipe's
    choice, else the advantage estimator's registered default."""
    info = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator].info
    where = info.get("kl_penalty", "reward") if cfg.kl_penalty == "auto" else cfg.kl_penalty
    whiten = info.get("whiten", True) if cfg.whiten_advantages is None else cfg.whiten_advantages
    return where, whiten


@torch.no_grad()
def make_experience(ro: Rollout, scores: torch.Tensor, m: PPOModels, kl_coef: float, cfg: PPOConfig,
                    micro_batch_size: int, reduce=None) -> Experience:
    """Old and reference log-probs and values, once per rollout; KL-shaped rewards (or the score
    alone, when the KL is a loss term); the advantage estimator's advantages, whitened over the
    whole batch (`reduce` sums over the processes)."""
    g = ro.gen
    ids, mask = sequence_batch(g)
    R = g.response_ids.shape[1]
    rmask = g.response_mask.float()
    policy, value_model = unwrap(m.policy), unwrap(m.value) if m.value is not None else None
    starts, lengths = row_extents(g.prompt_mask, g.response_mask)
    old_lp, ref_lp, vals = [], [], []
    for sl in _slices(ids.shape[0], micro_batch_size):  # each micro-batch without its padding columns
        cols, r = trim_columns(starts, lengths, range(sl.start, sl.stop), g.prompt_ids.shape[1])
        x, xm = ids[sl, cols], mask[sl, cols]
        if g.logprobs is None:  # old_logprobs: recompute (else they were kept while sampling)
            old_lp.append(_pad_to(response_logprobs(policy, x, xm, r, cfg.temperature), R))
        with m.reference() as ref:
            ref_lp.append(_pad_to(response_logprobs(ref, x, xm, r, cfg.temperature), R))
        if value_model is not None:
            vals.append(_pad_to(response_values(value_model, x, xm, r), R))
    old_lp, ref_lp = torch.cat(old_lp) if g.logprobs is None else g.logprobs, torch.cat(ref_lp)
    values = torch.cat(vals) if vals else None
    kl = core.kl_estimate(old_lp, ref_lp, cfg.kl_estimator) * rmask
    kl_where, whiten = kl_placement(cfg)
    rewards, non_score = core.shaped_rewards(scores, kl, kl_coef if kl_where == "reward" else 0.0, rmask)
    if cfg.whiten_rewards:  # over the whole batch, as the advantages: not each process's share
        rewards = core.masked_whiten(rewards, rmask, shift_mean=False, reduce=reduce)
    first: dict[int, int] = {}  # the K samples of one prompt are K rows holding the same prompt object
    group = torch.tensor([first.setdefault(id(p), i) for i, p in enumerate(ro.prompts)], device=rmask.device)
    x = AdvantageInputs(rewards, scores, kl, rmask, group, values)
    adv, returns = ADVANTAGE_ESTIMATORS[cfg.advantage_estimator].fn(x, cfg)
    if whiten:
        adv = core.masked_whiten(adv, rmask, reduce=reduce)
    values = values * rmask if values is not None else torch.zeros_like(rmask)
    returns = returns if returns is not None else torch.zeros_like(rmask)
    return Experience(ids, mask, rmask, old_lp, ref_lp, values, adv, returns, rewards, kl, non_score,
                      kl_coef if kl_where == "loss" else 0.0, starts, lengths)


def _slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, r) -> (B, width), zeros after column r (positions the response mask zeroes)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


# ----------------------------------------------------------------------------- update


def ppo_update(exp: Experience, m: PPOModels, acc, cfg: PPOConfig, split: BatchSplit, iteration: int,
               st: "PPOState") -> dict:
    """ppo_epochs passes over the rollout, reshuffled each time; minibatch -> micro-batches; one
    optimizer step per minibatch, skipped whole if anything is non-finite on any process."""
    B = exp.input_ids.shape[0]
    sums: dict[str, torch.Tensor | float] = {}  # kept on the device: read back once, at the end
    steps, applied = 0, 0
    dtype = compute_dtype(acc, cfg.model.dtype)  # (on the CPU in half precision: SDPA's math path, see engine)
    for epoch in range(cfg.ppo_epochs):
        perm = epoch_permutation(B, cfg.seed + 7919 * acc.process_index, iteration * 1000 + epoch)
        for mb in chunks(perm, split.minibatch):
            # token count of the whole (global) minibatch: every micro-batch divides by it
            n_tok = acc.reduce(exp.response_mask[mb].sum().detach().clone(), "sum").item() / acc.num_processes
            micro = chunks(mb, split.micro)
            finite = torch.ones((), dtype=torch.bool, device=exp.input_ids.device)
            for k, mi in enumerate(micro):
                sync = k == len(micro) - 1
                with acc.no_sync(m.policy) if not sync else _nothing(), \
                        acc.no_sync(m.value) if not sync and m.value is not None else _nothing(), \
                        backpropagated_attention(exp.input_ids.device, dtype):
                    ptx = (lambda: st.ptx.loss(m.policy) / len(micro)) if st.ptx is not None else None
                    for loss in loss_terms(exp, mi, m, cfg, n_tok, sums, len(mb), ptx):
                        loss = inject_fault(loss, iteration)
                        finite &= torch.isfinite(loss.detach())
                        backward(acc, loss, len(micro), sync)
            res = step_models(acc, m.step_parts(), cfg.max_grad_norm, bool(finite))
            if res[0]:
                applied += 1
                if st.ema is not None:
                    st.ema.update(m.policy)
                names = ["policy_grad_norm", "value_grad_norm"] if m.engine is None else ["grad_norm_joint"]
                for name, norm in zip(names, res[1]):  # (DeepSpeed clips policy + value jointly)
                    if norm is not None:
                        _add(sums, name, norm)
            st.guard.update(res[0], iteration, overflow=res.overflow, scale=loss_scale(acc))
            steps += 1
    # grad norms exist for the steps taken only (an fp16 overflow skips one): their mean is over those
    return {k: float(v) / (applied if k.endswith(("grad_norm", "grad_norm_joint")) else steps) for k, v in sums.items()}


def loss_terms(exp: Experience, rows: list[int], m: PPOModels, cfg: PPOConfig, n_tok: float, sums: dict,
               n_seq: int, ptx=None):
    """This micro-batch's loss (:func:`micro_batch_loss`, plus ptx_coef x `ptx()`, its share of
    the pretraining loss [InstructGPT eq. 2], when given) as terms to backpropagate one after the
    other, each computed only once the one before it has been backpropagated: the policy's, then
    the value model's. They share no parameter, so the gradients are those of their sum, and one
    model's activations are held at a time instead of both. Under DeepSpeed, whose engine trains
    both models and takes one backward per micro-batch (it steps inside it), a single term: their
    sum."""
    loss = policy_micro_loss(exp, rows, m, cfg, n_tok, sums, n_seq)
    if ptx is not None:
        ptx_loss = ptx()
        loss = loss + cfg.ptx_coef * ptx_loss
        _add(sums, "ptx_loss", ptx_loss)
    if m.value is None:
        yield loss
    elif m.engine is not None:
        yield loss + value_micro_loss(exp, rows, m, cfg, n_tok, sums, n_seq)
    else:
        yield loss  # (backpropagated by the caller, which frees the policy's graph, before the value forward)
        yield value_micro_loss(exp, rows, m, cfg, n_tok, sums, n_seq)


def micro_batch_loss(exp: Experience, rows: list[int], m: PPOModels, cfg: PPOConfig, n_tok: float,
                     sums: dict, n_seq: int | None = None) -> torch.Tensor:
    """Clipped surrogate [PPO eq. 7] + vf_coef x clipped value loss [N+] - entropy bonus, as this
    micro-batch's share of the minibatch's loss: each per-token term aggregated by cfg.loss_agg
    (token_mean: over the minibatch's n_tok tokens; the per-sequence ones over its n_seq
    responses). Its statistics are added to `sums`, each a token mean over the minibatch (a
    micro-batch weighs by its response tokens, not its rows). The micro-batch's rows come without
    the padding columns they all share (Experience.rows). The sum of :func:`policy_micro_loss`
    and :func:`value_micro_loss`; training backpropagates them one at a time (:func:`loss_terms`)."""
    loss = policy_micro_loss(exp, rows, m, cfg, n_tok, sums, n_seq)
    if m.value is not None:
        loss = loss + value_micro_loss(exp, rows, m, cfg, n_tok, sums, n_seq)
    return loss


def value_micro_loss(exp: Experience, rows: list[int], m: PPOModels, cfg: PPOConfig, n_tok: float,
                     sums: dict, n_seq: int | None = None) -> torch.Tensor:
    """vf_coef x the clipped value loss [N+] of this micro-batch (see :func:`micro_batch_loss`)."""
    idx, cols, R = exp.rows(rows)
    ids, mask, rmask = exp.input_ids[idx, cols], exp.attention_mask[idx, cols], exp.response_mask[idx, :R]
    agg = core.LOSS_AGGREGATIONS[cfg.loss_agg].fn(rmask, n_tok, n_seq or len(rows), cfg.max_new_tokens)
    vpred = m.value(ids, mask, position_ids_from_mask(mask))[:, -R - 1 : -1]
    vf_loss, vclip = core.value_loss(vpred, exp.old_values[idx, :R], exp.returns[idx, :R], rmask,
                                     cfg.cliprange_value, agg)
    _add(sums, "vf_loss", vf_loss)
    _add(sums, "value_clipfrac", vclip.double() * (rmask.sum().double() / n_tok))  # (a token mean, as the policy's)
    return cfg.vf_coef * vf_loss


def policy_micro_loss(exp: Experience, rows: list[int], m: PPOModels, cfg: PPOConfig, n_tok: float,
                      sums: dict, n_seq: int | None = None) -> torch.Tensor:
    """The policy's part of :func:`micro_batch_loss`: the clipped surrogate [PPO eq. 7] - the
    entropy bonus (+ beta x the KL loss term with kl_penalty: loss [Shao et al. 2024])."""
    idx, cols, R = exp.rows(rows)
    ids, mask, rmask = exp.input_ids[idx, cols], exp.attention_mask[idx, cols], exp.response_mask[idx, :R]
    # the entropy is logged; it carries a gradient only when it is in the loss
    logp, ent = response_logprobs(m.policy, ids, mask, R, cfg.temperature, return_entropy=True,
                                  entropy_grad=cfg.entropy_coef != 0)
    agg = core.LOSS_AGGREGATIONS[cfg.loss_agg].fn(rmask, n_tok, n_seq or len(rows), cfg.max_new_tokens)
    pg_loss, pst = core.policy_loss(logp, exp.old_logprobs[idx, :R], exp.advantages[idx, :R], rmask, cfg.cliprange,
                                    cfg.log_ratio_clamp, agg)
    loss = pg_loss
    _add(sums, "pg_loss", pg_loss)
    entropy = core.masked_sum(ent, rmask) / n_tok  # logged: a token mean, whatever the aggregation
    loss = loss - cfg.entropy_coef * (entropy if cfg.loss_agg == "token_mean" else core.aggregate(ent, agg))
    _add(sums, "entropy", entropy)
    if exp.kl_loss_coef > 0:  # GRPO: beta * KL(pi || pi_ref) as a loss term, on the current policy [Shao et al. 2024]
        kl = core.kl_loss_per_token(logp, exp.ref_logprobs[idx, :R], cfg.kl_loss_estimator)
        kl_loss = core.aggregate(kl, agg)
        loss = loss + exp.kl_loss_coef * kl_loss
        _add(sums, "kl_loss", kl_loss)
    weight = rmask.sum().double() / n_tok  # this micro-batch's share of the minibatch's tokens
    for name, value in (("policy_clipfrac", pst.clipfrac), ("approx_kl", pst.approx_kl),
                        ("ratio_mean", pst.ratio_mean)):
        _add(sums, name, value.double() * weight)
    return loss


def _nothing():
    return contextlib.nullcontext()


def _add(d: dict, k: str, v) -> None:
    """Accumulate a statistic: device tensors in float64 (no host sync per micro-batch), floats as they are."""
    v = v.detach().double() if isinstance(v, torch.Tensor) else v
    d[k] = d[k] + v if k in d else v


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(m: PPOModels, data: PPOInputs, cfg: PPOConfig, device) -> dict:
    """Held-out prompts sampled at cfg.temperature: mean score (the recipe's whole reward, and the
    reward model's own score apart as eval_rm_score), KL to the reference, gold accuracy."""
    policy = unwrap(m.policy)
    was = policy.training
    policy.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    scores, kls, k3s, golds, lengths, eos, gold_rewards, rm_scores = [], [], [], [], [], [], [], []
    failure = None  # a reward function's error: raised after the loop, whose forwards may be collective
    for chunk in chunks(data.eval_prompts, cfg.rollout_batch_size):
        ro = make_rollout(policy, data.tok, chunk, cfg, gen, device, m.autocast)
        # (each RM's forward runs before the functions: on every process, whatever the functions do)
        try:
            s, parts = compute_scores(ro, data.tok, m.reward_model, data.reward_fns, cfg, device)
            if "rm_score" in parts:
                rm_scores.append(parts["rm_score"])
        except RewardError as e:
            failure, s = failure or e, torch.zeros(len(chunk), device=device)
        try:
            g = gold_scores(ro, m, data, cfg, device)
        except RewardError as e:
            failure, g = failure or e, None
        if g is not None:
            gold_rewards.append(g)
        ids, mask = sequence_batch(ro.gen)
        R = ro.gen.response_ids.shape[1]
        rm = ro.gen.response_mask.float()
        lp = response_logprobs(policy, ids, mask, R, cfg.temperature)
        with m.reference() as ref:
            rlp = response_logprobs(ref, ids, mask, R, cfg.temperature)
        kls.append((core.kl_estimate(lp, rlp, "k1") * rm).sum(-1))
        k3s.append((core.kl_estimate(lp, rlp, "k3") * rm).sum(-1))
        scores.append(s)
        lengths.append(rm.sum(-1))
        eos.append(ro.gen.has_eos.float())
        if has_gold([p.meta for p in chunk]):
            golds += gold_reward(None, ro.texts, task=[p.meta["task"] for p in chunk],
                                 input=[p.meta["input"] for p in chunk])
    policy.train(was)
    if failure is not None:
        raise failure
    out = {"eval_reward": torch.cat(scores).mean().item(), "eval_kl": torch.cat(kls).mean().item(),
           "eval_kl_k3": torch.cat(k3s).mean().item(), "eval_response_length": torch.cat(lengths).mean().item(),
           "eval_eos_rate": torch.cat(eos).mean().item()}
    if golds:
        out["eval_gold_accuracy"] = sum(golds) / len(golds)
    if gold_rewards:
        out["eval_gold_reward"] = torch.cat(gold_rewards).mean().item()
    if rm_scores:  # the RM alone (no reward functions, weights or EOS penalty): one measure across methods
        out["eval_rm_score"] = torch.cat(rm_scores).mean().item()
    return out


# ----------------------------------------------------------------------------- the stage


BEST_GOLD_RECORD = "best_gold.json"
"""{'value', 'iteration'} beside the policy in best_gold/."""


@dataclass
class PPOState:
    """What changes from iteration to iteration besides the weights, and is checkpointed with them."""

    kl_ctl: object
    moments: core.RunningMoments
    guard: NonFiniteGuard
    sampling: torch.Generator
    """The rollout generator, on the device, seeded per process [N]."""
    ema: EMA | None = None
    ptx: PtxIterator | None = None
    summary: dict = field(default_factory=lambda: {"stage": "ppo"})
    evals: list = field(default_factory=list)
    """Every held-out evaluation as an overopt.Evaluation (iteration, KL, proxy, gold): the alarm's input."""
    best_gold: dict = field(default_factory=dict)
    """{'value', 'iteration'} of the best gold so far (its policy is in best_gold/)."""
    alarms: list = field(default_factory=list)
    """Iterations at which the hacking alarm fired."""
    refresher: RMRefresher | None = None
    """Online RM refresh (rm_refresh), or None."""

    @classmethod
    def create(cls, cfg: PPOConfig, acc, m: PPOModels, data: PPOInputs, split: BatchSplit) -> "PPOState":
        kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                  else core.FixedKLController(cfg.kl_coef))
        ema = EMA(m.policy, cfg.ema_decay, cfg.ema_offload) if cfg.ema_decay > 0 else None
        ptx = PtxIterator(data.ptx_feats, split.micro, data.tok.pad_token_id, cfg.seed + acc.process_index,
                          acc.device) if cfg.ptx_coef > 0 else None
        sampling = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)
        refresher = RMRefresher(cfg.rm_refresh, m.reward_model, data.prompts, cfg.seed, cfg.max_new_tokens) \
            if cfg.rm_refresh is not None else None
        return cls(kl_ctl, core.RunningMoments(), NonFiniteGuard(cfg.max_nonfinite_steps), sampling, ema, ptx,
                   refresher=refresher)

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "moments": self.moments.state_dict(),
                "guard": self.guard.state_dict(), "ptx": self.ptx.state_dict() if self.ptx else None,
                "initial": {k: v for k, v in self.summary.items() if k.startswith("initial_")},
                "evals": [vars(e) for e in self.evals], "best_gold": self.best_gold, "alarms": self.alarms,
                "rm_refresh": self.refresher.state_dict() if self.refresher else None,
                "stopped_by_alarm": self.summary.get("stopped_by_alarm")}

    def load(self, state: dict, ckpt: Path, rank: int) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
        self.guard.load_state_dict(state["guard"])
        self.summary.update(state["initial"])
        self.evals = [Evaluation(**e) for e in state.get("evals", [])]
        self.best_gold, self.alarms = state.get("best_gold", {}), state.get("alarms", [])
        record = ckpt.parent.parent / "best_gold" / BEST_GOLD_RECORD  # (the run folder's best_gold/)
        if record.exists():  # written after this checkpoint by the run that stopped: its policy is in the folder
            self.best_gold = json.loads(record.read_text())
        if state.get("stopped_by_alarm"):  # a stop survives a resume: the run only finishes
            self.summary["stopped_by_alarm"] = state["stopped_by_alarm"]
        if self.refresher is not None and state.get("rm_refresh"):
            self.refresher.load_state_dict(state["rm_refresh"])
        # (the recipe switched on what the interrupted run did not have: nothing of it to resume)
        if self.ptx is not None and state.get("ptx") is None:
            raise RunError(f"{ckpt}: has no PPO-ptx data position (the run was started without ptx_coef / "
                           f"ptx_data); resume with the run's recipe (its recipe.yaml), or start a new run")
        if self.ptx is not None:
            self.ptx.load_state_dict(state["ptx"])
        if self.ema is not None:
            name = f"ema-rank{rank}.safetensors" if self.ema.sharded else "ema.safetensors"
            if not (ckpt / name).exists():
                raise RunError(f"{ckpt}: has no EMA of the policy (the run was started without ema_decay); resume "
                               f"with the run's recipe (its recipe.yaml), or start a new run")
            self.ema.load(load_tensors(ckpt / name))


def checkpoint_parts(m: PPOModels, st: PPOState, **extra) -> CheckpointParts:
    """The models' parts of a checkpoint, the sampling generator and, with rm_refresh, the RM and its AdamW."""
    parts = m.checkpoint_parts(generators={"sampling": st.sampling}, **extra)
    if st.refresher is not None:
        parts.models["reward_model"] = st.refresher.rm.model
        parts.optimizers["reward_model"] = st.refresher.optimizer
    return parts


@dataclass
class PPORun:
    """One PPO run: its config, engine, models, inputs, state and outputs."""

    cfg: PPOConfig
    acc: object
    m: PPOModels
    data: PPOInputs
    st: PPOState
    split: BatchSplit
    out: Path
    logger: MetricsLogger
    peak: float
    """Matmul peak (FLOP/s) of the dtype that runs: the MFU denominator."""

    @property
    def evaluates(self) -> bool:
        """This process evaluates (the main one, or every one when models are sharded)."""
        return bool(self.data.eval_prompts) and (self.acc.is_main_process or self.m.collective)

    def evaluate(self) -> dict | None:
        """The held-out evaluation on the processes that evaluate (None on the others), then one
        vote among all: a reward function failing in it on any process stops every process."""
        def held_out():
            if not self.evaluates:
                return None
            with self.m.gathered(), eager_blocks():  # ZeRO-3: the policy's weights gathered once
                return evaluate_policy(self.m, self.data, self.cfg, self.acc.device)
        return on_every_process(self.acc, held_out)

    def after_evaluation(self, it: int, res: dict) -> bool:
        """Gold against proxy after a held-out evaluation: keep the best-by-gold policy in best_gold/,
        sound the hacking alarm [Gao et al. 2022]. Returns whether the run should stop (stop_on_alarm)."""
        cfg, st = self.cfg, self.st
        gold = res.get("eval_gold_reward", res.get("eval_gold_accuracy"))
        if st.evals and st.evals[-1].iteration == it:  # (the final evaluation of a run stopped at an evaluation)
            return False
        st.evals.append(Evaluation(it, res["eval_kl"], res["eval_reward"], gold))
        better = gold is not None and (not st.best_gold or gold > st.best_gold["value"])
        if self.m.collective:  # every process saves a sharded policy together: one decides (the main one)
            better = self.acc.reduce(torch.tensor(float(better and self.acc.is_main_process),
                                                  device=self.acc.device), "sum").item() > 0
        if better:
            st.best_gold = {"value": gold, "iteration": it}
            folder = self.out / "best_gold"
            if self.acc.is_main_process:
                (folder / BEST_GOLD_RECORD).unlink(missing_ok=True)  # (no record while the weights change)
            self.save_policy(folder)
            if self.acc.is_main_process:  # which policy the folder holds: a resume reads it (PPOState.load)
                atomic_write_text(folder / BEST_GOLD_RECORD, json.dumps(st.best_gold))
        reason = hacking_alarm(st.evals, cfg.alarm_window, cfg.alarm_proxy_rise, cfg.alarm_gold_drop, cfg.kl_budget)
        if reason or alarm_checkable(st.evals, cfg.alarm_window, cfg.kl_budget):
            self.logger.log(it, {"hacking_alarm": float(reason is not None)})
        if reason:
            log.warning("iteration %d: reward hacking alarm: %s%s", it, reason,
                        "; stopping (stop_on_alarm)" if cfg.stop_on_alarm else "")
            st.alarms.append(it)
        return bool(reason) and cfg.stop_on_alarm

    def save_policy(self, folder: Path) -> None:
        """The policy as an HF folder (collective under ZeRO-3, which consolidates its partitions)."""
        state = None
        if zero_stage(self.acc) == 3:
            full = self.acc.get_state_dict(self.m.engine)
            state = {k[len("policy."):]: v for k, v in full.items() if k.startswith("policy.")} if full else None
        if self.acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            save_model_files(self.m.policy, self.data.tok, folder, state_dict=state)

    def save(self, step: int, rng_state: dict | None = None) -> None:
        """A resumable checkpoint after `step` (collective); `rng_state` as saved by rng_snapshot."""
        ema = self.st.ema
        ema_t = {"ema": ema.tensors()} if ema is not None else None
        parts = checkpoint_parts(self.m, self.st, extra_tensors=ema_t if ema and not ema.sharded else None,
                                 sharded_tensors=ema_t if ema and ema.sharded else None)
        save_checkpoint(self.acc, self.out, step, parts, state=self.st.state_dict(), keep=self.cfg.save_total_limit,
                        rng_state=rng_state)


def run_ppo(cfg: PPOConfig, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    t_start = time.time()
    split = batch_split(cfg, world_size())
    acc = make_accelerator(cfg.mixed_precision, cfg.deepspeed, micro_batch_size=split.micro,
                           grad_accum=split.minibatch // split.micro, max_grad_norm=cfg.max_grad_norm,
                           matmul_precision=cfg.matmul_precision)
    warn_zero3_dtype(acc, cfg.model.dtype)
    rf = open_run(acc, output_dir or cfg.output_dir, overwrite, resume, "ppo", cfg)  # planned; nothing written yet
    if rf.done:
        return finished_summary(rf, cfg)
    set_seed(cfg.seed + acc.process_index)  # a different sampling seed per rank [N]
    with inputs_first(rf):  # prompts, reward functions (imported and called once), tokenizer, lengths first
        # (voted: a reward function whose check fails on one process only stops every one, with its error)
        data = on_every_process(acc, lambda: read_inputs(cfg), (RewardError, *user_errors()),
                                "a reward function, or a check of the inputs,")
    m = setup_models(cfg, acc, data.tok, split)
    _check_positions(m, data, cfg)
    out = prepare_output_dir(acc, rf, overwrite, resume)
    st = PPOState.create(cfg, acc, m, data, split)
    peak_dtype = compute_dtype(acc, cfg.model.dtype)  # MFU against the peak of the dtype that runs
    peak = cfg.peak_tflops * 1e12 or measure_matmul_peak(dtype=peak_dtype, device=acc.device)
    log.info("MFU against %s %.3g TFLOP/s (%s matmul peak)", "a given" if cfg.peak_tflops else "a measured",
             peak / 1e12, str(peak_dtype).replace("torch.", ""))
    start, state = resume_state(acc, out, resume, checkpoint_parts(m, st), total=(cfg.steps, "steps"))
    if state:
        st.load(state, latest_checkpoint(out), acc.process_index)
    save_recipe(acc, cfg, out, resume)
    logger = MetricsLogger(out, enabled=acc.is_main_process, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    if cfg.old_logprobs == "auto":  # (resolved after the recipe is saved: a resumed run resolves it again)
        cfg = replace(cfg, old_logprobs=resolve_old_logprobs(peak_dtype))
        log.info("old_logprobs: auto -> %s", cfg.old_logprobs)
    run = PPORun(cfg, acc, m, data, st, split, out, logger, peak)
    log.info("PPO: %d prompts, %d held out, %d iterations x %d rollouts, %s advantages, policy %.2fM params%s",
             len(data.prompts), len(data.eval_prompts), cfg.steps, cfg.rollout_batch_size, cfg.advantage_estimator,
             count_parameters(unwrap(m.policy)) / 1e6, f", resuming after iteration {start}" if start else "")
    initial = run.evaluate() if not state else None
    if initial is not None:
        st.summary.update({"initial_" + k: v for k, v in initial.items()})
        logger.log(0, initial)
        run.after_evaluation(0, initial)
    if st.refresher is not None and st.refresher.pending:  # paused for human ranking: learn from the ranks first
        logger.log(start, st.refresher.finish_pending(acc))
    bar = progress(total=cfg.steps, initial=start, desc="ppo", disable=not acc.is_main_process)
    for it in range(start + 1, cfg.steps + 1 if "stopped_by_alarm" not in st.summary else start + 1):
        postfix, stop = ppo_iteration(run, it)
        bar.set_postfix(**postfix)
        bar.update(1)
        if stop:  # (ppo_iteration recorded it in the summary and the checkpoint)
            break
    bar.close()
    return finish_ppo(run, t_start, str(peak_dtype).replace("torch.", ""))


def resolve_old_logprobs(compute: torch.dtype) -> str:
    """What ``old_logprobs: auto`` means for a run whose products compute in `compute`: 'sampling'
    when every product is full fp32 (`compute` float32 and torch's fp32 matmul precision 'highest'),
    where the log-probs kept while sampling equal a recompute's to float rounding (2.3e-5 nats at
    most on SmolLM2-135M: the KV-cached pass adds up in another order; bench/old_logprobs_agreement.py),
    so the recompute would only cost a policy pass; 'recompute' otherwise (bf16/fp16, TF32 or bf16
    products), where they differ by up to 0.26 nats and ~1% of tokens would start the update clipped."""
    exact = compute == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return "sampling" if exact else "recompute"


def ppo_iteration(run: PPORun, it: int) -> tuple[dict, bool]:
    """Sample -> score -> experience -> update -> log / evaluate / checkpoint. Returns the
    progress-bar figures and whether the run stops here (hacking alarm with stop_on_alarm)."""
    cfg, acc, m, st, data = run.cfg, run.acc, run.m, run.st, run.data
    t_gen, t_score, t_exp, t_train = Timer(), Timer(), Timer(), Timer()
    rng_at_start = rng_snapshot({"sampling": st.sampling})  # a reward failure saves the state of it - 1
    batch = rollout_prompts(run, it)

    unwrap(m.policy).eval()
    with t_gen, m.gathered():  # ZeRO-3: the weights are gathered once for the whole rollout
        ro = make_rollout(unwrap(m.policy), data.tok, batch, cfg, st.sampling, acc.device, m.autocast)
    with t_score:
        try:
            raw_scores, parts, failure = *compute_scores(ro, data.tok, m.reward_model, data.reward_fns, cfg,
                                                         acc.device), None
        except RewardError as e:
            raw_scores, parts, failure = None, None, e
        if acc.reduce(torch.tensor(float(failure is not None), device=acc.device), "sum").item():  # any process
            already_saved = it > 1 and (it - 1) % cfg.save_every == 0 if cfg.save_every else True
            raise reward_failure(failure, it, not already_saved, lambda: run.save(it - 1, rng_at_start), run.out)
        scores = core.REWARD_SCALINGS[cfg.scale_reward].fn(raw_scores, st.moments, acc.gather(raw_scores))
        scores = core.clip_scores(scores, cfg.reward_clip)
    # the beta this rollout's rewards use and the learning rate of its first optimizer step: logged with it
    used = {"kl_coef": st.kl_ctl.value, "lr": m.schedulers[0].get_last_lr()[0]}
    with t_exp, eager_blocks():  # (compile: the blocks are compiled for the training passes only)
        exp = make_experience(ro, scores, m, st.kl_ctl.value, cfg, run.split.micro,
                              reduce=lambda t: acc.reduce(t.clone(), "sum"))
    m.train()  # (dropout is off; training mode is what activation checkpointing needs)
    with t_train:
        stats = ppo_update(exp, m, acc, cfg, run.split, it, st)

    mean_kl = acc.reduce(exp.kl.sum(-1).mean(), "mean").item()
    st.kl_ctl.update(mean_kl, cfg.rollout_batch_size)
    postfix = {}
    if it % cfg.log_every == 0 or it == cfg.steps:
        times = {"generate": t_gen.total, "score": t_score.total, "experience": t_exp.total, "train": t_train.total}
        metrics = log_iteration(run, it, (ro, exp, raw_scores, scores, parts), stats, mean_kl, times, used)
        postfix = {"score": f"{metrics['score']:.3f}", "kl": f"{mean_kl:.3f}",
                   **({"gold": f"{metrics['gold_accuracy']:.2f}"} if "gold_accuracy" in metrics else {})}
    if acc.is_main_process and cfg.sample_every and (it % cfg.sample_every == 0 or it == 1):
        _log_samples(run.out, run.logger, it, ro, raw_scores)
    stop = False
    if cfg.eval_every and it % cfg.eval_every == 0 and it != cfg.steps:
        res = run.evaluate()
        if res is not None:
            run.logger.log(it, res)
            stop = run.after_evaluation(it, res)
        stop = acc.reduce(torch.tensor(float(stop), device=acc.device), "sum").item() > 0  # every process stops
    if stop:  # recorded before the checkpoint below: a resume after a crash in finishing still stops here
        st.summary["stopped_by_alarm"] = it
    paused = refresh_rm(run, it) if not stop else None
    if it == cfg.steps or stop:  # (before the last checkpoint: resuming from it could only fail again)
        st.guard.check_trained(it * cfg.ppo_epochs * (run.split.rollouts // run.split.minibatch), TRAINED_FIX)
    if paused or (cfg.save_every and (it % cfg.save_every == 0 or it == cfg.steps or stop)):
        run.save(it)
    if paused:
        raise Paused(paused)
    fault_point_step(it)
    return postfix, stop


def refresh_rm(run: PPORun, it: int) -> str | None:
    """The online RM refresh when due (rm_refresh.every); returns the pause message when a person
    must rank the samples first (the caller saves a checkpoint, then stops)."""
    ref = run.st.refresher
    if ref is None or it % ref.cfg.every or it == run.cfg.steps:  # (no rollout would use a last refresh)
        return None
    unwrap(run.m.policy).eval()
    with run.m.gathered():
        metrics = ref.refresh(unwrap(run.m.policy), run.data.tok, run.acc, it, run.out)
    run.logger.log(it, metrics)
    return ref.pending["message"] if ref.pending else None


def rollout_prompts(run: PPORun, it: int) -> list:
    """This process's prompts of iteration `it`: epoch e's order is a permutation seeded by (seed, e)."""
    k = run.cfg.samples_per_prompt  # each prompt K times in a row: its samples stay on one process
    n_prompts = run.cfg.rollout_batch_size // k
    epoch, pos = divmod(it - 1, len(run.data.prompts) // n_prompts)
    perm = epoch_permutation(len(run.data.prompts), run.cfg.seed, epoch)
    idx = [i for i in perm[pos * n_prompts : (pos + 1) * n_prompts] for _ in range(k)]
    rank, n = run.acc.process_index, run.split.rollouts
    return [run.data.prompts[i] for i in idx[rank * n : (rank + 1) * n]]


def log_iteration(run: PPORun, it: int, batch: tuple, stats: dict, mean_kl: float, times: dict, used: dict) -> dict:
    """One metrics.jsonl record: rewards, KL, advantages, losses (each process's share of the global
    minibatch mean, so their mean is the global value), the kl_coef and lr the iteration used (`used`;
    not the values the KL controller and scheduler moved on to after it), times, tokens/s and MFU per
    phase."""
    acc, device = run.acc, run.acc.device
    ro, exp, raw_scores, scores, parts = batch
    rm_ = exp.response_mask
    m = {"score": raw_scores.mean(), "score_used": scores.mean(), "kl": mean_kl,
         "kl_k3": (core.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k3") * rm_).sum(-1).mean(),
         "non_score_reward": exp.non_score.sum(-1).mean(), "total_reward": (exp.non_score.sum(-1) + scores).mean(),
         "response_length": rm_.sum(-1).mean(), "eos_rate": ro.gen.has_eos.float().mean(),
         "advantage_mean": core.masked_mean(exp.advantages, rm_), "return_mean": core.masked_mean(exp.returns, rm_),
         "value_mean": core.masked_mean(exp.old_values, rm_), **{k: v.mean() for k, v in parts.items()}}
    # every process must reduce the same keys in the same order: gold accuracy only if all have gold
    if not acc.reduce(torch.tensor(float(not has_gold([p.meta for p in ro.prompts])), device=device), "sum").item():
        g = gold_reward(None, ro.texts, task=[p.meta["task"] for p in ro.prompts],
                        input=[p.meta["input"] for p in ro.prompts])
        m["gold_accuracy"] = torch.tensor(sum(g) / len(g), device=device)
    gold = on_every_process(acc, lambda: gold_scores(ro, run.m, run.data, run.cfg, device))
    if gold is not None:
        m["gold_reward"] = gold.mean()
    m = {k: acc.reduce(torch.as_tensor(v, device=device, dtype=torch.float32).clone(), "mean").item()
         for k, v in m.items()}
    m.update({k: acc.reduce(torch.tensor(v, device=device, dtype=torch.float32), "mean").item()
              for k, v in sorted(stats.items())})
    m.update({**used, **{f"time_{k}": v for k, v in times.items()},
              "tokens_generated": int(acc.reduce(rm_.sum().double(), "sum").item())})
    m.update(phase_throughput(ro, exp, times, run.m.flop_params, run.cfg.ppo_epochs, run.peak,
                              policy_pass=run.cfg.old_logprobs == "recompute"))
    run.logger.log(it, m)
    return m


TRAINED_FIX = "lower the learning rate, or check the rewards and the loss coefficients (ptx_coef, vf_coef, kl_coef)"
"""What to do about a PPO run whose every optimizer step was non-finite (NonFiniteGuard.check_trained)."""


def finish_ppo(run: PPORun, t_start: float, peak_dtype: str) -> dict:
    """Final evaluation, summary, the policy (and its EMA) saved as HF folders; the run promoted."""
    cfg, acc, m, st, out = run.cfg, run.acc, run.m, run.st, run.out
    summary = st.summary
    last = summary.get("stopped_by_alarm", cfg.steps)
    final = run.evaluate()
    if final is not None:
        summary.update(final)
        run.logger.log(last, final)
        run.after_evaluation(last, final)
    if st.best_gold:
        summary.update({"best_gold": st.best_gold["value"], "best_gold_iteration": st.best_gold["iteration"]})
    if st.evals:
        summary["hacking_alarms"] = st.alarms
    n_updates = last * cfg.ppo_epochs * (run.split.rollouts // run.split.minibatch)
    summary.update({"steps": last, "optimizer_steps": n_updates, "skipped_nonfinite_steps": st.guard.skipped,
                    **st.guard.summary(), "train_prompts": len(run.data.prompts), "mfu_peak_dtype": peak_dtype,
                    "old_logprobs": run.cfg.old_logprobs, "compiled": run.m.compiled,
                    "skipped_bad_rows": run.data.skipped_bad_rows,
                    "eval_prompts": len(run.data.eval_prompts), "kl_coef_final": st.kl_ctl.value,
                    "train_seconds": round(time.time() - t_start, 1), "num_processes": acc.num_processes})
    summary.update(peak_memory(acc))  # collective
    policy_state = None
    if zero_stage(acc) == 3:  # consolidate the sharded policy (collective)
        full = acc.get_state_dict(m.engine)
        policy_state = {k[len("policy."):]: v for k, v in full.items() if k.startswith("policy.")} if full else None
    ema_state = None
    if st.ema is not None and (st.ema.sharded or acc.is_main_process):  # collective under ZeRO-3
        ema_state = st.ema.full_state_dict(m.policy, acc)
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model_files(m.policy, run.data.tok, out, state_dict=policy_state)
        if st.ema is not None:
            (out / "ema").mkdir(exist_ok=True)
            save_model_files(m.policy, run.data.tok, out / "ema", state_dict=ema_state)
        if st.refresher is not None:  # the refreshed RM, as `rlhf rm` saves one
            (out / "reward_model").mkdir(exist_ok=True)
            save_model_files(st.refresher.rm.model, st.refresher.rm.tok, out / "reward_model")
        write_summary(out, summary)
    finish_run(acc, run.logger, out)
    return summary


def reward_failure(error: RewardError | None, it: int, save_now: bool, save, out: Path) -> RewardError:
    """The error that stops a run whose reward failed at iteration `it` (on this or another
    process), after saving the state before that iteration when checkpoints are on (collective),
    so `--resume` retries the same rollout once the reward function is fixed."""
    if save_now:
        save()
    ckpt = latest_checkpoint(out)
    resume = f"; resumable from {ckpt.name} with --resume once fixed" if ckpt is not None else ""
    reason = str(error) if error is not None else "a reward function failed on another process"
    return RewardError(f"iteration {it}: {reason}{resume}")


def phase_throughput(ro: Rollout, exp: Experience, times: dict, flop_params: dict, ppo_epochs: int,
                     peak: float, policy_pass: bool = True) -> dict:
    """Tokens/s and MFU of each phase of one iteration on this process (formulas: rlhf.flops).
    `policy_pass`: whether the experience phase ran the policy (old log-probs recomputed) besides the
    reference; with old_logprobs: sampling it did not."""
    n_policy, n_value, n_rm = flop_params["policy"], flop_params["value"], flop_params["rm"]
    n_head = flop_params.get("policy_head", 0)
    t_gen, t_exp, t_train = times["generate"], times["score"] + times["experience"], times["train"]
    gen_tokens = int(ro.gen.response_mask.sum())
    prefill = int(ro.gen.prompt_mask.sum())
    seq_tokens = int(exp.attention_mask.sum())
    f_gen = forward_flops(n_policy, prefill + gen_tokens) + forward_flops(n_head, gen_tokens)
    # (policy,) reference, value, RM; the LM head at the response tokens of the policy and reference
    n_lm = 2 if policy_pass else 1
    f_exp = forward_flops(n_lm * n_policy + n_value + n_rm, seq_tokens) + forward_flops(n_lm * n_head, gen_tokens)
    f_train = (train_flops(n_policy + n_value, seq_tokens) + train_flops(n_head, gen_tokens)) * ppo_epochs
    return {"tokens_per_s_generate": gen_tokens / max(t_gen, 1e-9),
            "tokens_per_s_train": seq_tokens * ppo_epochs / max(t_train, 1e-9),
            "mfu_generate": mfu(f_gen, t_gen, peak), "mfu_experience": mfu(f_exp, t_exp, peak),
            "mfu_train": mfu(f_train, t_train, peak), "peak_tflops": peak / 1e12}


def _log_samples(out: Path, logger: MetricsLogger, it: int, ro: Rollout, scores: torch.Tensor, n: int = 8) -> None:
    rows = [{"step": it, "prompt": p.prompt[-1]["content"], "completion": t, "score": float(s)}
            for p, t, s in list(zip(ro.prompts, ro.texts, scores))[:n]]
    with open(out / "samples.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    logger.text(it, "samples", "\n\n".join(f"**{r['prompt']}** → {r['completion']} ({r['score']:.2f})" for r in rows))

"""Stage 3, PPO with a KL penalty against the SFT policy [IGPT §3.5 eq. 2, N, N+].

Each iteration is four calls you can find below:

    rollout   = make_rollout(...)       # sample responses (KV cache, left padding, stop at EOS)
    scores    = compute_scores(...)     # RM (normalised) and/or Python reward functions, EOS penalty
    batch     = make_experience(...)    # old log-probs, reference log-probs, values (once per
                                        # rollout), per-token reward -beta*KL + score at the end,
                                        # GAE advantages (whitened) and returns
    stats     = ppo_update(...)         # ppo_epochs x shuffled minibatches x micro-batches of the
                                        # clipped surrogate + clipped value loss (+ ptx, entropy)

The math lives in :mod:`rlhf.algos.core` as pure functions; this file only wires models to it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..algos import core
from ..checkpoint import (fault_point_step, inject_fault, latest_checkpoint, load_tensors, resume_state, rng_snapshot,
                          save_checkpoint)
from ..config import PPOConfig, dump_yaml, to_dict
from ..data.formats import DataError, load_examples, parse_prompt, parse_sft, split_train_eval
from ..data.tasks import has_gold, gold_reward
from ..flops import count_flop_params, forward_flops, measure_matmul_peak, mfu, train_flops
from ..engine import backward, compute_dtype, frozen_placement, loss_scale, step_models, gathered_params, is_deepspeed, prepare_frozen, world_size, zero_stage
from ..engine import (MetricsLogger, NonFiniteGuard, finish_run, RunError, Timer, chunks, epoch_permutation, make_accelerator, make_optimizer,
                      make_scheduler, inputs_first, open_run, peak_memory, prepare_output_dir, progress, set_seed,
                      write_summary)
from ..models import _outside_zero3_init
from ..models import (ModelError, count_parameters, disable_dropout, enable_gradient_checkpointing, load_causal_lm,
                      load_tokenizer, torch_dtype, unwrap)
from ..rewards import RewardError, RewardModel, call_reward_fn, dry_call, load_reward_fn, score_head
from ..rollout import Generation, generate, position_ids_from_mask, response_logprobs
from ..tokenization import decode_response, encode_prompt, encode_sft

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- value model


class PolicyValue(nn.Module):
    """Policy and value model as one module, so one DeepSpeed engine trains both (their forward
    passes are called on the submodules)."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


class ValueModel(nn.Module):
    """A transformer backbone with a scalar head read at every position: V(s_t), shape (B, T)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids, attention_mask, position_ids=None):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def load_value_model(cfg: PPOConfig, policy_tok, reward_model: RewardModel | None) -> ValueModel:
    """Value model from the RM checkpoint (InstructGPT, default) or a fresh head on the policy's backbone."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if cfg.value_init == "reward_model":
        if reward_model is None:
            raise ModelError("recipe: 'value_init: reward_model' needs 'reward_model' (or use value_init: policy)")
        if not reward_model.same_tokenizer(policy_tok):
            raise ModelError("recipe: the reward model's tokenizer differs from the policy's; use 'value_init: policy'")
        rm = AutoModelForSequenceClassification.from_pretrained(reward_model.path)
        if getattr(rm.config, "is_encoder_decoder", False) or rm.config.model_type in ("bert", "roberta", "distilbert"):
            raise ModelError("recipe: a bidirectional encoder cannot give per-token values; use 'value_init: policy'")
        backbone = getattr(rm, rm.base_model_prefix)
        head = score_head(rm)
    elif cfg.value_init == "policy":
        backbone = AutoModel.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                                             dtype=torch_dtype(cfg.model.dtype))
        d = backbone.config.hidden_size
        head = nn.Linear(d, 1, bias=False, dtype=torch.float32)
        with torch.no_grad():  # its own seeded stream: the same head however the backbone was loaded
            g = torch.Generator().manual_seed(cfg.seed)
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(d + 1))
    else:
        raise ModelError(f"recipe: 'value_init' must be 'reward_model' or 'policy', got '{cfg.value_init}'")
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    model = ValueModel(backbone, head)
    disable_dropout(model)
    return model


# ----------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    gen: Generation
    prompts: list
    """PromptExample per row."""
    texts: list[str]


def make_rollout(policy, tok, prompts: list, cfg: PPOConfig, generator: torch.Generator, device) -> Rollout:
    encoded = [encode_prompt(tok, p.prompt) for p in prompts]
    gen = generate(policy, encoded, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator, device=device)
    texts = decode_responses(tok, gen)
    return Rollout(gen, prompts, texts)


def decode_responses(tok, gen: Generation) -> list[str]:
    """Each row's response text up to its EOS (copied to the host once, not row by row)."""
    ids, mask = gen.response_ids.cpu(), gen.response_mask.cpu().bool()
    return [decode_response(tok, r[m].tolist()) for r, m in zip(ids, mask)]


def compute_scores(ro: Rollout, tok, reward_model: RewardModel | None, reward_fns: list, cfg: PPOConfig,
                   device) -> tuple[torch.Tensor, dict]:
    """Sequence scores (B,): weighted RM score + reward functions; EOS-less responses penalised [N+]."""
    bsz = len(ro.texts)
    score = torch.zeros(bsz, device=device)
    parts: dict[str, torch.Tensor] = {}
    if reward_model is not None:
        if reward_model.same_tokenizer(tok):  # reuse the sampled tokens: exactly what the RM was trained on
            g = ro.gen  # (copied to the host once)
            seqs = [p[pm].tolist() + r[rm].tolist() for p, pm, r, rm in
                    zip(g.prompt_ids.cpu(), g.prompt_mask.cpu().bool(), g.response_ids.cpu(), g.response_mask.cpu().bool())]
            rm_score = reward_model.score_ids(seqs).to(device)
        else:
            rm_score = reward_model.score([p.prompt for p in ro.prompts], ro.texts).to(device)
        parts["rm_score"] = rm_score
        score = score + cfg.reward_model_weight * rm_score
    for spec, fn in reward_fns:
        fields = {k: [p.meta.get(k) for p in ro.prompts] for k in ro.prompts[0].meta}
        vals = torch.tensor(call_reward_fn(fn, [p.raw_prompt for p in ro.prompts], ro.texts, fields,
                                           where=[getattr(p, "where", "?") for p in ro.prompts],
                                           timeout=cfg.reward_timeout), device=device)
        parts[f"reward_fn/{spec.fn}"] = vals
        score = score + spec.weight * vals
    if cfg.penalize_missing_eos:
        score = torch.where(ro.gen.has_eos.to(device), score, torch.full_like(score, cfg.missing_eos_penalty))
    return score, parts


# ----------------------------------------------------------------------------- experience


@dataclass
class Experience:
    input_ids: torch.Tensor      # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R)
    old_logprobs: torch.Tensor   # (B, R)
    ref_logprobs: torch.Tensor   # (B, R)
    old_values: torch.Tensor     # (B, R)
    advantages: torch.Tensor     # (B, R)
    returns: torch.Tensor        # (B, R)
    rewards: torch.Tensor        # (B, R)
    kl: torch.Tensor             # (B, R) the estimator used in the reward
    non_score: torch.Tensor      # (B, R)


def sequence_batch(g: Generation) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([g.prompt_ids, g.response_ids], dim=1)
    mask = torch.cat([g.prompt_mask, g.response_mask], dim=1)
    return ids, mask


@torch.no_grad()
def forward_values(value_model, ids, mask, response_len: int) -> torch.Tensor:
    """V(s_t) for each response token t: read at the position *before* token t (the state in which it
    was chosen), the same off-by-one as the log-probs [N]."""
    return value_model(ids, mask, position_ids_from_mask(mask))[:, -response_len - 1 : -1]


@torch.no_grad()
def make_experience(ro: Rollout, scores: torch.Tensor, policy, ref_policy, value_model, kl_coef: float,
                    cfg: PPOConfig, micro_batch_size: int) -> Experience:
    g = ro.gen
    ids, mask = sequence_batch(g)
    R = g.response_ids.shape[1]
    rmask = g.response_mask.float()
    old_lp, ref_lp, vals = [], [], []
    for sl in _slices(ids.shape[0], micro_batch_size):
        old_lp.append(response_logprobs(policy, ids[sl], mask[sl], R, cfg.temperature))
        with _reference(policy, ref_policy) as ref:
            ref_lp.append(response_logprobs(ref, ids[sl], mask[sl], R, cfg.temperature))
        vals.append(forward_values(value_model, ids[sl], mask[sl], R))
    old_lp, ref_lp, vals = torch.cat(old_lp), torch.cat(ref_lp), torch.cat(vals)
    kl = core.kl_estimate(old_lp, ref_lp, cfg.kl_estimator) * rmask
    rewards, non_score = core.shaped_rewards(scores, kl, kl_coef, rmask)
    if cfg.whiten_rewards:
        rewards = core.masked_whiten(rewards, rmask, shift_mean=False)
    adv, returns = core.gae_advantages(rewards, vals, rmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = core.masked_whiten(adv, rmask)
    return Experience(ids, mask, rmask, old_lp, ref_lp, vals * rmask, adv, returns, rewards, kl, non_score)


@contextlib.contextmanager
def _reference(policy, ref_policy):
    """The frozen reference: a separate copy, or the LoRA policy with its adapters disabled."""
    if ref_policy is not None:
        yield ref_policy
    else:
        with unwrap(policy).disable_adapter():
            yield policy


def _partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ----------------------------------------------------------------------------- update


def ppo_update(exp: Experience, policy, value_model, opt_policy, opt_value, sched_policy, sched_value, acc,
               cfg: PPOConfig, mb_local: int, micro_batch_size: int, iteration: int, ptx_iter=None, ema=None,
               guard=None) -> dict:
    """ppo_epochs passes over the rollout, reshuffled each time; minibatch -> micro-batches."""
    B = exp.input_ids.shape[0]
    R = exp.response_mask.shape[1]
    sums: dict[str, torch.Tensor | float] = {}  # kept on the device: read back once, at the end
    counts = 0
    for epoch in range(cfg.ppo_epochs):
        perm = epoch_permutation(B, cfg.seed + 7919 * acc.process_index, iteration * 1000 + epoch)
        for mb in chunks(perm, mb_local):
            # token count of the whole (global) minibatch: every micro-batch divides by it
            n_tok = acc.reduce(exp.response_mask[mb].sum().detach().clone(), "sum").item()
            micro = chunks(mb, micro_batch_size)
            finite = torch.ones((), dtype=torch.bool, device=exp.input_ids.device)
            for k, mi in enumerate(micro):
                idx = torch.tensor(mi, device=exp.input_ids.device)
                ids, mask, rmask = exp.input_ids[idx], exp.attention_mask[idx], exp.response_mask[idx]
                sync = k == len(micro) - 1
                with (contextlib.nullcontext() if sync else acc.no_sync(policy)), \
                        (contextlib.nullcontext() if sync else acc.no_sync(value_model)):
                    logp, ent = response_logprobs(policy, ids, mask, R, cfg.temperature, return_entropy=True)
                    if cfg.entropy_coef == 0:
                        ent = ent.detach()  # logged only: no backward through the entropy
                    pg_loss, pst = core.policy_loss(logp, exp.old_logprobs[idx], exp.advantages[idx], rmask,
                                                    cfg.cliprange, cfg.log_ratio_clamp, n_tok / acc.num_processes)
                    vpred = value_model(ids, mask, position_ids_from_mask(mask))[:, -R - 1 : -1]
                    vf_loss, vclip = core.value_loss(vpred, exp.old_values[idx], exp.returns[idx], rmask,
                                                     cfg.cliprange_value, n_tok / acc.num_processes)
                    entropy = core.masked_sum(ent, rmask) / (n_tok / acc.num_processes)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
                    if ptx_iter is not None and cfg.ptx_coef > 0:
                        ptx_loss = ptx_iter.loss(policy) / len(micro)
                        loss = loss + cfg.ptx_coef * ptx_loss
                        _add(sums, "ptx_loss", ptx_loss)
                    loss = inject_fault(loss, iteration)
                    finite &= torch.isfinite(loss.detach())
                    backward(acc, loss, len(micro), sync)
                w = len(mi) / len(mb)
                _add(sums, "pg_loss", pg_loss)
                _add(sums, "vf_loss", vf_loss)
                _add(sums, "entropy", entropy)
                _add(sums, "policy_clipfrac", pst.clipfrac.double() * w)
                _add(sums, "approx_kl", pst.approx_kl.double() * w)
                _add(sums, "ratio_mean", pst.ratio_mean.double() * w)
                _add(sums, "value_clipfrac", vclip.double() * w)
            # one optimizer step for both models, skipped whole if anything is non-finite on any process
            parts = [(policy, opt_policy, sched_policy)]
            if opt_value is not None:  # (under DeepSpeed one engine trains both: one joint norm)
                parts.append((value_model, opt_value, sched_value))
            res = step_models(acc, parts, cfg.max_grad_norm, bool(finite))
            if res[0]:
                if ema is not None:
                    ema.update(policy)
                if len(parts) == 2:
                    _add(sums, "policy_grad_norm", res[1][0])
                    _add(sums, "value_grad_norm", res[1][1])
                elif res[1][0] is not None:
                    _add(sums, "grad_norm_joint", res[1][0])
            if guard is not None:
                guard.update(res[0], iteration, overflow=res.overflow, scale=loss_scale(acc))
            counts += 1
    return {k: float(v) / counts for k, v in sums.items()}


def _add(d: dict, k: str, v) -> None:
    """Accumulate a statistic: device tensors in float64 (no host sync per micro-batch), floats as they are."""
    v = v.detach().double() if isinstance(v, torch.Tensor) else v
    d[k] = d[k] + v if k in d else v


class PtxIterator:
    """PPO-ptx [IGPT eq. 2]: next-token loss on pretraining/SFT rows, one micro-batch per call."""

    def __init__(self, feats: list, micro_batch_size: int, pad_id: int, seed: int, device):
        self.feats, self.mbs, self.pad_id, self.seed, self.device = feats, micro_batch_size, pad_id, seed, device
        self.epoch, self.pos, self.perm = 0, 0, epoch_permutation(len(feats), seed, 0)

    def next_batch(self):
        if self.pos + self.mbs > len(self.perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = epoch_permutation(len(self.feats), self.seed, self.epoch)
        batch = [self.feats[i] for i in self.perm[self.pos : self.pos + self.mbs]]
        self.pos += self.mbs
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = d["epoch"], d["pos"]
        self.perm = epoch_permutation(len(self.feats), self.seed, self.epoch)

    def loss(self, policy) -> torch.Tensor:
        from .sft import collate

        ids, mask, labels = collate(self.next_batch(), self.pad_id, self.device)
        s, n = core.lm_loss_sum(policy(input_ids=ids, attention_mask=mask).logits, labels)
        return s / max(n, 1)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its ZeRO-3 partition (flat, padded), else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EMA:
    """Exponential moving average of the policy weights [IGPT: 0.992], in fp32.

    Only trained parameters are averaged (a frozen LoRA base never changes: its EMA is itself),
    kept beside them on their device, or in CPU memory with `offload`. Under ZeRO-3 each
    process averages only its own partition of every parameter (1/N of the weights, updated
    after each optimizer step like the partition itself); `full_state_dict` all-gathers the
    partitions when the EMA policy is saved. Tensors are keyed by the parameter's index in
    `model.parameters()`."""

    def __init__(self, model, decay: float, offload: bool = False):
        self.decay, self.offload = decay, offload
        params = list(unwrap(model).parameters())
        self.sharded = any(hasattr(p, "ds_tensor") for p in params)
        self.index = [i for i, p in enumerate(params) if p.requires_grad]
        self.params = [self._copy(_local(params[i])) for i in self.index]

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu" if self.offload else t.device, torch.float32, copy=True)

    def update(self, model) -> None:
        params = list(unwrap(model).parameters())
        local = [_local(params[i]).detach() for i in self.index]
        if self.offload:
            local = [p.to("cpu") for p in local]  # (blocking: the update reads them on the host at once)
        core.ema_update(self.params, local, self.decay)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {str(i): p.cpu() for i, p in zip(self.index, self.params)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """(Checkpoints from before the EMA skipped frozen parameters hold every index: the
        trained ones are read.)"""
        self.params = [tensors[str(i)].to(p.device, p.dtype) for i, p in zip(self.index, self.params)]

    def full_state_dict(self, model, acc) -> dict[str, torch.Tensor]:
        """name -> full EMA tensor in the model's dtype, on the CPU (collective under ZeRO-3;
        every process gets it)."""
        m = unwrap(model)
        names: dict[int, list[str]] = {}  # every name of each parameter (tied weights have two)
        for name, p in m.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        aliases = {n for ns in names.values() for n in ns}
        out = {k: v for k, v in m.state_dict().items() if k not in aliases}  # persistent buffers
        ema = dict(zip(self.index, self.params))
        for i, p in enumerate(m.parameters()):
            e = ema[i] if i in ema else _local(p).detach()  # a frozen parameter is its own average
            if self.sharded and hasattr(p, "ds_tensor"):  # partitions are consecutive slices of the flat tensor
                e = acc.gather(e.to(acc.device))[: p.ds_numel].view(p.ds_shape)
            for name in names[id(p)]:
                out[name] = e.to("cpu", p.dtype)
        return out


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(policy, ref_policy, tok, prompts: list, reward_model, reward_fns, cfg: PPOConfig, device,
                    seed: int) -> dict:
    """Held-out prompts sampled at cfg.temperature: mean score, KL to the reference, gold accuracy."""
    policy_m = unwrap(policy)
    was = policy_m.training
    policy_m.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    scores, kls, k3s, golds, lengths, eos = [], [], [], [], [], []
    for chunk in chunks(prompts, cfg.rollout_batch_size):
        ro = make_rollout(policy_m, tok, chunk, cfg, gen, device)
        s, _ = compute_scores(ro, tok, reward_model, reward_fns, cfg, device)
        ids, mask = sequence_batch(ro.gen)
        R = ro.gen.response_ids.shape[1]
        rm = ro.gen.response_mask.float()
        lp = response_logprobs(policy_m, ids, mask, R, cfg.temperature)
        with _reference(policy, ref_policy) as ref:
            rlp = response_logprobs(ref, ids, mask, R, cfg.temperature)
        kls.append((core.kl_estimate(lp, rlp, "k1") * rm).sum(-1))
        k3s.append((core.kl_estimate(lp, rlp, "k3") * rm).sum(-1))
        scores.append(s)
        lengths.append(rm.sum(-1))
        eos.append(ro.gen.has_eos.float())
        if has_gold([p.meta for p in chunk]):
            golds += gold_reward(None, ro.texts, task=[p.meta["task"] for p in chunk],
                                 input=[p.meta["input"] for p in chunk])
    policy_m.train(was)
    out = {"eval_reward": torch.cat(scores).mean().item(), "eval_kl": torch.cat(kls).mean().item(),
           "eval_kl_k3": torch.cat(k3s).mean().item(), "eval_response_length": torch.cat(lengths).mean().item(),
           "eval_eos_rate": torch.cat(eos).mean().item()}
    if golds:
        out["eval_gold_accuracy"] = sum(golds) / len(golds)
    return out


# ----------------------------------------------------------------------------- the stage


def _check(cfg: PPOConfig, world: int) -> tuple[int, int]:
    if cfg.reward_model is None and not cfg.reward_fns:
        raise RunError("recipe: PPO needs a reward: set 'reward_model' and/or 'reward_fns'")
    if cfg.rollout_batch_size % world or cfg.minibatch_size % world:
        raise RunError(f"recipe: rollout_batch_size and minibatch_size must be multiples of the {world} processes")
    b_local, mb_local = cfg.rollout_batch_size // world, cfg.minibatch_size // world
    micro = min(cfg.micro_batch_size, mb_local)
    if mb_local % micro:
        raise RunError(f"recipe: 'minibatch_size' per process ({mb_local}) must be a multiple of 'micro_batch_size' "
                       f"({micro})")
    return b_local, mb_local, micro


def run_ppo(cfg: PPOConfig, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    t_start = time.time()
    b_local, mb_local, micro_bs = _check(cfg, world_size())
    acc = make_accelerator(cfg.mixed_precision, cfg.deepspeed, micro_batch_size=micro_bs,
                           grad_accum=mb_local // micro_bs, max_grad_norm=cfg.max_grad_norm)
    use_ds, zero3 = is_deepspeed(acc), zero_stage(acc) == 3
    rf = open_run(acc, output_dir or cfg.output_dir, overwrite, resume)  # planned; nothing written yet
    if rf.done:
        log.info("%s: run already complete", rf.final)
        return json.loads((rf.final / "summary.json").read_text())
    set_seed(cfg.seed + acc.process_index)  # a different sampling seed per rank [N]
    device = acc.device

    with inputs_first(rf):  # prompts, reward functions (imported and called once) and tokenizer first
        prompts, pstats = load_examples(cfg.data.train, parse_prompt, split=cfg.data.split,
                                        skip_bad_rows=cfg.data.skip_bad_rows, max_samples=cfg.data.max_samples,
                                        what="prompts")
        if cfg.data.eval:
            eval_prompts, _ = load_examples(cfg.data.eval, parse_prompt, skip_bad_rows=cfg.data.skip_bad_rows,
                                            what="prompts", field_name="data.eval")
        else:
            prompts, eval_prompts = split_train_eval(prompts, cfg.data.eval_split, cfg.seed)
        eval_prompts = eval_prompts[: cfg.eval_samples]
        reward_fns = [(spec, load_reward_fn(spec.fn)) for spec in cfg.reward_fns]
        probe = prompts[:4]
        for _, fn in reward_fns:
            dry_call(fn, [p.raw_prompt for p in probe], {k: [p.meta.get(k) for p in probe] for k in probe[0].meta},
                     cfg.reward_timeout)
        tok = load_tokenizer(cfg.model)
        for p in prompts + eval_prompts:
            n = len(encode_prompt(tok, p.prompt))
            if n > cfg.data.max_prompt_length:
                raise DataError(f"{p.where}: field 'prompt': {n} tokens, more than data.max_prompt_length "
                                f"({cfg.data.max_prompt_length})")
    # Under ZeRO-3 the checkpoints are read straight into partitions (transformers' zero.Init
    # path: no process ever holds a whole model) -- the policy, the value model and, when they
    # are sharded, the reference and the RM. Otherwise a model is loaded whole and partitioned as
    # it is handed to DeepSpeed (models built from a config always are: the same random init as a
    # 1-process run). `_outside_zero3_init` is the "load whole" switch.
    placement = frozen_placement(acc, cfg.frozen_models)
    into_parts = zero3 and cfg.model.init == "pretrained" and not cfg.model.gguf_file
    whole = contextlib.nullcontext if into_parts else _outside_zero3_init
    with whole():
        policy = load_causal_lm(cfg.model, tok)
    disable_dropout(policy)
    read_into_parts = [("policy", _partitioned(policy))]
    ref_policy = None
    if not cfg.model.lora.enabled:  # (with LoRA the reference is the policy with its adapters off)
        if into_parts:  # the policy is partitioned: read the reference from its checkpoint again
            with contextlib.nullcontext() if placement == "sharded" else _outside_zero3_init():
                ref = load_causal_lm(cfg.model, tok)
            disable_dropout(ref)
            read_into_parts.append(("reference", _partitioned(ref)))
        else:
            ref = copy.deepcopy(policy)
        ref_policy = prepare_frozen(acc, ref, placement)
    reward_model = None
    if cfg.reward_model:
        with contextlib.nullcontext() if zero3 and placement == "sharded" else _outside_zero3_init():
            reward_model = RewardModel(cfg.reward_model)
        read_into_parts.append(("RM", _partitioned(reward_model.model)))
    n_rm = count_flop_params(reward_model.model) if reward_model is not None else 0
    with whole():
        value_model = load_value_model(cfg, tok, reward_model)
    read_into_parts.append(("value model", _partitioned(value_model.backbone)))
    if reward_model is not None:
        reward_model.model, reward_model.device = prepare_frozen(acc, reward_model.model, placement), device
    if zero3:
        log.info("ZeRO-3: read straight into partitions: %s; loaded whole, then partitioned: %s",
                 ", ".join(n for n, yes in read_into_parts if yes) or "-",
                 ", ".join(n for n, yes in read_into_parts if not yes) or "-")
    # under sharded frozen models every process takes part in each of their forwards (evaluation too)
    collective = zero3 or placement != "whole"

    n_updates = cfg.steps * cfg.ppo_epochs * (b_local // mb_local)
    opt_p = make_optimizer(policy.parameters(), cfg.lr, cfg.weight_decay, (0.9, 0.95), cfg.adam_eps)
    if use_ds:  # one engine trains both: the value model's parameters join the optimizer with their own lr
        for g in make_optimizer(value_model.parameters(), cfg.value_lr or cfg.lr, cfg.weight_decay).param_groups:
            opt_p.add_param_group({"params": g["params"], "weight_decay": g["weight_decay"], "lr": cfg.value_lr or cfg.lr})
        opt_v = sched_v = None
    else:
        opt_v = make_optimizer(value_model.parameters(), cfg.value_lr or cfg.lr, cfg.weight_decay, (0.9, 0.95),
                               cfg.adam_eps)
    out = prepare_output_dir(acc, rf, overwrite, resume)
    engine = None
    if use_ds:
        engine, opt_p = acc.prepare(PolicyValue(policy, value_model), opt_p)
        policy, value_model = engine.module.policy, engine.module.value
    else:
        policy, value_model, opt_p, opt_v = acc.prepare(policy, value_model, opt_p, opt_v)
        sched_v = make_scheduler(opt_v, cfg.lr_scheduler, n_updates, cfg.warmup_ratio)
    sched_p = make_scheduler(opt_p, cfg.lr_scheduler, n_updates, cfg.warmup_ratio)  # on the prepared optimizer
    # ZeRO-3: the policy's full weights are gathered once per generation (not per token); the
    # no-grad passes of make_experience fetch one layer at a time like the training passes
    gathered = (lambda: gathered_params(acc, engine.module.policy)) if zero3 else contextlib.nullcontext
    kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else core.FixedKLController(cfg.kl_coef))
    moments = core.RunningMoments()
    ema = EMA(policy, cfg.ema_decay, cfg.ema_offload) if cfg.ema_decay > 0 else None
    ptx_iter = None
    if cfg.ptx_coef > 0:
        demos, _ = load_examples(cfg.ptx_data, parse_sft, skip_bad_rows=True, what="ptx rows", field_name="ptx_data")
        ptx_iter = PtxIterator([encode_sft(tok, d.prompt, d.completion) for d in demos], micro_bs,
                               tok.pad_token_id, cfg.seed + acc.process_index, device)

    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + acc.process_index)  # sampling, on the device
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    peak_dtype = compute_dtype(acc, cfg.model.dtype)  # MFU against the peak of the dtype that runs
    peak = cfg.peak_tflops * 1e12 or measure_matmul_peak(dtype=peak_dtype, device=device)
    log.info("MFU against %s %.3g TFLOP/s (%s matmul peak)", "a given" if cfg.peak_tflops else "a measured",
             peak / 1e12, str(peak_dtype).replace("torch.", ""))
    n_policy, n_value = count_flop_params(unwrap(policy)), count_flop_params(unwrap(value_model).backbone) + 1
    # the reference was copied from the SFT weights above; a resumed run reloads only what trains
    # what a resumable checkpoint holds: under DeepSpeed the engine saves policy + value and the
    # (partitioned) optimizer states itself
    ckpt_parts = {"models": {"engine": engine}, "optimizers": {}, "schedulers": {"policy": sched_p}} if use_ds else \
        {"models": {"policy": policy, "value": value_model}, "optimizers": {"policy": opt_p, "value": opt_v},
         "schedulers": {"policy": sched_p, "value": sched_v}}
    start, state = resume_state(acc, out, resume, **ckpt_parts, generators={"sampling": gen})
    summary: dict = {"stage": "ppo"}
    if state:
        kl_ctl.load_state_dict(state["kl_ctl"])
        moments.load_state_dict(state["moments"])
        guard.load_state_dict(state["guard"])
        summary.update(state["initial"])
        if ptx_iter is not None:
            ptx_iter.load_state_dict(state["ptx"])
        if ema is not None:
            ema.load(load_tensors(latest_checkpoint(out) / (f"ema-rank{acc.process_index}.safetensors" if ema.sharded
                                                            else "ema.safetensors")))
    if acc.is_main_process and not resume:
        dump_yaml(cfg, out / "recipe.yaml")
    logger = MetricsLogger(out, enabled=acc.is_main_process, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    log.info("PPO: %d prompts, %d held out, %d iterations x %d rollouts, %d optimizer steps, policy %.2fM params%s",
             len(prompts), len(eval_prompts), cfg.steps, cfg.rollout_batch_size, n_updates,
             count_parameters(unwrap(policy)) / 1e6, f", resuming after iteration {start}" if start else "")

    if eval_prompts and (acc.is_main_process or collective) and not state:
        with gathered():
            initial = evaluate_policy(policy, ref_policy, tok, eval_prompts, reward_model, reward_fns, cfg, device,
                                      cfg.seed + 12345)
        summary.update({"initial_" + k: v for k, v in initial.items()})
        logger.log(0, initial)

    per_epoch = len(prompts) // cfg.rollout_batch_size
    if per_epoch == 0:
        raise RunError(f"{len(prompts)} prompts are fewer than one rollout batch ({cfg.rollout_batch_size})")
    def save(step: int, rng_state: dict | None = None) -> None:
        ema_t = {"ema": ema.tensors()} if ema is not None else None
        save_checkpoint(acc, out, step, **ckpt_parts, generators={"sampling": gen}, keep=cfg.save_total_limit,
                        extra_tensors=None if ema is None or ema.sharded else ema_t,
                        sharded_tensors=ema_t if ema is not None and ema.sharded else None, rng_state=rng_state,
                        state={"kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict(),
                               "guard": guard.state_dict(), "ptx": ptx_iter.state_dict() if ptx_iter else None,
                               "initial": {k: v for k, v in summary.items() if k.startswith("initial_")}})

    bar = progress(total=cfg.steps, initial=start, desc="ppo", disable=not acc.is_main_process)
    for it in range(start + 1, cfg.steps + 1):
        t_gen, t_score, t_exp, t_train = Timer(), Timer(), Timer(), Timer()
        rng_at_start = rng_snapshot({"sampling": gen})  # a reward failure saves the state of iteration it - 1
        epoch, pos = divmod(it - 1, per_epoch)
        perm = epoch_permutation(len(prompts), cfg.seed, epoch)
        batch_idx = perm[pos * cfg.rollout_batch_size : (pos + 1) * cfg.rollout_batch_size]
        batch = [prompts[i] for i in batch_idx[acc.process_index * b_local : (acc.process_index + 1) * b_local]]

        unwrap(policy).eval()
        with t_gen, gathered():  # ZeRO-3: the weights are gathered once for the whole rollout
            ro = make_rollout(unwrap(policy), tok, batch, cfg, gen, device)
        with t_score:
            try:
                raw_scores, parts, failure = *compute_scores(ro, tok, reward_model, reward_fns, cfg, device), None
            except RewardError as e:
                raw_scores, parts, failure = None, None, e
            if acc.reduce(torch.tensor(float(failure is not None), device=device), "sum").item():  # on any process
                already_saved = it > 1 and (it - 1) % cfg.save_every == 0 if cfg.save_every else True
                raise reward_failure(failure, it, not already_saved, lambda: save(it - 1, rng_at_start), out)
            scores = raw_scores
            if cfg.scale_reward == "running_std":
                moments.update(acc.gather(raw_scores))
                scores = scores / max(moments.std, 1e-8)
            scores = core.clip_scores(scores, cfg.reward_clip)
        with t_exp:
            exp = make_experience(ro, scores, unwrap(policy), ref_policy, unwrap(value_model), kl_ctl.value, cfg,
                                  micro_bs)
        unwrap(policy).train()
        unwrap(value_model).train()  # (dropout is off; training mode is what activation checkpointing needs)
        with t_train:
            stats = ppo_update(exp, policy, value_model, opt_p, opt_v, sched_p, sched_v, acc, cfg, mb_local, micro_bs,
                               it, ptx_iter, ema, guard)

        seq_kl = exp.kl.sum(-1)
        mean_kl = acc.reduce(seq_kl.mean(), "mean").item()
        kl_ctl.update(mean_kl, cfg.rollout_batch_size)
        if it % cfg.log_every == 0 or it == cfg.steps:
            rm_ = exp.response_mask
            m = {
                "score": raw_scores.mean(), "score_used": scores.mean(), "kl": mean_kl,
                "kl_k3": (core.kl_estimate(exp.old_logprobs, exp.ref_logprobs, "k3") * rm_).sum(-1).mean(),
                "non_score_reward": exp.non_score.sum(-1).mean(),
                "total_reward": (exp.non_score.sum(-1) + scores).mean(),
                "response_length": rm_.sum(-1).mean(), "eos_rate": ro.gen.has_eos.float().mean(),
                "advantage_mean": core.masked_mean(exp.advantages, rm_), "return_mean": core.masked_mean(exp.returns, rm_),
                "value_mean": core.masked_mean(exp.old_values, rm_), **{k: v.mean() for k, v in parts.items()},
            }
            if has_gold([p.meta for p in batch]):
                g = gold_reward(None, ro.texts, task=[p.meta["task"] for p in batch], input=[p.meta["input"] for p in batch])
                m["gold_accuracy"] = torch.tensor(sum(g) / len(g), device=device)
            m = {k: acc.reduce(torch.as_tensor(v, device=device, dtype=torch.float32).clone(), "mean").item()
                 for k, v in m.items()}
            # each process's losses are its share of the global minibatch mean: their mean is the global value
            m.update({k: acc.reduce(torch.tensor(v, device=device, dtype=torch.float32), "mean").item()
                      for k, v in sorted(stats.items())})
            m.update({"kl_coef": kl_ctl.value, "lr": sched_p.get_last_lr()[0], "time_generate": t_gen.total,
                      "time_score": t_score.total, "time_experience": t_exp.total, "time_train": t_train.total,
                      "tokens_generated": int(rm_.sum().item()) * acc.num_processes})
            m.update(phase_throughput(ro, exp, t_gen.total, t_score.total + t_exp.total, t_train.total, n_policy,
                                      n_value, n_rm, cfg.ppo_epochs, peak))
            logger.log(it, m)
            bar.set_postfix(score=f"{m['score']:.3f}", kl=f"{mean_kl:.3f}",
                            **({"gold": f"{m['gold_accuracy']:.2f}"} if "gold_accuracy" in m else {}))
        if acc.is_main_process and cfg.sample_every and (it % cfg.sample_every == 0 or it == 1):
            _log_samples(out, logger, it, ro, raw_scores)
        if cfg.eval_every and it % cfg.eval_every == 0 and it != cfg.steps and eval_prompts and \
                (acc.is_main_process or collective):
            with gathered():
                logger.log(it, evaluate_policy(policy, ref_policy, tok, eval_prompts, reward_model, reward_fns, cfg,
                                               device, cfg.seed + 12345))
        if cfg.save_every and (it % cfg.save_every == 0 or it == cfg.steps):
            save(it)
        fault_point_step(it)
        bar.update(1)
    bar.close()

    if eval_prompts and (acc.is_main_process or collective):
        with gathered():
            final = evaluate_policy(policy, ref_policy, tok, eval_prompts, reward_model, reward_fns, cfg, device,
                                    cfg.seed + 12345)
        summary.update(final)
        logger.log(cfg.steps, final)
    summary.update({"steps": cfg.steps, "optimizer_steps": n_updates, "skipped_nonfinite_steps": guard.skipped,
                    **guard.summary(),
                    "train_prompts": len(prompts), "mfu_peak_dtype": str(peak_dtype).replace("torch.", ""),
                    "eval_prompts": len(eval_prompts), "kl_coef_final": kl_ctl.value,
                    "train_seconds": round(time.time() - t_start, 1), "num_processes": acc.num_processes})
    summary.update(peak_memory(acc))  # collective
    policy_state = None
    if zero3:  # consolidate the sharded policy (collective)
        full = acc.get_state_dict(engine)
        policy_state = {k[len("policy."):]: v for k, v in full.items() if k.startswith("policy.")} if full else None
    ema_state = None
    if ema is not None and (ema.sharded or acc.is_main_process):  # collective under ZeRO-3
        ema_state = ema.full_state_dict(policy, acc)
    acc.wait_for_everyone()
    if acc.is_main_process:
        from .sft import save_model_files

        save_model_files(policy, tok, out, state_dict=policy_state)
        if ema is not None:
            (out / "ema").mkdir(exist_ok=True)
            save_model_files(policy, tok, out / "ema", state_dict=ema_state)
        write_summary(out, summary)
    finish_run(acc, logger, out)
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


def phase_throughput(ro: Rollout, exp: Experience, t_gen: float, t_exp: float, t_train: float, n_policy: int,
                     n_value: int, n_rm: int, ppo_epochs: int, peak: float) -> dict:
    """Tokens/s and MFU of each phase of one iteration on this process (formulas: rlhf.flops)."""
    gen_tokens = int(ro.gen.response_mask.sum())
    prefill = int(ro.gen.prompt_mask.sum())
    seq_tokens = int(exp.attention_mask.sum())
    f_gen = forward_flops(n_policy, prefill + gen_tokens)
    f_exp = forward_flops(2 * n_policy + n_value + n_rm, seq_tokens)  # policy, reference, value, RM
    f_train = train_flops(n_policy + n_value, seq_tokens) * ppo_epochs
    return {"tokens_per_s_generate": gen_tokens / max(t_gen, 1e-9),
            "tokens_per_s_train": seq_tokens * ppo_epochs / max(t_train, 1e-9),
            "mfu_generate": mfu(f_gen, t_gen, peak), "mfu_experience": mfu(f_exp, t_exp, peak),
            "mfu_train": mfu(f_train, t_train, peak), "peak_tflops": peak / 1e12}


def _log_samples(out: Path, logger: MetricsLogger, it: int, ro: Rollout, scores: torch.Tensor, n: int = 8) -> None:
    import json

    rows = [{"step": it, "prompt": p.prompt[-1]["content"], "completion": t, "score": float(s)}
            for p, t, s in list(zip(ro.prompts, ro.texts, scores))[:n]]
    with open(out / "samples.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    logger.text(it, "samples", "\n\n".join(f"**{r['prompt']}** → {r['completion']} ({r['score']:.2f})" for r in rows))

"""Online RM refresh during PPO: the reward model keeps learning from the policy's own samples.

InstructGPT collected comparisons of successive policies' outputs (§3.4), Anthropic retrained
its preference models weekly on fresh samples ("iterated online RLHF", Bai et al. 2022 §4.5) and
Llama 2 retrained its RM on each new policy's samples (Touvron et al. 2023 §3.2.3). Every
`rm_refresh.every` PPO iterations:

1. the current policy answers `num_prompts` prompts `k` times each;
2. a judge ranks the k answers of each prompt: a Python function ('file.py:fn', or 'judge', the
   built-in task judge), or a person ('human': the samples are written out, the run saves a
   checkpoint and pauses; `rlhf data join-ranks` turns the person's ranks into rankings and
   `--resume` continues);
3. the rankings join the RM's data, and the RM trains `steps` steps on the mix of the old pairs
   (`rm_refresh.data`: an RM trained only on the newest samples forgets what the earlier policy
   exploited) and every ranking collected so far;
4. the refreshed RM scores the following rollouts.

The RM's weights and AdamW state, and every ranking collected, are part of PPO's resumable
checkpoint, so a resumed run refreshes exactly as an uninterrupted one. Before training, the old
RM's accuracy on the new rankings is logged (`rm_refresh/accuracy_before`): it falls when the
policy has found what the RM wrongly rewards.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from .config import RMRefreshConfig
from .data.formats import Row, load_examples, parse_preference, parse_prompt, read_rows
from .engine import clip_grad_norm, epoch_permutation, make_optimizer, run_autocast
from .errors import DataError, RunError
from .evaluate import sample_texts
from .faults import fault_point
from .algos.core import reward_bias
from .rewards import BIAS_KEY, call_reward_fn, group_loss, load_reward_fn, on_every_process, reward_fields

log = logging.getLogger(__name__)


class Paused(RunError):
    """The run stopped on purpose (a person ranks the refresh samples); `--resume` continues."""


def check_ranked_samples(ranked: list[Row], samples: list[Row], path: Path) -> None:
    """The person's rankings after a pause are this pause's samples: every row's id is one of the
    samples file's, with the same prompt and responses, and at least one row is there (an empty
    or foreign file would skip the ranking round, or train the RM on other samples)."""
    if not ranked:
        raise DataError(f"{path}: no ranked rows; rank the responses of {samples[0].source if samples else 'the samples'}"
                        f" and join the ranks into this file (rlhf data join-ranks)")
    by_id = {str(s.data.get("id")): s.data for s in samples}
    for r in ranked:
        s = by_id.get(str(r.data.get("id")))
        if s is None:
            raise DataError(f"{r.where('id')}: {r.data.get('id')!r} is not a row of this pause's samples "
                            f"({samples[0].source if samples else '?'})")
        for fld in ("prompt", "responses"):
            if r.data.get(fld) != s.get(fld):
                raise DataError(f"{r.where(fld)}: not the {fld} of sample {s.get('id')!r}")
    if len(ranked) < len(samples):
        log.warning("%s: %d of the %d sampled rows are ranked; the RM learns from those", path, len(ranked),
                    len(samples))


class RMRefresher:
    """The trainable side of PPO's reward model; see the module docstring."""

    def __init__(self, cfg: RMRefreshConfig, reward_model, prompts: list, seed: int, max_new_tokens: int):
        self.cfg, self.rm, self.seed = cfg, reward_model, seed
        self.max_new_tokens = cfg.max_new_tokens or max_new_tokens
        self.prompts = load_examples(cfg.prompts, parse_prompt, what="prompts", field_name="rm_refresh.prompts")[0] \
            if cfg.prompts else prompts
        self.judge = None if cfg.judge == "human" else load_reward_fn(cfg.judge)
        old = load_examples(cfg.data, parse_preference, what="preference rows", field_name="rm_refresh.data")[0] \
            if cfg.data else []
        self.old = [self.encode(g) for g in old]
        self.collected: list[dict] = []  # ranking rows as JSON (the checkpoint keeps them)
        self.refreshes, self.pending = 0, None
        # a fixed set of sequences whose mean score must not move with a refresh: the bias absorbs
        # the shift, so the proxy keeps the scale the RM stage gave it [IGPT §3.5]
        self.reference = [seqs[w] for seqs, pairs in self.old[:256] for w in sorted({p[0] for p in pairs})]
        self.rm.model.requires_grad_(True)
        self.optimizer = make_optimizer(self.rm.model.parameters(), _optim(cfg.lr))

    def encode(self, group) -> tuple[list[list[int]], list]:
        """The group's sequences as the RM reads them (cut to its positions, as PPO's scores are)."""
        return self.rm.fit([self.rm.encode(group.prompt, r) for r in group.responses])[0], group.pairs

    # ------------------------------------------------------------------ the refresh

    def refresh(self, policy, tok, acc, it: int, out: Path) -> dict:
        """Sample, rank, train. Returns metrics; raises Paused when a person must rank first."""
        rows = self._sample(policy, tok, acc, it)
        if self.judge is None:
            self.pending = {"iteration": it, **self._write_for_human(rows, it, out, acc)}
            return {}
        return self._learn(rows, acc)

    def finish_pending(self, acc) -> dict:
        """After a pause: read the person's rankings and train (raises Paused again if absent)."""
        ranked = Path(self.pending["rankings"])
        if not ranked.exists():
            raise Paused(self.pending["message"])
        rows = read_rows(str(ranked))
        check_ranked_samples(rows, read_rows(self.pending["samples"]), ranked)
        self.pending = None
        return self._learn([r.data for r in rows], acc, rows)

    def _sample(self, policy, tok, acc, it: int) -> list[dict]:
        k, n = self.cfg.k, self.cfg.num_prompts
        order = epoch_permutation(len(self.prompts), self.seed + 31, self.refreshes * n // len(self.prompts))
        start = self.refreshes * n % len(self.prompts)
        picked = [self.prompts[order[(start + j) % len(order)]] for j in range(n)]
        mine = picked[acc.process_index :: acc.num_processes]  # each process ranks its share; all learn from all
        expanded = [p for p in mine for _ in range(k)]
        with run_autocast(acc)():  # one region: each weight is cast once, not once per token
            texts, _ = sample_texts(policy, tok, [p.prompt for p in expanded], max_new_tokens=self.max_new_tokens,
                                    seed=self.seed * 1009 + it * 7 + acc.process_index, batch_size=64)
        scores = None
        if self.judge is not None:
            fields = reward_fields(expanded)
            raw = [p.raw_prompt for p in expanded]  # (a judge failing on one process stops them all)
            scores = on_every_process(acc, lambda: call_reward_fn(self.judge, raw, texts, fields))
        rows = []
        for j, p in enumerate(mine):
            row = {"id": f"it{it}-{acc.process_index}-{j}", **p.meta, "prompt": p.raw_prompt,
                   "responses": texts[j * k : (j + 1) * k]}
            if scores is not None:
                row["scores"] = scores[j * k : (j + 1) * k]
            rows.append(row)
        return _gather(rows, acc)

    def _write_for_human(self, rows: list[dict], it: int, out: Path, acc) -> dict:
        folder = out / "rm_refresh"
        samples, rankings = folder / f"iter{it:06d}-samples.jsonl", folder / f"iter{it:06d}-rankings.jsonl"
        if acc.is_main_process:
            from .data.tasks import write_jsonl

            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(samples, rows)
        message = (f"paused for human ranking at iteration {it}: rank the {self.cfg.k} responses of each row of "
                   f"{samples} (rows {{id, ranks}}, 1 = best), then `rlhf data join-ranks {samples} RANKS --out "
                   f"{rankings}` and rerun with --resume")
        return {"samples": str(samples), "rankings": str(rankings), "message": message}

    def _learn(self, rows: list[dict], acc, read: list[Row] | None = None) -> dict:
        new = []
        for i, row in enumerate(rows):
            g = parse_preference(read[i] if read else Row(row, "rm_refresh", i + 1), {})
            if g is not None:
                new.append(self.encode(g))
        metrics = {"rm_refresh/accuracy_before": self._accuracy(new, acc), "rm_refresh/new_groups": float(len(new))}
        if not self.reference:  # no old data: the first refresh's preferred responses are the fixed set
            self.reference = [seqs[w] for seqs, pairs in new[:256] for w in sorted({p[0] for p in pairs})]
        before = self._reference_mean()
        self.collected += rows
        fresh = [e for e in (self._encode_row(r, i) for i, r in enumerate(self.collected)) if e]
        metrics["rm_refresh/loss"] = self._train(fresh, acc)
        metrics["rm_refresh/accuracy_after"] = self._accuracy(new, acc)
        if before is not None:  # the shift of the fixed set's mean score goes into the bias
            self.rm.bias -= self._reference_mean() - before
            self.rm.model.config.update({BIAS_KEY: self.rm.bias})
            metrics["rm_refresh/bias"] = self.rm.bias
        metrics["rm_refresh/groups"] = float(len(fresh))
        self.refreshes += 1
        return metrics

    def _reference_mean(self) -> float | None:
        if not self.reference:
            return None
        self.rm.model.eval()
        return -reward_bias(self.rm.score_ids(self.reference, normalized=False))

    def _encode_row(self, row: dict, i: int):
        g = parse_preference(Row(row, "rm_refresh", i + 1), {})
        return self.encode(g) if g is not None else None

    @torch.no_grad()
    def _accuracy(self, groups: list, acc) -> float:
        if not groups:
            return float("nan")
        self.rm.model.eval()
        _, c, r = group_loss(self.rm.model, groups, self.rm.tok.pad_token_id, acc.device)
        return ((c > r).float() + 0.5 * (c == r).float()).mean().item()

    def _train(self, fresh: list, acc) -> float:
        """`steps` AdamW steps on batches mixing the collected rankings (`new_share` of each batch)
        with the old pairs; under DDP every process takes its share of each batch and the gradients
        are summed, so every process holds the same RM."""
        model, bs, total = self.rm.model, self.cfg.batch_size, 0.0
        if not fresh and not self.old:  # every ranking so far was a tie: nothing to learn from yet
            return float("nan")
        n_new = 0 if not fresh else bs if not self.old else max(1, round(bs * self.cfg.new_share))
        new_order = epoch_permutation(len(fresh), self.seed + 97, self.refreshes) if fresh else []
        old_order = epoch_permutation(len(self.old), self.seed + 89, self.refreshes) if self.old else []
        for step in range(self.cfg.steps):
            batch = [fresh[new_order[(step * n_new + j) % len(new_order)]] for j in range(n_new)]
            batch += [self.old[old_order[(step * (bs - n_new) + j) % len(old_order)]] for j in range(bs - n_new)]
            mine = batch[acc.process_index :: acc.num_processes]
            n_pairs = sum(len(p) for _, p in batch)
            losses, _, _ = group_loss(model, mine, self.rm.tok.pad_token_id, acc.device)
            loss = losses.sum() / n_pairs
            loss.backward()
            if acc.num_processes > 1:
                for p in model.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
            if not step_if_finite(model, self.optimizer, max_norm=1.0):
                log.warning("rm_refresh: step %d of refresh %d skipped: the RM's gradient norm is not finite "
                            "(its weights and AdamW state are left as they were)", step + 1, self.refreshes + 1)
            self.optimizer.zero_grad(set_to_none=True)
            fault_point("refresh")  # (test hook: RLHF_FAULT=refresh:N kills in the middle of a refresh)
            total += float(acc.reduce(loss.detach().clone(), "sum"))
        model.eval()
        return total / self.cfg.steps

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {"collected": self.collected, "refreshes": self.refreshes, "pending": self.pending,
                "bias": self.rm.bias}

    def load_state_dict(self, state: dict) -> None:
        self.collected, self.refreshes, self.pending = state["collected"], state["refreshes"], state["pending"]
        self.rm.bias = state.get("bias", self.rm.bias)
        self.rm.model.config.update({BIAS_KEY: self.rm.bias})


def step_if_finite(model: torch.nn.Module, optimizer, max_norm: float) -> bool:
    """Clip `model`'s gradients to `max_norm` and step `optimizer` only if their norm is finite: a
    NaN/inf gradient (a NaN loss, an overflow) never reaches the RM's weights or AdamW moments,
    which every later reward would inherit. Returns whether it stepped."""
    norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], max_norm)
    if not math.isfinite(norm):
        return False
    optimizer.step()
    return True


def _optim(lr: float):
    from .config import OptimConfig

    return OptimConfig(lr=lr, adam_beta2=0.999)


def _gather(rows: list[dict], acc) -> list[dict]:
    if acc.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return [json.loads(r) for r in gather_object([json.dumps(r) for r in rows])]

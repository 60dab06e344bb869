"""Evaluation helpers shared by the stages: batched sampling of held-out prompts, gold accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import tasks
from .errors import USER_ERRORS, DataError, RunError
from .models import check_positions
from .rollout import Sampling, generate
from .tokenization import decode_response, encode_prompt


@torch.no_grad()
def sample_texts(model, tok, prompts: list, *, batch_size: int = 64, seed: int = 0, device=None,
                 progress_desc: str | None = None, **sampling) -> tuple[list[str], list[bool]]:
    """Sample one response per prompt (messages or raw text); returns (texts, ended_with_eos).
    `sampling`: :class:`rlhf.rollout.Sampling`'s fields (max_new_tokens, temperature, ...)."""
    from .engine import progress

    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)  # on the model's device: CUDA sampling needs it
    texts, eos = [], []
    encoded = [encode_prompt(tok, p) for p in prompts]
    check_sampling_positions(model, encoded, sampling.get("max_new_tokens", Sampling.max_new_tokens))
    starts = list(range(0, len(encoded), batch_size))
    for s in progress(starts, desc=progress_desc or "sampling", disable=progress_desc is None):
        g = generate(model, encoded[s : s + batch_size], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     generator=gen, device=device, **sampling)
        for row, m, e in zip(g.response_ids.cpu(), g.response_mask.cpu().bool(), g.has_eos.tolist()):  # one copy
            texts.append(decode_response(tok, row[m].tolist()))
            eos.append(e)
    model.train(was_training)
    return texts, eos


def check_sampling_positions(model, encoded: list[list[int]], max_new_tokens: int) -> None:
    """:func:`rlhf.models.check_positions` before sampling: the longest encoded prompt and
    `max_new_tokens` (less the last token, never fed back) within a model's learned positions (GPT-2,
    OPT: an IndexError, on a GPU a device-side assert, in the middle of sampling)."""
    if not encoded:
        return
    i = max(range(len(encoded)), key=lambda k: len(encoded[k]))
    check_positions(model, len(encoded[i]) + max_new_tokens - 1,
                    f"prompt {i + 1} ({len(encoded[i])} tokens) with max_new_tokens {max_new_tokens}, less the last "
                    f"token (never fed back)", "lower max_new_tokens or shorten the prompts")


def gold_accuracy(model, tok, examples: list, *, batch_size: int = 64, seed: int = 0, device=None,
                  **sampling) -> float:
    """Share of held-out prompts answered correctly (built-in task checker); examples carry meta."""
    texts, _ = sample_texts(model, tok, [e.prompt for e in examples], batch_size=batch_size, seed=seed, device=device,
                            **sampling)
    ok = tasks.gold_reward(None, texts, task=[e.meta["task"] for e in examples],
                           input=[e.meta["input"] for e in examples])
    return sum(ok) / len(ok)


def gold_examples(examples: list, limit: int) -> list:
    """Unique-prompt examples whose meta names a built-in task (empty if the data has no gold checker),
    at most `limit` of them (0: none)."""
    if limit <= 0:
        return []
    seen, out = set(), []
    for e in examples:
        meta = getattr(e, "meta", {})
        if meta.get("task") not in tasks.TASKS or not isinstance(meta.get("input"), str):
            return []
        key = (meta["task"], meta["input"])
        if key not in seen:
            seen.add(key)
            out.append(e)
        if len(out) >= limit:
            break
    return out


# ----------------------------------------------------------------------------- metrics (pure)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean next-token NLL) over the scored tokens."""
    import math

    return math.exp(nll_sum / max(n_tokens, 1))


def win_rate(scores_a: list[float], scores_b: list[float], n_boot: int = 2000, seed: int = 0,
             tie_tolerance: float = 0.0) -> dict:
    """Win rate of A over B on the same prompts: (wins + ties / 2) / n, with a 95% bootstrap CI.

    A pair whose scores differ by at most `tie_tolerance` is a tie (a judge returning equal
    scores, e.g. both answers right).
    """
    import random

    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    outcome = [1.0 if a - b > tie_tolerance else 0.0 if b - a > tie_tolerance else 0.5
               for a, b in zip(scores_a, scores_b)]
    n = len(outcome)
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(outcome) for _ in range(n)) / n for _ in range(n_boot))
    return {"win_rate": sum(outcome) / n, "wins": outcome.count(1.0), "ties": outcome.count(0.5),
            "losses": outcome.count(0.0), "n": n, "ci95_low": boots[int(0.025 * n_boot)],
            "ci95_high": boots[min(int(0.975 * n_boot), n_boot - 1)]}


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, default tokenisation) of hypotheses against one reference each."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


# ----------------------------------------------------------------------------- rlhf eval


@torch.no_grad()
def lm_perplexity(model, tok, examples: list, batch_size: int = 16) -> dict:
    """Perplexity of a causal LM on SFT rows (assistant tokens only, as in SFT)."""
    from .algos.core import lm_loss_sum
    from .rollout import right_pad
    from .tokenization import IGNORE_INDEX, encode_sft

    feats = [encode_sft(tok, e.prompt, e.completion) for e in examples]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(feats), batch_size):
        chunk = feats[i : i + batch_size]
        ids = right_pad([f[0] for f in chunk], tok.pad_token_id, device)
        labels = right_pad([f[1] for f in chunk], IGNORE_INDEX, device)
        mask = right_pad([[1] * len(f[0]) for f in chunk], 0, device)
        s, n = lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
        total, count = total + float(s), count + n
    return {"loss": total / max(count, 1), "perplexity": perplexity(total, count), "tokens": count}


@dataclass
class EvalConfig:
    """What `rlhf eval` measures (see `rlhf eval --help`)."""

    perplexity_data: str | None = None
    pairs: str | None = None
    prompts: str | None = None
    reward_model: str | None = None
    reward_fns: list[str] = field(default_factory=list)
    judge: str | None = None
    reference_field: str | None = None
    max_samples: int | None = 256
    batch_size: int = 32
    seed: int = 0
    sampling: Sampling = field(default_factory=Sampling)


def run_eval(checkpoints: list[str], cfg: EvalConfig, device=None) -> dict:
    """Evaluate checkpoints: reward models on preference pairs, policies on perplexity and on
    sampled responses (reward, gold accuracy, BLEU/chrF, win rate of the first against the
    others). Every model runs on `device` (default: the CPU). Returns a JSON-able dict."""
    from transformers import AutoConfig

    from .data.formats import load_examples, load_prompts, parse_sft
    from .models import read_model_config
    from .rewards import RewardModel, dry_call_on, load_reward_fn

    device = torch.device(device or "cpu")
    result: dict = {"generation": {**vars(cfg.sampling), "seed": cfg.seed, "max_samples": cfg.max_samples},
                    "checkpoints": {}}
    archs = [((read_model_config(c) or vars(AutoConfig.from_pretrained(c))).get("architectures") or [""])[0]
             for c in checkpoints]  # each a model folder, checked before any model loads
    for ckpt, arch in zip(checkpoints, archs):  # something to measure for each, or a one-line error
        if arch.endswith("ForSequenceClassification") and not cfg.pairs:
            raise RunError(f"{ckpt}: a reward model, and nothing to measure it on: give --pairs (its accuracy on "
                           f"preference rows); --prompts and --perplexity evaluate policies")
        if not arch.endswith("ForSequenceClassification") and not (cfg.prompts or cfg.perplexity_data):
            raise RunError(f"{ckpt}: a policy, and nothing to measure it on: give --prompts (samples: reward, gold "
                           f"accuracy, BLEU, win rate) and/or --perplexity; --pairs evaluates reward models")
    rm = RewardModel(cfg.reward_model, device=device) if cfg.reward_model else None
    judge = load_reward_fn(cfg.judge) if cfg.judge else None
    fns = [(spec, load_reward_fn(spec)) for spec in cfg.reward_fns]  # every input checked before any model loads
    prompts = load_prompts(cfg.prompts, max_samples=cfg.max_samples) if cfg.prompts else []
    check_references(prompts, cfg.reference_field)
    demos = load_examples(cfg.perplexity_data, parse_sft, max_samples=cfg.max_samples, what="SFT rows",
                          field_name="--perplexity")[0] if cfg.perplexity_data else []
    # called once now, as PPO's reward functions are, not after every checkpoint has sampled
    dry_call_on(([judge] if judge else []) + [f for _, f in fns], prompts)
    judged: dict[str, list[float]] = {}
    labels = [c if checkpoints.index(c) == i else f"{c}#{i + 1}" for i, c in enumerate(checkpoints)]
    for label, ckpt, arch in zip(labels, checkpoints, archs):
        try:
            if arch.endswith("ForSequenceClassification"):
                result["checkpoints"][label] = eval_reward_model(ckpt, cfg, device) if cfg.pairs else {}
                continue
            result["checkpoints"][label], scores = eval_policy(ckpt, cfg, (prompts, demos), (rm, judge, fns), device)
        except USER_ERRORS as e:  # name the checkpoint, and keep what the ones before it measured
            done = list(result["checkpoints"])
            named = str(e) if str(e).startswith(str(ckpt)) else f"{ckpt}: {e}"
            err = type(e)(named + (f" (the results of {', '.join(done)}, evaluated before it, are printed above)"
                                   if done else ""))
            err.partial = result if done else None
            raise err from None
        if scores is not None:
            judged[label] = scores
    if len(judged) >= 2:
        first, *others = list(judged)
        result["win_rate"] = {f"{first} vs {o}": {**win_rate(judged[first], judged[o], seed=cfg.seed),
                                                  "judge": cfg.judge or f"reward model {cfg.reward_model}"}
                              for o in others}
    return result


def check_references(prompts: list, reference_field: str | None) -> None:
    """Before any model samples: every prompt row has `reference_field` (--reference_field, the
    reference text for BLEU/chrF) as a string; the first that does not is named by file:line."""
    if not reference_field:
        return
    if not prompts:
        raise DataError(f"--reference_field {reference_field}: BLEU/chrF compare sampled responses with the "
                        f"prompt rows' references; give --prompts")
    for p in prompts:
        v = p.meta.get(reference_field)
        if not isinstance(v, str):
            got = "missing" if v is None else f"expected a string, got {type(v).__name__}"
            raise DataError(f"{p.where}: field '{reference_field}': {got} (--reference_field, the reference for "
                            f"BLEU/chrF)")


def eval_reward_model(ckpt: str, cfg: EvalConfig, device) -> dict:
    """Accuracy (ties count half) and mean margin of a reward model on `cfg.pairs`."""
    from .data.formats import load_examples, parse_preference
    from .rewards import RewardModel, group_loss

    r = RewardModel(ckpt, device=device)
    groups, _ = load_examples(cfg.pairs, parse_preference, max_samples=cfg.max_samples, what="preference rows",
                              field_name="--pairs")
    enc = [([r.encode(g.prompt, x) for x in g.responses], g.pairs) for g in groups]
    for g, (seqs, _) in zip(groups, enc):
        for fld, seq in zip(g.fields, seqs):
            if r.too_long(seq):
                raise DataError(f"{g.source}: field '{fld}': {r.too_long(seq)}")
    c, rj = [], []
    for i in range(0, len(enc), cfg.batch_size):
        _, cc, rr = group_loss(r.model, enc[i : i + cfg.batch_size], r.tok.pad_token_id, device)
        c.append(cc)
        rj.append(rr)
    c, rj = torch.cat(c), torch.cat(rj)
    return {"rm_accuracy": ((c > rj).float() + 0.5 * (c == rj).float()).mean().item(),
            "rm_margin": (c - rj).mean().item(), "rm_pairs": int(c.numel())}


def eval_policy(ckpt: str, cfg: EvalConfig, data: tuple, judges: tuple, device) -> tuple[dict, list | None]:
    """Perplexity on `data`'s demonstrations, and on sampled responses to its prompts EOS rate,
    length, RM score, reward functions, gold accuracy and BLEU/chrF. `data` is (prompts, demos),
    both read before any model loads. Returns (metrics, the judge's per-prompt scores for the win rate)."""
    from .config import ModelConfig
    from .models import disable_dropout, load_causal_lm, load_tokenizer
    from .rewards import call_reward_fn, reward_fields

    prompts, demos = data
    rm, judge, fns = judges
    mc = ModelConfig(name_or_path=ckpt)
    tok = load_tokenizer(mc)
    model = load_causal_lm(mc, tok).eval().to(device)
    disable_dropout(model)
    res: dict = {}
    if demos:
        res.update(lm_perplexity(model, tok, demos, cfg.batch_size))
    if not prompts:
        return res, None
    texts, eos = sample_texts(model, tok, [p.prompt for p in prompts], batch_size=cfg.batch_size, seed=cfg.seed,
                              device=device, **vars(cfg.sampling))
    res["eos_rate"] = sum(eos) / len(eos)
    res["response_chars"] = sum(len(t) for t in texts) / len(texts)
    fields = reward_fields(prompts)
    raw = [p.raw_prompt for p in prompts]
    if rm is not None:
        res["reward_model_score"] = rm.score([p.prompt for p in prompts], texts, fit=True).mean().item()
    where = [getattr(p, "where", "?") for p in prompts]
    for spec, fn in fns:
        vals = call_reward_fn(fn, raw, texts, fields, where=where)
        res[f"reward/{spec}"] = sum(vals) / len(vals)
    if tasks.has_gold([p.meta for p in prompts]):
        g = tasks.gold_reward(None, texts, task=fields["task"], input=fields["input"])
        res["gold_accuracy"] = sum(g) / len(g)
    if cfg.reference_field:
        res.update(bleu_chrf(texts, [p.meta[cfg.reference_field] for p in prompts]))
    if judge is not None:
        return res, call_reward_fn(judge, raw, texts, fields, where=where)
    return res, rm.score([p.prompt for p in prompts], texts, fit=True).tolist() if rm is not None else None


def format_table(result: dict) -> str:
    """The eval result as a plain-text table (one row per checkpoint)."""
    rows = result["checkpoints"]
    keys = sorted({k for r in rows.values() for k in r})
    if not keys:
        return "(no metrics)"
    width = max(len(c) for c in rows) + 2
    lines = ["checkpoint".ljust(width) + "  ".join(k.rjust(max(len(k), 10)) for k in keys)]
    for c, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append((f"{v:.4f}" if isinstance(v, float) else str(v)).rjust(max(len(k), 10)))
        lines.append(c.ljust(width) + "  ".join(cells))
    for name, w in result.get("win_rate", {}).items():
        lines.append(f"win rate {name}: {w['win_rate']:.3f} (95% CI {w['ci95_low']:.3f}-{w['ci95_high']:.3f}; "
                     f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses; judge: {w['judge']})")
    g = result["generation"]
    lines.append("generation: " + ", ".join(f"{k}={v}" for k, v in g.items()))
    return "\n".join(lines)

"""`rlhf sample` and the RM stage's rankings: K samples of a policy per prompt, ranked by a judge
(InstructGPT §3.4), written as K-way ranking rows that the RM trains on."""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig, SampleConfig
from .data.formats import DataError, load_examples, parse_preference, parse_prompt
from .data.tasks import write_jsonl
from .evaluate import sample_texts
from .models import check_policy_model, disable_dropout, load_causal_lm, load_tokenizer, outside_zero3_init
from .rewards import call_reward_fn, dry_call_on, load_reward_fn, reward_fields


def check_sample_config(sc: SampleConfig, skip_bad_rows: bool = False) -> tuple[list, list]:
    """Fail before anything is written: the sampling policy and prompt file must exist, the judge
    must run, and the `mix_with` rows must be preference rows (they are appended after all the
    sampling). Returns the `mix_with` preference groups (empty without it) and the prompts."""
    if not sc.checkpoint or not sc.prompts:
        raise DataError("recipe: 'sample.checkpoint' and 'sample.prompts' are required for sampling")
    check_policy_model(sc.checkpoint, "sample.checkpoint")  # a model folder or a hub id, not a reward model
    prompts, _ = load_examples(sc.prompts, parse_prompt, max_samples=sc.max_prompts, what="prompts",
                               field_name="sample.prompts")
    mixed = load_examples(sc.mix_with, parse_preference, skip_bad_rows=skip_bad_rows, what="preference rows",
                          field_name="sample.mix_with")[0] if sc.mix_with else []
    if sc.judge != "none":  # called once now, as PPO's reward functions are: not after all the sampling
        dry_call_on([load_reward_fn(sc.judge or "judge")], prompts)
    return mixed, prompts


def sample_rankings(sc: SampleConfig, out_path: str | Path, seed: int = 0, device=None) -> dict:
    """InstructGPT §3.4: K samples of the policy per prompt, scored by a judge -> K-way rankings."""
    if not sc.checkpoint or not sc.prompts:
        raise DataError("recipe: 'sample.checkpoint' and 'sample.prompts' are required for sampling")
    prompts, _ = load_examples(sc.prompts, parse_prompt, max_samples=sc.max_prompts, what="prompts",
                               field_name="sample.prompts")
    judge = None if sc.judge == "none" else load_reward_fn(sc.judge or "judge")
    mc = ModelConfig(name_or_path=sc.checkpoint)
    tok = load_tokenizer(mc)
    with outside_zero3_init():  # sampled by one process: a ZeRO-3-partitioned copy would wait on the others
        policy = load_causal_lm(mc, tok)
    disable_dropout(policy)
    if device is not None:
        policy.to(device)
    expanded = [p for p in prompts for _ in range(sc.k)]
    texts, _ = sample_texts(policy, tok, [p.prompt for p in expanded], max_new_tokens=sc.max_new_tokens,
                            temperature=sc.temperature, batch_size=sc.batch_size, seed=seed, device=device,
                            progress_desc=f"sampling K={sc.k}")
    fields = reward_fields(expanded)
    scores = call_reward_fn(judge, [p.raw_prompt for p in expanded], texts, fields) if judge else None
    rows = []
    for i, p in enumerate(prompts):
        sl = slice(i * sc.k, (i + 1) * sc.k)
        row = {"id": p.meta.get("id", i), **p.meta, "prompt": p.raw_prompt, "responses": texts[sl]}
        if scores is not None:
            row["scores"] = scores[sl]
        rows.append(row)
    if sc.mix_with:
        from .data.formats import read_rows

        rows += [r.data for r in read_rows(sc.mix_with)]
    write_jsonl(out_path, rows)
    distinct = sum(len(set(r["responses"])) for r in rows[: len(prompts)]) / max(len(prompts), 1)
    out = {"sampled_prompts": len(prompts), "k": sc.k, "mean_distinct_responses": distinct}
    if scores is not None:
        out["mean_judge_score"] = sum(scores) / len(scores)
    return out

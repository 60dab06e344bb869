"""Evaluation helpers shared by the stages: batched sampling of held-out prompts, gold accuracy."""

from __future__ import annotations

import torch

from .data import tasks
from .rollout import generate
from .tokenization import decode_response, encode_prompt


@torch.no_grad()
def sample_texts(model, tok, prompts: list, *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 top_k: int = 0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0,
                 device=None, progress_desc: str | None = None) -> tuple[list[str], list[bool]]:
    """Sample one response per prompt (messages or raw text); returns (texts, ended_with_eos)."""
    from .engine import progress

    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    texts, eos = [], []
    encoded = [encode_prompt(tok, p) for p in prompts]
    starts = list(range(0, len(encoded), batch_size))
    for s in progress(starts, desc=progress_desc or "sampling", disable=progress_desc is None):
        g = generate(model, encoded[s : s + batch_size], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     greedy=greedy, generator=gen, device=device)
        for row, m, e in zip(g.response_ids, g.response_mask, g.has_eos):
            texts.append(decode_response(tok, row[m.bool()].tolist()))
            eos.append(bool(e))
    model.train(was_training)
    return texts, eos


def gold_accuracy(model, tok, examples: list, *, max_new_tokens: int, temperature: float = 1.0,
                  greedy: bool = False, batch_size: int = 64, seed: int = 0, device=None) -> float:
    """Share of held-out prompts answered correctly (built-in task checker); examples carry meta."""
    texts, _ = sample_texts(model, tok, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                            temperature=temperature, greedy=greedy, batch_size=batch_size, seed=seed, device=device)
    ok = tasks.gold_reward(None, texts, task=[e.meta["task"] for e in examples],
                           input=[e.meta["input"] for e in examples])
    return sum(ok) / len(ok)


def gold_examples(examples: list, limit: int) -> list:
    """Unique-prompt examples whose meta names a built-in task (empty if the data has no gold checker)."""
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

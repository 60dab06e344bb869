"""How far the sampling pass's log-probs are from recomputed ones (`old_logprobs: sampling` vs
`recompute`), in fp32 and bf16, on the bench's SmolLM2-135M-Instruct policy (issue 17):

    python bench/old_logprobs_agreement.py [--prompts 16] [--tokens 32]   # ~1 min on 2 cores

For each dtype: sample responses with `rollout.generate(..., return_logprobs=True)` (the KV-cached
pass), recompute the same tokens' log-probs with `rollout.response_logprobs` (one pass over the
finished sequences, what `recompute` does), and report |Δ log p| over the response tokens and the
PPO ratio exp(Δ) that the first minibatch would start from, before any update, with the share of
tokens whose ratio is already outside a 0.2 clip range. Also the two passes' seconds. Writes
bench/results/old_logprobs_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from ppo_vs_trl import WORK, smollm2_models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.rollout import generate, response_logprobs
    from rlhf.tokenization import encode_prompt

    policy, _ = smollm2_models(WORK / "smollm2")
    tok = AutoTokenizer.from_pretrained(policy)
    rows = [json.loads(line)["prompt"] for line in open(ROOT / "recipes/tiny/data/rl_prompts.jsonl")][: a.prompts]
    encoded = [encode_prompt(tok, r) for r in rows]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "prompts": a.prompts,
              "max_new_tokens": a.tokens, "dtypes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=dtype).eval()
        t = time.perf_counter()
        gen = generate(model, encoded, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       max_new_tokens=a.tokens, generator=torch.Generator().manual_seed(a.seed), return_logprobs=True)
        t_gen = time.perf_counter() - t
        ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
        mask = torch.cat([gen.prompt_mask, gen.response_mask], 1)
        t = time.perf_counter()
        with torch.no_grad():
            recomputed = response_logprobs(model, ids, mask, gen.response_ids.shape[1])
        t_rec = time.perf_counter() - t
        delta = (recomputed.float() - gen.logprobs.float())[gen.response_mask.bool()]
        ratio = delta.exp()
        row = {"response_tokens": int(delta.numel()), "max_abs_dlogp": float(delta.abs().max()),
               "mean_abs_dlogp": float(delta.abs().mean()), "ratio_min": float(ratio.min()),
               "ratio_max": float(ratio.max()), "share_outside_clip_0.2": float(((ratio - 1).abs() > 0.2).float().mean()),
               "generate_seconds": t_gen, "recompute_seconds": t_rec}
        name = str(dtype).replace("torch.", "")
        result["dtypes"][name] = row
        print(f"{name:8s} {row['response_tokens']} tokens: |Δ log p| max {row['max_abs_dlogp']:.2e}, mean "
              f"{row['mean_abs_dlogp']:.2e}; first ratio {row['ratio_min']:.5f}-{row['ratio_max']:.5f}, "
              f"{row['share_outside_clip_0.2']:.2%} outside 1 ± 0.2; generate {t_gen:.1f} s, recompute {t_rec:.1f} s",
              flush=True)
    out = ROOT / "bench" / "results" / "old_logprobs_agreement.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

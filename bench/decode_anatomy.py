"""Where a decoding step's time goes on the CPU: SmolLM2-135M-Instruct, 16 sequences (issue 17).

    python bench/decode_anatomy.py            # ~2 min; writes bench/results/decode_anatomy_smollm2.json

Measured without the profiler (which charges small ops far more than they cost alone), each
figure the mean of several repeats in one process:
- one KV-cached decoding step of `rollout.generate` (inside `FewRowsLinear`, as generate runs it),
  on both threads, on one thread, and for 8 of the 16 rows on one thread;
- the step's linear products alone, replayed with the model's own (cold) weights and a 16-row
  input: as `few_rows_linear` (what decoding uses) and as plain `F.linear`;
- the floor under them: one read of every weight (a sum) and their FLOPs at the fp32 matmul peak
  measured here;
- drawing the next token: `torch.multinomial`, `rollout.sample_tokens` (what generate uses since
  2026-12-05: multinomial's tokens, its exponential race drawn in one call), and an inverse-CDF draw
  (cumsum + one uniform per row + searchsorted; the same distribution, other tokens per seed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def mean_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="decoding steps timed per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_anatomy_smollm2.json"))
    a = ap.parse_args()

    from ppo_vs_trl import WORK, smollm2_models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.engine import retain_freed_cpu_memory
    from rlhf.flops import measure_matmul_peak
    from rlhf.rollout import (FewRowsLinear, _cache_kwarg, _cache_of, few_rows_linear, left_pad,
                              position_ids_from_mask, sample_tokens)

    retain_freed_cpu_memory()
    sft, _ = smollm2_models(WORK / "smollm2")
    tok = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    rows = [json.loads(line) for line in open(ROOT / "recipes" / "tiny" / "data" / "rl_prompts.jsonl")][:16]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
               for r in rows]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    cache_kw = _cache_kwarg(model)

    @torch.no_grad()
    def step_ms(batch: list[list[int]]) -> float:
        """Prefill, then the mean time of `--steps` decoding steps (greedy: sampling is timed apart)."""
        ids, mask = left_pad(batch, tok.pad_token_id)
        pos = position_ids_from_mask(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, token, nxt = _cache_of(out), out.logits[:, -1].argmax(-1), pos[:, -1:] + 1
        t = time.perf_counter()
        for _ in range(a.steps):
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], 1)
            with FewRowsLinear():
                out = model(input_ids=token[:, None], attention_mask=mask, position_ids=nxt, use_cache=True,
                            **{cache_kw: cache})
            cache, token, nxt = _cache_of(out), out.logits[:, -1].argmax(-1), nxt + 1
        return (time.perf_counter() - t) / a.steps * 1e3

    def best_of(fn) -> float:
        return min(fn() for _ in range(a.repeats))

    threads = torch.get_num_threads()
    r: dict[str, float] = {}
    step_ms(prompts)
    r["step_16_rows_ms"] = best_of(lambda: step_ms(prompts))
    torch.set_num_threads(1)
    r["step_16_rows_1_thread_ms"] = best_of(lambda: step_ms(prompts))
    r["step_8_rows_1_thread_ms"] = best_of(lambda: step_ms(prompts[:8]))
    torch.set_num_threads(threads)

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {n: torch.randn(16, n) for n in {lin.in_features for lin in linears}}
    r["linear_layers"] = len(linears)
    r["products_few_rows_linear_ms"] = best_of(lambda: mean_ms(
        lambda: [few_rows_linear(xs[lin.in_features], lin.weight, lin.bias) for lin in linears], 5))
    r["products_plain_linear_ms"] = best_of(lambda: mean_ms(
        lambda: [F.linear(xs[lin.in_features], lin.weight, lin.bias) for lin in linears], 5))
    r["read_every_weight_once_ms"] = best_of(lambda: mean_ms(lambda: [lin.weight.sum() for lin in linears], 5))
    flops = sum(2 * 16 * lin.weight.numel() for lin in linears)
    peak = measure_matmul_peak(2048, 10)
    r["products_gflop"] = flops / 1e9
    r["peak_gflops"] = peak / 1e9
    r["products_at_peak_ms"] = flops / peak * 1e3

    probs = (torch.randn(16, model.config.vocab_size) * 3).softmax(-1)
    gen = torch.Generator().manual_seed(0)

    def inverse_cdf():
        cdf = probs.cumsum(-1)
        u = torch.rand(16, 1, generator=gen) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).clamp_(max=probs.shape[-1] - 1)

    r["multinomial_ms"] = best_of(lambda: mean_ms(lambda: torch.multinomial(probs, 1, generator=gen), 20))
    r["sample_tokens_ms"] = best_of(lambda: mean_ms(lambda: sample_tokens(probs, gen), 20))
    r["inverse_cdf_ms"] = best_of(lambda: mean_ms(inverse_cdf, 20))

    print(f"SmolLM2-135M, 16 sequences of {len(prompts[0])}-token prompts, fp32, {threads} threads; "
          f"matmul peak {r['peak_gflops']:.0f} GFLOP/s")
    table = [("decoding step, 16 rows", "step_16_rows_ms"),
             ("decoding step, 16 rows, 1 thread", "step_16_rows_1_thread_ms"),
             ("decoding step, 8 rows, 1 thread", "step_8_rows_1_thread_ms"),
             (f"its {len(linears)} products, few_rows_linear", "products_few_rows_linear_ms"),
             ("the same products as plain F.linear", "products_plain_linear_ms"),
             ("one read of every weight (floor)", "read_every_weight_once_ms"),
             (f"their {r['products_gflop']:.1f} GFLOP at the peak (floor)", "products_at_peak_ms"),
             ("next token: torch.multinomial", "multinomial_ms"),
             ("next token: sample_tokens (its tokens)", "sample_tokens_ms"),
             ("next token: inverse CDF", "inverse_cdf_ms")]
    for label, key in table:
        print(f"  {label:<40}: {r[key]:7.2f} ms")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
    except OSError:
        cpu = platform.processor()
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "threads": threads,
                                       "torch": torch.__version__, **r}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""Where PPO's training phase spends its time on the CPU: SmolLM2-135M-Instruct (issue 17).

    python bench/train_anatomy.py [--onednn] [--compile] [--bf16]   # ~3 min; prints a table, writes JSON

Runs `rlhf ppo` on the bench's SmolLM2 models (the issue-17 work: 16 rollouts, minibatch and
micro-batch 8, 32 response tokens) up to its first update; there it takes the run's own
experience, models and optimizers and times one micro-batch's training step piece by piece,
without the profiler (which charges small ops far more than they cost alone), each piece the
median of `--repeats`:
- the policy's forward (transformer body + LM head at the response positions), the log-prob and
  entropy of the response tokens, the value model's forward, the losses;
- the backward of the policy's part of the loss and of the value model's part, apart;
- the optimizer step: gradient-norm clipping (the norms are reported), AdamW per model, zero_grad;
against the FLOPs of each piece at the matmul peak measured in the same process (fp32; bf16 with
`--bf16`, which runs the stage in bf16 mixed precision as `mixed_precision: bf16` does). Nothing is
trained: the weights are restored after the repeats, and the run then goes on as usual.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--onednn", action="store_true", help="onednn_linear: true (without it: the default, auto)")
    ap.add_argument("--compile", action="store_true", help="compile: true")
    ap.add_argument("--bf16", action="store_true",
                    help="mixed_precision: bf16 (autocast over fp32 weights; MFU against the bf16 matmul peak)")
    ap.add_argument("--matmul_precision", default="highest", choices=["highest", "high", "medium"],
                    help="the recipe's matmul_precision (medium: fp32 products with bf16 inputs on CPUs with AMX; "
                         "MFU then against the fp32 peak measured at that precision)")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/train_anatomy_smollm2[...].json)")
    a = ap.parse_args()
    suffix = ("_onednn" if a.onednn else "") + ("_compile" if a.compile else "") + ("_bf16" if a.bf16 else "") + \
        (f"_{a.matmul_precision}" if a.matmul_precision != "highest" else "")
    out_json = Path(a.out or ROOT / "bench" / "results" / f"train_anatomy_smollm2{suffix}.json")

    from ppo_vs_trl import WORK, smollm2_models

    import rlhf.stages.ppo as ppo
    from rlhf.algos import core
    from rlhf.config import load_stage_config
    from rlhf.engine import backpropagated_attention, clip_grad_norm
    from rlhf.flops import measure_matmul_peak, train_flops
    from rlhf.rollout import position_ids_from_mask
    from rlhf.stages import run

    sft, rm = smollm2_models(WORK / "smollm2")
    torch.set_float32_matmul_precision(a.matmul_precision)  # (the run sets it too): the peak of these products
    peak = measure_matmul_peak(2048, 10, dtype=torch.bfloat16 if a.bf16 else torch.float32)
    result: dict = {}

    def anatomy(exp, m, acc, cfg, split, iteration, st):
        rows = list(range(split.micro))
        idx, cols, R = exp.rows(rows)
        ids, mask, rmask = exp.input_ids[idx, cols], exp.attention_mask[idx, cols], exp.response_mask[idx, :R]
        n_tok = float(rmask.sum())
        saved = [copy.deepcopy(o.state_dict()) for o in m.optimizers]
        weights = [copy.deepcopy(mod.state_dict()) for mod in (m.policy, m.value)]
        t: dict[str, list[float]] = {}

        def tick(name, t0):
            now = time.perf_counter()
            t.setdefault(name, []).append(now - t0)
            return now

        # as ppo_update: training forwards take SDPA's math path on the CPU in bf16 (rlhf.engine)
        with backpropagated_attention(ids.device, torch.bfloat16 if a.bf16 else torch.float32):
            for _ in range(a.repeats + 1):  # the first one warms up (and compiles)
                t0 = time.perf_counter()
                pos = position_ids_from_mask(mask)
                logits = m.policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                  logits_to_keep=R + 1).logits
                logits = logits[:, -R - 1 : -1, :].float()
                t0 = tick("policy forward (body + LM head)", t0)
                logp, ent = core.token_logprobs(logits, ids[:, -R:], True, cfg.entropy_coef != 0)
                t0 = tick("log-probs + entropy", t0)
                vpred = m.value(ids, mask, position_ids_from_mask(mask))[:, -R - 1 : -1]
                t0 = tick("value forward", t0)
                pg_loss, _ = core.policy_loss(logp, exp.old_logprobs[idx, :R], exp.advantages[idx, :R], rmask,
                                              cfg.cliprange, cfg.log_ratio_clamp, n_tok)
                vf_loss, _ = core.value_loss(vpred, exp.old_values[idx, :R], exp.returns[idx, :R], rmask,
                                             cfg.cliprange_value, n_tok)
                entropy = core.masked_sum(ent, rmask) / n_tok
                lp = pg_loss - cfg.entropy_coef * entropy
                lv = cfg.vf_coef * vf_loss
                t0 = tick("losses", t0)
                lp.backward()
                t0 = tick("policy backward", t0)
                lv.backward()
                t0 = tick("value backward", t0)
                norms = [clip_grad_norm([p for p in mod.parameters() if p.grad is not None], cfg.max_grad_norm)
                         for mod, _, _ in m.step_parts()]  # (as step_models does)
                t0 = tick("clip grad norms", t0)
                for _, opt, _ in m.step_parts():
                    opt.step()
                t0 = tick("AdamW steps", t0)
                for _, opt, _ in m.step_parts():
                    opt.zero_grad(set_to_none=True)
                tick("zero_grad", t0)
        for o, s in zip(m.optimizers, saved):
            o.load_state_dict(s)
        for mod, w in zip((m.policy, m.value), weights):
            mod.load_state_dict(w)

        fp = m.flop_params
        seq_tokens = int(mask.sum())
        resp = int(rmask.numel())
        body = {"policy": fp["policy"], "value": fp["value"]}
        # forward FLOPs are a third of train_flops (2N of 6N per token); backward two thirds
        f_fwd_pol = train_flops(body["policy"], seq_tokens) / 3 + train_flops(fp.get("policy_head", 0), resp) / 3
        f_fwd_val = train_flops(body["value"], seq_tokens) / 3
        ideal = {"policy forward (body + LM head)": f_fwd_pol / peak, "value forward": f_fwd_val / peak,
                 "policy backward": 2 * f_fwd_pol / peak, "value backward": 2 * f_fwd_val / peak}
        med = {k: statistics.median(v[1:]) for k, v in t.items()}
        total = sum(med.values())
        f_all = 3 * (f_fwd_pol + f_fwd_val)
        result.update({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                       "cpu_threads": torch.get_num_threads(), "onednn_linear": a.onednn, "compile": a.compile, "matmul_precision": a.matmul_precision,
                       "bf16": a.bf16, "micro_batch": split.micro, "tokens": seq_tokens, "response_tokens": resp,
                       "peak_gflops": peak / 1e9, "max_grad_norm": cfg.max_grad_norm,
                       "grad_norms": norms, "seconds": med, "matmul_floor_seconds": ideal,
                       "step_seconds": total, "step_mfu": f_all / total / peak})
        print(f"\none micro-batch + optimizer step: {split.micro} rows, {seq_tokens} tokens; peak {peak / 1e9:.0f} "
              f"GFLOP/s; onednn_linear={a.onednn} compile={a.compile}")
        for k, v in med.items():
            floor = f"   (matmuls at peak: {ideal[k]:.3f} s, {ideal[k] / v:.0%})" if k in ideal else ""
            print(f"  {k:34s} {v:7.3f} s{floor}")
        print(f"  {'total':34s} {total:7.3f} s   MFU {f_all / total / peak:.0%}", flush=True)
        raise SystemExit(0)

    ppo.ppo_update = anatomy
    prompts = str(ROOT / "recipes" / "tiny" / "data" / "rl_prompts.jsonl")
    cfg = load_stage_config("ppo", None, {
        "model.name_or_path": str(sft), "reward_model": str(rm), "value_init": "reward_model",
        "data.train": prompts, "data.eval_split": 0.0, "steps": 1, "rollout_batch_size": 16, "minibatch_size": 8,
        "micro_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 32, "sample_every": 0,
        "compile": a.compile, "onednn_linear": True if a.onednn else "auto",
        "mixed_precision": "bf16" if a.bf16 else "auto", "matmul_precision": a.matmul_precision})
    try:
        run("ppo", cfg, tempfile.mkdtemp() + "/ppo")
    except SystemExit:
        pass
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()

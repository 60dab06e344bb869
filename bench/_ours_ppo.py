"""Worker: `rlhf ppo` on the bench's models, in-process. Prints one JSON line like _trl_ppo.py,
plus our per-phase seconds, tokens/s and MFU."""

import argparse
import json
import resource
import sys
import tempfile

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def main():
    ap = argparse.ArgumentParser()
    for k in ("policy", "reward", "prompts"):
        ap.add_argument(f"--{k}", required=True)
    for k in ("iters", "batch", "minibatch", "micro", "epochs", "response"):
        ap.add_argument(f"--{k}", type=int, required=True)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--kl_coef", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak_tflops", type=float, default=0.0,
                    help="the MFU denominator; default: the matmul peak this process measures just before the run")
    ap.add_argument("--old_logprobs", default="auto", choices=["auto", "recompute", "sampling"],
                    help="the recipe's old_logprobs (default: rlhf's own default, auto)")
    ap.add_argument("--compile", action="store_true", help="compile: true (regional torch.compile)")
    ap.add_argument("--no_compile", action="store_true",
                    help="compile: false (without either flag: rlhf's default, auto, which compiles a CPU "
                         "run's policy of >= 100M parameters)")
    ap.add_argument("--onednn", action="store_true",
                    help="onednn_linear: true (rlhf.cpu_linear); without it the default, auto")
    ap.add_argument("--bf16", action="store_true",
                    help="mixed_precision: bf16 (autocast over fp32 weights); the peaks are then bf16 matmuls")
    ap.add_argument("--matmul_precision", default="highest", choices=["highest", "high", "medium"],
                    help="the recipe's matmul_precision (medium: fp32 products with bf16 inputs on CPUs with AMX)")
    a = ap.parse_args()

    from rlhf.config import load_stage_config
    from rlhf.cpu_linear import mkl_below_peak_here
    from rlhf.flops import measure_matmul_peak
    from rlhf.stages import run

    torch.set_float32_matmul_precision(a.matmul_precision)  # as the run will: the peak of the run's own products
    peak_dtype = torch.bfloat16 if a.bf16 else torch.float32  # the dtype the run's matmuls execute in
    peak_start = measure_matmul_peak(2048, 10, peak_dtype) / 1e12  # this process, this moment: the machine's speed drifts
    mfu_peak = a.peak_tflops or peak_start
    out = tempfile.mkdtemp() + "/ppo"
    cfg = load_stage_config("ppo", None, {
        "model.name_or_path": a.policy, "reward_model": a.reward, "value_init": "reward_model",
        "data.train": a.prompts, "data.eval_split": 0.0, "steps": a.iters, "rollout_batch_size": a.batch,
        "minibatch_size": a.minibatch, "micro_batch_size": a.micro, "ppo_epochs": a.epochs,
        "max_new_tokens": a.response, "lr": a.lr, "kl_coef": a.kl_coef, "seed": a.seed, "sample_every": 0,
        "peak_tflops": mfu_peak, "old_logprobs": a.old_logprobs,
        "compile": True if a.compile else False if a.no_compile else "auto", "onednn_linear": True if a.onednn else "auto",
        "mixed_precision": "bf16" if a.bf16 else "auto", "matmul_precision": a.matmul_precision})
    steps: dict[int, int] = {}  # optimizer steps actually taken, per optimizer (torch's global step hook)
    register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.__setitem__(id(opt), steps.get(id(opt), 0) + 1))
    summary = run("ppo", cfg, out)
    peak_end = measure_matmul_peak(2048, 10, peak_dtype) / 1e12
    m = [json.loads(l) for l in open(out + "/metrics.jsonl") if '"pg_loss"' in l]
    stamps = [r["time"] for r in m]
    phases = ("time_generate", "time_score", "time_experience", "time_train", "tokens_per_s_generate",
              "tokens_per_s_train", "mfu_generate", "mfu_experience", "mfu_train")
    first = sum(v for k, v in m[0].items() if k.startswith("time_"))  # with compile: includes compiling
    print(json.dumps({"impl": "rlhf", "bf16": a.bf16, "matmul_precision": a.matmul_precision, "old_logprobs": summary.get("old_logprobs", a.old_logprobs), "compile": summary.get("compiled", a.compile),
                      "optimizer_steps_per_iteration": max(steps.values(), default=0) / a.iters,
                      "onednn_linear": True if a.onednn else "auto", "mkl_below_peak_here": mkl_below_peak_here(),
                      "first_iter_phase_seconds": first, "mfu_peak_tflops": mfu_peak,
                      "peak_tflops_start": peak_start, "peak_tflops_end": peak_end,
                      "iter_seconds": [b - c for b, c in zip(stamps[1:], stamps[:-1])],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "phases": {k: sorted(r[k] for r in m)[len(m) // 2] for k in phases}}))


if __name__ == "__main__":
    sys.exit(main())

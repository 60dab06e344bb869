"""The over-optimisation experiment of docs/results.md: static vs refreshed RM, and no false alarms.

    python tools/overopt_experiment.py --out runs/overopt          # ~10 min on 2 CPU cores

For seeds 0, 1, 2:
1. `recipes/tiny/hackable.yaml` (RM without near-miss negatives, static): gold, proxy, KL, alarms;
2. the same SFT policy and RM with the online RM refresh against the built-in judge;
3. the normal tiny pipeline (`recipes/tiny/pipeline.yaml`) with the same evaluations and alarm
   settings, which must raise no alarm.
Writes OUT/overopt.json and prints a markdown table; the Gao et al. plots are in each PPO run's
report/gao_proxy_vs_gold.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFRESH = ("{every: 2, k: 4, judge: judge, lr: 1.0e-3, data: recipes/tiny/data/prefs_no_near_miss.jsonl}")
ALARM = ["--ppo.eval_every", "5", "--ppo.alarm_window", "3", "--ppo.alarm_gold_drop", "0.05", "--ppo.kl_budget", "3.0"]


def rlhf(*args) -> dict:
    env = dict(os.environ, RLHF_NO_PROGRESS="1")
    p = subprocess.run([sys.executable, "-m", "rlhf", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env=env)
    if p.returncode != 0:
        sys.exit(f"failed: rlhf {' '.join(map(str, args))}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def row(kind: str, seed: int, s: dict) -> dict:
    return {"kind": kind, "seed": seed, "sft_gold": s["initial_eval_gold_accuracy"], "gold": s["eval_gold_accuracy"],
            "proxy_start": s["initial_eval_reward"], "proxy": s["eval_reward"], "kl": s["eval_kl"],
            "alarms": s.get("hacking_alarms", []), "best_gold": s.get("best_gold"),
            "best_gold_iteration": s.get("best_gold_iteration")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/overopt")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    out = Path(a.out)
    rows = []
    for seed in map(int, a.seeds.split(",")):
        hack = out / f"hackable-s{seed}"
        s = rlhf("pipeline", "recipes/tiny/hackable.yaml", "--output_dir", hack, "--seed", seed, "--overwrite")
        rows.append(row("static RM (hackable)", seed, s["ppo"]))
        s = rlhf("ppo", "recipes/tiny/hackable.yaml", "--model.name_or_path", hack / "sft", "--reward_model",
                 hack / "rm", "--output_dir", out / f"refreshed-s{seed}", "--seed", seed, "--overwrite",
                 "--rm_refresh", REFRESH)
        rows.append(row("refreshed RM (hackable)", seed, s))
        s = rlhf("pipeline", "recipes/tiny/pipeline.yaml", "--output_dir", out / f"normal-s{seed}", "--seed", seed,
                 "--overwrite", *ALARM)
        rows.append(row("normal tiny pipeline", seed, s["ppo"]))
        print(json.dumps(rows[-3:]), flush=True)
    (out / "overopt.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| run | seed | SFT gold | final gold | proxy start → end | KL (nats/seq) | alarms at | best gold (iteration) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['seed']} | {r['sft_gold']:.3f} | {r['gold']:.3f} | {r['proxy_start']:.2f} → "
              f"{r['proxy']:.2f} | {r['kl']:.2f} | {r['alarms'] or '–'} | {r['best_gold']:.3f} "
              f"({r['best_gold_iteration']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The SmolLM2-135M table and curves of docs/results.md, from finished pipeline runs.

    rlhf pipeline recipes/smollm2-135m/pipeline.yaml --output_dir runs/smollm2-s0 --seed 0   # ~35 min each
    rlhf pipeline recipes/smollm2-135m/pipeline.yaml --output_dir runs/smollm2-s1 --seed 1
    python tools/smollm2_results.py "GPT-2-style RM, seed 0=runs/smollm2-s0" "seed 1=runs/smollm2-s1" \
        --png docs/img/smollm2_gold_kl.png

Each argument is LABEL=RUN, RUN a pipeline run folder (sft/ rm/ ppo/) or a PPO run folder. Prints a
markdown table: held-out gold accuracy (T = 1) of the SFT policy (PPO's evaluation before its first
iteration, on the same prompts) and after PPO, the gain, the KL to the SFT policy and the RM score on
the held-out prompts, and each stage's time and their sum. --png draws gold accuracy and KL against the iteration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def read_run(folder: str) -> dict:
    root = Path(folder)
    ppo = root / "ppo" if (root / "ppo").is_dir() else root
    evals = [r for r in map(json.loads, (ppo / "metrics.jsonl").read_text().splitlines())
             if "eval_gold_accuracy" in r]
    s = _load(ppo / "summary.json")
    seconds = {st: _load(root / st / "summary.json").get("train_seconds") for st in ("sft", "rm")}
    seconds["ppo"] = s.get("train_seconds") or s.get("seconds")
    return {"evals": evals, "ppo": s, "seconds": seconds}


def table(runs: dict[str, dict]) -> str:
    head = ("| run | SFT gold (T = 1) | after PPO | gain | KL (nats/seq) | RM score | SFT / RM / PPO s | stages in all |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = []
    for label, r in runs.items():
        first, last = r["evals"][0], r["evals"][-1]
        sec = r["seconds"]
        times = " / ".join("–" if sec.get(k) is None else f"{sec[k]:.0f}" for k in ("sft", "rm", "ppo"))
        parts = [sec.get(k) for k in ("sft", "rm", "ppo")]  # (a resumed pipeline's own total counts the last part)
        total = "–" if None in parts else f"{sum(parts) / 60:.1f} min"
        rows.append(f"| {label} | {first['eval_gold_accuracy']:.3f} | {last['eval_gold_accuracy']:.3f} (it "
                    f"{last['step']}) | **{100 * (last['eval_gold_accuracy'] - first['eval_gold_accuracy']):+.1f}** "
                    f"| {last['eval_kl']:.2f} | {first['eval_reward']:.2f} → {last['eval_reward']:.2f} | {times} "
                    f"| {total} |")
    return "\n".join([head, *rows])


def plot(runs: dict[str, dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_g, ax_k) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, r in runs.items():
        steps = [e["step"] for e in r["evals"]]
        ax_g.plot(steps, [e["eval_gold_accuracy"] for e in r["evals"]], marker="o", label=label)
        ax_k.plot(steps, [e["eval_kl"] for e in r["evals"]], marker="o", label=label)
    ax_g.set(title="held-out gold accuracy (T = 1)", xlabel="PPO iteration")
    ax_k.set(title="KL to the SFT policy (nats / sequence)", xlabel="PPO iteration")
    ax_k.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax_g.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_FOLDER")
    ap.add_argument("--png", help="write the gold / KL curves here")
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        runs[label or folder] = read_run(folder)
    print(table(runs))
    if args.png:
        plot(runs, args.png)


if __name__ == "__main__":
    main()

"""`rlhf compare`: PPO, the critic-free estimators and DPO from one SFT policy and one RM, x seeds.

A compare recipe is a pipeline recipe (`sft:`, `rm:`, and base `ppo:` / `dpo:` sections) plus

    seeds: [0, 1, 2]
    methods:
      ppo: {}                                            # the base ppo section as it is
      grpo: {advantage_estimator: grpo, samples_per_prompt: 4}
      dpo: {stage: dpo}                                  # the base dpo section

Each method is its base section with its overrides (dotted keys allowed) and a seed; every
method/seed pair runs in its own process (its wall time and peak memory are its own) into
D/runs/METHOD/seedS from the same D/sft and D/rm. Every PPO-family
method must generate the same number of samples (steps x rollout_batch_size): the comparison is
at an equal sampling budget; DPO trains on the RM's preference pairs and samples nothing. Runs
already complete in D are reused; `--resume` continues interrupted ones (without it they start
over). The results: D/compare.json (every run and the mean and std per method), D/compare.md
(the table) and D/compare.png (held-out gold accuracy against KL to the SFT policy, one point per
run: the frontier a reader looks for).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import statistics
from pathlib import Path

from ..config import (CompareConfig, ConfigError, DPOConfig, PPOConfig, apply_overrides, from_dict, read_yaml,
                      recipe_changes, to_dict)
from ..engine import RunError, atomic_write_text, world_size, write_summary
from ..rundir import compare_folder_problem, hold_compare, release, staging_path
from .pipeline import check_later_stages

log = logging.getLogger(__name__)

# eval_rm_score: the RM alone on the held-out samples, the one reward measure DPO and PPO share (eval_reward is
# the PPO recipe's whole reward: its reward functions, weights and missing-EOS penalty too)
MEASURES = ("eval_gold_accuracy", "eval_rm_score", "eval_reward", "eval_kl", "train_seconds", "peak_rss_mb")


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def method_configs(cfg: CompareConfig, sft_dir: Path, rm_dir: Path | None) -> dict[tuple[str, int], tuple[str, object]]:
    """{(method, seed): (stage, config)}, each built and checked now (a typo costs seconds)."""
    if not cfg.methods or not cfg.seeds:
        raise ConfigError("recipe: a compare recipe needs 'methods' and 'seeds'", "methods")
    runs, budgets = {}, {}
    for name, spec in cfg.methods.items():
        if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):  # each method's runs are folders NAME/seedS
            raise ConfigError(f"methods: method name {name!r} must be a plain folder name (letters, digits and "
                              f"_ . + -, starting with a letter or digit; no '/')", "methods")
        if not isinstance(spec, dict | None):
            raise ConfigError(f"methods.{name}: expected a mapping of the fields it changes, got {spec!r}",
                              f"methods.{name}")
        spec = dict(spec or {})
        for key in ("output_dir", "seed"):  # set by compare itself: D/NAME/seedS, and each of `seeds`
            if key in spec:
                raise ConfigError(f"methods.{name}.{key}: set by rlhf compare for every run (its folder is "
                                  f"D/{name}/seedS, its seed each of 'seeds'); remove it", f"methods.{name}.{key}")
        stage = spec.pop("stage", "ppo")
        if stage not in ("ppo", "dpo"):
            raise ConfigError(f"methods.{name}.stage: must be ppo or dpo, got {stage!r}", f"methods.{name}.stage")
        base = to_dict(cfg.ppo if stage == "ppo" else cfg.dpo)
        if base["model"].get("init", "pretrained") == "pretrained":
            base["model"]["name_or_path"] = base["model"]["name_or_path"] or str(sft_dir)
        if rm_dir is not None and base.get("reward_model") is None:
            base["reward_model"] = str(rm_dir)
        if stage == "dpo" and rm_dir is not None and cfg.rm.sample is not None:
            # the rankings of the SFT policy's own samples the RM learnt from (and through it every
            # PPO-family method): DPO learns from the same preferences
            train = base["data"]["train"]
            base["data"]["train"] = [*(train if isinstance(train, list) else [train] if train else []),
                                     str(rm_dir / "sampled_rankings.jsonl")]
        for seed in cfg.seeds:
            doc = apply_overrides(copy.deepcopy(base), {**spec, "seed": seed})
            try:
                run_cfg = from_dict(PPOConfig if stage == "ppo" else DPOConfig, doc)
            except ConfigError as e:
                raise ConfigError(f"methods.{name}: {e}", f"methods.{name}") from None
            runs[(name, seed)] = (stage, run_cfg)
            if stage == "ppo":
                budgets[name] = run_cfg.steps * run_cfg.rollout_batch_size
    if len(set(budgets.values())) > 1:
        raise ConfigError(f"methods: the PPO-family methods must generate the same number of samples (steps x "
                          f"rollout_batch_size), got {budgets}", "methods")
    evals = {name: _evaluation(stage, c) for (name, _), (stage, c) in runs.items()}
    if len(set(evals.values())) > 1:  # the table compares measurements: one held-out set, one way of sampling it
        raise ConfigError("methods: every method must be evaluated alike (held-out prompts file, eval_samples, "
                          "max_new_tokens, temperature), got " + "; ".join(f"{n}: {e}" for n, e in evals.items()),
                          "methods")
    if any(e[0] is None for e in evals.values()):
        raise ConfigError("recipe: a compare recipe needs 'ppo.data.eval' (held-out prompts every method is "
                          "evaluated on; a split of the training prompts would differ by seed and from DPO's)",
                          "ppo.data.eval")
    return runs


def _evaluation(stage: str, c) -> tuple:
    """(held-out prompts file, eval_samples, max_new_tokens, temperature) of one run's evaluation."""
    prompts = c.data.eval if stage == "ppo" else c.eval_prompts
    return (str(prompts) if prompts else None, c.eval_samples, c.max_new_tokens, c.temperature)


def run_compare(cfg: CompareConfig, output_dir: str | None = None, overwrite: bool = False, resume: bool = False,
                run_stage=None) -> dict:
    """SFT and RM once, then every method x seed; reuses what is complete. `run_stage` runs one
    stage (:func:`rlhf.stages.run`, which calls this)."""
    root = Path(output_dir or cfg.output_dir or "")
    if not str(root) or str(root) == ".":
        raise RunError("no output directory: pass --output_dir or set output_dir in the recipe")
    if world_size() > 1:
        raise RunError("rlhf compare runs as one process (it starts each run in its own); to give the runs several "
                       "processes, launch the stages' recipes with torchrun / accelerate launch")
    sft_dir, rm_dir = root / "sft", root / "rm"
    has_rm = bool(cfg.rm.data.train or cfg.rm.sample is not None)
    runs = method_configs(cfg, sft_dir, rm_dir if has_rm else None)  # checked before anything runs
    # the inputs of every stage still to run (its data, reward functions, models), before the first trains
    to_run = {stage for (method, seed), (stage, _) in runs.items()
              if not (root / "runs" / method / f"seed{seed}" / "summary.json").exists()}
    check_later_stages(cfg, ["sft", *(["rm"] if has_rm and not (rm_dir / "summary.json").exists() else []),
                             *sorted(to_run)])
    if overwrite:
        raise RunError("rlhf compare reuses the runs complete in its folder: remove the folder to start over")
    problem = compare_folder_problem(root)  # (a live run's folder, another run's, or the user's own files)
    if problem:
        raise RunError(problem)
    held = hold_compare(root)
    try:
        return _run_methods(cfg, root, runs, resume, run_stage)
    finally:
        release(held)


def _run_methods(cfg: CompareConfig, root: Path, runs: dict, resume: bool, run_stage) -> dict:
    """SFT and RM in this process (unless complete), then each method x seed in its own."""
    sft_dir, rm_dir = root / "sft", root / "rm"
    has_rm = bool(cfg.rm.data.train or cfg.rm.sample is not None)

    def once(stage: str, stage_cfg, folder: Path) -> dict:
        if (folder / "summary.json").exists():
            saved = read_yaml(folder / "recipe.yaml") if (folder / "recipe.yaml").exists() else None
            changed = recipe_changes(saved, keys_in(to_dict(stage_cfg), saved)) if saved is not None else []
            if changed:  # (the methods would be compared from another SFT policy or RM than the recipe's)
                raise RunError(f"{folder}: made from another recipe than this comparison's {stage} section "
                               f"({'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); remove it (and "
                               f"the runs made from it) to run it again")
            return json.loads((folder / "summary.json").read_text())
        interrupted = staging_path(folder).exists()
        return run_stage(stage, stage_cfg, str(folder), overwrite=interrupted and not resume,
                         resume=interrupted and resume)

    once("sft", cfg.sft, sft_dir)
    if has_rm:
        if cfg.rm.model.init == "pretrained":
            cfg.rm.model.name_or_path = cfg.rm.model.name_or_path or str(sft_dir)
        if cfg.rm.sample is not None and cfg.rm.sample.checkpoint is None:
            cfg.rm.sample.checkpoint = str(sft_dir)
        once("rm", cfg.rm, rm_dir)
    results = []
    for i, ((method, seed), (stage, run_cfg)) in enumerate(runs.items(), 1):
        log.info("compare: run %d of %d: %s, seed %d", i, len(runs), method, seed)
        summary = run_apart(stage, run_cfg, root / "runs" / method / f"seed{seed}", resume)
        results.append({"method": method, "seed": seed, "stage": stage,
                        **{k: summary.get(k) for k in ("initial_eval_gold_accuracy", *MEASURES)}})
    return write_comparison(root, cfg, results, runs)


def keys_in(now: dict, saved: dict) -> dict:
    """`now` without the keys `saved` lacks (a field a later rlhf added reads as None -> its default,
    which is no change of recipe)."""
    return {k: keys_in(v, saved[k]) if isinstance(v, dict) and isinstance(saved.get(k), dict) else v
            for k, v in now.items() if k in saved}


def run_apart(stage: str, run_cfg, folder: Path, resume: bool) -> dict:
    """One method x seed in its own `rlhf` process, so its wall time and peak memory are its own
    (the recipe it ran is kept beside it as FOLDER.yaml). A complete run is reused."""
    import os
    import subprocess
    import sys

    import yaml

    recipe = folder.with_suffix(".yaml")
    wanted = yaml.safe_dump(to_dict(run_cfg), sort_keys=False, width=float("inf"))
    if (folder / "summary.json").exists():
        if recipe.exists() and recipe.read_text() != wanted:
            raise RunError(f"{folder}: made from another recipe than this comparison's ({recipe} differs); remove it "
                           f"to run it again")
        return json.loads((folder / "summary.json").read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(wanted)
    interrupted = staging_path(folder).exists()
    flags = (["--resume"] if resume else ["--overwrite"]) if interrupted else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    with subprocess.Popen([sys.executable, "-m", "rlhf", stage, str(recipe), "--output_dir", str(folder), *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as p:
        try:
            _, err = p.communicate()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM here: the run stops as itself, its folder marked
            stop_child(p)
            raise
    if p.returncode != 0:
        last = [line for line in err.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RunError(f"{folder}: the {stage} run failed (exit {p.returncode}): {last[0]}")
    return json.loads((folder / "summary.json").read_text())


def stop_child(p, grace: float = 10.0, patience: float = 60.0) -> None:
    """Stop a run's process `p` the way it can clean up after: it usually got the same signal (a
    terminal's Ctrl-C, a job's SIGTERM to its process group) and is given `grace` seconds to stop by
    itself; otherwise it gets one SIGTERM (a second would end it at once: rlhf.cli) and `patience`
    seconds to mark its folder and exit, and is killed only after that. (subprocess.run killed it
    outright, leaving its folder unmarked.)"""
    import subprocess

    for wait, then in ((grace, p.terminate), (patience, p.kill)):
        try:
            p.communicate(timeout=wait)  # (reads its pipes: a child blocked writing to them stops too)
            return
        except subprocess.TimeoutExpired:
            then()
    p.communicate()


def write_comparison(root: Path, cfg: CompareConfig, results: list[dict], runs: dict) -> dict:
    """compare.json, compare.md and compare.png from the runs' summaries."""
    table = {}
    for method in cfg.methods:
        rows = [r for r in results if r["method"] == method]
        table[method] = {}
        for k in MEASURES:
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            if vals:
                table[method][k] = {"mean": statistics.fmean(vals),
                                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    budget = {m: (rc.steps * rc.rollout_batch_size if stage == "ppo" else None)
              for (m, _), (stage, rc) in runs.items()}
    sft = [r["initial_eval_gold_accuracy"] for r in results if r.get("initial_eval_gold_accuracy") is not None]
    out = {"seeds": list(cfg.seeds), "sft_eval_gold_accuracy": statistics.fmean(sft) if sft else None,
           "samples_per_run": budget, "runs": results, "table": table}
    atomic_write_text(root / "compare.json", json.dumps(out, indent=1) + "\n")
    atomic_write_text(root / "compare.md", comparison_markdown(out))
    plot_frontier(results, out["sft_eval_gold_accuracy"], root / "compare.png")
    write_summary(root, {"stage": "compare", "methods": list(cfg.methods), "seeds": list(cfg.seeds),
                         "table": table})
    return out


def comparison_markdown(out: dict) -> str:
    def cell(stats: dict | None, digits: int) -> str:
        if not stats:
            return "–"
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"

    lines = [f"Mean ± std over seeds {out['seeds']}. SFT policy's held-out gold accuracy: "
             f"{out['sft_eval_gold_accuracy'] if out['sft_eval_gold_accuracy'] is not None else '–'}.", "",
             "| method | gold accuracy | RM score | reward | KL to SFT (nats/seq) | wall time (s) | peak RSS (MB) | "
             "samples generated |", "|---|---|---|---|---|---|---|---|"]
    for method, t in out["table"].items():
        budget = out["samples_per_run"].get(method)
        reward = cell(t.get("eval_reward"), 3) if budget is not None else "–"  # (DPO has no PPO reward)
        lines.append(f"| {method} | {cell(t.get('eval_gold_accuracy'), 3)} | {cell(t.get('eval_rm_score'), 3)} | "
                     f"{reward} | "
                     f"{cell(t.get('eval_kl'), 3)} | {cell(t.get('train_seconds'), 1)} | "
                     f"{cell(t.get('peak_rss_mb'), 0)} | {budget if budget is not None else '0 (preference pairs)'} |")
    return "\n".join(lines) + "\n"


def plot_frontier(results: list[dict], sft_gold: float | None, path: Path) -> None:
    """Gold accuracy against KL to the SFT policy, one point per run, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in results):
        pts = [(r["eval_kl"], r["eval_gold_accuracy"]) for r in results
               if r["method"] == method and r.get("eval_kl") is not None and r.get("eval_gold_accuracy") is not None]
        if pts:
            ax.scatter(*zip(*pts), label=method, s=36, alpha=0.85)
    if sft_gold is not None:
        ax.scatter([0.0], [sft_gold], marker="*", s=140, color="black", label="SFT")
    ax.set_xlabel("KL to the SFT policy (nats per sequence, held-out samples)")
    ax.set_ylabel("held-out gold accuracy")
    ax.set_title("methods at an equal sampling budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""`rlhf pipeline`: SFT -> RM -> PPO, each stage reading the previous stage's output folder.

Stages write into OUTPUT_DIR/sft, OUTPUT_DIR/rm and OUTPUT_DIR/ppo. Where a later stage leaves
its model unset, it takes the earlier stage's output: the RM backbone (and the policy it samples
rankings from) is the SFT checkpoint; PPO's policy is the SFT checkpoint and its reward model the
RM checkpoint. A stage whose section has no training data is skipped (e.g. a PPO run driven by
Python reward functions only has no rm section).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..config import PipelineConfig
from ..engine import RunError, write_summary
from ..rundir import KIND


def stages_to_run(cfg: PipelineConfig) -> list[str]:
    """The stages whose sections have data (an RM may have only a `sample:` section), in order."""
    has = {"sft": cfg.sft.data.train, "rm": cfg.rm.data.train or cfg.rm.sample is not None,
           "ppo": cfg.ppo.data.train, "dpo": cfg.dpo.data.train}
    return [stage for stage, yes in has.items() if yes]


def check_later_stages(cfg: PipelineConfig, todo: list[str]) -> None:
    """Before the first stage trains: the inputs of the stages after it that no earlier stage
    makes (their data files and rows, reward functions imported, checkpoints the recipe names),
    so that a typo in the ppo: section is not found hours later, when PPO starts. What needs an
    earlier stage's output (token lengths, the reward functions' dry call on the prompts) is still
    checked when that stage starts. Each error names the stage's field."""
    from ..data.formats import load_examples, parse_preference, parse_prompt, parse_sft
    from ..models import check_policy_model, check_reward_model
    from ..rewards import load_reward_fn

    def data(stage: str, fld: str, spec, parser, limit: int | None) -> None:
        if spec:  # (read as far as the stage reads it: a bad row past its limit is no problem)
            c = getattr(cfg, stage)
            load_examples(spec, parser, skip_bad_rows=c.data.skip_bad_rows, field_name=f"{stage}.{fld}",
                          what=f"rows for {stage}.{fld}", split=c.data.split if fld == "data.train" else "train",
                          max_samples=limit)

    checks = []
    if "rm" in todo[1:]:
        checks += [("rm", "data.train", cfg.rm.data.train, parse_preference, cfg.rm.data.max_samples),
                   ("rm", "data.eval", cfg.rm.data.eval, parse_preference, None),
                   ("rm", "normalize_data", cfg.rm.normalize and cfg.rm.normalize_data, parse_sft,
                    cfg.rm.normalize_max_samples)]
        if cfg.rm.sample is not None:  # (the policy it samples is SFT's output: checked when the RM starts)
            checks += [("rm", "sample.prompts", cfg.rm.sample.prompts, parse_prompt, cfg.rm.sample.max_prompts),
                       ("rm", "sample.mix_with", cfg.rm.sample.mix_with, parse_preference, None)]
    if "ppo" in todo[1:]:
        checks += [("ppo", "data.train", cfg.ppo.data.train, parse_prompt, cfg.ppo.data.max_samples),
                   ("ppo", "data.eval", cfg.ppo.data.eval, parse_prompt, None),
                   ("ppo", "ptx_data", cfg.ppo.ptx_coef > 0 and cfg.ppo.ptx_data, parse_sft, None)]
    if "dpo" in todo[1:]:
        checks += [("dpo", "data.train", cfg.dpo.data.train, parse_preference, cfg.dpo.data.max_samples),
                   ("dpo", "eval_prompts", cfg.dpo.eval_prompts, parse_prompt, cfg.dpo.eval_samples)]
    for check in checks:
        data(*check)
    for stage in [s for s in ("ppo", "dpo") if s in todo[1:]]:
        c = getattr(cfg, stage)
        if c.model.init == "pretrained" and c.model.name_or_path and not c.model.gguf_file:
            check_policy_model(c.model.name_or_path, f"{stage}.model.name_or_path")
        for fld in ("reward_model", "gold_reward_model"):
            if getattr(c, fld, None):
                check_reward_model(getattr(c, fld), f"{stage}.{fld}")
    _check_later_batches(cfg, todo)
    if "rm" in todo[1:] and cfg.rm.sample is not None and cfg.rm.sample.judge != "none":
        load_reward_fn(cfg.rm.sample.judge or "judge")
    if "ppo" in todo[1:]:
        for spec in [*cfg.ppo.reward_fns, *cfg.ppo.gold_reward_fns]:
            load_reward_fn(spec.fn)
        refresh = cfg.ppo.rm_refresh
        if refresh is not None and refresh.judge not in (None, "human"):
            load_reward_fn(refresh.judge)


def _check_later_batches(cfg: PipelineConfig, todo: list[str]) -> None:
    """The later stages' batches split over the processes this job has, and their DeepSpeed JSONs
    read and checked: both were found only when that stage started."""
    from ..engine import grad_accum_steps, launcher_deepspeed, read_deepspeed_json, world_size
    from .dpo import check_dpo_engine
    from .ppo import batch_split
    from .ppo_setup import COMPILE_DEEPSPEED

    world = world_size()
    for stage in [s for s in ("rm", "dpo") if s in todo[1:]]:
        tc = getattr(cfg, stage).train
        grad_accum_steps(tc.batch_size, tc.micro_batch_size, world, f"{stage}.train")
        if tc.deepspeed and stage != "dpo":  # (rlhf dpo refuses DeepSpeed itself, naming the key)
            read_deepspeed_json(tc.deepspeed, f"{stage}.train.deepspeed")
    if "ppo" in todo[1:]:  # (its reward model, unset, is the RM stage's output)
        batch_split(dataclasses.replace(cfg.ppo, reward_model=cfg.ppo.reward_model or "rm/"), world, "ppo.")
        if cfg.ppo.deepspeed:
            read_deepspeed_json(cfg.ppo.deepspeed, "ppo.deepspeed")
        if cfg.ppo.compile is True and (cfg.ppo.deepspeed or launcher_deepspeed()):
            raise RunError(COMPILE_DEEPSPEED.replace("'compile", "'ppo.compile"))
    if "dpo" in todo[1:]:  # (DDP only)
        check_dpo_engine(cfg.dpo, "dpo.")


def run_pipeline(cfg: PipelineConfig, output_dir: str | None = None, overwrite: bool = False,
                 resume: bool = False, run_stage=None) -> dict:
    """The whole pipeline is one run folder: a new pipeline is written into a staging folder and
    replaces the old one only when its last stage has finished (:mod:`rlhf.rundir`); its stages
    write in place inside it. `run_stage` runs one stage (:func:`rlhf.stages.run`, which calls this)."""
    from ..engine import finish_folder, finished_summary, make_accelerator, open_run, prepare_output_dir, save_recipe

    run = run_stage
    todo = stages_to_run(cfg)
    if not todo:  # (an empty or mis-sectioned recipe would "finish" having run nothing)
        raise RunError("recipe: no stage to run: give at least one of sft, rm, ppo, dpo a 'data.train' "
                       "(or rm a 'sample' section)")
    # the Accelerator (not a bare PartialState) first: it sets up gloo for multi-process CPU runs
    acc = make_accelerator(cfg.sft.train.mixed_precision)
    rf = open_run(acc, output_dir or cfg.output_dir, overwrite, resume, "pipeline", cfg)
    if rf.done:
        return finished_summary(rf, cfg)
    check_later_stages(cfg, [s for s in todo if not (resume and (rf.work / s / "summary.json").exists())])
    if rf.problem:
        raise RunError(rf.problem)
    root = prepare_output_dir(acc, rf, overwrite, resume)
    save_recipe(acc, cfg, root, resume)  # (resumed: kept, and each key the new recipe changes named, as a stage does)

    def started(stage_dir: Path) -> bool:  # --resume continues the stage it stopped in; later ones start anew
        return resume and any((stage_dir / f).exists() for f in ("recipe.yaml", KIND))

    t0 = time.time()
    summary: dict = {"stages": []}
    sft_dir, rm_dir = root / "sft", root / "rm"
    if "sft" in todo:
        summary["sft"] = run("sft", cfg.sft, str(sft_dir), overwrite, started(sft_dir))
        summary["stages"].append("sft")
    if "rm" in todo:
        if cfg.rm.model.name_or_path is None and cfg.rm.model.init == "pretrained":
            cfg.rm.model.name_or_path = str(sft_dir)
        if cfg.rm.sample is not None and cfg.rm.sample.checkpoint is None:
            cfg.rm.sample.checkpoint = str(sft_dir)
        summary["rm"] = run("rm", cfg.rm, str(rm_dir), overwrite, started(rm_dir))
        summary["stages"].append("rm")
    if "ppo" in todo:
        if cfg.ppo.model.name_or_path is None and cfg.ppo.model.init == "pretrained":
            cfg.ppo.model.name_or_path = str(sft_dir)
        if cfg.ppo.reward_model is None and "rm" in summary:
            cfg.ppo.reward_model = str(rm_dir)
        summary["ppo"] = run("ppo", cfg.ppo, str(root / "ppo"), overwrite, started(root / "ppo"))
        summary["stages"].append("ppo")
    if "dpo" in todo:  # DPO from the same SFT policy, in place of (or beside) RM + PPO
        if cfg.dpo.model.name_or_path is None and cfg.dpo.model.init == "pretrained":
            cfg.dpo.model.name_or_path = str(sft_dir)
        if cfg.dpo.reward_model is None and "rm" in summary:
            cfg.dpo.reward_model = str(rm_dir)  # scores the held-out samples only: the methods compare
        summary["dpo"] = run("dpo", cfg.dpo, str(root / "dpo"), overwrite, started(root / "dpo"))
        summary["stages"].append("dpo")
    summary["total_seconds"] = round(time.time() - t0, 1)
    if acc.is_main_process:
        write_summary(root, summary)
        from ..report import report_after_run

        report_after_run(root)
    finish_folder(acc, root)
    return summary

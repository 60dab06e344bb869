"""The three InstructGPT stages and the pipeline that chains them."""

from __future__ import annotations


def run(stage: str, cfg, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    if stage == "sft":
        from .sft import run_sft

        return run_sft(cfg, output_dir, overwrite, resume)
    if stage == "rm":
        from .rm import run_rm

        return run_rm(cfg, output_dir, overwrite, resume)
    if stage == "ppo":
        from .ppo import run_ppo

        return run_ppo(cfg, output_dir, overwrite, resume)
    if stage == "pipeline":
        from .pipeline import run_pipeline

        return run_pipeline(cfg, output_dir, overwrite, resume)
    raise ValueError(f"unknown stage {stage}")

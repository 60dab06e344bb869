"""The three InstructGPT stages and the pipeline that chains them."""

from __future__ import annotations

from ..errors import RunError

CURRENT: list[str] = []
"""The stage running now (a pipeline runs several): errors about a recipe key are located in its section."""


def run(stage: str, cfg, output_dir: str | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    """Run one stage (or the pipeline). If it stops with an error, the run folder it was writing
    is cleaned up: a staged run without a checkpoint is removed, one with a checkpoint is kept,
    marked FAILED and resumable (the error message says where)."""
    from ..engine import OPEN_RUNS, fail_open_runs, matmul_settings, restore_matmul_settings, retain_freed_cpu_memory, \
        user_errors

    retain_freed_cpu_memory()  # freed tensors' memory is reused, not page-faulted in again (engine.py)
    opened = len(OPEN_RUNS)  # (a pipeline's stages run inside it: each cleans up only what it opened)
    caller = matmul_settings()  # the caller's matmul precision and attention, given back after the stage's own
    try:
        return _run(stage, cfg, output_dir, overwrite, resume)
    except BaseException as e:
        from accelerate import PartialState

        try:
            try:
                main = PartialState().is_main_process
            except Exception:  # (the process group never started: one process, or this one's view of it)
                main = True
            note = fail_open_runs(e, main, since=opened)
        except OSError:  # (the folder cannot be written at all: the error below says so; nothing to clean up)
            note = ""
        if isinstance(e, KeyboardInterrupt) and note and not e.args:  # (Ctrl-C, SIGTERM: where to resume)
            e.args = (note.replace("fix the cause and pass --resume", "pass --resume to continue it"),)
        disk = unwritable(e)
        if disk:  # a full disk, a read-only file system, no permission: one line, not a traceback
            raise RunError(f"{disk}{note}") from None
        if peer_gone(e):  # another process failed (and said why) inside a collective: not a second traceback
            raise RunError(f"another process of this job stopped while this one waited for it in a collective "
                           f"(its error is in its log; here: {str(e).strip().splitlines()[0][:200]}){note}") from None
        if note and isinstance(e, user_errors()) and note not in str(e) and "resumable from" not in str(e):
            noted = type(e)(f"{e}{note}")
            noted.key = getattr(e, "key", None)  # (a ConfigError's key: the CLI locates it)
            raise noted from None
        raise
    finally:
        restore_matmul_settings(caller)


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
"""What gloo (and torch.distributed's store) say when another process of the job has exited."""


def peer_gone(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another process of the job exited: that
    process printed its own error (one line for bad input, a full disk, a reward function), and
    this one printed a gloo traceback beside it."""
    import torch.distributed as dist

    from ..engine import user_errors

    return isinstance(e, RuntimeError) and not isinstance(e, user_errors()) and any(k in str(e) for k in PEER_GONE) \
        and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwritable(e: BaseException) -> str | None:
    """The one-line message for an OSError a user fixes outside rlhf (a full disk or quota, a
    read-only file system, no permission), naming the path; None for any other error."""
    import errno
    import os

    from ..textio import DISK_ERRNOS

    if not isinstance(e, OSError) or e.errno not in DISK_ERRNOS:
        return None
    path = f" {e.filename}" if e.filename else ""
    return f"cannot write{path}: {e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"


def _run(stage: str, cfg, output_dir: str | None, overwrite: bool, resume: bool) -> dict:
    CURRENT[:] = [stage]
    if stage == "sft":
        from .sft import run_sft

        return run_sft(cfg, output_dir, overwrite, resume)
    if stage == "rm":
        from .rm import run_rm

        return run_rm(cfg, output_dir, overwrite, resume)
    if stage == "ppo":
        from .ppo import run_ppo

        return run_ppo(cfg, output_dir, overwrite, resume)
    if stage == "dpo":
        from .dpo import run_dpo

        return run_dpo(cfg, output_dir, overwrite, resume)
    if stage == "pipeline":
        from .pipeline import run_pipeline

        return run_pipeline(cfg, output_dir, overwrite, resume, run_stage=run)
    if stage == "compare":
        from .compare import run_compare

        return run_compare(cfg, output_dir, overwrite, resume, run_stage=run)
    raise ValueError(f"unknown stage {stage}")

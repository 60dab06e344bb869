"""Resumable checkpoints: atomic, kept K at a time, exact on resume.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-NNNNNNNN/``:

- ``<name>.safetensors`` — each trained model's weights (policy, value, ...) and the EMA;
- ``<name>.optim.pt`` / ``<name>.sched.pt`` — optimizer and LR-scheduler state dicts
  (plain tensors and numbers: loaded with ``torch.load(weights_only=True)``);
- under DeepSpeed, ``<name>/`` instead of the first two — the engine's own resumable checkpoint
  (``engine.save_checkpoint``): the ZeRO-partitioned weights and optimizer states, one file per
  process, reloaded by the same number of processes (a DeepSpeed checkpoint is torch-pickled: it
  is only ever read back from a run's own output folder); ``ema-rank<R>.safetensors`` —
  each process's shard of a ZeRO-3 EMA;
- ``state-rank<R>.json`` — what differs between processes (running metric sums);
- ``rng-rank<R>.pt`` — every RNG of process R: python, numpy, torch (CPU and, once used, its
  CUDA device) and the stage's own generators, wherever they live (torch tensors and lists only);
- ``state.json`` — the step, data position, KL controller, reward statistics, the fp16 loss
  scale, and whatever else the stage needs to continue exactly.

It is written into ``checkpoints/.tmp-step-NNNNNNNN`` and renamed into place, so a crash (even
``kill -9``) during the write never leaves a broken latest checkpoint; a leftover temporary
folder is ignored and removed by the next save. Only the ``keep`` newest checkpoints remain.
Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import RunError
from .faults import fault_point
from .textio import disk_errors

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
PREFIX = "step-"


def checkpoint_root(out: Path) -> Path:
    return Path(out) / CKPT_DIR


def list_checkpoints(out: Path) -> list[Path]:
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
            and (p / "state.json").is_file()]  # (not a copy a file manager made: 'step-00000002 copy')
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = list_checkpoints(out)
    return ckpts[-1] if ckpts else None


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def rng_snapshot(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG state of this process now, to checkpoint later as if saved at this moment."""
    return _rng_state(generators)


def _set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for k, g in generators.items():
        try:
            g.set_state(state["generators"][k])
        except RuntimeError:  # written by a generator on another device (CPU vs CUDA: different states)
            import logging

            logging.getLogger(__name__).warning(
                "the '%s' generator's state was saved on another kind of device; it keeps its seed here, so "
                "sampling after this resume is not the uninterrupted run's", k)


@dataclass
class CheckpointParts:
    """What a stage's resumable checkpoint holds besides its state.json, each by name."""

    models: dict
    """Trained models, or DeepSpeed engines (each saves its weights and optimizer states itself)."""
    optimizers: dict = field(default_factory=dict)
    """Optimizers (those a DeepSpeed engine owns are skipped)."""
    schedulers: dict = field(default_factory=dict)
    generators: dict = field(default_factory=dict)
    """The stage's own torch generators (saved per process with the global RNGs)."""
    extra_tensors: dict | None = None
    """{name: {key: tensor}} written by the main process (e.g. the EMA)."""
    sharded_tensors: dict | None = None
    """{name: {key: tensor}} written by every process: its own shard (e.g. a ZeRO-3 EMA)."""


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file: a full disk is an OSError (ENOSPC), not torch's
    "unexpected pos" RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(acc, out: Path, step: int, parts: CheckpointParts, *, state: dict, keep: int = 2,
                    rank_state: dict | None = None, rng_state: dict | None = None) -> Path | None:
    """Write checkpoint `step` atomically (collective: every process calls it). Returns its path.

    `rank_state` is written by every process (what differs between them, e.g. each one's running
    loss sums) and returned as state["rank"] on resume. `rng_state` (from :func:`rng_snapshot`)
    saves the RNGs as they were then instead of now."""
    from safetensors.torch import save_file, save_model

    models, optimizers, schedulers = parts.models, parts.optimizers, parts.schedulers
    generators, extra_tensors, sharded_tensors = parts.generators, parts.extra_tensors, parts.sharded_tensors

    from .models import unwrap

    root = checkpoint_root(out)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    with disk_errors(tmp):  # a full disk: one line naming the folder, not torch's RuntimeError
        _torch_save(rng_state or _rng_state(generators or {}), tmp / f"rng-rank{acc.process_index}.pt")
        if rank_state is not None:
            (tmp / f"state-rank{acc.process_index}.json").write_text(json.dumps(rank_state))
        for name, model in models.items():
            if _is_engine(model):  # collective: each process writes its partitions (and its optimizer states)
                model.save_checkpoint(str(tmp), tag=name, save_latest=False)
        for name, tensors in (sharded_tensors or {}).items():
            shard = {k: v.contiguous() for k, v in tensors.items()}
            save_file(shard, str(tmp / f"{name}-rank{acc.process_index}.safetensors"))
        if acc.is_main_process:
            for name, model in models.items():
                if not _is_engine(model):
                    save_model(unwrap(model), str(tmp / f"{name}.safetensors"))
            for name, tensors in (extra_tensors or {}).items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
            for name, opt in optimizers.items():
                if not _is_engine_optimizer(opt):
                    _torch_save(_plain_optimizer(opt).state_dict(), tmp / f"{name}.optim.pt")
            for name, sched in schedulers.items():
                _torch_save(sched.state_dict(), tmp / f"{name}.sched.pt")
        fault_point("checkpoint")  # tests kill the process here, mid-write
        engines = sorted(name for name, model in models.items() if _is_engine(model))
        scaler = getattr(acc, "scaler", None)  # fp16: the loss scale and its growth tracker
        (tmp / "state.json").write_text(json.dumps({"step": step, **state, "num_processes": acc.num_processes,
                                                    "models": sorted(models), "deepspeed_engines": engines,
                                                    "deepspeed_zero": _zero_layout(models),
                                                    "grad_scaler": scaler.state_dict() if scaler else None}, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: the checkpoint appears whole or not at all
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _check_same_models(ckpt: Path, state: dict, models: dict) -> None:
    """A one-line RunError when the checkpoint lacks a model this run trains: the recipe
    changed since it was written (a critic-free PPO run resumed with GAE, which adds the value model).
    Its files are then intact, and deleting it (the advice for a damaged one) would lose the run.
    Checkpoints written before state.json recorded its models: a model with neither weights nor an
    optimizer state in the folder counts as absent, not as damage."""
    saved = state.get("models")
    if saved is None:
        saved = [n for n in models if (ckpt / f"{n}.safetensors").exists() or (ckpt / f"{n}.optim.pt").exists()
                 or (ckpt / n).is_dir()]
    absent = [n for n in models if n not in saved]
    if absent:  # (a model it holds that this run lacks is left unread: the recipe change is warned of)
        raise RunError(f"{ckpt}: holds no {', '.join(absent)} model, which this run trains (the recipe changed since "
                       f"it was written: advantage_estimator, value_init, rm_refresh, ...); resume with the recipe "
                       f"that wrote it (its recipe.yaml), or start a new run")


def load_checkpoint(acc, ckpt: Path, parts: CheckpointParts) -> dict:
    """Restore everything `save_checkpoint` wrote into `parts`; returns state.json's content."""
    from safetensors.torch import load_model

    from .models import unwrap

    models, optimizers, schedulers, generators = parts.models, parts.optimizers, parts.schedulers, parts.generators

    state = json.loads((ckpt / "state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise DamagedCheckpoint("state.json holds no checkpoint state (an object with an integer 'step')")
    _check_compatible(acc, ckpt, state, models)
    _check_same_models(ckpt, state, models)
    for name, model in models.items():
        if _is_engine(model):
            path, _ = model.load_checkpoint(str(ckpt), tag=name, load_optimizer_states=True,
                                            load_lr_scheduler_states=False, load_module_strict=True)
            if path is None:
                raise RuntimeError(f"{ckpt / name}: DeepSpeed could not load this checkpoint")
        else:
            load_model(unwrap(model), str(ckpt / f"{name}.safetensors"), strict=True)
    for name, opt in optimizers.items():
        if not _is_engine_optimizer(opt):
            _plain_optimizer(opt).load_state_dict(torch.load(ckpt / f"{name}.optim.pt", weights_only=True))
    for name, sched in schedulers.items():
        sched.load_state_dict(torch.load(ckpt / f"{name}.sched.pt", weights_only=True))
    if state.get("grad_scaler") and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(state["grad_scaler"])
    written_by = state.get("num_processes", acc.num_processes)
    if written_by > acc.num_processes and acc.is_main_process:  # (processes acc.num_processes.. are not restored)
        dropped = ", ".join(map(str, range(acc.num_processes, written_by)))
        log.warning("%s: written by %d processes, resumed on %d: the random state and running sums of process(es) %s "
                    "are not restored and their rollouts/batches are drawn anew; the run goes on, but not as an "
                    "uninterrupted one would (resume on %d for that)", ckpt, written_by, acc.num_processes, dropped,
                    written_by)
    rng = ckpt / f"rng-rank{acc.process_index}.pt"
    if rng.exists() or written_by == acc.num_processes:
        # every process that wrote the checkpoint wrote one: missing, the checkpoint is damaged (FileNotFoundError)
        _set_rng_state(torch.load(rng, weights_only=True), generators or {})
    else:  # more processes than wrote it (plain checkpoints only): this one starts its random streams anew
        log.warning("%s: written by %d processes, resumed on %d: process %d has no random state to restore; "
                    "the run goes on, but not as an uninterrupted one would (resume on %d for that)", ckpt,
                    state["num_processes"], acc.num_processes, acc.process_index, state["num_processes"])
    rank_file = ckpt / f"state-rank{acc.process_index}.json"
    if rank_file.exists():
        state["rank"] = json.loads(rank_file.read_text())
    return state


def _is_engine(model) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, DeepSpeedEngine)


def _zero_layout(models: dict) -> dict | None:
    """What a DeepSpeed checkpoint's partitions depend on: the ZeRO stage and where the optimizer
    states and weights live (None without DeepSpeed). Resuming under another layout failed inside
    DeepSpeed (a bare AssertionError, or a KeyError at the first step after resuming)."""
    engine = next((m for m in models.values() if _is_engine(m)), None)
    if engine is None:
        return None

    def where(offload) -> str:  # (an offload config's device: an enum of 'none', 'cpu', 'nvme')
        device = getattr(offload, "device", None)
        return str(getattr(device, "value", device) or "none")

    return {"stage": int(engine.zero_optimization_stage()), "offload_optimizer": where(engine.zero_offload_optimizer()),
            "offload_param": where(engine.zero_offload_param())}


def _said(layout: dict) -> str:
    return f"ZeRO-{layout['stage']} (offload_optimizer: {layout['offload_optimizer']}, offload_param: " \
           f"{layout['offload_param']})"


def _is_engine_optimizer(opt) -> bool:
    """accelerate's wrapper of a DeepSpeed engine's optimizer (the engine checkpoints it)."""
    return type(opt).__name__ == "DeepSpeedOptimizerWrapper"


def _check_compatible(acc, ckpt: Path, state: dict, models: dict) -> None:
    """A DeepSpeed checkpoint resumes under DeepSpeed on the process count that wrote it (one
    partition of the weights and optimizer states each); a plain one resumes without DeepSpeed."""
    saved = state.get("deepspeed_engines", [])
    now = sorted(name for name, model in models.items() if _is_engine(model))
    if saved != now:
        how = ["without DeepSpeed", "under DeepSpeed"]
        raise RunError(f"{ckpt}: written {how[bool(saved)]}, resumed {how[bool(now)]}; resume with the same "
                       f"'deepspeed' setting and process count")
    layout, layout_now = state.get("deepspeed_zero"), _zero_layout(models)
    # another stage partitions differently; optimizer states moved to an offload device failed at the first step
    # (DeepSpeed's KeyError 'bias_correction'); the other way round, and weights moved, resume (tested)
    if saved and layout and (layout["stage"] != layout_now["stage"] or layout["offload_optimizer"] == "none"
                             and layout_now["offload_optimizer"] != "none"):  # (checkpoints before 2026-12-07: none)
        raise RunError(f"{ckpt}: written under {_said(layout)}, resumed under {_said(layout_now)}; resume with the "
                       f"DeepSpeed JSON that wrote it")
    n = state.get("num_processes", acc.num_processes)
    if saved and n != acc.num_processes:
        raise RunError(f"{ckpt}: a DeepSpeed checkpoint written by {n} processes cannot resume on "
                       f"{acc.num_processes}; resume with {n} (or convert it with its zero_to_fp32.py and start anew)")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _plain_optimizer(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records logged after `step` (they are re-logged by the resumed run), and a last line
    cut short (a process killed, or a disk filled, while writing it); a damaged line before the
    last is an error naming it."""
    from .textio import log_records

    path = Path(path)
    if not path.exists():
        return
    keep = [line for line, record in log_records(path, RunError) if record.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class DamagedCheckpoint(ValueError):
    """A checkpoint file that reads, but not as what save_checkpoint wrote."""


def _unrestorable(e: Exception, ckpt: Path, out: Path) -> RunError | None:
    """The one-line error for a checkpoint that cannot be restored, or None for other errors:
    - damaged on disk (each is written atomically, so a disk fault or a hand edit): delete it, and
      --resume continues from the one before;
    - not this run's models (the recipe changed since: LoRA, the architecture): restore the recipe;
      every older checkpoint would fail the same way, so deleting them would lose the run."""
    why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    damaged = isinstance(e, (json.JSONDecodeError, EOFError, FileNotFoundError, DamagedCheckpoint)) or \
        type(e).__name__ in ("SafetensorError", "UnpicklingError") or "PytorchStreamReader" in why
    if damaged:
        earlier = list_checkpoints(out)[:-1]
        then = f"--resume continues from {earlier[-1].name}" if earlier else "--resume starts the run over"
        return RunError(f"{ckpt}: damaged, cannot be restored ({type(e).__name__}: {why}); delete this checkpoint "
                        f"folder and {then}")
    if isinstance(e, RuntimeError) and any(k in why for k in ("state_dict", "Missing key", "Unexpected key",
                                                              "size mismatch", "must match the size of tensor")):
        return RunError(f"{ckpt}: does not match this run's models ({why}); resume with the recipe that wrote it "
                        f"(its recipe.yaml), or start a new run")
    return None


def resume_state(acc, out: Path, resume: bool, parts: CheckpointParts, total: tuple[int, str] | None = None
                 ) -> tuple[int, dict]:
    """(step to continue after, saved state) — (0, {}) for a new run or a run with no checkpoint yet.
    Records logged after the checkpoint are dropped (the resumed run logs them again). `total`: (the
    run's last step, the recipe key that sets it); a checkpoint past it is refused in one line (the
    run "finished" with the checkpoint's model, a summary that said fewer steps, and a step counter
    that went backwards in metrics.jsonl)."""
    if not resume:
        return 0, {}
    ckpt = latest_checkpoint(out)
    if ckpt is not None and total is not None and ckpt.name[len(PREFIX):].isdigit() \
            and int(ckpt.name[len(PREFIX):]) > total[0]:
        step = int(ckpt.name[len(PREFIX):])
        raise RunError(f"{ckpt}: step {step} is past this run's last step, {total[0]} ({total[1]}); resume with "
                       f"{total[1]} of at least {step}, or start a new run")
    if ckpt is None:
        if acc.is_main_process:  # nothing to keep: the run starts over, step 0 included
            truncate_jsonl(Path(out) / "metrics.jsonl", -1)
            truncate_jsonl(Path(out) / "samples.jsonl", -1)
        acc.wait_for_everyone()
        return 0, {}
    try:
        state = load_checkpoint(acc, ckpt, parts)
    except Exception as e:  # one line for what a user can act on; anything else propagates as it is
        raise _unrestorable(e, ckpt, out) or e
    if acc.is_main_process:
        truncate_jsonl(Path(out) / "metrics.jsonl", state["step"])
        truncate_jsonl(Path(out) / "samples.jsonl", state["step"])
    acc.wait_for_everyone()
    return state["step"], state

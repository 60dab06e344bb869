"""Run folders: a run never destroys the run it replaces until it has earned it.

A new run (into a new folder, or ``--overwrite`` of a finished one) writes into a staging folder
beside its final path, ``PARENT/.NAME.staging/`` (marked by a ``.rlhf-staging`` file), and takes
the final path only when it has finished: an atomic exchange of the two folders
(``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, which :func:`recover` completes
after a crash in between), after which the old run is deleted. Until then the old run at
``PARENT/NAME`` is untouched, and a crash at any moment leaves either the old run intact or the
new one complete or resumable.

- ``--resume`` continues an interrupted staged run from its latest checkpoint (from step 0 if it
  had none), then promotes it.
- ``--overwrite`` discards an interrupted staged run and starts a new one; the finished run at
  the final path stays until the new one finishes.
- A run that stops with an error leaves nothing half-made: without a checkpoint its staging
  folder is removed; with one it stays, holding ``FAILED`` (the error), for ``--resume``.
- Inside a staged folder (a pipeline's stages) runs write in place: the pipeline is promoted as a
  whole. Runs started before staging existed resume in place too.

Every function that changes the file system runs on the main process only.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import RunError
from .faults import fault_point

MARK = ".rlhf-staging"
FAILED = "FAILED"
RUN_MARKERS = ("recipe.yaml", "summary.json", "metrics.jsonl")
KIND = ".rlhf-run"
"""In every run folder, from its start: {"command": "sft" | "rm" | "ppo" | "dpo" | "pipeline"}."""
STAGE_FOLDERS = ("sft", "rm", "ppo", "dpo")
"""A pipeline's stage folders (each with its recipe.yaml once the stage has started)."""


@dataclass
class RunFolder:
    final: Path
    """Where the finished run lives."""
    work: Path
    """Where this run writes: the staging folder, or `final` itself (in place)."""
    problem: str | None = None
    """Why the run may not start here; reported once the inputs have been validated."""
    done: bool = False
    """`--resume` of a run that already finished: nothing to do."""
    command: str | None = None
    """The command this run is (sft, rm, ppo, dpo, pipeline), written to its folder's KIND file."""
    lock: int | None = None
    """The open KIND file this process holds an exclusive flock on while the run is live
    (:func:`hold`): another run into the same folder is refused (:func:`busy`), never told to
    --overwrite or --resume a live run. The kernel drops it when the process dies."""

    @property
    def staged(self) -> bool:
        return self.work != self.final


def staging_path(final: Path) -> Path:
    return final.parent / f".{final.name}.staging"


def final_path(path: Path) -> Path:
    """`path` with every staging component ('.NAME.staging') named as it will be once promoted."""
    parts = [p[1 : -len(".staging")] if p.startswith(".") and p.endswith(".staging") else p for p in Path(path).parts]
    return Path(*parts) if parts else Path(path)


def _trash_path(final: Path) -> Path:
    return final.parent / f".{final.name}.replaced"


def holds_run(path: Path) -> bool:
    """Whether `path` is an rlhf run folder: its KIND file, or (runs from before it existed) a
    summary.json, a metrics.jsonl, a checkpoint (checkpoints/step-N/state.json, or DPO's
    checkpoints/checkpoint-N/trainer_state.json), or a pipeline's stage folders. A user's folder
    that merely holds a recipe.yaml, or a checkpoints/ folder of its own, is not one (an
    --overwrite would delete it)."""
    if not path.is_dir():
        return False
    marks = [path / f for f in (KIND, "summary.json", "metrics.jsonl")]
    marks += [path / stage / "recipe.yaml" for stage in STAGE_FOLDERS]
    return any(p.exists() for p in marks) or any(path.glob("checkpoints/step-*/state.json")) or \
        any(path.glob("checkpoints/checkpoint-*/trainer_state.json"))


def run_command(path: Path) -> str | None:
    """The command whose run `path` holds (its KIND file; for older runs, the stage in its
    summary.json, or 'pipeline' for a folder of stage folders); None when unknown."""
    try:
        return json.loads((path / KIND).read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        summary = json.loads((path / "summary.json").read_text())
        if isinstance(summary, dict) and summary.get("stage"):
            return str(summary["stage"])
        if isinstance(summary, dict) and "stages" in summary:
            return "pipeline"
    except (OSError, ValueError):
        pass
    if any((path / stage / "recipe.yaml").exists() for stage in STAGE_FOLDERS):
        return "pipeline"
    return None


def _other_command(folder: Path, final: Path, command: str | None) -> str | None:
    """Why `--resume` of `command` may not continue the run in `folder`: it is another command's."""
    other = run_command(folder) if command else None
    if other is None or other == command:
        return None
    return (f"{final}: holds an rlhf {other} run, not an rlhf {command} run; resume it with "
            f"'rlhf {other} ... --resume', or give {command} another --output_dir")


def _inside_staging(folder: Path) -> bool:
    """Whether `folder` or one above it is a staging folder."""
    folder = folder.resolve()
    return any((p / MARK).exists() for p in (folder, *folder.parents))


def file_in_the_way(path: str | Path) -> Path | None:
    """The file at `path` or above it (its nearest existing ancestor) that keeps a folder from
    being made there; None when the way is clear."""
    above = Path(path)
    while not above.exists() and above != above.parent:
        above = above.parent
    return None if above.is_dir() else above


def plan(path: str | Path | None, overwrite: bool = False, resume: bool = False,
         command: str | None = None) -> RunFolder:
    """Decide where a run of `command` writes, touching nothing (call :func:`recover` first)."""
    rf = _plan(path, overwrite, resume)
    rf.command = command
    if resume and rf.problem is None:
        rf.problem = _other_command(rf.work if rf.work.exists() else rf.final, rf.final, command)
        rf.done = rf.done and rf.problem is None
    return rf


def _plan(path: str | Path | None, overwrite: bool, resume: bool) -> RunFolder:
    if not path:
        return RunFolder(Path("."), Path("."), "no output directory: pass --output_dir or set output_dir in the recipe")
    final = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)  # a link: stage its target
    if final.exists() and not final.is_dir():
        return RunFolder(final, final, f"{final}: exists and is not a folder")
    blocked = file_in_the_way(final.parent)
    if blocked is not None:
        return RunFolder(final, final, f"{final}: {blocked} is a file, not a folder")
    if final.is_dir() and os.path.ismount(final):
        return RunFolder(final, final, f"{final}: is a mount point; give a folder inside it (a run is staged "
                                       f"beside its folder and swapped in when it finishes)")
    if resume and overwrite:
        return RunFolder(final, final, "--resume and --overwrite exclude each other")
    staging = staging_path(final)
    interrupted = (staging / MARK).exists()
    if _inside_staging(final.parent):  # a stage of a staged pipeline: the pipeline is promoted whole
        in_place = RunFolder(final, final)
        if resume and not (holds_run(final) or (final / "recipe.yaml").exists()):
            in_place.problem = f"{final}: no run to resume"
        elif not resume and holds_run(final) and not overwrite:
            in_place.problem = f"{final}: already holds a run; pass --overwrite to replace it (or --resume)"
        in_place.done = resume and (final / "summary.json").exists()
        return in_place
    if resume:
        if interrupted:
            return RunFolder(final, staging)
        if holds_run(final):  # finished, or an interrupted run from before staging existed
            return RunFolder(final, final, done=(final / "summary.json").exists())
        return RunFolder(final, staging, f"{final}: no run to resume")
    rf = RunFolder(final, staging)
    if interrupted and not overwrite:
        rf.problem = (f"{final}: an interrupted run is in {staging}; pass --resume to continue it or --overwrite to "
                      f"start over")
    elif holds_run(final) and not overwrite:
        rf.problem = f"{final}: already holds a run; pass --overwrite to replace it (or --resume to continue it)"
    elif final.is_dir() and any(final.iterdir()) and not holds_run(final):
        rf.problem = (f"{final}: exists, is not empty and holds no run; give a new or empty folder (a run "
                      f"replaces only a folder that holds a run)")
    return rf


def inputs_inside(cfg, folder: Path) -> list[tuple[str, str]]:
    """The recipe's inputs (model folders, data files, reward-function files: any string field
    naming something on disk) that lie inside `folder`: [(dotted key, path)]. A run given
    --overwrite of that folder would delete them when it replaces it (PPO writing over the SFT
    checkpoint it starts from)."""
    import dataclasses

    inside, root = [], Path(folder).resolve()

    def visit(value, key: str) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.name != "output_dir":
                    visit(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{key}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{key}.{k}")
        elif isinstance(value, str) and value:
            path = value.rsplit(":", 1)[0] if value.count(":") == 1 and ".py:" in value else value  # file.py:fn
            try:
                here = Path(path).exists() and Path(path).resolve().is_relative_to(root)
            except (OSError, ValueError):  # (a name too long or with a NUL is no input here)
                here = False
            if here:
                inside.append((key, value))

    visit(cfg, "")
    return inside


def make_folder(path: Path) -> None:
    """mkdir -p, where a file system that makes no folders at all (/proc, /sys: ENOENT though the
    parents exist) is one line, not a traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as e:
        raise RunError(f"cannot create the folder {path}: {e.strerror} at {e.filename} (a file system that makes "
                       f"no folders?)") from None


def open_folder(rf: RunFolder, overwrite: bool, resume: bool) -> Path:
    """Create (or clear) the folder the run writes into; returns it. Main process only."""
    if _live(rf.work / KIND):  # (both runs planned before either opened: the other one opened first)
        raise RunError(_live_message(rf.final, rf.work))
    if rf.staged:
        if rf.work.exists() and not resume:  # --overwrite of an interrupted staged run
            shutil.rmtree(rf.work)
        make_folder(rf.work)
        (rf.work / FAILED).unlink(missing_ok=True)
        if not (rf.work / MARK).exists():
            (rf.work / MARK).write_text(json.dumps({"final": str(rf.final), "started": time.time(),
                                                    "pid": os.getpid()}) + "\n")
    else:
        if overwrite:  # in place (inside a staged pipeline): clear the old run's files
            for f in (*RUN_MARKERS, KIND, "samples.jsonl"):
                (rf.work / f).unlink(missing_ok=True)
            for d in ("checkpoints", "tb", "report"):
                shutil.rmtree(rf.work / d, ignore_errors=True)
        make_folder(rf.work)
    if rf.command and not (rf.work / KIND).exists():
        (rf.work / KIND).write_text(json.dumps({"command": rf.command}) + "\n")
    hold(rf)
    return rf.work


_NO_LOCKS: list[str] = []
"""File systems where flock failed other than "held by another" (Lustre without flock: ENOSYS;
some NFS setups): runs go on unlocked there, with one warning."""


def _flock(path: Path, exclusive: bool) -> int | None:
    """An open descriptor of `path` holding a flock; None when another process holds one. -1
    where this file system takes no flock at all (the run goes on unlocked)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        return -1
    try:  # (NFS emulates flock with POSIX locks: an exclusive one needs a file open for writing)
        fd = os.open(path, os.O_RDWR if exclusive else os.O_RDONLY)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        if not _NO_LOCKS:
            import logging

            logging.getLogger(__name__).warning("%s: this file system takes no lock (%s); a second run into a folder "
                                                "a live run writes is not refused here", path, e)
        _NO_LOCKS.append(str(path))
        return -1
    return fd


def _live(kind: Path) -> bool:
    """Whether a live process holds the lock on this KIND file (:func:`hold`)."""
    if not kind.is_file():
        return False
    fd = _flock(kind, exclusive=False)
    if fd is not None and fd >= 0:
        os.close(fd)
    return fd is None


def _live_message(final: Path, folder: Path) -> str:
    return (f"{final}: another running rlhf is writing this run ({folder}); wait for it to finish, or give this "
            f"run another --output_dir")


def hold(rf: RunFolder) -> None:
    """Lock the run's KIND file for as long as this process writes the run (main process)."""
    if rf.lock is not None or not (rf.work / KIND).exists():
        return
    fd = _flock(rf.work / KIND, exclusive=True)
    if fd is None:  # (two runs planned the same folder at the same moment)
        raise RunError(_live_message(rf.final, rf.work))
    rf.lock = fd if fd >= 0 else None


def release(rf: RunFolder) -> None:
    """The run is over in this process (finished, or failed): another may write the folder
    (unlocked first: a child process forked by a reward function shares the descriptor)."""
    if rf.lock is not None:
        import fcntl

        fcntl.flock(rf.lock, fcntl.LOCK_UN)
        os.close(rf.lock)
        rf.lock = None


def busy(path: str | Path | None) -> str | None:
    """Why no run may be planned into `path` now: a live process is writing it, or its staging
    folder (its KIND file is locked, :func:`hold`). None when no process is."""
    if not path:
        return None
    final = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)  # (as :func:`plan` stages it)
    for folder in (final, staging_path(final)):
        if _live(folder / KIND):
            return _live_message(final, folder)
    if final.is_dir():  # a run a live process writes inside it (D/sft, D/.sft.staging): replacing D would take it
        for kind in [*final.glob(f"*/{KIND}"), *final.glob(f".*.staging/{KIND}")]:
            if _live(kind):
                return (f"{final}: a running rlhf is writing a run inside it ({kind.parent}); wait for it to finish, "
                        f"or give this run another --output_dir")
    return None


COMPARE_ENTRIES = frozenset({KIND, "summary.json", "compare.json", "compare.md", "compare.png", "runs", "sft", "rm",
                             ".sft.staging", ".rm.staging"})
"""What `rlhf compare` writes in its folder (which it reuses: it runs what is not complete there)."""


def compare_folder_problem(root: Path) -> str | None:
    """Why `rlhf compare` may not write into `root`: a live process writes it (or a run inside it),
    or it holds another command's run, or files that are not a comparison's. None for a new or
    empty folder, or a comparison's own (which compare continues)."""
    if root.exists() and not root.is_dir():
        return f"{root}: exists and is not a folder"
    blocked = file_in_the_way(root.parent)
    if blocked is not None:
        return f"{root}: {blocked} is a file, not a folder"
    problem = busy(root)
    if problem or not root.is_dir() or not any(root.iterdir()):
        return problem
    marked = (root / KIND).is_file() or (root / "summary.json").is_file()  # (not a folder of stage folders alone:
    command = (run_command(root) or "unknown") if marked else None     # an old comparison has sft/ and rm/ too)
    if command is not None:
        return None if command == "compare" else (f"{root}: holds an rlhf {command} run, not a comparison; give "
                                                  f"rlhf compare a new or empty --output_dir")
    if {p.name for p in root.iterdir()} <= COMPARE_ENTRIES:  # (a comparison from before the KIND file)
        return None
    return (f"{root}: exists, is not empty and holds no comparison; give rlhf compare a new or empty --output_dir "
            f"(it writes its runs into the folder it is given)")


def hold_compare(root: Path) -> RunFolder:
    """Mark `root` as a comparison's and lock it while this process runs the comparison (:func:`hold`):
    a run given the same folder is refused, as for any run a live process writes. :func:`release` ends it."""
    rf = RunFolder(root, root, command="compare")
    make_folder(root)
    if not (root / KIND).exists():
        (root / KIND).write_text(json.dumps({"command": "compare"}) + "\n")
    hold(rf)
    return rf


def promote(rf: RunFolder) -> None:
    """Move a finished staged run to its final path, replacing the old run there. Main process only."""
    if not rf.staged:
        return
    final, work = rf.final, rf.work
    _repoint_recipes(work, work, final)  # before the swap: a crash after it leaves correct recipes
    if final.exists():
        if _exchange(work, final):  # atomic: `final` is the new run, `work` now holds the old one
            fault_point("promote")  # tests kill the process here
            shutil.rmtree(work)
        else:
            trash = _trash_path(final)
            os.replace(final, trash)
            fault_point("promote")
            os.replace(work, final)
            shutil.rmtree(trash)
    else:
        make_folder(final.parent)
        os.replace(work, final)
    (final / MARK).unlink(missing_ok=True)


def _repoint_recipes(folder: Path, work: Path, final: Path) -> None:
    """The recipe.yaml files in `folder` (a pipeline's stages name each other's folders) name the
    final path, not the staging folder they were written in (idempotent)."""
    old, new = str(work), str(final)
    for recipe in [folder / "recipe.yaml", *folder.glob("*/recipe.yaml")]:
        if recipe.is_file():
            text = recipe.read_text()
            if old in text:
                tmp = recipe.with_name(".recipe.yaml.tmp")
                tmp.write_text(text.replace(old, new))
                os.replace(tmp, recipe)


def recover(final: str | Path | None) -> None:
    """Finish a promotion that a crash interrupted (main process, before planning a run)."""
    if not final:
        return
    final = Path(final)
    staging, trash = staging_path(final), _trash_path(final)
    if (final / MARK).exists():  # exchanged, not yet cleaned up: `staging` holds the old run
        if staging.exists() and not (staging / MARK).exists():
            shutil.rmtree(staging)
        (final / MARK).unlink()
    if trash.exists():
        if not final.exists() and (staging / "summary.json").exists():  # between the two renames
            os.replace(staging, final)
            (final / MARK).unlink(missing_ok=True)
        if final.exists():
            shutil.rmtree(trash)
        else:  # the new run is not complete: put the old one back
            os.replace(trash, final)
    if (staging / MARK).exists() and (staging / "summary.json").exists():  # finished, never promoted
        promote(RunFolder(final, staging))


def fail(rf: RunFolder, error: BaseException) -> str:
    """A run stopped with an error: remove a staged run with no checkpoint, else mark it FAILED
    (resumable). Returns what became of it, for the error message. Main process only."""
    from .checkpoint import latest_checkpoint, list_checkpoints

    if not rf.staged or not rf.work.exists():
        return ""
    ckpt = latest_checkpoint(rf.work)
    stages_done = sorted(p.parent.name for p in rf.work.glob("*/summary.json"))  # a pipeline's finished stages
    stage_ckpts = [c for c in rf.work.glob("*/checkpoints/step-*") if (c / "state.json").exists()]
    stage_ckpts += [c for c in rf.work.glob("checkpoints/checkpoint-*") if (c / "trainer_state.json").exists()]
    stage_ckpts += [c for c in rf.work.glob("*/checkpoints/checkpoint-*") if (c / "trainer_state.json").exists()]
    if (rf.work / "summary.json").exists():  # finished: never delete it; the next run promotes it (recover)
        return f" (the finished run is in {rf.work}; the next run into {rf.final} moves it there)"
    if ckpt is None and not stages_done and not stage_ckpts:
        shutil.rmtree(rf.work, ignore_errors=True)
        return ""
    try:
        (rf.work / FAILED).write_text(f"{type(error).__name__}: {error}\n")
    except OSError:  # (the disk is full: the mark is a note to the user; the checkpoints are what resume reads)
        pass
    if ckpt is not None and str(error).startswith(f"{ckpt}: damaged"):  # resumable from the one before, once deleted
        earlier = list_checkpoints(rf.work)[:-1]
        ckpt = earlier[-1] if earlier else None
        if ckpt is None and not stages_done and not stage_ckpts:
            return ""  # (the error says --resume starts over; the damaged checkpoint is kept for the user to see)
    what = ckpt.name if ckpt is not None else "its checkpoints and finished stages"
    return f" (the run stays resumable from {what} in {rf.work}: fix the cause and pass --resume)"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except Exception:  # no libc with renameat2 (not Linux, or an old glibc): two renames instead
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0

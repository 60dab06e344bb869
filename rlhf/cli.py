"""`rlhf` command line: sft | rm | ppo | pipeline | data make | sample | score | generate | chat.

Training commands take a YAML recipe and dotted overrides::

    rlhf sft recipes/tiny/sft.yaml --output_dir runs/sft --train.lr 3e-4

Errors a user can fix (bad recipe key, bad data row, missing checkpoint, failing reward
function) print one line and exit with status 2; nothing already written is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from .errors import Terminated

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def _user_errors() -> tuple[type[BaseException], ...]:
    from .engine import user_errors

    return user_errors()


def _training_parser(sub, name: str, help: str, epilog: str | None = None):
    p = sub.add_parser(name, help=help, description=help, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--output_dir", help="run folder (beats the recipe's output_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="InstructGPT end to end: SFT -> RM -> PPO.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _training_parser(sub, "sft", "supervised fine-tuning on demonstrations (stage 1)")
    _training_parser(sub, "rm", "pairwise-preference reward model (stage 2)")
    _training_parser(sub, "ppo", "PPO with a KL penalty against the SFT policy (stage 3)", _ppo_choices())
    _training_parser(sub, "dpo", "DPO from the SFT policy on preference pairs, through TRL (instead of RM + PPO)")
    _training_parser(sub, "pipeline", "SFT -> RM -> PPO (and/or DPO) into OUTPUT_DIR/{sft,rm,ppo,dpo}")
    _training_parser(sub, "compare", "methods x seeds (PPO, GRPO, RLOO, REINFORCE++, DPO, ...) from one SFT policy "
                                     "and RM -> compare.json, compare.md, compare.png")

    data = sub.add_parser("data", help="built-in verifiable task data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    make = dsub.add_parser("make", help="write SFT demos, preferences, rankings and RL prompts for a task")
    make.add_argument("task", help="task name or comma list: sort, reverse, add, upper")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--n_sft", type=int, default=4000)
    make.add_argument("--n_pref", type=int, default=2000)
    make.add_argument("--n_rank", type=int, default=0, help="K-way ranking rows")
    make.add_argument("--k", type=int, default=4, help="responses per ranking row")
    make.add_argument("--n_rl", type=int, default=2000)
    make.add_argument("--n_eval", type=int, default=500)
    make.add_argument("--wrong_share", type=float, default=0.4, help="share of systematically wrong demos")
    make.add_argument("--systematic_share", type=float, default=0.4, help="share of rejected that are the systematic error")
    make.add_argument("--near_miss_share", type=float, default=0.3,
                      help="share of rejected of the right form but wrong content (e.g. sorted, wrong digits)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--overwrite", action="store_true", help="replace the task files already in --out")

    samp = sub.add_parser("sample", help="K samples of a policy per prompt, ranked by a judge -> K-way rankings JSONL")
    samp.add_argument("checkpoint")
    samp.add_argument("prompts", help="prompt file (rows with 'prompt' and the fields the judge reads)")
    samp.add_argument("--out", required=True, help="rankings JSONL to write ({prompt, responses, scores, ...})")
    samp.add_argument("--k", type=int, default=4)
    samp.add_argument("--judge", help="'file.py:function' or 'module:function' scoring each sample (default: task "
                                      "judge); 'none' writes unranked rows with ids for human ranking")
    samp.add_argument("--max_prompts", type=int)
    samp.add_argument("--temperature", type=float, default=1.0)
    samp.add_argument("--max_new_tokens", type=int, default=64)
    samp.add_argument("--batch_size", type=int, default=64)
    samp.add_argument("--mix_with", help="preference file appended to the output")
    samp.add_argument("--seed", type=int, default=0)
    samp.add_argument("--overwrite", action="store_true", help="replace the file(s) already at --out")

    score = sub.add_parser("score", help="score prompt/response rows with a reward model checkpoint")
    score.add_argument("checkpoint")
    score.add_argument("file", help="rows with 'prompt' and 'response' (or 'completion', or 'chosen'/'rejected')")
    score.add_argument("--out", help="write the rows with a 'score' field (JSONL) instead of printing")
    score.add_argument("--raw", action="store_true", help="without the normalisation bias")
    score.add_argument("--batch_size", type=int, default=64)
    score.add_argument("--overwrite", action="store_true", help="replace the file(s) already at --out")

    join = dsub.add_parser("join-ranks", help="join human ranks (by id) onto sampled responses -> K-way rankings")
    join.add_argument("samples", help="rows with 'id', 'prompt', 'responses' (rlhf sample --judge none)")
    join.add_argument("ranks", help="rows with 'id' and 'ranks' (1 = best) or 'scores'")
    join.add_argument("--out", required=True)
    join.add_argument("--overwrite", action="store_true", help="replace the file(s) already at --out")

    ev = sub.add_parser("eval", help="evaluate checkpoints: perplexity, RM accuracy, reward, gold accuracy, win rate, BLEU")
    ev.add_argument("checkpoints", nargs="+", help="policy (causal LM) and/or reward-model checkpoints")
    ev.add_argument("--perplexity", help="SFT-format file: perplexity of each policy on its assistant tokens")
    ev.add_argument("--pairs", help="preference file: accuracy and margin of each reward-model checkpoint")
    ev.add_argument("--prompts", help="prompt rows (.jsonl, .json, .parquet) or a text file, one prompt a line: "
                                        "sample each policy (reward, gold accuracy, BLEU, win rate)")
    ev.add_argument("--reward_model", help="reward model scoring the samples (and judging the win rate)")
    ev.add_argument("--reward_fn", action="append", default=[], help="reward function 'file.py:f' (repeatable)")
    ev.add_argument("--judge", help="Python judge for the win rate (scores each completion; higher is better)")
    ev.add_argument("--reference_field", help="prompt-row field holding the reference text for BLEU/chrF")
    ev.add_argument("--max_samples", type=int, default=256)
    ev.add_argument("--out", help="write the results JSON here")
    ev.add_argument("--overwrite", action="store_true", help="replace the file(s) already at --out")
    _sampling_args(ev)

    rep = sub.add_parser("report", help="(re)build the HTML + PNG report of a run folder (or a pipeline folder)")
    rep.add_argument("run_dir")

    gen = sub.add_parser("generate", help="sample completions from a checkpoint")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompts", help="JSONL file with 'prompt' rows, or a text file (one prompt a line); default stdin")
    gen.add_argument("--out", help="write JSONL here instead of printing")
    gen.add_argument("--overwrite", action="store_true", help="replace the file(s) already at --out")
    _sampling_args(gen)

    chat = sub.add_parser("chat", help="multi-turn chat with a checkpoint through its chat template")
    chat.add_argument("checkpoint")
    chat.add_argument("--system", help="system message")
    _sampling_args(chat)
    return parser


def _ppo_choices() -> str:
    """The registered choices of the algorithm (recipe fields checked against them), for `rlhf ppo --help`."""
    from .algos.registry import registries

    lines = ["recipe fields are dotted overrides (--kl_coef 0.05); every field: docs/config-reference.md",
             "", "registered choices (one function each; see docs/algorithms.md to add one):"]
    return "\n".join(lines + [r.describe() for r in registries().values()])


def _sampling_args(p) -> None:
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)


# the value flags of the commands that take no recipe: (low, None) for >= low, ('>', x) for > x
FLAG_RANGES = {"k": (2, None), "top_p": (">", 0), "top_k": (0, None),
               "max_new_tokens": (1, None), "batch_size": (1, None), "max_prompts": (1, None),
               "max_samples": (1, None), "seed": (0, 2**32 - 1)}  # (config.SEED_MAX)


def _check_flags(args) -> None:
    """sample / score / generate / chat / eval: each value flag in its range (and finite), before
    anything loads; the stages check their recipe fields the same way when the recipe loads."""
    import math

    from .errors import ConfigError

    if args.command not in ("sample", "score", "generate", "chat", "eval"):
        return
    for name in ("temperature", "top_p"):  # (temperature > 0 is checked with --greedy in mind, in _dispatch)
        v = getattr(args, name, None)
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"--{name}: expected a finite number, got {v}")
    for name, (low, high) in FLAG_RANGES.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        if low == ">" and not v > high:
            raise ConfigError(f"--{name}: must be > {high}, got {v!r}")
        if low != ">" and v < low:
            raise ConfigError(f"--{name}: must be >= {low}, got {v!r}")
        if low != ">" and high is not None and v > high:
            raise ConfigError(f"--{name}: must be <= {high}, got {v!r}")
    if getattr(args, "top_p", None) is not None and args.top_p > 1:
        raise ConfigError(f"--top_p: must be in (0, 1], got {args.top_p}")


def main(argv: list[str] | None = None) -> int:
    argv = _drop_local_rank(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    rank = process_rank()
    _setup_logging(args.verbose, rank)
    if rest and args.command not in ("sft", "rm", "ppo", "dpo", "pipeline", "compare"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from .rm_refresh import Paused

    previous = _stop_on_sigterm()
    try:
        from .engine import check_environment

        check_environment()  # RLHF_* variables, on every process, before anything loads
        _check_flags(args)
        return _dispatch(args, rest)
    except Paused as e:  # a planned stop (a person ranks samples), resumable with --resume
        print(f"rlhf {args.command}: paused: {e}", file=sys.stderr)
        return 3
    except _user_errors() as e:  # (under a launcher every process says its own: tagged as its log lines are)
        print(f"rlhf {args.command}: error: {f'[rank {rank}] ' if rank else ''}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated); a run's note says where it can resume
        how = " (SIGTERM)" if isinstance(e, Terminated) else ""
        print(f"rlhf {args.command}: {f'[rank {rank}] ' if rank else ''}interrupted{how}{e.args[0] if e.args else ''}",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _close_process_group()


def _stop_on_sigterm():
    """SIGTERM raises :class:`Terminated` in the main thread (once: a second one ends the process
    at once), so that a run stopped by its launcher or its cluster cleans up as on Ctrl-C. Returns
    the handler it replaced (None off the main thread, where none can be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    return signal.signal(signal.SIGTERM, stop)


def run() -> NoReturn:
    """The `rlhf` command (console script and `python -m rlhf`): `main`, then exit with its status.

    A process that ran torch.distributed (under a launcher: torchrun, `accelerate launch`,
    `deepspeed`, MPI; or DeepSpeed in one process, for which rlhf sets the launcher's variables
    itself) ends with `os._exit`, once Python's exit steps (its threads joined, its exit handlers)
    have run and the streams are flushed: every file a stage writes is closed by then, and the
    interpreter's teardown and the C++ static destructors that follow it are skipped. There, a
    backend thread still joinable could abort a rank that had finished its work ("terminate called
    without an active exception", SIGABRT), and the launcher then failed the whole run."""
    distributed = _distributed_process()
    try:
        rc = main()
    except BaseException as e:
        if not (distributed or _distributed_process()):
            raise
        rc = _exit_status(e)
    if not (distributed or _distributed_process()):
        sys.exit(rc)
    _hard_exit(rc)


def _exit_status(e: BaseException) -> int:
    """What the interpreter would have made of `e` at exit: SystemExit's code (argparse's usage
    errors), else its traceback and 1."""
    if isinstance(e, SystemExit):
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    import traceback

    traceback.print_exception(e)
    return 1


def _distributed_process() -> bool:
    """Whether a launcher started this process, or rlhf set a launcher's variables for one-process
    DeepSpeed (engine.make_accelerator)."""
    launcher = ("LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
    return any(k in os.environ for k in launcher) or os.environ.get("WORLD_SIZE", "1") != "1"


def _hard_exit(rc: int) -> NoReturn:
    """Python's exit steps, in the interpreter's order, then os._exit: non-daemon threads joined
    after their shutdown hooks (`threading._shutdown`, which also wakes idle thread-pool workers,
    such as inductor's compile pool), the atexit handlers, logging's, and every stream flushed,
    C's stdio included (DeepSpeed's C++ extensions print through it)."""
    import atexit
    import ctypes
    import threading

    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken pipe: nothing more to write
                pass
        try:
            ctypes.CDLL(None).fflush(None)
        except Exception:  # no C library to flush (not Linux or macOS)
            pass
        os._exit(rc if isinstance(rc, int) else 1)


def _close_process_group() -> None:
    """Tear torch.distributed down before the interpreter does: a process group still alive at
    exit leaves its backend's threads to static destructors, and a CPU (gloo) rank then could
    abort at exit ("terminate called without an active exception") after finishing its work."""
    dist = sys.modules.get("torch.distributed")  # (never imported: nothing to close)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _setup_logging(verbose: bool, rank: int) -> None:
    """One voice per job: the main process logs INFO; the others log warnings and errors only,
    each line naming its rank, and draw no progress bars (ours are off there already;
    transformers' weight-loading bars too)."""
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if rank != 0:
        level, fmt = logging.WARNING, f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DS_LOG_LEVEL", "warning")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        logging.getLogger("rlhf.config").setLevel(logging.ERROR)  # (every process reads the same recipe: one says it)
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher passes --local_rank=N to each process (and sets LOCAL_RANK, which
    accelerate reads): drop the argument."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(a)
    return out


def _dispatch(args, rest: list[str]) -> int:
    from .config import ConfigError, load_stage_config, parse_overrides

    if getattr(args, "temperature", 1.0) <= 0 and not getattr(args, "greedy", False):
        raise ConfigError(f"--temperature must be > 0 for sampling, got {args.temperature:g}"
                          + (" (or pass --greedy)" if hasattr(args, "greedy") else ""))
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if args.command not in ("sft", "rm", "ppo", "dpo", "pipeline", "compare") and world not in ("", "0", "1"):
        from .errors import RunError  # (each rank did the whole job: files written twice)

        raise RunError(f"rlhf {args.command} runs as one process, but WORLD_SIZE={world} says this process is one of "
                       f"several (a launcher, or a cluster job that sets it): run it without torchrun / accelerate "
                       f"launch, where WORLD_SIZE is unset or 1")
    if args.command in ("sft", "rm", "ppo", "dpo", "pipeline", "compare"):
        import contextlib

        from . import stages
        from .config import locate_message

        overrides = {}
        try:
            from .engine import world_size

            world_size()  # (an empty or non-numeric WORLD_SIZE is one line, before anything reads it)
            overrides = parse_overrides(rest)
            cfg = load_stage_config(args.command, args.recipe, overrides)
            # stdout carries only the summary JSON; libraries that print (DeepSpeed's logger) go to stderr
            with contextlib.redirect_stdout(sys.stderr):
                summary = stages.run(args.command, cfg, args.output_dir, overwrite=args.overwrite, resume=args.resume)
        except _user_errors() as e:  # name the recipe line of the key at fault, and a run folder problem too
            section = stages.CURRENT[0] if args.command in ("pipeline", "compare") and stages.CURRENT else ""
            message = locate_message(str(e), args.recipe, overrides, section, getattr(e, "key", None))
            # (rank 0 only: it alone opened the folder, and cleaned it up; another rank would see
            # this run's own staging folder and call it an interrupted run)
            folder = _folder_problem(args) if process_rank() == 0 else None
            if folder and folder not in message and "resumable from" not in message:
                message = f"{message}; and {folder}"
            if message != str(e):
                raise type(e)(message) from None
            raise
        if process_rank() == 0:  # one summary per job, not one per process
            print(json.dumps(summary, indent=2, default=float))
        return 0
    if args.command == "data" and args.data_command == "join-ranks":
        from .data.formats import join_ranks

        _check_out(args.out, args.overwrite)
        n = join_ranks(args.samples, args.ranks, args.out)
        print(f"{args.out}: {n} ranked rows")
        return 0
    if args.command == "data":
        from .data.tasks import make_task_data

        counts = make_task_data(args.task, args.out, n_sft=args.n_sft, n_pref=args.n_pref, n_rank=args.n_rank, k=args.k,
                                n_rl=args.n_rl, n_eval=args.n_eval, wrong_share=args.wrong_share,
                                systematic_share=args.systematic_share, near_miss_share=args.near_miss_share,
                                seed=args.seed, overwrite=args.overwrite)
        for name, n in counts.items():
            print(f"{args.out}/{name}: {n} rows")
        return 0
    if args.command == "sample":
        from .config import SampleConfig
        from .sampling import check_sample_config, sample_rankings

        sc = SampleConfig(checkpoint=args.checkpoint, prompts=args.prompts, k=args.k, judge=args.judge,
                          max_prompts=args.max_prompts, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, mix_with=args.mix_with)
        from .engine import runtime_device

        _check_out(args.out, args.overwrite)
        check_sample_config(sc)  # the judge called once before the sampling, not after it
        print(json.dumps(sample_rankings(sc, args.out, seed=args.seed, device=runtime_device()), indent=2))
        return 0
    if args.command == "score":
        return _score(args)
    if args.command == "eval":
        from .engine import runtime_device
        from .evaluate import EvalConfig, format_table, run_eval
        from .rollout import Sampling

        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, greedy=args.greedy)
        cfg = EvalConfig(perplexity_data=args.perplexity, pairs=args.pairs, prompts=args.prompts,
                         reward_model=args.reward_model, reward_fns=args.reward_fn, judge=args.judge,
                         reference_field=args.reference_field, max_samples=args.max_samples,
                         batch_size=args.batch_size, seed=args.seed, sampling=sampling)
        _check_out(args.out, args.overwrite)
        try:
            result = run_eval(args.checkpoints, cfg, device=runtime_device())
        except Exception as e:
            if getattr(e, "partial", None):  # what the checkpoints before the one at fault measured
                print(format_table(e.partial))
            raise
        if args.out:
            from .engine import atomic_write_text

            atomic_write_text(args.out, json.dumps(result, indent=2))
        print(format_table(result))
        return 0
    if args.command == "report":
        from .report import build_report

        print(build_report(args.run_dir))
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "chat":
        return _chat(args)
    raise AssertionError(args.command)


def _folder_problem(args) -> str | None:
    """What is wrong with --output_dir for this run, if anything (reads, touches nothing)."""
    if not args.output_dir:
        return None
    from .rundir import busy, compare_folder_problem, plan

    if args.command == "compare":  # (it reuses its own folder by design: one holding its runs is no problem of it)
        return compare_folder_problem(Path(args.output_dir))
    return busy(args.output_dir) or plan(args.output_dir, args.overwrite, args.resume).problem


def _load_policy(path: str):
    from .config import ModelConfig
    from .models import check_policy_model, disable_dropout, load_causal_lm, load_tokenizer

    from .engine import runtime_device

    check_policy_model(path, None)  # a model folder, not a reward model (one line if not), before anything loads
    mc = ModelConfig(name_or_path=path)
    tok = load_tokenizer(mc)
    model = load_causal_lm(mc, tok)
    disable_dropout(model)
    model.eval().to(runtime_device())  # the GPU when there is one
    return model, tok


def _read_prompts(path: str | None) -> list:
    from .data.formats import DataError, load_prompts, parse_prompt, prompt_lines
    from .textio import decode_utf8

    if path:
        if not path.endswith((".jsonl", ".json", ".parquet")) and not Path(path).is_file():
            raise DataError(f"{path}: not a file (--prompts: .jsonl, .json or .parquet rows, or one prompt per line)")
        return [p.prompt for p in load_prompts(path)]
    rows = prompt_lines(decode_utf8(_stdin_bytes(), "<stdin>", DataError), "<stdin>")
    if not rows:
        raise DataError("<stdin>: no prompts in it (one prompt per line)")
    return [parse_prompt(r).prompt for r in rows]


def _generate(args) -> int:
    from .evaluate import sample_texts

    from .models import check_policy_model

    _check_out(args.out, args.overwrite)
    check_policy_model(args.checkpoint, None)  # a wrong path is named before stdin is waited on
    prompts = _read_prompts(args.prompts)  # (before the model: a bad file costs no loading)
    model, tok = _load_policy(args.checkpoint)
    texts, eos = sample_texts(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              greedy=args.greedy, top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size,
                              seed=args.seed)
    rows = [{"prompt": p[-1]["content"] if isinstance(p, list) else p, "completion": t, "eos": e}
            for p, t, e in zip(prompts, texts, eos)]
    return _emit_rows(rows, args.out, "completions")


def _check_out(path: str | None, overwrite: bool) -> None:
    """Before anything loads: --out must name a file that can be written, and none already there
    unless --overwrite (a rerun must not replace, say, a samples file people have ranked in place)."""
    if not path:
        return
    from .errors import RunError

    p = Path(path)
    if p.is_dir():
        raise RunError(f"--out {path}: is a folder; name a file")
    if p.exists() and not overwrite:
        raise RunError(f"--out {path}: already exists; pass --overwrite to replace it")
    from .rundir import file_in_the_way

    blocked = file_in_the_way(p.parent)
    if blocked is not None:
        raise RunError(f"--out {path}: {blocked} is a file, not a folder")


def _emit_rows(rows: list[dict], out: str | None, what: str) -> int:
    """JSONL to `out` (atomically), or to stdout."""
    if out:
        from .data.tasks import write_jsonl

        write_jsonl(out, rows)
        print(f"wrote {len(rows)} {what} to {out}")
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


def _score(args) -> int:
    from .data.formats import DataError, parse_scored, read_rows
    from .engine import runtime_device
    from .errors import TemplateError
    from .rewards import RewardModel

    _check_out(args.out, args.overwrite)
    rm = RewardModel(args.checkpoint, device=runtime_device())
    rows = read_rows(args.file)
    if not rows:  # (as eval, sample and generate say of an empty file; it wrote an empty --out)
        raise DataError(f"{args.file}: no rows to score")
    seqs, targets = [], []  # one token sequence per response, and the (row, key) its score goes to
    for r in rows:
        for fld, prompt, reply in parse_scored(r):
            try:
                seqs.append(rm.encode(prompt, reply))
            except TemplateError as e:
                raise DataError(f"{r.where(fld)}: {e}") from None
            if rm.too_long(seqs[-1]):
                raise DataError(f"{r.where(fld)}: {rm.too_long(seqs[-1])}")
            targets.append((r.data, "score" if fld in ("response", "completion") else f"score_{fld}"))
    replaced = len({id(row) for row, key in targets if key in row})
    if replaced:
        logging.getLogger(__name__).warning("%s: %d rows already have the score fields written here; their "
                                            "scores are replaced by this reward model's", args.file, replaced)
    scores = rm.score_ids(seqs, normalized=not args.raw, batch_size=args.batch_size).tolist()
    for (row, key), s in zip(targets, scores):
        row[key] = s
    return _emit_rows([r.data for r in rows], args.out, "scored rows")


def _chat(args) -> int:
    from .data.formats import DataError
    from .errors import ModelError
    from .evaluate import sample_texts

    if args.system and not _is_utf8(args.system):
        raise DataError("--system: not UTF-8 text")
    model, tok = _load_policy(args.checkpoint)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    n = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        raw = _stdin_bytes(line=True)
        if not raw:
            break
        n += 1
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            msg = f"<stdin>:{n}:{e.start + 1}: not UTF-8 (byte 0x{raw[e.start]:02x})"
            if not interactive:
                raise DataError(msg) from None
            print(f"error: {msg}; line ignored", file=sys.stderr, flush=True)
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():  # (an empty line is no message)
            continue
        if re.fullmatch(r"/[A-Za-z]+", line.strip()):  # a mistyped command is not a message (/etc/hosts is one)
            print(f"error: unknown command {line.strip()}; the commands are /reset, /exit, /quit", file=sys.stderr,
                  flush=True)
            continue
        history.append({"role": "user", "content": line})
        try:
            (reply,), _ = sample_texts(model, tok, [history], max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, greedy=args.greedy, top_k=args.top_k,
                                       top_p=args.top_p, seed=args.seed + len(history))
        except ModelError as e:  # the conversation outgrew a model's learned positions: keep the session
            history.pop()
            msg = str(e).replace("prompt 1 (", "the conversation (").replace(
                "or shorten the prompts", "or start over with /reset")
            print(f"error: {msg}; message not sent", file=sys.stderr, flush=True)
            continue
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}" if interactive else reply, flush=True)
    return 0


def _stdin_bytes(line: bool = False) -> bytes:
    """A line of standard input (or all of it) as bytes, decoded by the caller (strictly, naming the
    line); a text stream put in place of sys.stdin (an embedding program, a test) is read as text."""
    stream = getattr(sys.stdin, "buffer", None) or sys.stdin
    data = stream.readline() if line else stream.read()
    return data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data


def _is_utf8(text: str) -> bool:
    """False for an argument the OS passed as bytes that are not UTF-8 (Python keeps them as
    lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    run()

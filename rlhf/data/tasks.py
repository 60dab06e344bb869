"""Built-in verifiable tasks: synthetic data with gold checkers, so RLHF has something to show.

Each task draws a random input, knows its correct answer, and knows one *systematic* mistake
(the kind a careless labeller makes every time). `make_task_data` writes:

- ``sft.jsonl``        demonstrations, a share ``wrong_share`` of them systematically wrong:
                       SFT imitates the mix, so the sampled policy is right only part of the time;
- ``prefs.jsonl``      preference pairs: correct response chosen, a wrong one (systematic or a
                       random corruption) rejected — the signal the demonstrations lack;
- ``rankings.jsonl``   K-way rankings ({prompt, responses, scores}) scored by the graded judge;
- ``prefs_eval.jsonl`` held-out pairs for reward-model accuracy;
- ``rl_prompts.jsonl`` prompts for PPO;
- ``eval_prompts.jsonl`` held-out prompts (disjoint from all of the above) for gold accuracy.

Every row carries ``task``, ``input`` and ``answer``, so the gold checker
(:func:`gold_reward`) and the graded judge (:func:`judge`) work on any of them; both follow the
reward-function protocol of :mod:`rlhf.rewards` and can be named in a recipe as
``rlhf.data.tasks:gold_reward``.
"""

from __future__ import annotations

import difflib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, RunError

# ----------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    """Prompt text before the input."""
    draw: Callable[[random.Random], str]
    """Random input."""
    solve: Callable[[str], str]
    """The correct answer."""
    systematic_error: Callable[[str], str]
    """The mistake the imperfect demonstrations make (differs from solve for every input)."""
    description: str = ""
    near_miss: Callable[[str, random.Random], str] | None = None
    """A wrong answer of the right form (e.g. sorted, but not the input's digits); default:
    the correct procedure applied to a corrupted input."""

    def hard_negative(self, x: str, rng: random.Random) -> str:
        answer = self.solve(x)
        for _ in range(100):
            out = self.near_miss(x, rng) if self.near_miss else self.solve(corrupt(x, rng))
            if out != answer:
                return out
        return corrupt(answer, rng)

    def prompt(self, x: str) -> str:
        return f"{self.instruction} {x}"


def _digits(n_lo: int, n_hi: int) -> Callable[[random.Random], str]:
    def draw(rng: random.Random) -> str:
        while True:
            s = "".join(rng.choice("0123456789") for _ in range(rng.randint(n_lo, n_hi)))
            if sorted(s) != sorted(s, reverse=True):  # not all equal: ascending != descending
                return s

    return draw


def _letters(n_lo: int, n_hi: int) -> Callable[[random.Random], str]:
    def draw(rng: random.Random) -> str:
        while True:
            s = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(n_lo, n_hi)))
            if s != s[::-1]:
                return s

    return draw


def _draw_sum(rng: random.Random) -> str:
    while True:  # always a carry in the units, so the systematic error differs
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if a % 10 + b % 10 >= 10:
            return f"{a}+{b}"


def _sum_without_carry(x: str) -> str:
    a, b = (int(v) for v in x.split("+"))
    return str(a + b - 10)


def _lower_shouting(x: str) -> str:
    return x.lower()


def _sum_off(x: str, rng: random.Random) -> str:
    a, b = (int(v) for v in x.split("+"))
    return str(a + b + rng.choice([-2, -1, 1, 2, 10, -10]))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sort", "Sort the digits:", _digits(5, 5), lambda x: "".join(sorted(x)),
             lambda x: "".join(sorted(x, reverse=True)),
             "sort 5 digits ascending; the systematic error sorts descending"),
        Task("reverse", "Reverse:", _letters(4, 6), lambda x: x[::-1], lambda x: x,
             "reverse 4-6 letters; the systematic error copies the input unchanged"),
        Task("add", "Add:", _draw_sum, lambda x: str(sum(int(v) for v in x.split("+"))), _sum_without_carry,
             "add two 2-digit numbers; the systematic error forgets the carry", _sum_off),
        Task("upper", "Answer in capitals:", _letters(3, 6), lambda x: x.upper(), _lower_shouting,
             "format constraint: repeat the word in capitals; the systematic error ignores the format"),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}' (built-in tasks: {', '.join(TASKS)})")
    return TASKS[name]


def corrupt(answer: str, rng: random.Random) -> str:
    """A random non-systematic mistake: change, drop, duplicate or swap a character."""
    alphabet = sorted(set(answer) | set("0123456789"))
    for _ in range(100):
        s = list(answer)
        op = rng.choice(["change", "drop", "dup", "swap"])
        i = rng.randrange(len(s))
        if op == "change":
            s[i] = rng.choice(alphabet)
        elif op == "drop" and len(s) > 1:
            del s[i]
        elif op == "dup":
            s.insert(i, s[i])
        elif op == "swap" and len(s) > 1:
            j = rng.randrange(len(s))
            s[i], s[j] = s[j], s[i]
        out = "".join(s)
        if out != answer:
            return out
    return answer + answer[-1]


# ----------------------------------------------------------------------------- checkers


def is_correct(task: str, x: str, completion: str) -> bool:
    return completion.strip() == get_task(task).solve(x)


def judge_one(task: str, x: str, completion: str) -> float:
    """Graded labeller stand-in: 1.0 iff correct, else 0.5 x string similarity to the answer."""
    answer = get_task(task).solve(x)
    completion = completion.strip()
    if completion == answer:
        return 1.0
    return 0.5 * difflib.SequenceMatcher(None, completion, answer).ratio()


def gold_reward(prompts: list, completions: list[str], *, task: list[str], input: list[str], **_) -> list[float]:
    """Reward function (see rlhf.rewards.RewardFn): 1.0 for a correct answer, else 0.0."""
    return [float(is_correct(t, x, c)) for t, x, c in zip(task, input, completions)]


def judge(prompts: list, completions: list[str], *, task: list[str], input: list[str], **_) -> list[float]:
    """Reward/judge function: graded score in [0, 1], 1.0 iff correct (used to rank K samples)."""
    return [judge_one(t, x, c) for t, x, c in zip(task, input, completions)]


def has_gold(rows: list[dict]) -> bool:
    """True when every row names a built-in task and its input (the gold checker applies)."""
    return bool(rows) and all(r.get("task") in TASKS and isinstance(r.get("input"), str) for r in rows)


# ----------------------------------------------------------------------------- data files


@dataclass(frozen=True)
class TaskDataSpec:
    """How much of each file `rlhf data make` writes, and how the wrong answers are mixed."""

    n_sft: int = 4000
    n_pref: int = 2000
    n_rank: int = 0
    k: int = 4
    n_rl: int = 2000
    n_eval: int = 500
    wrong_share: float = 0.4
    """Share of demonstrations with the systematic error."""
    systematic_share: float = 0.4
    """Share of rejected responses that are the systematic error."""
    near_miss_share: float = 0.3
    """Share of rejected responses of the right form but wrong content (sorted, but not the input's
    digits); the rest are random edits of the correct answer. Near misses teach the RM what a
    policy drifting away from the demonstrations produces."""
    seed: int = 0


def make_task_data(tasks: list[str] | str, out: str | Path, spec: TaskDataSpec | None = None, *,
                   overwrite: bool = True, **fields) -> dict[str, int]:
    """Write the task files into `out` (see the module docstring); returns row counts per file.
    `spec` (or its fields given as keywords) sets the counts and shares. With `overwrite` False
    (the CLI without --overwrite), files of these names already in `out` are an error, before
    anything is written."""
    spec = replace(spec or TaskDataSpec(), **fields)
    n_sft, n_pref, n_rank, k, n_rl, n_eval = spec.n_sft, spec.n_pref, spec.n_rank, spec.k, spec.n_rl, spec.n_eval
    wrong_share, systematic_share, near_miss_share, seed = (spec.wrong_share, spec.systematic_share,
                                                           spec.near_miss_share, spec.seed)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n for part in names for n in part.split(",") if n]
    if not names:
        raise ConfigError(f"no task named (built-in tasks: {', '.join(TASKS)})")
    specs = [get_task(n) for n in names]
    for key, share in (("wrong_share", wrong_share), ("systematic_share", systematic_share),
                       ("near_miss_share", near_miss_share)):
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {share}")
    for key, n in (("n_sft", n_sft), ("n_pref", n_pref), ("n_rank", n_rank), ("n_rl", n_rl), ("n_eval", n_eval)):
        if n < 0:
            raise ConfigError(f"{key}: must be >= 0, got {n}")
    if systematic_share + near_miss_share > 1.0:  # (the rest are random edits: a share < 0 of them is no share)
        raise ConfigError(f"systematic_share + near_miss_share: must be <= 1 (the rest of the rejected responses are "
                          f"random edits), got {systematic_share} + {near_miss_share}")
    if not any((n_sft, n_pref, n_rank, n_rl, n_eval)):
        raise ConfigError("nothing to write: n_sft, n_pref, n_rank, n_rl and n_eval are all 0")
    if seed < 0:
        raise ConfigError(f"seed: must be >= 0, got {seed}")
    if n_rank and k < 2:
        raise ConfigError(f"k: a ranking compares at least 2 responses, got {k}")
    out = Path(out)
    from ..rundir import file_in_the_way

    blocked = file_in_the_way(out)
    if blocked is not None:
        raise RunError(f"--out {out}: {'is' if blocked == out else f'{blocked} is'} a file, not a folder")
    planned = [name for name, n in (("sft.jsonl", n_sft), ("prefs.jsonl", n_pref), ("prefs_eval.jsonl", n_pref),
                                    ("rankings.jsonl", n_rank), ("rl_prompts.jsonl", n_rl),
                                    ("eval_prompts.jsonl", n_eval), ("task.json", 1)) if n]
    there = [name for name in planned if (out / name).exists()]
    if there and not overwrite:
        raise RunError(f"--out {out}: already holds {', '.join(there)}; pass --overwrite to replace them")
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    # held-out inputs first, so no other file can contain them
    eval_inputs: set[tuple[str, str]] = set()
    eval_rows = []
    while len(eval_rows) < n_eval:
        t = rng.choice(specs)
        x = t.draw(rng)
        if (t.name, x) in eval_inputs:
            continue
        eval_inputs.add((t.name, x))
        eval_rows.append(_row(t, x))

    def fresh() -> tuple[Task, str]:
        while True:
            t = rng.choice(specs)
            x = t.draw(rng)
            if (t.name, x) not in eval_inputs:
                return t, x

    sft = []
    for _ in range(n_sft):
        t, x = fresh()
        wrong = rng.random() < wrong_share
        sft.append({**_row(t, x), "completion": t.systematic_error(x) if wrong else t.solve(x),
                    "demo_correct": not wrong})

    def pair(t: Task, x: str) -> dict:
        good = t.solve(x)
        u = rng.random()
        if u < systematic_share:
            bad = t.systematic_error(x)
        elif u < systematic_share + near_miss_share:
            bad = t.hard_negative(x, rng)
        else:
            bad = corrupt(good, rng)
        return {**_row(t, x), "chosen": good, "rejected": bad}

    prefs = [pair(*fresh()) for _ in range(n_pref)]
    prefs_eval = [pair(*fresh()) for _ in range(max(n_pref // 10, 50))] if n_pref else []

    rankings = []
    for _ in range(n_rank):
        t, x = fresh()
        good = t.solve(x)
        cands = [good, t.systematic_error(x), t.hard_negative(x, rng)] + [corrupt(good, rng) for _ in range(max(k - 3, 0))]
        cands = cands[:k]
        rng.shuffle(cands)
        rankings.append({**_row(t, x), "responses": cands, "scores": [judge_one(t.name, x, c) for c in cands]})

    rl = [_row(*fresh()) for _ in range(n_rl)]

    files = {"sft.jsonl": sft, "prefs.jsonl": prefs, "prefs_eval.jsonl": prefs_eval,
             "rankings.jsonl": rankings, "rl_prompts.jsonl": rl, "eval_prompts.jsonl": eval_rows}
    counts = {}
    for name, rows in files.items():
        if not rows:
            continue
        write_jsonl(out / name, rows)
        counts[name] = len(rows)
    (out / "task.json").write_text(json.dumps(
        {"tasks": names, "seed": seed, "wrong_share": wrong_share, "systematic_share": systematic_share,
         "near_miss_share": near_miss_share,
         "counts": counts, "descriptions": {t.name: t.description for t in specs}}, indent=2))
    return counts


def _row(t: Task, x: str) -> dict:
    return {"prompt": t.prompt(x), "task": t.name, "input": x, "answer": t.solve(x)}


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """JSONL, atomically: a temporary file beside `path` (its folder made if missing), renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

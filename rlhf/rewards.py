"""Rewards for PPO: a trained reward model, Python reward functions, or a weighted sum.

The reward-function protocol (:class:`RewardFn`)::

    def my_reward(prompts: list[str | list[dict]], completions: list[str], **fields) -> list[float]:
        ...

``prompts`` are the dataset rows' prompts (strings or chat messages), ``completions`` the
decoded responses (text up to EOS), and ``fields`` every other column of the rows as lists of
the same length (e.g. ``answer=[...]``). It returns one finite float per sample. A recipe names
it as ``path/to/file.py:function`` or ``package.module:function``; ``gold`` is the built-in
task checker ``rlhf.data.tasks:gold_reward``. Reward code is imported only from the paths a
recipe names. A function that cannot be imported, raises, or returns the wrong count or a
non-finite value stops the run with a :class:`RewardError` naming it and the sample.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .errors import RewardError
from .algos.core import pairwise_rm_loss
from .rollout import position_ids_from_mask, right_pad

log = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, prompts: list, completions: list[str], **fields: list) -> list[float]: ...


ALIASES = {"gold": "rlhf.data.tasks:gold_reward", "judge": "rlhf.data.tasks:judge"}


def load_reward_fn(spec: str) -> Callable:
    """Import 'path/to/file.py:function' or 'package.module:function'."""
    spec = ALIASES.get(spec, spec)
    if ":" not in spec:
        raise RewardError(f"reward function '{spec}': expected 'path/to/file.py:function' or 'module:function'")
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise RewardError(f"reward function '{spec}': file {target} not found")
            stat = path.stat()  # (imported once per version of the file: a judge that the checks dry-call and the
            # run then calls keeps its module's state, a model it loads or a counter, as a module import does)
            mod_name = f"rlhf_user_reward_{abs(hash(str(path.resolve())))}_{stat.st_mtime_ns}_{stat.st_size}"
            module = sys.modules.get(mod_name)
            if module is None:
                mod_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[mod_name] = module
                try:
                    mod_spec.loader.exec_module(module)
                except BaseException:  # (a failed import is tried again next time, as Python's own)
                    del sys.modules[mod_name]
                    raise
        else:
            module = importlib.import_module(target)
    except RewardError:
        raise
    except SystemExit as e:  # a script that runs its main() on import, without `if __name__ == "__main__":`
        raise RewardError(f"reward function '{spec}': importing {target} called sys.exit({e.code!r}); guard the "
                          f"script's own entry point with `if __name__ == \"__main__\":`") from None
    except Exception as e:
        raise RewardError(f"reward function '{spec}': cannot import {target} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                      and getattr(v, "__module__", None) == module.__name__)
        listing = f"; it has: {', '.join(have)}" if have else "; it defines no functions"
        raise RewardError(f"reward function '{spec}': {target} has no function '{name}'{listing}")
    try:
        fn.__rlhf_name__ = spec
    except (AttributeError, TypeError):  # a builtin (os:system) or a C function: named through a wrapper
        target_fn = fn

        def fn(*args, **kwargs):
            return target_fn(*args, **kwargs)

        fn.__rlhf_name__ = spec
    return fn


DRY_COMPLETIONS = ("", "a", "The answer is 42.")


def dry_call(fn: Callable, prompts: list, fields: dict[str, list], timeout: float = 0.0) -> None:
    """Call a reward function once before anything is written or loaded: a few real prompts (with
    their fields) and dummy completions; it must return one finite float each, in time."""
    n = len(prompts)
    completions = [DRY_COMPLETIONS[i % len(DRY_COMPLETIONS)] for i in range(n)]
    try:
        call_reward_fn(fn, prompts, completions, fields, timeout=timeout)
    except RewardError as e:
        raise RewardError(f"{e} [at the check before the run, on {n} prompts with dummy completions]") from None


def reward_fields(examples: list) -> dict[str, list]:
    """The `fields` reward functions receive for `examples` (PromptExamples): every column any of
    them has (in the order first met), one value per example, None where its row lacks the column.
    (Taken from the first row's columns, a batch whose first row lacked `answer` passed no `answer`
    for the rows that had one.)"""
    keys = dict.fromkeys(k for e in examples for k in e.meta)
    return {k: [e.meta.get(k) for e in examples] for k in keys}


def dry_call_on(fns: list[Callable], prompts: list, timeout: float = 0.0) -> None:
    """:func:`dry_call` each of `fns` on the first 4 of `prompts` (PromptExamples), with their
    fields: every reward function and judge is called once before anything samples."""
    probe = prompts[:4]
    fields = {k: v[:4] for k, v in reward_fields(prompts).items()}  # (every column a later batch may pass)
    for fn in fns if probe else []:
        dry_call(fn, [p.raw_prompt for p in probe], fields, timeout)


def on_every_process(acc, fn: Callable, errors: tuple = (RewardError,), what: str = "a reward function"):
    """`fn()` on this process, then one vote among the processes: an error of `errors` that `fn`
    raised on any of them is raised on every one (on the others as a pointer to it), so no process
    is left waiting on a collective that another has left (the launcher would kill it, with no
    word why). `what` names what failed, in the pointer."""
    try:
        out, failure = fn(), None
    except errors as e:
        out, failure = None, e
    if acc.num_processes > 1 and acc.reduce(torch.tensor(float(failure is not None), device=acc.device),
                                            "sum").item():
        raise failure or RewardError(f"{what} failed on another process (its error is in that process's log)")
    if failure is not None:
        raise failure
    return out


FLOAT32_MAX = torch.finfo(torch.float32).max


def call_reward_fn(fn: Callable, prompts: list, completions: list[str], fields: dict[str, list],
                   where: list[str] | None = None, timeout: float = 0.0) -> list[float]:
    """Call a reward function on copies of the prompts, completions and fields, and check what it
    returns (count, type, finite in float32) and how long it takes (`timeout` seconds, 0 = no
    limit). Errors name the function and, with `where` (each
    sample's file:line), the data row of the sample at fault."""
    name = getattr(fn, "__rlhf_name__", getattr(fn, "__name__", repr(fn)))
    row = (lambda i: f" (row {where[i]})") if where else (lambda i: "")
    try:
        with time_limit(timeout, name):  # (copies: a function that edits its arguments changes nothing of the run's)
            out = fn(copy.deepcopy(prompts), list(completions), **copy.deepcopy(fields))
    except RewardError:
        raise
    except (Exception, SystemExit) as e:  # (a sys.exit in a reward function would end the run without a word)
        raise RewardError(f"reward function '{name}' raised {type(e).__name__}: {str(e) or repr(e)} on a batch of "
                          f"{len(completions)} samples{row(0).replace('row', 'first row')} "
                          f"(first prompt: {_short(prompts[0])})") from None
    if isinstance(out, torch.Tensor):
        out = out.detach().flatten().tolist()
    try:
        if isinstance(out, str | bytes | dict):  # iterable, but not one value per sample
            raise TypeError
        out = list(out)
    except TypeError:
        raise RewardError(f"reward function '{name}' returned {type(out).__name__}, expected a list of floats") from None
    if len(out) != len(completions):
        raise RewardError(f"reward function '{name}' returned {len(out)} values for {len(completions)} samples")
    values = []
    for i, v in enumerate(out):
        try:
            if isinstance(v, str | bytes):  # float('1.0') would pass: a bug in the function, not a reward
                raise TypeError
            v = float(v)
        except OverflowError:
            size = f"an integer of {v.bit_length()} bits" if isinstance(v, int) else f"a {type(v).__name__}"
            raise RewardError(f"reward function '{name}' returned {size} for sample {i}{row(i)}, too large for a "
                              f"float") from None
        except (TypeError, ValueError):
            raise RewardError(f"reward function '{name}' returned {v!r} for sample {i}{row(i)}, expected a float") \
                from None
        if not math.isfinite(v) or abs(v) > FLOAT32_MAX:  # (rewards are float32 tensors: 1e39 would be inf)
            outside = "" if not math.isfinite(v) else ", outside float32's range"
            raise RewardError(f"reward function '{name}' returned {v} for sample {i}{row(i)}{outside} "
                              f"(prompt: {_short(prompts[i])}, completion: {completions[i]!r})")
        values.append(v)
    return values


class time_limit:
    """Raise RewardError if the block runs longer than `seconds` (0: no limit).

    SIGALRM interrupts the Python code of the reward function in this (main) thread, so nothing
    is left running afterwards: no thread, no process. Off the main thread, or where SIGALRM does
    not exist, the limit cannot be enforced and is skipped with a warning."""

    def __init__(self, seconds: float, name: str):
        self.seconds, self.name, self.armed = seconds, name, False

    def __enter__(self):
        import signal
        import threading

        if self.seconds <= 0:
            return self
        if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            log.warning("reward_timeout cannot be enforced here (not the main thread)")
            return self
        self.previous = signal.signal(signal.SIGALRM, self._expired)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        self.armed = True
        return self

    def _expired(self, signum, frame):
        raise _TimedOut  # a BaseException: a reward function's `except Exception` cannot swallow it

    def __exit__(self, exc_type, exc, tb):
        if self.armed:
            import signal

            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
            except _TimedOut:  # fired between the function's return and the disarm: it finished in time
                pass
            signal.signal(signal.SIGALRM, self.previous if self.previous is not None else signal.SIG_DFL)
        if exc_type is _TimedOut:
            raise RewardError(f"reward function '{self.name}' took longer than reward_timeout ({self.seconds:g} s)")
        return False


class _TimedOut(BaseException):
    pass


def _short(p: Any) -> str:
    text = p if isinstance(p, str) else (p[-1]["content"] if p else "")
    return repr(text[:80])


# ----------------------------------------------------------------------------- reward model


BIAS_KEY = "rlhf_reward_bias"


def score_head(model):
    """The scalar head of a sequence-classification model (decoders: `score`; encoders: `classifier`)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise RewardError(f"{type(model).__name__} has no scalar head ('score' or 'classifier')")


def fit_positions(seqs: list[list[int]], limit: int | None) -> tuple[list[list[int]], list[bool]]:
    """Sequences longer than a model's `limit` learned positions cut to their first limit - 1 tokens
    and their last (the EOS a decoder RM reads its score at, an encoder's [SEP]), and which were cut.
    A reward model with a tokenizer of its own re-encodes PPO's text, whose length in its tokens is
    known only once sampled; past the table it would fail with an IndexError mid-run."""
    if limit is None or limit < 2:  # (no table, or one too small to keep both ends: score_ids refuses)
        return seqs, [False] * len(seqs)
    cut = [len(s) > limit for s in seqs]
    return [s[: limit - 1] + s[-1:] if c else s for s, c in zip(seqs, cut)], cut


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int = 64, device=None) -> torch.Tensor:
    """Raw RM scores (N,) of token sequences, read at the last non-pad token of each."""
    out = []
    device = device or next(model.parameters()).device
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        ids = right_pad(chunk, pad_id, device)
        mask = right_pad([[1] * len(s) for s in chunk], 0, device)
        out.append(forward_scores(model, ids, mask))
    return torch.cat(out) if out else torch.zeros(0)


def forward_scores(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) scores; position ids from the mask so left or right padding give the same score."""
    from .models import is_bidirectional

    kwargs = {}
    if not is_bidirectional(getattr(model, "config", None)):  # (an encoder numbers its positions its own way: XLM-R
        kwargs["position_ids"] = position_ids_from_mask(mask)  # from padding_idx + 1, as it was pretrained)
        kwargs["use_cache"] = False  # (a decoder: no KV cache for a full-sequence pass)
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, 0].float()


class RewardModel:
    """A saved RM checkpoint: scores (prompt, response) pairs exactly as in RM training, + its bias."""

    positions: int | None = None
    """Its learned positions (:func:`rlhf.models.position_limit`); None: no table to run past."""
    warned_truncation = False

    def __init__(self, path: str, device=None, dtype: str = "float32"):
        from transformers import AutoModelForSequenceClassification

        from .config import ModelConfig
        from .models import ModelError, check_reward_model, disable_dropout, load_tokenizer, position_limit, torch_dtype

        if not Path(path).exists():
            raise ModelError(f"reward model checkpoint not found: {path}")
        check_reward_model(path)
        self.tok = load_tokenizer(ModelConfig(name_or_path=path))
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype))
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load a reward model ({str(e).splitlines()[0]})") from None
        self.model.config.pad_token_id = self.tok.pad_token_id
        disable_dropout(self.model)
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.device = device  # where inputs go; None: the model's first parameter's device
        self.bias = float(getattr(self.model.config, BIAS_KEY, 0.0) or 0.0)
        self.path = path
        self.positions = position_limit(self.model)

    def encode(self, prompt, response) -> list[int]:
        from .tokenization import encode_scored

        return encode_scored(self.tok, prompt, response)

    def fit(self, seqs: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
        """`seqs` cut to its learned positions (:func:`fit_positions`) and which were cut, for text
        sampled by a policy with another tokenizer, whose length here is known only once sampled.
        The first cut is warned of."""
        seqs, cut = fit_positions(seqs, self.positions)
        if any(cut) and not self.warned_truncation:
            self.warned_truncation = True
            log.warning("%s: %d of %d sequences are longer than its %d learned positions in its own tokens; each is "
                        "scored on its first %d tokens and its last (further cuts are not warned of)", self.path,
                        sum(cut), len(seqs), self.positions, self.positions - 1)
        return seqs, cut

    def too_long(self, seq: list[int]) -> str | None:
        """Why `seq` cannot be scored whole (longer than its learned positions: an IndexError, or a
        device-side assert on a GPU), or None."""
        if self.positions is None or len(seq) <= self.positions:
            return None
        return f"{len(seq)} tokens with the prompt, more than the reward model's {self.positions} learned positions"

    def score_ids(self, seqs: list[list[int]], normalized: bool = True, batch_size: int = 64) -> torch.Tensor:
        why = next(filter(None, map(self.too_long, seqs)), None)
        if why:
            raise RewardError(f"{self.path}: a sequence to score of {why} (max_position_embeddings / n_positions)")
        raw = score_sequences(self.model, seqs, self.tok.pad_token_id, batch_size, self.device)
        return raw + self.bias if normalized else raw

    def score(self, prompts: list, responses: list, normalized: bool = True, batch_size: int = 64,
              fit: bool = False) -> torch.Tensor:
        """Scores of (prompt, response) pairs; with `fit`, those past the positions cut (:meth:`fit`)."""
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        return self.score_ids(self.fit(seqs)[0] if fit else seqs, normalized, batch_size)

    def same_tokenizer(self, tok) -> bool:
        """The policy's sampled ids are exactly what this RM's tokenizer makes of the same text: the
        same vocabulary, template and special tokens (else PPO re-encodes the text for the RM)."""
        from .tokenization import adds_bos

        special = ("eos_token_id", "bos_token_id", "cls_token_id")
        return self.tok.get_vocab() == tok.get_vocab() and self.tok.chat_template == tok.chat_template and \
            all(getattr(self.tok, k, None) == getattr(tok, k, None) for k in special) and \
            adds_bos(self.tok) == adds_bos(tok)


def group_loss(model, groups: list[tuple[list[list[int]], list[tuple[int, int, float]]]], pad_id: int, device,
               use_margin: bool = True):
    """Scores each distinct sequence of the groups once, then the pairwise losses. Returns
    (per-pair losses (P,), chosen scores (P,), rejected scores (P,))."""
    seqs, offsets = [], []
    for s, _ in groups:
        offsets.append(len(seqs))
        seqs.extend(s)
    ids = right_pad(seqs, pad_id, device)
    mask = right_pad([[1] * len(s) for s in seqs], 0, device)
    scores = forward_scores(model, ids, mask)
    w = torch.tensor([o + i for o, (_, pairs) in zip(offsets, groups) for i, _, _ in pairs], device=device)
    l = torch.tensor([o + j for o, (_, pairs) in zip(offsets, groups) for _, j, _ in pairs], device=device)
    margin = torch.tensor([m for _, pairs in groups for _, _, m in pairs], device=device, dtype=scores.dtype)
    chosen, rejected = scores[w], scores[l]
    return pairwise_rm_loss(chosen, rejected, margin if use_margin else None), chosen, rejected

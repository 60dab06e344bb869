"""Named choices of the algorithm: one function per entry, registered under the name a recipe uses.

    KL_ESTIMATORS = Registry("kl_estimator", "per-token KL estimator in the reward")

    @KL_ESTIMATORS.register("k3")
    def kl_k3(logprobs, ref_logprobs):
        \"\"\"(r - 1) - log r: unbiased, >= 0, low variance [Schulman 2020].\"\"\"
        ...

A recipe field (``kl_estimator: k3``) is checked against its registry when the recipe loads,
``rlhf ppo --help`` lists every entry with the first line of its docstring, and the code looks
the function up by name (``KL_ESTIMATORS["k3"].fn``) instead of an ``if``/``elif`` chain. Adding a
choice means writing one function and decorating it. This module imports nothing; the modules
that hold the entries are imported by :func:`registries`.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    info: dict = field(default_factory=dict)
    """What the loop needs to know about the entry (e.g. needs_values for an advantage estimator)."""

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().split("\n")[0]


class Registry:
    def __init__(self, field_name: str, what: str):
        self.field, self.what = field_name, what
        self._entries: dict[str, Entry] = {}
        _ALL[field_name] = self

    def register(self, name: str, **info: Any) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.field}: '{name}' is registered twice")
            self._entries[name] = Entry(name, fn, info)
            return fn

        return add

    def names(self) -> list[str]:
        return list(self._entries)

    def problem(self, name: str) -> str | None:
        """Why `name` is not a valid choice (None if it is), with the near miss."""
        if name in self._entries:
            return None
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"must be one of {', '.join(self.names())}, got {name!r}{hint}"

    def __getitem__(self, name: str) -> Entry:
        problem = self.problem(name)
        if problem:
            raise ValueError(f"{self.field}: {problem}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def describe(self) -> str:
        """'field: what' and one line per entry (for --help and the docs)."""
        lines = [f"{self.field} ({self.what}):"]
        lines += [f"  {e.name:<14} {e.summary}" for e in self._entries.values()]
        return "\n".join(lines)


_ALL: dict[str, Registry] = {}
_ENTRY_MODULES = ("rlhf.algos.core", "rlhf.algos.advantages", "rlhf.value")


def registries() -> dict[str, Registry]:
    """Every registry, by the recipe field it serves, with all its entries loaded."""
    for module in _ENTRY_MODULES:
        importlib.import_module(module)
    return dict(_ALL)

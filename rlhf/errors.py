"""The errors a user can fix. Each prints one line (naming the recipe file:line, the data
file:line:field, the reward function, ...) and exits with status 2; nothing already written is lost."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema (one line, names the key).

    `key` is the dotted key at fault (relative to the config being built), so the loader can
    prefix the recipe's file:line or the command-line override that set it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class DataError(ValueError):
    """A bad dataset row; the message names file, line and field."""


class RunError(RuntimeError):
    """A run that cannot start or go on (one line, nothing already written is touched)."""


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded as the recipe asks (one line)."""


class RewardError(ValueError):
    """A reward function or reward model that cannot be used (one line)."""


class TemplateError(ValueError):
    """The chat template does not render a conversation as prefix + continuation."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a launcher stopping its workers after its own Ctrl-C or SIGTERM, a cluster job's
    preemption or time limit) raised in the main thread: the run stops as on Ctrl-C, its folder
    marked and resumable, where the signal's default action ended the process without a word."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, RunError, ModelError, RewardError,
                                                TemplateError)

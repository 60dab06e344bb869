"""Advantage estimators: how a rollout's rewards become per-token advantages (and returns).

Every estimator is one pure function registered in :data:`ADVANTAGE_ESTIMATORS` under the name
a recipe gives as ``advantage_estimator``::

    @ADVANTAGE_ESTIMATORS.register("gae", needs_values=True)
    def gae(x: AdvantageInputs, cfg) -> tuple[Tensor, Tensor | None]:
        ...

It receives an :class:`AdvantageInputs` (the whole rollout batch: token rewards, sequence
scores, per-token KL, the response mask, the old values when the estimator uses a critic, and
which prompt each sample answers, so that group estimators can compare the K samples of one
prompt) and the PPO config (for its coefficients), and returns (advantages (B, R), returns
(B, R) or None). Registration info the loop reads:

- ``needs_values``: a value model is built, trained on the returns and read here; without it
  no value model is loaded at all;
- ``min_group``: the fewest samples per prompt (``samples_per_prompt``) the estimator can use.

The PPO loop around it stays the same whatever the estimator: clipped surrogate, KL controller,
whitening (``whiten_advantages``), resume, DeepSpeed, Python rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import core
from .registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage_estimator", "per-token advantages from the rollout's rewards")


@dataclass
class AdvantageInputs:
    """One rollout batch of B sequences with R response tokens, as an estimator sees it."""

    rewards: torch.Tensor
    """(B, R) per-token reward: -beta * KL_t, plus the sequence score on the last valid token [N]."""
    scores: torch.Tensor
    """(B,) sequence scores (after scaling and clipping)."""
    kl: torch.Tensor
    """(B, R) the per-token KL estimate in the reward (0 after the end)."""
    mask: torch.Tensor
    """(B, R) 1 on response tokens up to and including EOS."""
    group: torch.Tensor
    """(B,) the index of the prompt each sample answers: its K samples share it."""
    values: torch.Tensor | None = None
    """(B, R) V(s_t) of the state before each token, if the estimator uses a critic."""


@ADVANTAGE_ESTIMATORS.register("gae", needs_values=True, min_group=1)
def gae(x: AdvantageInputs, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO with a critic: GAE(gamma, lam) over the KL-shaped token rewards [GAE eq. 16, IGPT]."""
    return core.gae_advantages(x.rewards, x.values, x.mask, cfg.gamma, cfg.lam)

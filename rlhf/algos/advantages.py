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
- ``min_group``: the fewest samples per prompt (``samples_per_prompt``) the estimator can use
  (checked when the recipe loads);
- ``kl_penalty``: where the KL to the reference goes by default, ``reward`` (-beta * KL per
  token in the rewards it receives) or ``loss`` (beta * KL added to the policy loss; the rewards
  then hold the score alone); a recipe's ``kl_penalty`` overrides it;
- ``whiten``: whether its advantages are whitened over the whole batch (all processes) by
  default; a recipe's ``whiten_advantages`` overrides it.

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


@ADVANTAGE_ESTIMATORS.register("gae", needs_values=True, min_group=1, kl_penalty="reward", whiten=True)
def gae(x: AdvantageInputs, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO with a critic: GAE(gamma, lam) over the KL-shaped token rewards [GAE eq. 16, IGPT]."""
    return core.gae_advantages(x.rewards, x.values, x.mask, cfg.gamma, cfg.lam)


# ----------------------------------------------------------------------------- critic-free baselines


def sequence_returns(x: AdvantageInputs) -> torch.Tensor:
    """(B,) R_i = sum_t r_t over the valid tokens: the score minus beta times the sequence KL
    when the KL is in the reward, the score alone when it is a loss term."""
    return (x.rewards * x.mask).sum(-1)


def group_mean_std(values: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: the mean, the unbiased std and the size of its group (samples sharing `group`).

    values (B,), group (B,) integer ids. Returns three (B,) tensors."""
    ids, inverse = torch.unique(group, return_inverse=True)
    n = torch.zeros(len(ids), dtype=values.dtype, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    total = torch.zeros_like(n).index_add_(0, inverse, values)
    mean = total / n
    sq = torch.zeros_like(n).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))
    return mean[inverse], std[inverse], n[inverse]


@ADVANTAGE_ESTIMATORS.register("grpo", needs_values=False, min_group=2, kl_penalty="loss", whiten=False)
def grpo(x: AdvantageInputs, cfg) -> tuple[torch.Tensor, None]:
    """GRPO: (R_i - mean of its group) / std of its group, on every token [Shao et al. 2024 §4.1.2].

    Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300, eq. 3 and §4.1.2,
    "outcome supervision"): each of the G = samples_per_prompt responses to a prompt gets
    A_i = (r_i - mean(r)) / std(r) on all its tokens; std is the unbiased one, as verl's
    compute_grpo_outcome_advantage. `grpo_scale_std: false` keeps only the centring (Dr. GRPO,
    Liu et al. 2025, arXiv 2503.20783: the division favours prompts whose rewards barely vary).
    By default the KL to the reference is a loss term (k3), not in the reward (`kl_penalty`).
    Shapes: rewards/mask (B, R), group (B,) -> advantages (B, R), no returns."""
    r = sequence_returns(x)
    mean, std, _ = group_mean_std(r, x.group)
    adv = r - mean
    if cfg.grpo_scale_std:
        adv = adv / (std + 1e-6)
    return adv[:, None] * x.mask, None


@ADVANTAGE_ESTIMATORS.register("rloo", needs_values=False, min_group=2, kl_penalty="reward", whiten=False)
def rloo(x: AdvantageInputs, cfg) -> tuple[torch.Tensor, None]:
    """RLOO: R_i minus the mean of the other k - 1 samples of its prompt, on every token [Ahmadian et al. 2024].

    REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740, eq. 5; Kool et al. 2019):
    the whole response is one action with return R_i = score_i - beta * sum_t KL_t, and
    A_i = R_i - 1/(k-1) sum_{j != i} R_j = k/(k-1) (R_i - mean(R)).
    Shapes: rewards/mask (B, R), group (B,) -> advantages (B, R), no returns."""
    r = sequence_returns(x)
    mean, _, n = group_mean_std(r, x.group)
    adv = (r - mean) * n / (n - 1).clamp(min=1)
    return adv[:, None] * x.mask, None


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", needs_values=False, min_group=1, kl_penalty="reward", whiten=True)
def reinforce_pp(x: AdvantageInputs, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: the token rewards to go (KL in the reward, no critic), normalised over the global batch [Hu 2025].

    REINFORCE++ (Hu 2025, arXiv 2501.03262, §3): PPO's per-token reward -beta * KL_t plus the
    score at the end, returns G_t = sum_{t' >= t} gamma^(t'-t) r_t' (gamma = 1 by default), used
    directly as advantages and normalised over the whole batch of every process (the loop's
    whitening, registered `whiten=True`), not per prompt; PPO's clipping stays.
    Shapes: rewards/mask (B, R) -> (advantages, returns) (B, R)."""
    rewards = x.rewards * x.mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + cfg.gamma * running
        returns[:, t] = running
    returns = returns * x.mask
    return returns, returns

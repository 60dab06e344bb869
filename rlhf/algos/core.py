"""The RLHF algorithm as pure functions of tensors (imports nothing but torch and the registry).

Shapes: B = sequences, R = response tokens. ``mask`` is 1 on valid response tokens (up to and
including EOS) and 0 after. Every function names its source:

[IGPT] Ouyang et al. 2022, arXiv 2203.02155.  [N] Huang et al. 2023, "The N Implementation
Details of RLHF with PPO".  [N+] Huang et al. 2024, arXiv 2403.17031.  [PPO] Schulman et al.
2017, arXiv 1707.06347.  [GAE] Schulman et al. 2016, arXiv 1506.02438.  [K] Schulman 2020,
"Approximating KL Divergence".  [MAX] Zheng et al. 2023, arXiv 2307.04964.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import Registry

# ----------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (0 if none)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default, as in [N])."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce=None) -> torch.Tensor:
    """Whiten x over the valid tokens: (x - mean) / sqrt(var + eps) [N, "advantage whitening"].

    With shift_mean=False the mean is added back (reward whitening in [N] keeps the mean).
    Masked positions are returned as 0. `reduce` sums a tensor over the data-parallel processes,
    so the mean and (Bessel-corrected) variance are those of the whole batch; without it, of x.
    """
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        n = reduce(mask.sum())
        mean = reduce((x * mask).sum()) / n.clamp(min=1)
        var = reduce(((x - mean) ** 2 * mask).sum()) / n.clamp(min=1)
        var = var * n / (n - 1) if n > 1 else var
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------- SFT / ptx


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Next-token NLL summed over labelled tokens, and their count.

    logits (B, T, V), labels (B, T) aligned with the inputs (label t is the token at t); the
    logit at t predicts label t + 1. Positions with ignore_index (prompt, padding) carry no
    loss. Dividing by the count of the whole global batch gives the token-mean CE used for SFT
    [IGPT §3.5] and for the PPO-ptx term [IGPT eq. 2].
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    return loss, int((shift_labels != ignore_index).sum())


# ----------------------------------------------------------------------------- reward model


def pairwise_rm_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin)  [IGPT eq. 1] (margin: Llama 2).

    chosen, rejected, margin: (P,) scores of P pairs. Returns (P,). Averaging over the
    C(K, 2) pairs of a prompt, all in one batch, is the InstructGPT estimator.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def reward_bias(reference_scores: torch.Tensor) -> float:
    """Bias b so that reference_scores + b has mean 0 [IGPT §3.5: "normalized so that the
    labeler demonstrations achieve a mean score of 0"]."""
    return float(-reference_scores.float().mean())


# ----------------------------------------------------------------------------- KL and reward


KL_ESTIMATORS = Registry("kl_estimator", "per-token estimate of KL(pi || pi_ref) from the sampled tokens [K]")


@KL_ESTIMATORS.register("k1")
def kl_k1(log_r: torch.Tensor) -> torch.Tensor:
    """-log r: unbiased, can be negative per token (InstructGPT's penalty)."""
    return -log_r


@KL_ESTIMATORS.register("k2")
def kl_k2(log_r: torch.Tensor) -> torch.Tensor:
    """(log r)^2 / 2: biased, low variance, >= 0."""
    return 0.5 * log_r**2


@KL_ESTIMATORS.register("k3")
def kl_k3(log_r: torch.Tensor) -> torch.Tensor:
    """(r - 1) - log r: unbiased, >= 0, low variance."""
    return torch.expm1(log_r) - log_r


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi [K].

    logprobs, ref_logprobs: (B, R) log-probs of the sampled tokens; with log r = ref - logp
    (r = pi_ref / pi) the estimator is one of :data:`KL_ESTIMATORS` (k1, k2, k3).
    """
    return KL_ESTIMATORS[estimator].fn(ref_logprobs.float() - logprobs.float())


def kl_loss_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3",
                      bound: float = 10.0) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) for a KL *loss* term (GRPO's beta * D_KL [Shao et al. 2024, eq. 3-4]):
    :func:`kl_estimate` with log r clamped to [-20, 20] and the estimate to [-bound, bound], as verl's
    `kl_penalty` does for its low-variance (k3) estimate (core_algos.py). The clamp is only active
    where a token is >10 nats apart: there k3's gradient r - 1 = e^(log r) - 1 would otherwise dwarf the
    policy-gradient term (the estimate, not only the gradient, is bounded, so the logged kl_loss is too).

    logprobs, ref_logprobs: (B, R). Returns (B, R); the gradient flows through logprobs where unclamped.
    """
    log_r = (ref_logprobs.float() - logprobs.float()).clamp(-20.0, 20.0)
    return KL_ESTIMATORS[estimator].fn(log_r).clamp(-bound, bound)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last valid response token (the EOS, or the last one if cut off)."""
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
    return (positions * mask.long()).argmax(-1)


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward r_t = -beta * KL_t, plus the sequence score on the last valid token [N, IGPT eq. 2].

    scores (B,), kl (B, R), mask (B, R). Returns (rewards (B, R), non_score_rewards (B, R)),
    both 0 on masked positions.
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    idx = last_token_index(mask)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), idx] += scores.to(rewards.dtype)
    return rewards, non_score


def clip_scores(scores: torch.Tensor, clip: float) -> torch.Tensor:
    """Clip sequence scores to [-clip, clip] (clip <= 0: unchanged) [MAX §5.3]."""
    return scores if clip <= 0 else scores.clamp(-clip, clip)


# ----------------------------------------------------------------------------- advantages


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation [GAE eq. 16], over the response tokens.

    rewards, values, mask: (B, R). delta_t = r_t + gamma V_{t+1} - V_t;
    A_t = sum_l (gamma lam)^l delta_{t+l}. The episode ends at the last valid token (V = 0
    beyond it); masked positions get advantage 0. Returns (advantages, returns = A + V).
    InstructGPT uses gamma = 1 ("no discount"); lam = 0.95 [N+].
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    last = torch.zeros_like(values[:, 0])
    adv = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]  # nothing flows back from after the end
        adv[:, t] = last
    returns = adv + values
    return adv * mask, returns * mask


# ----------------------------------------------------------------------------- losses


LOSS_AGGREGATIONS = Registry("loss_agg", "how a minibatch's per-token losses become one number [verl agg_loss]")


@dataclass
class Aggregate:
    """A minibatch's per-token losses x (B, R) become sum(x * weights) / divisor."""
    weights: torch.Tensor  # (B, R), 0 on masked positions
    divisor: float


@LOSS_AGGREGATIONS.register("token_mean")
def agg_token_mean(mask: torch.Tensor, n_tokens: float, n_seqs: float, max_len: int) -> Aggregate:
    """Mean over every valid token of the minibatch: long responses weigh more [N+; verl's default,
    TRL's and DAPO's (Yu et al. 2025, eq. 8)]."""
    return Aggregate(mask, n_tokens)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def agg_seq_mean_token_mean(mask: torch.Tensor, n_tokens: float, n_seqs: float, max_len: int) -> Aggregate:
    """Each response's token mean, averaged over the responses: 1/G sum_i 1/|o_i| sum_t, GRPO's
    objective as published [Shao et al. 2024, eq. 3]."""
    return Aggregate(mask / mask.sum(-1, keepdim=True).clamp(min=1), n_seqs)


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def agg_seq_mean_token_sum_norm(mask: torch.Tensor, n_tokens: float, n_seqs: float, max_len: int) -> Aggregate:
    """Token sums divided by one constant, max_new_tokens x responses: no length bias either way
    [Dr. GRPO, Liu et al. 2025, eq. 3 / §3.2]."""
    return Aggregate(mask, max_len * n_seqs)


def aggregate(per_token: torch.Tensor, agg: Aggregate) -> torch.Tensor:
    """sum(per_token * agg.weights) / agg.divisor: a scalar."""
    return masked_sum(per_token, agg.weights) / agg.divisor


@dataclass
class PolicyLossStats:
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2, log_ratio_clamp: float = 20.0,
                normalizer: float | Aggregate | None = None) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate loss [PPO eq. 7], as a loss to minimise.

    L = sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) / N with
    rho_t = exp(clamp(logp - logp_old, +-log_ratio_clamp)); N = valid tokens (or `normalizer`,
    e.g. the token count of the whole minibatch when it is split into micro-batches; or an
    :class:`Aggregate` of :data:`LOSS_AGGREGATIONS`, whose weights replace the mask in the sum).
    Stats (token means whatever the aggregation): fraction of clipped tokens,
    approx-KL = mean((rho - 1) - log rho) [K, k3], mean ratio.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    loss = _aggregate(per_token, mask, normalizer)
    with torch.no_grad():
        stats = PolicyLossStats(
            clipfrac=masked_mean((clipped > unclipped).float(), mask),
            approx_kl=masked_mean(ratio - 1 - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2,
               normalizer: float | Aggregate | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 1/2 max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2) [N+, N].

    values, old_values, returns, mask: (B, R). Returns (loss averaged over valid tokens, or
    divided by `normalizer`, or aggregated by it as in :func:`policy_loss`; fraction of tokens
    where the clipped term was larger).
    """
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return _aggregate(per_token, mask, normalizer), clipfrac


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, normalizer: float | Aggregate | None) -> torch.Tensor:
    if isinstance(normalizer, Aggregate):
        return aggregate(per_token, normalizer)
    return masked_sum(per_token, mask) / (mask.sum().clamp(min=1) if normalizer is None else normalizer)


def _logp_entropy(logits: torch.Tensor, targets: torch.Tensor):
    """(logp, entropy, exp(x - max), its sum): one vocabulary-sized tensor made."""
    top = logits.amax(-1, keepdim=True)
    e = (logits - top).exp_()
    total = e.sum(-1, keepdim=True)
    lse = top + total.log()
    logp = (logits.gather(-1, targets.unsqueeze(-1)) - lse).squeeze(-1)
    entropy = lse.squeeze(-1) - torch.linalg.vecdot(e, logits) / total.squeeze(-1)  # H = lse - E_p[x]
    return logp, entropy, e, total


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(x)[y] with the softmax kept for a one-allocation backward (see token_logprobs)."""

    @staticmethod
    def forward(ctx, logits, targets):
        logp, entropy, p, total = _logp_entropy(logits, targets)
        p.div_(total)  # the softmax, for the backward
        ctx.save_for_backward(p, targets)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # (no second-order gradients through the in-place reuse)
    def backward(ctx, grad_logp, _grad_entropy):
        p, targets = ctx.saved_tensors
        # d logp_y / d x_v = 1[v = y] - p_v; the saved softmax becomes the gradient in place
        # (the graph is never run twice: PPO's backward does not retain it)
        grad = p.mul_(-grad_logp.unsqueeze(-1))
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
        return grad, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = True,
                   entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | ...) of the chosen tokens and the entropy of each position, from logits.

    logits (..., V) float, targets (...) int64 -> (logp (...), entropy (...) or None), in nats.
    logp = x_y - logsumexp(x) (the log-softmax at the target: the [PPO] ratio's numerator);
    H = logsumexp(x) - sum_v softmax(x)_v x_v. The (..., V) log-softmax is never materialised:
    with a gradient, one vocabulary-sized tensor (the softmax) is made and reused as the
    gradient, where log_softmax + gather + their backward make five; without one, it is made
    and dropped. The values equal F.log_softmax(x).gather(y) to float rounding. The entropy
    carries no gradient unless `entropy_grad` (an entropy bonus in the loss), which takes
    F.log_softmax through autograd."""
    if entropy_grad:
        logp_all = F.log_softmax(logits, dim=-1)
        logp = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1)
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogprobs.apply(logits, targets)
    logp, entropy = _logp_entropy(logits, targets)[:2]  # the same arithmetic: a ratio of exactly 1 stays 1
    return logp, entropy if with_entropy else None


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax distribution, in nats."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- KL coefficient


class FixedKLController:
    """Constant beta (InstructGPT used 0.02; N+ 0.05)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        """Nothing to restore: β is the recipe's kl_coef (a resume that changes it, or switches
        adaptive_kl off, goes on with the recipe's, as its warning says; it was the checkpoint's)."""


class AdaptiveKLController:
    """lm-human-preferences' controller [N]: e = clip(KL/target - 1, -0.2, 0.2);
    beta <- beta (1 + e n_steps / horizon). Defaults there: init 0.15, target 6, horizon 10000."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        """β from a checkpoint (a fixed controller's too: adaptive_kl switched on at a resume goes on
        from its β); the target and horizon stay the recipe's, as a resume with a changed recipe says."""
        self.value = d["value"]


# ----------------------------------------------------------------------------- reward scaling


class RunningMoments:
    """Running mean / std of scores, merged batch by batch (Chan et al. parallel variance);
    dividing the score by the running std is the reward scaling of [MAX §5.3]."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x: torch.Tensor) -> None:
        x = x.double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_var = float(x.var(unbiased=False))
        delta = b_mean - self.mean
        tot = self.count + n
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.var = m2 / tot
        self.count = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.count = d["mean"], d["var"], d["count"]


REWARD_SCALINGS = Registry("scale_reward", "how sequence scores are scaled before the KL penalty is added [MAX]")


@REWARD_SCALINGS.register("none")
def scale_none(scores: torch.Tensor, moments: RunningMoments, batch: torch.Tensor) -> torch.Tensor:
    """Scores as they are."""
    return scores


@REWARD_SCALINGS.register("running_std")
def scale_running_std(scores: torch.Tensor, moments: RunningMoments, batch: torch.Tensor) -> torch.Tensor:
    """Divide by the running std of every score seen so far, this batch (all processes) included [MAX §5.3]."""
    moments.update(batch)
    return scores / max(moments.std, 1e-8)


# ----------------------------------------------------------------------------- EMA


@torch.no_grad()
def ema_update(ema_params, params, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta  [IGPT: EMA 0.992 of the policy]."""
    for e, p in zip(ema_params, params):
        e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1.0 - decay)

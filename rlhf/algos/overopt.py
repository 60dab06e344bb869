"""Reward over-optimisation: the trends a hacking alarm reads (pure functions, no torch).

Gao, Schulman & Hilton 2022 (arXiv 2210.10760): optimising a proxy reward model, the gold reward
first rises and then falls as d = sqrt(KL(pi || pi_init)) grows, while the proxy keeps rising;
for RL they fit R_gold(d) = d (alpha - beta log d). The alarm watches exactly that divergence on
the held-out evaluations, plus an absolute KL budget (this project's hacked runs passed ~2 nats
per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass


def trend(values: list[float]) -> float:
    """The least-squares line's change across `values` (slope x (n - 1)); 0 for fewer than 2.

    Robust to one noisy point in a way first-minus-last is not: for (1, 3, 2) it is 1.0."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    sxy = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return sxy / sxx * (n - 1)


@dataclass
class Evaluation:
    """One held-out evaluation: its iteration, KL to the SFT policy (nats per sequence), the proxy
    reward (what the policy is trained on) and the gold reward (held out)."""

    iteration: int
    kl: float
    proxy: float
    gold: float | None


def alarm_checkable(history: list[Evaluation], window: int, kl_budget: float = 0.0) -> bool:
    """Whether :func:`hacking_alarm` could fire after the newest evaluation: with a KL budget, or
    with gold on every evaluation and `window` of them after at least one earlier. Where it could
    not, "no alarm" means nothing and is not logged as 0."""
    if kl_budget > 0:
        return bool(history)
    return len(history) > window and all(e.gold is not None for e in history)


def hacking_alarm(history: list[Evaluation], window: int, proxy_rise: float, gold_drop: float,
                  kl_budget: float = 0.0) -> str | None:
    """Why the alarm fires after the newest evaluation, or None.

    Gao et al. 2022 (Fig. 1): past its peak, the gold reward falls while the proxy keeps rising.
    The alarm fires when, over the last `window` evaluations, the proxy's least-squares trend
    rises by more than `proxy_rise` while every gold in the window stays more than `gold_drop`
    below the best gold before it: a sustained fall from the peak, not one noisy evaluation, and
    not a dip the run has already recovered from. It also fires when the newest KL to the initial
    policy exceeds `kl_budget` (> 0).
    """
    if not history:
        return None
    last = history[-1]
    if kl_budget > 0 and last.kl > kl_budget:
        return f"KL to the SFT policy {last.kl:.2f} nats/sequence passed kl_budget {kl_budget:g}"
    recent, before = history[-window:], history[:-window]
    if len(recent) < window or not before or any(e.gold is None for e in recent + before):
        return None
    peak = max(before, key=lambda e: e.gold)
    d_proxy = trend([e.proxy for e in recent])
    if d_proxy > proxy_rise and all(e.gold < peak.gold - gold_drop for e in recent):
        worst = min(e.gold for e in recent)
        return (f"over the last {window} evaluations (iterations {recent[0].iteration}-{last.iteration}) the proxy "
                f"reward rose by {d_proxy:+.3f} while the gold stayed below its best ({peak.gold:.3f} at iteration "
                f"{peak.iteration}) by more than {gold_drop:g} (down to {worst:.3f})")
    return None

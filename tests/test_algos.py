"""The PPO/RM math against hand-computed values on 2-4 token examples, plus invariances."""

import math

import pytest
import torch

from rlhf.algos import core


def test_masked_mean_var_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert core.masked_mean(x, m).item() == pytest.approx(2.0)
    assert core.masked_var(x, m).item() == pytest.approx(1.0)  # unbiased: ((1+0+1)/3)*3/2
    w = core.masked_whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert w[0, 3].item() == 0.0  # masked position zeroed
    keep = core.masked_whiten(x, m, shift_mean=False)
    assert keep[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


def test_whiten_ignores_masked_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    y = torch.tensor([[1.0, 2.0, 3.0, -1e6]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.equal(core.masked_whiten(x, m), core.masked_whiten(y, m))


def test_kl_estimators_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    # log r = ref - logp = [-log 2, +log 2]
    l2 = math.log(2)
    assert core.kl_estimate(logp, ref, "k1")[0].tolist() == pytest.approx([l2, -l2])
    assert core.kl_estimate(logp, ref, "k2")[0].tolist() == pytest.approx([0.5 * l2**2, 0.5 * l2**2])
    assert core.kl_estimate(logp, ref, "k3")[0].tolist() == pytest.approx([(0.5 - 1) + l2, (2 - 1) - l2])
    assert (core.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        core.kl_estimate(logp, ref, "k4")


def test_kl_loss_is_the_estimate_clamped_as_verl_clamps_it():
    logp = torch.tensor([[math.log(0.5), -30.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), 0.0, -30.0]])
    kl = core.kl_loss_per_token(logp, ref, "k3")
    l2 = math.log(2)
    # an ordinary token: the k3 estimate itself; log r = +30 and -30: clamped to +-20, then to 10
    assert kl[0].tolist() == pytest.approx([(0.5 - 1) + l2, 10.0, 10.0])
    kl.sum().backward()
    # d/dlogp of k3 = 1 - r on the ordinary token; none through the clamped ones
    assert logp.grad[0].tolist() == pytest.approx([1 - 0.5, 0.0, 0.0])
    assert core.kl_loss_per_token(logp, ref, "k1")[0, 0].item() == pytest.approx(l2)


def test_kl_estimators_agree_in_expectation():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.4, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200000, replacement=True)
    logp, logq = p.log()[x], q.log()[x]
    for est in ("k1", "k3"):
        assert core.kl_estimate(logp, logq, est).mean().item() == pytest.approx(true_kl, rel=0.03)


def test_shaped_rewards_score_on_last_valid_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, 2.0])
    rewards, non_score = core.shaped_rewards(scores, kl, 0.1, mask)
    assert rewards[0].tolist() == pytest.approx([-0.01, -0.02, -0.03, -0.04 + 1.0])
    assert rewards[1].tolist() == pytest.approx([-0.05, -0.05 + 2.0, 0.0, 0.0])
    assert non_score[1].tolist() == pytest.approx([-0.05, -0.05, 0.0, 0.0])


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert core.last_token_index(mask).tolist() == [2, 0, 3]


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3)
    gamma, lam = 1.0, 0.5
    adv, ret = core.gae_advantages(rewards, values, mask, gamma, lam)
    d2 = 1.0 - 0.3
    d1 = 0.0 + 0.3 - 0.4
    d0 = 0.0 + 0.4 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])


def _gae_reference(r, v, n, gamma, lam):
    """Per-sequence python loop over the n valid tokens."""
    adv = [0.0] * len(r)
    last = 0.0
    for t in reversed(range(n)):
        nv = v[t + 1] if t + 1 < n else 0.0
        delta = r[t] + gamma * nv - v[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_batched_matches_python_loop_and_ignores_padding():
    torch.manual_seed(0)
    B, T = 5, 7
    r, v = torch.randn(B, T), torch.randn(B, T)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, _ = core.gae_advantages(r, v, mask, 0.9, 0.8)
    for b, n in enumerate(lengths):
        ref = _gae_reference(r[b].tolist(), v[b].tolist(), n, 0.9, 0.8)
        assert adv[b].tolist() == pytest.approx(ref, abs=1e-5)
    # garbage after the end changes nothing
    r2, v2 = r.clone(), v.clone()
    r2[mask == 0] = 123.0
    v2[mask == 0] = -77.0
    adv2, ret2 = core.gae_advantages(r2, v2, mask, 0.9, 0.8)
    assert torch.allclose(adv, adv2) and (adv2[mask == 0] == 0).all() and (ret2[mask == 0] == 0).all()


def test_policy_loss_hand_computed():
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5 vs old = 0
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, st = core.policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert st.clipfrac.item() == pytest.approx(0.5)
    assert st.ratio_mean.item() == pytest.approx(1.0)
    l1, l2 = math.log(1.5), math.log(0.5)
    assert st.approx_kl.item() == pytest.approx(((0.5 - l1) + (-0.5 - l2)) / 2)


def test_policy_loss_negative_advantage_and_mask():
    logp = torch.tensor([[math.log(0.5), 5.0]])
    old = torch.zeros(1, 2)
    adv = torch.tensor([[-2.0, 100.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss, st = core.policy_loss(logp, old, adv, mask, cliprange=0.2)
    # ratio 0.5, A = -2: max(1.0, 2 * 0.8 = 1.6) = 1.6
    assert loss.item() == pytest.approx(1.6)
    assert st.clipfrac.item() == pytest.approx(1.0)


def test_policy_loss_ratio_one_and_log_ratio_clamp():
    logp = torch.randn(3, 4)
    adv = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    loss, st = core.policy_loss(logp, logp.clone(), adv, mask)
    assert st.ratio_mean.item() == 1.0 and st.clipfrac.item() == 0.0 and st.approx_kl.item() == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    huge = torch.full((1, 1), 1000.0)
    l, s = core.policy_loss(huge, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), log_ratio_clamp=20.0)
    assert torch.isfinite(l) and torch.isfinite(s.approx_kl)


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.1]])
    mask = torch.ones(1, 2)
    loss, clipfrac = core.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: unclipped (1-2)^2 = 1; clipped V = 0.7 -> (0.7-2)^2 = 1.69; max = 1.69
    # token 1: both (0 - 0.1)^2 = 0.01
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.01) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_normalizer_makes_micro_batching_exact():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.float)
    full, _ = core.policy_loss(logp, old, adv, mask)
    n = mask.sum()
    parts = sum(core.policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], normalizer=n)[0]
                for i in (0, 2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_pairwise_rm_loss_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    loss = core.pairwise_rm_loss(chosen, rejected)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(2.0)])
    with_margin = core.pairwise_rm_loss(chosen, rejected, torch.tensor([1.0, 0.0]))
    assert with_margin[0].item() == pytest.approx(math.log(2.0))


def test_reward_bias_centres_reference():
    ref = torch.tensor([1.0, 2.0, 6.0])
    b = core.reward_bias(ref)
    assert b == pytest.approx(-3.0)
    assert (ref + b).mean().item() == pytest.approx(0.0)


def test_lm_loss_sum_masks_prompt():
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 3] = 10.0  # predicts label at t=2
    labels = torch.tensor([[-100, -100, 3, -100]])
    s, n = core.lm_loss_sum(logits, labels)
    assert n == 1
    expected = -torch.log_softmax(logits[0, 1], -1)[3].item()
    assert s.item() == pytest.approx(expected)


def test_adaptive_kl_controller():
    ctl = core.AdaptiveKLController(0.15, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.15 * (1 + 0.2 * 100 / 10000))
    ctl2 = core.AdaptiveKLController(0.15, 6.0, 10000)
    ctl2.update(current_kl=5.4, n_steps=64)  # error -0.1
    assert ctl2.value == pytest.approx(0.15 * (1 - 0.1 * 64 / 10000))
    fixed = core.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    # resumed: beta from the checkpoint, a fixed controller's too (adaptive_kl switched on at a resume was a
    # KeyError), target and horizon the recipe's (a changed kl_target was silently the checkpoint's)
    resumed = core.AdaptiveKLController(0.15, target=3.0, horizon=500)
    resumed.load_state_dict(fixed.state_dict())
    assert (resumed.value, resumed.target, resumed.horizon) == (0.05, 3.0, 500)
    resumed.load_state_dict(ctl.state_dict())
    assert (resumed.value, resumed.target, resumed.horizon) == (ctl.value, 3.0, 500)
    fixed.load_state_dict(ctl.state_dict())  # a fixed beta is the recipe's kl_coef, whatever was saved
    assert fixed.value == 0.05


def test_running_moments_matches_numpy():
    torch.manual_seed(0)
    xs = [torch.randn(n) * 3 + 1 for n in (5, 17, 8)]
    rm = core.RunningMoments()
    for x in xs:
        rm.update(x)
    allx = torch.cat(xs).double()
    assert rm.mean == pytest.approx(allx.mean().item(), abs=1e-9)
    assert rm.std == pytest.approx(allx.std(unbiased=True).item(), abs=1e-9)


def test_clip_scores_and_ema():
    assert core.clip_scores(torch.tensor([-20.0, 3.0, 20.0]), 10.0).tolist() == [-10.0, 3.0, 10.0]
    assert core.clip_scores(torch.tensor([-20.0]), 0.0).tolist() == [-20.0]
    e = [torch.tensor([1.0])]
    core.ema_update(e, [torch.tensor([3.0])], 0.75)
    assert e[0].item() == pytest.approx(1.5)


def test_entropy_from_logits():
    assert core.entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------- critic-free estimators


def _groups_2x3():
    """2 prompts x 3 samples; rows 1, 2 and 4 end early (padding after their last token)."""
    from rlhf.algos.advantages import AdvantageInputs

    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    scores = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 0.0])
    rewards = torch.zeros(6, 3)
    last = [2, 1, 0, 2, 1, 2]
    for i, t in enumerate(last):
        rewards[i, t] = scores[i]  # the KL is a loss term here: the score alone, on the last token
    rewards[:, :] += 7.0 * (1 - mask)  # junk on padding must never count
    return AdvantageInputs(rewards=rewards, scores=scores, kl=torch.zeros(6, 3), mask=mask,
                           group=torch.tensor([0, 0, 0, 3, 3, 3]))


def test_grpo_hand_computed_on_two_prompts_of_three_samples():
    from types import SimpleNamespace

    from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS

    x = _groups_2x3()
    adv, ret = ADVANTAGE_ESTIMATORS["grpo"].fn(x, SimpleNamespace(grpo_scale_std=True))
    # group 0: r = (1, 0, 2), mean 1, unbiased std 1 -> (0, -1, 1); group 1: r = (3, 3, 0), mean 2,
    # std sqrt(3) -> (1, 1, -2) / sqrt(3); every valid token of a sample carries its advantage
    s3 = 3**0.5
    want = torch.tensor([[0, 0, 0], [-1, -1, 0], [1, 0, 0], [1 / s3] * 3, [1 / s3, 1 / s3, 0], [-2 / s3] * 3])
    assert ret is None and torch.allclose(adv, want, atol=1e-5)
    adv, _ = ADVANTAGE_ESTIMATORS["grpo"].fn(x, SimpleNamespace(grpo_scale_std=False))  # Dr. GRPO: centring only
    assert torch.allclose(adv[3], torch.tensor([1.0, 1.0, 1.0])) and torch.allclose(adv[5], torch.tensor([-2.0] * 3))


def test_rloo_hand_computed_on_two_prompts_of_three_samples():
    from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS

    adv, ret = ADVANTAGE_ESTIMATORS["rloo"].fn(_groups_2x3(), None)
    # A_i = R_i - mean of the other two: 1-(0+2)/2=0, 0-1.5, 2-0.5; 3-1.5, 3-1.5, 0-3
    want = torch.tensor([[0, 0, 0], [-1.5, -1.5, 0], [1.5, 0, 0], [1.5] * 3, [1.5, 1.5, 0], [-3.0] * 3])
    assert ret is None and torch.allclose(adv, want)


def test_reinforce_pp_is_reward_to_go_of_kl_shaped_rewards():
    from types import SimpleNamespace

    from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.5, 0.25, 1.0], [2.0, 9.0, 9.0]])  # -beta*KL_t (+ score at the end); padding junk
    x = AdvantageInputs(rewards=rewards, scores=torch.tensor([1.0, 2.0]), kl=torch.zeros(2, 3), mask=mask,
                        group=torch.tensor([0, 1]))
    adv, ret = ADVANTAGE_ESTIMATORS["reinforce_pp"].fn(x, SimpleNamespace(gamma=1.0))
    assert adv.tolist() == [[1.75, 1.25, 1.0], [2.0, 0.0, 0.0]] and torch.equal(adv, ret)
    adv, _ = ADVANTAGE_ESTIMATORS["reinforce_pp"].fn(x, SimpleNamespace(gamma=0.5))
    assert adv[0].tolist() == [0.5 + 0.5 * (0.25 + 0.5 * 1.0), 0.25 + 0.5, 1.0]


def test_estimators_registered_with_what_the_loop_reads():
    from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS

    info = {n: ADVANTAGE_ESTIMATORS[n].info for n in ("gae", "grpo", "rloo", "reinforce_pp")}
    assert info["gae"]["needs_values"] and not any(info[n]["needs_values"] for n in ("grpo", "rloo", "reinforce_pp"))
    assert info["grpo"]["kl_penalty"] == "loss" and info["rloo"]["kl_penalty"] == "reward"
    assert info["grpo"]["min_group"] == info["rloo"]["min_group"] == 2


def test_global_whitening_equals_whitening_the_concatenated_batch():
    a, b = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[4.0, 8.0, 5.0]])
    ma, mb = torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3)
    whole = core.masked_whiten(torch.cat([a, b]), torch.cat([ma, mb]))
    total = {}

    def reduce_over_two(t):  # a two-process all-reduce, played out by hand: this process's a, the other's b
        key = len(total)
        total[key] = t
        other = {0: mb.sum(), 1: (b * mb).sum()}.get(key)
        if other is None:  # the variance pass: the other process's squared deviations from the global mean
            mean = (total[1] + (b * mb).sum()) / (total[0] + mb.sum())
            other = ((b - mean) ** 2 * mb).sum()
        return t + other

    assert torch.allclose(core.masked_whiten(a, ma, reduce=reduce_over_two), whole[:1])


# ----------------------------------------------------------------------------- over-optimisation


def test_trend_is_the_least_squares_change():
    from rlhf.algos.overopt import trend

    assert trend([1.0, 3.0, 2.0]) == pytest.approx(1.0) and trend([5.0]) == 0.0
    assert trend([0.0, 1.0, 2.0, 3.0]) == pytest.approx(3.0) and trend([2.0, 2.0, 2.0]) == 0.0


def _evals(proxy, gold, kl=None):
    from rlhf.algos.overopt import Evaluation

    kl = kl or [0.1 * i for i in range(len(proxy))]
    return [Evaluation(5 * i, k, p, g) for i, (k, p, g) in enumerate(zip(kl, proxy, gold))]


@pytest.mark.parametrize("proxy, gold, fires", [
    ([0, 1, 2, 3], [0.6, 0.8, 0.6, 0.5], False),       # below the peak, but the window reaches back to it
    ([0, 1, 2, 3, 4], [0.6, 0.8, 0.7, 0.6, 0.5], True),  # Gao et al.: past the peak the gold falls, proxy rises
    ([0, 1, 2, 3, 4], [0.6, 0.7, 0.8, 0.85, 0.9], False),  # both rise: healthy
    ([4, 3, 2, 1, 0], [0.6, 0.8, 0.7, 0.6, 0.5], False),  # both fall: a bad run, not hacking
    ([0, 1, 2, 3, 4], [0.6, 0.8, 0.77, 0.6, 0.6], False),  # one point within the threshold of the peak: no
    ([0, 1, 2, 3, 4, 5], [0.6, 0.85, 0.70, 0.74, 0.83, 0.84], False),  # a dip recovered from (seed 1, tiny)
    ([0, 6.2, 6.7, 6.8, 7.4], [0.59, 0.81, 0.756, 0.632, 0.638], True),  # the hacked tiny run, seed 0
])
def test_hacking_alarm_rule(proxy, gold, fires):
    from rlhf.algos.overopt import hacking_alarm

    reason = hacking_alarm(_evals(proxy, gold), window=3, proxy_rise=0.0, gold_drop=0.05)
    assert (reason is not None) == fires, reason
    if fires:
        assert "proxy reward rose" in reason and "below its best" in reason


def test_hacking_alarm_kl_budget_and_missing_gold():
    from rlhf.algos.overopt import hacking_alarm

    assert "passed kl_budget 2" in hacking_alarm(_evals([1, 2, 3], [None] * 3, kl=[0.5, 1.5, 2.5]), 3, 0.0, 0.02, 2.0)
    assert hacking_alarm(_evals([1, 2, 3], [None] * 3), 3, 0.0, 0.02) is None  # no gold: only the budget can fire


def test_the_alarm_is_logged_only_where_it_could_fire():
    """No gold, or not yet a window of evaluations after the first: "no alarm" means nothing and is
    not logged as 0 (a row of zeros reads as "no hacking found"); a KL budget can always fire."""
    from rlhf.algos.overopt import alarm_checkable

    assert not alarm_checkable(_evals([1, 2, 3, 4], [None] * 4), 3)
    assert not alarm_checkable(_evals([1, 2, 3], [0.5, 0.6, 0.7]), 3)  # the window has nothing before it
    assert alarm_checkable(_evals([1, 2, 3, 4], [0.5, 0.6, 0.7, 0.8]), 3)
    assert alarm_checkable(_evals([1], [None]), 3, kl_budget=2.0) and not alarm_checkable([], 3, kl_budget=2.0)


def test_token_logprobs_hand_computed_and_against_log_softmax():
    # logits (0, ln 3): softmax (1/4, 3/4); log p of token 1 = ln 3/4, entropy = -(1/4 ln 1/4 + 3/4 ln 3/4)
    x = torch.tensor([[0.0, math.log(3.0)]])
    for grad in (False, True):
        xx = x.clone().requires_grad_(grad)
        logp, ent = core.token_logprobs(xx, torch.tensor([1]))
        assert logp.item() == pytest.approx(math.log(0.75), abs=1e-6)
        assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * 4).double()
    y = torch.randint(0, 50, (3, 5))
    ref_all = torch.log_softmax(logits, -1)
    ref = ref_all.gather(-1, y[..., None]).squeeze(-1)
    g = torch.randn(3, 5, dtype=torch.double)
    for entropy_grad in (False, True):
        a = logits.clone().requires_grad_(True)
        lp, ent = core.token_logprobs(a, y, entropy_grad=entropy_grad)
        torch.testing.assert_close(lp, ref)
        torch.testing.assert_close(ent, -(ref_all.exp() * ref_all).sum(-1))
        assert ent.requires_grad == entropy_grad
        (lp * g).sum().backward()
        b = logits.clone().requires_grad_(True)
        (torch.log_softmax(b, -1).gather(-1, y[..., None]).squeeze(-1) * g).sum().backward()
        torch.testing.assert_close(a.grad, b.grad)  # d logp_y / dx = onehot(y) - softmax(x)
    with torch.no_grad():  # the no-grad path (old / reference log-probs)
        lp, ent = core.token_logprobs(logits, y, with_entropy=False)
        torch.testing.assert_close(lp, ref)
        assert ent is None


def test_loss_aggregations_hand_values():
    """Two responses of 1 and 3 tokens, per-token losses [[2, ., ., .], [1, 2, 3, .]]."""
    x = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]])
    agg = lambda name: core.aggregate(x, core.LOSS_AGGREGATIONS[name].fn(mask, 4.0, 2, 4)).item()  # noqa: E731
    assert agg("token_mean") == pytest.approx((2 + 1 + 2 + 3) / 4)          # every token alike
    assert agg("seq_mean_token_mean") == pytest.approx((2 / 1 + 6 / 3) / 2)  # each response's mean [GRPO]
    assert agg("seq_mean_token_sum_norm") == pytest.approx((2 + 6) / (4 * 2))  # one constant [Dr. GRPO]
    # the losses take an aggregation in place of the token count; token_mean is the old normaliser, bit for bit
    adv, lp = torch.tensor([[1.0, 0, 0, 0], [-1.0, 2, 0.5, 0]]), torch.zeros(2, 4)
    plain, _ = core.policy_loss(lp, lp, adv, mask, 0.2, 20.0, 4.0)
    tm, _ = core.policy_loss(lp, lp, adv, mask, 0.2, 20.0, core.LOSS_AGGREGATIONS["token_mean"].fn(mask, 4.0, 2, 4))
    seq, _ = core.policy_loss(lp, lp, adv, mask, 0.2, 20.0,
                              core.LOSS_AGGREGATIONS["seq_mean_token_mean"].fn(mask, 4.0, 2, 4))
    assert torch.equal(plain, tm)
    assert seq.item() == pytest.approx((-1.0 + (1 - 2 - 0.5) / 3) / 2)  # -A rho with rho = 1
    v, _ = core.value_loss(torch.ones(2, 4), torch.ones(2, 4), torch.zeros(2, 4), mask, 0.2,
                           core.LOSS_AGGREGATIONS["seq_mean_token_sum_norm"].fn(mask, 4.0, 2, 4))
    assert v.item() == pytest.approx(0.5 * 4 / (4 * 2))

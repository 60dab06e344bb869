"""Behaviour of each stage on tiny runs: SFT lowers held-out loss, the RM beats chance and
normalises, PPO's first-minibatch ratio is 1 and a Python reward rises."""

import json
import math

import pytest
import torch

from rlhf.config import load_stage_config
from rlhf.errors import DataError
from rlhf.stages import run


@pytest.mark.slow
def test_sft_lowers_heldout_loss_and_saves_hf_folder(sft_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = json.loads((sft_checkpoint / "summary.json").read_text())
    assert s["eval_loss"] < 0.5 * s["initial_eval_loss"]
    assert s["eval_perplexity"] == pytest.approx(math.exp(s["eval_loss"]))
    assert 0.0 <= s["eval_gold_accuracy"] <= 1.0 and "eval_gold_accuracy_greedy" in s
    assert (sft_checkpoint / "model.safetensors").exists() and (sft_checkpoint / "recipe.yaml").exists()
    metrics = [json.loads(l) for l in open(sft_checkpoint / "metrics.jsonl")]
    assert all("step" in m for m in metrics) and metrics[0]["loss"] > metrics[-2]["loss"]
    model = AutoModelForCausalLM.from_pretrained(sft_checkpoint)
    tok = AutoTokenizer.from_pretrained(sft_checkpoint)
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, sft_checkpoint, task_dir):
    out = tmp_path_factory.mktemp("rm_run")
    cfg = load_stage_config("rm", None, {
        "model.name_or_path": str(sft_checkpoint), "data.train": str(task_dir / "prefs.jsonl"),
        "data.eval": str(task_dir / "prefs_eval.jsonl"), "data.max_length": 48, "train.epochs": 3,
        "train.batch_size": 16, "train.micro_batch_size": 8, "train.lr": 1e-3, "train.log_every": 5,
        "normalize_data": str(task_dir / "sft.jsonl")})
    return out, run("rm", cfg, str(out), overwrite=True)


@pytest.mark.slow
def test_rm_beats_chance_on_heldout_pairs(rm_run):
    _, s = rm_run
    assert s["eval_accuracy"] >= 0.75, s
    assert s["eval_margin"] > 0 and s["eval_chosen_mean"] > s["eval_rejected_mean"]
    for k in ("reward_bias", "eval_pairs", "train_pairs"):
        assert k in s


@pytest.mark.slow
def test_rm_normalisation_and_reload_identical_scores(rm_run, task_dir):
    from transformers import AutoModelForSequenceClassification

    from rlhf.data.formats import load_examples, parse_sft
    from rlhf.rewards import BIAS_KEY, RewardModel, score_sequences

    out, s = rm_run
    rm = RewardModel(str(out))
    assert rm.bias == pytest.approx(s["reward_bias"])
    demos, _ = load_examples(str(task_dir / "sft.jsonl"), parse_sft)
    scores = rm.score([d.prompt for d in demos], [d.completion for d in demos])
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)  # the reference set scores mean 0
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert getattr(plain.config, BIAS_KEY) == pytest.approx(rm.bias)
    seqs = [rm.encode(d.prompt, d.completion) for d in demos[:16]]
    raw = score_sequences(plain, seqs, rm.tok.pad_token_id)
    assert torch.equal(raw + rm.bias, rm.score_ids(seqs))


@pytest.mark.slow
def test_rm_score_read_at_last_token_whatever_padding(rm_run, task_dir):
    from rlhf.rewards import RewardModel, forward_scores
    from rlhf.rollout import left_pad, right_pad

    out, _ = rm_run
    rm = RewardModel(str(out))
    seqs = [rm.encode([{"role": "user", "content": "Sort the digits: 1234" + "5" * i}], "12345") for i in range(4)]
    ids_r = right_pad(seqs, rm.tok.pad_token_id)
    mask_r = right_pad([[1] * len(s) for s in seqs], 0)
    ids_l, mask_l = left_pad(seqs, rm.tok.pad_token_id)
    right = forward_scores(rm.model, ids_r, mask_r)
    left = forward_scores(rm.model, ids_l, mask_l)
    alone = torch.cat([forward_scores(rm.model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    assert torch.allclose(right, left, atol=1e-5) and torch.allclose(right, alone, atol=1e-5)


@pytest.mark.slow
def test_kway_groups_train(tmp_path, sft_checkpoint, task_dir):
    cfg = load_stage_config("rm", None, {
        "model.name_or_path": str(sft_checkpoint), "data.train": str(task_dir / "rankings.jsonl"),
        "data.eval_split": 0.2, "data.max_length": 48, "train.batch_size": 4, "train.micro_batch_size": 2,
        "train.lr": 1e-3, "normalize": False})
    s = run("rm", cfg, str(tmp_path / "rm"), overwrite=True)
    # up to C(4, 2) = 6 pairs per ranking (tied judge scores give none); exact expansion: test_data.py
    assert s["train_groups"] * 4 < s["train_pairs"] <= s["train_groups"] * 6
    assert s["reward_bias"] == 0.0


# ----------------------------------------------------------------------------- PPO


def _ppo_cfg(sft_checkpoint, task_dir, **over):
    base = {"model.name_or_path": str(sft_checkpoint), "reward_fns": [{"fn": "gold"}],
            "value_init": "policy", "data.train": str(task_dir / "rl_prompts.jsonl"),
            "data.eval": str(task_dir / "eval_prompts.jsonl"), "steps": 2, "rollout_batch_size": 16,
            "minibatch_size": 8, "micro_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8, "lr": 1e-3,
            "eval_samples": 16}
    base.update(over)
    return load_stage_config("ppo", None, base)


def _rollout_of_16(cfg):
    """The SFT policy's seeded rollout of the first 16 training prompts, and PPOModels whose
    reference is the policy itself and whose value model answers 0."""
    from rlhf.data.formats import load_examples, parse_prompt
    from rlhf.models import disable_dropout, load_causal_lm, load_tokenizer
    from rlhf.stages.ppo import make_rollout
    from rlhf.stages.ppo_setup import PPOModels

    tok = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, tok).eval()
    disable_dropout(policy)
    prompts, _ = load_examples(cfg.data.train, parse_prompt, max_samples=16)
    ro = make_rollout(policy, tok, prompts, cfg, torch.Generator().manual_seed(0), "cpu")
    value = lambda ids, mask, pos=None: torch.zeros(ids.shape)  # noqa: E731
    return ro, PPOModels(policy, value, policy, None, [], [])


@pytest.mark.slow
@pytest.mark.parametrize("old_logprobs,precision", [("recompute", "highest"), ("sampling", "highest"),
                                                    ("recompute", "medium")])
def test_ratio_is_exactly_one_on_first_minibatch(sft_checkpoint, task_dir, old_logprobs, precision):
    """The first minibatch's ratio is 1 (to float rounding): the old log-probs are the training
    pass's own. With matmul_precision 'medium' too (bf16 products on CPUs with AMX), where the
    no-grad passes must take the attention path the training pass takes (engine._cpu_medium_sdpa)."""
    from rlhf.engine import set_matmul_precision

    cfg = _ppo_cfg(sft_checkpoint, task_dir, temperature=0.8, old_logprobs=old_logprobs)
    set_matmul_precision(precision)
    try:
        _ratio_is_one(cfg, old_logprobs)
    finally:
        set_matmul_precision("highest")


def _ratio_is_one(cfg, old_logprobs):
    from rlhf.rollout import response_logprobs
    from rlhf.stages.ppo import make_experience

    ro, models = _rollout_of_16(cfg)
    policy = models.policy
    exp = make_experience(ro, torch.ones(16), models, 0.1, cfg, micro_batch_size=16)
    if old_logprobs == "recompute":
        assert exp.kl.abs().max().item() == 0.0  # policy == reference: KL exactly 0
    else:  # the sampling pass's log-probs are taken as they are; the reference recomputes them
        assert exp.old_logprobs is ro.gen.logprobs
        assert exp.kl.abs().max().item() < 1e-5
    idx = torch.tensor([3, 0, 7, 12])  # a shuffled micro-batch, as in the update
    R = exp.response_mask.shape[1]
    policy.train()
    lp = response_logprobs(policy, exp.input_ids[idx], exp.attention_mask[idx], R, cfg.temperature)
    ratio = torch.exp(lp - exp.old_logprobs[idx])[exp.response_mask[idx].bool()]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0), ratio


@pytest.mark.slow
def test_update_statistics_are_token_means_over_the_minibatch(sft_checkpoint, task_dir):
    """approx_kl, ratio_mean and policy_clipfrac of a minibatch split into micro-batches of unequal
    token counts: the token means over the whole minibatch, as the loss is (not a mean of
    micro-batch means)."""
    from rlhf.algos import core
    from rlhf.rollout import response_logprobs
    from rlhf.stages.ppo import make_experience, micro_batch_loss

    cfg = _ppo_cfg(sft_checkpoint, task_dir, cliprange=0.05)
    ro, models = _rollout_of_16(cfg)
    exp = make_experience(ro, torch.linspace(-1.0, 1.0, 16), models, 0.1, cfg, micro_batch_size=16)
    exp.old_logprobs = exp.old_logprobs + 0.3 * torch.randn(exp.old_logprobs.shape,
                                                            generator=torch.Generator().manual_seed(0))
    exp.response_mask[0, 2:] = 0  # micro-batch [0]: 2 tokens; [1, 2]: all theirs
    assert exp.response_mask[1:3].sum() > 4
    mb = [0, 1, 2]
    n_tok = exp.response_mask[mb].sum().item()
    sums = {}
    with torch.no_grad():
        for rows in ([0], [1, 2]):
            micro_batch_loss(exp, rows, models, cfg, n_tok, sums)
        R = exp.response_mask.shape[1]
        lp = response_logprobs(models.policy, exp.input_ids[mb], exp.attention_mask[mb], R, cfg.temperature)
        _, whole = core.policy_loss(lp, exp.old_logprobs[mb, :R], exp.advantages[mb, :R], exp.response_mask[mb],
                                    cfg.cliprange, cfg.log_ratio_clamp, n_tok)
    for name, value in (("approx_kl", whole.approx_kl), ("ratio_mean", whole.ratio_mean),
                        ("policy_clipfrac", whole.clipfrac)):
        assert float(sums[name]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), name
    # the loss itself: split into micro-batches, each aggregation gives the whole minibatch's value
    losses = {}
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        cfg.loss_agg, sums = agg, {}
        with torch.no_grad():
            for rows in ([0], [1, 2]):
                micro_batch_loss(exp, rows, models, cfg, n_tok, sums, len(mb))
            a = core.LOSS_AGGREGATIONS[agg].fn(exp.response_mask[mb], n_tok, len(mb), cfg.max_new_tokens)
            whole_loss, _ = core.policy_loss(lp, exp.old_logprobs[mb, :R], exp.advantages[mb, :R],
                                             exp.response_mask[mb], cfg.cliprange, cfg.log_ratio_clamp, a)
        losses[agg] = float(sums["pg_loss"])
        assert losses[agg] == pytest.approx(float(whole_loss), rel=1e-4, abs=1e-6), agg
    assert len({round(v, 6) for v in losses.values()}) == 3  # unequal lengths: the three differ


@pytest.mark.slow
@pytest.mark.parametrize("ptx", [False, True])
def test_policy_and_value_losses_are_backpropagated_one_at_a_time(sft_checkpoint, task_dir, ptx):
    """loss_terms: the policy's loss is backpropagated before the value model's forward runs, so
    one model's activations are held at a time, and the gradients of both models are those of the
    joint loss (micro_batch_loss + ptx_coef x the pretraining term) bit for bit."""
    from rlhf.models import load_tokenizer
    from rlhf.stages.ppo import loss_terms, make_experience, micro_batch_loss
    from rlhf.value import load_value_model

    cfg = _ppo_cfg(sft_checkpoint, task_dir, entropy_coef=0.01)
    cfg.ptx_coef = 0.5 if ptx else 0.0
    ro, models = _rollout_of_16(cfg)
    models.value = load_value_model(cfg, load_tokenizer(cfg.model), None)
    exp = make_experience(ro, torch.linspace(-1.0, 1.0, 16), models, 0.1, cfg, micro_batch_size=16)
    exp.old_logprobs = exp.old_logprobs + 0.1  # a ratio off 1: the clipped surrogate has a gradient
    rows, params = [0, 3, 5, 9], [*models.policy.parameters(), *models.value.parameters()]
    n_tok = exp.response_mask[rows].sum().item()

    class Ptx:  # a stand-in pretraining term: any differentiable function of the policy
        def loss(self, policy):
            return policy(input_ids=exp.input_ids[:2], use_cache=False).logits.float().log_softmax(-1)[..., 7].mean()

    def grads(fn):
        for p in params:
            p.grad = None
        fn(Ptx() if ptx else None)
        return [p.grad.clone() if p.grad is not None else None for p in params]

    def joint(it):
        loss = micro_batch_loss(exp, rows, models, cfg, n_tok, {}, len(rows))
        if it is not None:
            loss = loss + cfg.ptx_coef * it.loss(models.policy) / 2
        loss.backward()

    policy_grad_at_value_forward = []
    models.value.register_forward_pre_hook(lambda *_: policy_grad_at_value_forward.append(
        all(p.grad is not None for p in models.policy.parameters() if p.requires_grad)))
    expected = grads(joint)
    assert policy_grad_at_value_forward == [False]  # (the joint loss: both graphs alive together)
    got = grads(lambda it: [loss.backward() for loss in loss_terms(
        exp, rows, models, cfg, n_tok, {}, len(rows), (lambda: it.loss(models.policy) / 2) if it else None)])
    assert policy_grad_at_value_forward == [False, True]
    assert sum(g is not None for g in got) > len(params) // 2
    for e, g in zip(expected, got):
        assert (e is None and g is None) or torch.equal(e, g)


@pytest.mark.slow
def test_rewards_are_whitened_over_the_whole_batch_across_processes(sft_checkpoint, task_dir):
    """whiten_rewards under data parallelism: the mean and variance are the whole batch's, as for
    the advantages. Simulated here as two processes holding the same rollout (`reduce` doubles
    every sum): the whitened rewards are those of the doubled batch, whose Bessel correction
    differs from one process's own."""
    from rlhf.algos import core
    from rlhf.stages.ppo import make_experience

    def experience(whiten: bool):
        cfg = _ppo_cfg(sft_checkpoint, task_dir, whiten_rewards=whiten)
        ro, models = _rollout_of_16(cfg)
        scores = torch.linspace(-1.0, 2.0, 16)
        return make_experience(ro, scores, models, 0.1, cfg, micro_batch_size=16, reduce=lambda t: 2 * t)

    raw, whitened = experience(False), experience(True)
    mask = raw.response_mask
    both = core.masked_whiten(torch.cat([raw.rewards, raw.rewards]), torch.cat([mask, mask]), shift_mean=False)
    alone = core.masked_whiten(raw.rewards, mask, shift_mean=False)
    assert not torch.allclose(both[:16], alone, rtol=1e-5, atol=0)  # the test can tell them apart
    torch.testing.assert_close(whitened.rewards, both[:16], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ppo_python_reward_rises(tmp_path, sft_checkpoint, task_dir):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(
        "def starts_low(prompts, completions, **fields):\n"
        "    return [1.0 if c[:1] in '01' else 0.0 for c in completions]\n")
    cfg = _ppo_cfg(sft_checkpoint, task_dir, reward_fns=[{"fn": f"{reward_file}:starts_low"}], steps=12,
                   rollout_batch_size=32, minibatch_size=16, micro_batch_size=16, lr=3e-3, kl_coef=0.01)
    s = run("ppo", cfg, str(tmp_path / "ppo"), overwrite=True)
    m = [json.loads(l) for l in open(tmp_path / "ppo" / "metrics.jsonl") if '"score"' in l]
    first = sum(r["score"] for r in m[:3]) / 3
    last = sum(r["score"] for r in m[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert s["eval_reward"] > s["initial_eval_reward"]
    assert s["skipped_bad_rows"] == 0 and s["train_prompts"] == 300
    for k in ("kl", "kl_coef", "approx_kl", "policy_clipfrac", "value_clipfrac", "entropy", "ratio_mean",
              "response_length", "eos_rate", "time_generate", "time_score", "time_train", "non_score_reward"):
        assert k in m[-1], k
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")


@pytest.mark.slow
def test_prompts_over_max_prompt_length_stop_ppo_or_are_skipped_and_counted(tmp_path, sft_checkpoint, task_dir):
    """A prompt over data.max_prompt_length is an error naming its file, line and field; with
    data.skip_bad_rows it is left out (train or eval) and counted, as SFT and RM do, before the
    held-out set is cut to eval_samples (so it holds as many as asked for; the rows past them are
    neither read nor counted)."""
    from rlhf.stages.ppo import read_inputs

    rows = [json.loads(l) for l in open(task_dir / "rl_prompts.jsonl")][:20]
    long = dict(rows[0], prompt="sort " + " ".join(str(i % 10) for i in range(300)))
    rows[:0] = [long, dict(rows[0]), long]  # lines 1 and 3
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps(long) + "\n" + open(task_dir / "eval_prompts.jsonl").read()
                                         + json.dumps(long) + "\n")  # (the last one, past eval_samples, unread)
    over = {"data.train": str(tmp_path / "train.jsonl"), "data.eval": str(tmp_path / "eval.jsonl"),
            "eval_samples": 60}
    with pytest.raises(DataError, match=r"train\.jsonl:1: field 'prompt': \d+ tokens, more than "
                                        r"data\.max_prompt_length \(128\); raise it or set data\.skip_bad_rows"):
        read_inputs(_ppo_cfg(sft_checkpoint, task_dir, **over))
    data = read_inputs(_ppo_cfg(sft_checkpoint, task_dir, **over, **{"data.skip_bad_rows": True}))
    assert (len(data.prompts), len(data.eval_prompts), data.skipped_bad_rows) == (21, 60, 3)
    assert [p.where for p in data.prompts][:2] == [f"{tmp_path / 'train.jsonl'}:2", f"{tmp_path / 'train.jsonl'}:4"]
    with pytest.raises(DataError, match=r"train\.jsonl: 15 training prompts once the prompts over "
                                        r"data\.max_prompt_length were skipped, fewer than one rollout batch \(16"):
        read_inputs(_ppo_cfg(sft_checkpoint, task_dir, **over, **{"data.skip_bad_rows": True,
                                                                 "data.max_samples": 17}))


@pytest.mark.parametrize("body,needle", [
    ("raise RuntimeError('boom')", "raised RuntimeError: boom"),
    ("return [0.0]", "returned 1 values for"),
    ("return [float('nan')] * len(completions)", "returned nan for sample 0"),
])
@pytest.mark.slow
def test_bad_reward_function_stops_with_its_name(tmp_path, sft_checkpoint, task_dir, body, needle):
    from rlhf.rewards import RewardError

    f = tmp_path / "bad.py"
    f.write_text(f"def r(prompts, completions, **kw):\n    {body}\n")
    cfg = _ppo_cfg(sft_checkpoint, task_dir, reward_fns=[{"fn": f"{f}:r"}])
    with pytest.raises(RewardError, match=needle) as e:
        run("ppo", cfg, str(tmp_path / "ppo"), overwrite=True)
    assert "bad.py:r" in str(e.value)
    assert not (tmp_path / "ppo" / "model.safetensors").exists()


def test_reward_fn_import_errors(tmp_path):
    from rlhf.rewards import RewardError, load_reward_fn

    with pytest.raises(RewardError, match="not found"):
        load_reward_fn(str(tmp_path / "none.py") + ":f")
    (tmp_path / "m.py").write_text("x = 1\n")
    with pytest.raises(RewardError, match="has no function 'f'"):
        load_reward_fn(str(tmp_path / "m.py") + ":f")
    with pytest.raises(RewardError, match="cannot import"):
        load_reward_fn("no_such_module_xyz:f")
    assert load_reward_fn("gold").__name__ == "gold_reward"


def test_a_reward_file_is_imported_once_per_version(tmp_path):
    """The RM's sampling judge was imported twice (for the check before the run, then for the
    sampling): state its module keeps (a loaded model, a cache, a counter) started over. A file is
    now executed once per version; an edited file is imported again, a failed import retried."""
    import os

    from rlhf.rewards import RewardError, load_reward_fn

    f = tmp_path / "judge.py"
    f.write_text("CALLS = []\n\ndef j(prompts, completions, **kw):\n    CALLS.append(1)\n    return [float(len(CALLS))]"
                 " * len(completions)\n")
    a, b = load_reward_fn(f"{f}:j"), load_reward_fn(f"{f}:j")
    assert a([""], ["x"]) == [1.0] and b([""], ["x"]) == [2.0]  # one module: the count goes on
    f.write_text(f.read_text().replace("float(len(CALLS))", "-float(len(CALLS))"))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # (an edit within the clock's tick)
    assert load_reward_fn(f"{f}:j")([""], ["x"]) == [-1.0]  # edited: imported anew
    g = tmp_path / "flaky.py"
    g.write_text("raise ImportError('not yet')\n")
    with pytest.raises(RewardError, match="not yet"):
        load_reward_fn(f"{g}:h")
    with pytest.raises(RewardError, match="not yet"):  # tried again, not a half-made module from the cache
        load_reward_fn(f"{g}:h")


@pytest.mark.slow
def test_ppo_every_option_runs(tmp_path, sft_checkpoint, task_dir, rm_run):
    """RM + reward fn sum, value from the RM, k3, adaptive KL, running-std scaling, reward
    whitening, PPO-ptx, EMA, old log-probs from sampling: each branch of the loop runs and logs
    what it should."""
    rm_dir, _ = rm_run
    cfg = _ppo_cfg(sft_checkpoint, task_dir, reward_model=str(rm_dir), value_init="reward_model",
                   reward_fns=[{"fn": "gold", "weight": 0.5}], kl_estimator="k3", adaptive_kl=True, kl_target=0.01,
                   kl_horizon=100, scale_reward="running_std", whiten_rewards=True, ptx_coef=0.5,
                   ptx_data=str(task_dir / "sft.jsonl"), ema_decay=0.9, eval_every=1, steps=2, entropy_coef=0.01,
                   old_logprobs="sampling", **{"model.gradient_checkpointing": True})
    s = run("ppo", cfg, str(tmp_path / "ppo"), overwrite=True)
    m = [json.loads(l) for l in open(tmp_path / "ppo" / "metrics.jsonl")]
    train = [r for r in m if "pg_loss" in r]
    assert all("ptx_loss" in r and "rm_score" in r and "reward_fn/gold" in r for r in train)
    assert s["kl_coef_final"] != 0.05  # the adaptive controller moved beta
    # each record carries the beta its rollout's rewards used: the first the recipe's, the next the moved one
    assert train[0]["kl_coef"] == 0.05 and train[1]["kl_coef"] != 0.05
    assert sum("eval_reward" in r for r in m) == 3  # start, iteration 1, end
    from transformers import AutoModelForCausalLM

    ema = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "ema")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")
    assert not torch.equal(ema.model.embed_tokens.weight, final.model.embed_tokens.weight)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_compiled_blocks_give_the_eager_numbers(tmp_path, sft_checkpoint, task_dir, rm_run, precision):
    """compile: true (regional torch.compile of the policy's and value model's blocks for training)
    moves no logged number beyond float rounding (bf16's under bf16 mixed precision, where the
    compiled kernels fuse and round differently: grad norms within 3% in the run this bound was
    set on); sampling stays eager: the same tokens."""
    rm_dir, _ = rm_run
    runs = {}
    tol = dict(rel=1e-4, abs=1e-6) if precision == "no" else dict(rel=5e-2, abs=2e-3)
    for compiled in (False, True):
        cfg = _ppo_cfg(sft_checkpoint, task_dir, reward_model=str(rm_dir), value_init="reward_model",
                       reward_fns=[], steps=2, compile=compiled, sample_every=1, mixed_precision=precision)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run("ppo", cfg, str(tmp_path / str(compiled)), overwrite=True)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # eager: none; compiled: the policy's and value model's blocks in training share one graph
        # (two once a shape turns dynamic). A KV cache in a full-sequence pass makes every block's
        # layer index a guard, one graph more per block (3 with the value model's use_cache=False removed)
        assert graphs == 0 if not compiled else 0 < graphs <= 2, graphs
        runs[compiled] = [json.loads(l) for l in open(tmp_path / str(compiled) / "metrics.jsonl") if '"pg_loss"' in l]
    for key in ("pg_loss", "vf_loss", "rm_score", "kl", "approx_kl", "entropy", "policy_grad_norm", "value_grad_norm"):
        for eager, comp in zip(runs[False], runs[True]):
            assert comp[key] == pytest.approx(eager[key], **tol), (key, eager[key], comp[key])
    samples = [[json.loads(l) for l in open(tmp_path / str(c) / "samples.jsonl")] for c in (False, True)]
    first = [[r for r in rows if r["step"] == 1] for rows in samples]  # (later: weights equal to rounding)
    assert len(first[0]) == 8 and [r["completion"] for r in first[0]] == [r["completion"] for r in first[1]]
    assert [r["score"] for r in first[1]] == pytest.approx([r["score"] for r in first[0]], rel=1e-4)
    if precision == "bf16":  # (the runs really were in bf16)
        assert json.load(open(tmp_path / "True" / "summary.json"))["mfu_peak_dtype"] == "bfloat16"
    # old_logprobs: auto read them from sampling in fp32 only; the recipe saved keeps 'auto'
    assert json.load(open(tmp_path / "True" / "summary.json"))["old_logprobs"] == \
        ("sampling" if precision == "no" else "recompute")
    assert "old_logprobs: auto" in (tmp_path / "True" / "recipe.yaml").read_text()
    assert [json.load(open(tmp_path / str(c) / "summary.json"))["compiled"] for c in (False, True)] == [False, True]


def test_old_logprobs_auto_reads_sampling_log_probs_only_where_every_product_is_full_fp32():
    from rlhf.engine import set_matmul_precision
    from rlhf.stages.ppo import resolve_old_logprobs

    assert resolve_old_logprobs(torch.float32) == "sampling"
    assert resolve_old_logprobs(torch.bfloat16) == resolve_old_logprobs(torch.float16) == "recompute"
    for precision in ("high", "medium"):  # TF32 / bf16 products
        set_matmul_precision(precision)
        try:
            assert resolve_old_logprobs(torch.float32) == "recompute"
        finally:
            set_matmul_precision("highest")


@pytest.mark.slow
def test_onednn_linear_gives_the_default_numbers(tmp_path, sft_checkpoint, task_dir, rm_run, monkeypatch):
    """onednn_linear: true (every fp32 nn.Linear through oneDNN, rlhf.cpu_linear), alone and with
    compile: true, moves no logged number beyond float rounding and samples the same tokens, and its
    products really run through oneDNN (counted)."""
    import rlhf.cpu_linear

    if not rlhf.cpu_linear.onednn_linear_available():
        pytest.skip("this torch has no oneDNN")
    calls = []
    orig = rlhf.cpu_linear._linear_pointwise
    monkeypatch.setattr(rlhf.cpu_linear, "_linear_pointwise", lambda *a: calls.append(1) or orig(*a))
    rm_dir, _ = rm_run
    runs = {}
    for name, over in {"default": {}, "onednn": {"onednn_linear": True},
                       "onednn+compile": {"onednn_linear": True, "compile": True}}.items():
        cfg = _ppo_cfg(sft_checkpoint, task_dir, reward_model=str(rm_dir), value_init="reward_model",
                       reward_fns=[], steps=2, sample_every=1, peak_tflops=1.0, **over)  # (no peak measured)
        torch._dynamo.reset()
        calls.clear()
        run("ppo", cfg, str(tmp_path / name), overwrite=True)
        assert (len(calls) > 0) == ("onednn" in name), (name, len(calls))
        runs[name] = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl") if '"pg_loss"' in l]
    for name in ("onednn", "onednn+compile"):
        for key in ("pg_loss", "vf_loss", "rm_score", "kl", "approx_kl", "entropy", "policy_grad_norm",
                    "value_grad_norm"):
            for ref, got in zip(runs["default"], runs[name]):
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (name, key)
        first = [[r for r in map(json.loads, open(tmp_path / n / "samples.jsonl")) if r["step"] == 1]
                 for n in ("default", name)]
        assert len(first[0]) == 8 and [r["completion"] for r in first[0]] == [r["completion"] for r in first[1]]


@pytest.mark.slow
def test_onednn_linear_in_sft_and_rm_gives_the_default_numbers(tmp_path, sft_checkpoint, task_dir, monkeypatch):
    """onednn_linear: true in the SFT and RM stages: the products go through oneDNN (counted) and
    the losses and metrics equal the default run's to float rounding."""
    import rlhf.cpu_linear

    if not rlhf.cpu_linear.onednn_linear_available():
        pytest.skip("this torch has no oneDNN")
    calls = []
    orig = rlhf.cpu_linear._linear_pointwise
    monkeypatch.setattr(rlhf.cpu_linear, "_linear_pointwise", lambda *a: calls.append(1) or orig(*a))
    stages = {
        "sft": {"model.name_or_path": str(sft_checkpoint), "data.train": str(task_dir / "sft.jsonl"),
                "data.eval_split": 0.1, "data.max_length": 48, "train.max_steps": 3, "train.batch_size": 16,
                "train.micro_batch_size": 8, "train.lr": 1e-3, "gen_eval_samples": 8, "max_new_tokens": 6},
        "rm": {"model.name_or_path": str(sft_checkpoint), "data.train": str(task_dir / "prefs.jsonl"),
               "data.eval": str(task_dir / "prefs_eval.jsonl"), "data.max_length": 48, "train.max_steps": 3,
               "train.batch_size": 16, "train.micro_batch_size": 8, "train.lr": 1e-3,
               "normalize_data": str(task_dir / "sft.jsonl")}}
    for stage, over in stages.items():
        summaries = {}
        for onednn in (False, True):
            calls.clear()
            cfg = load_stage_config(stage, None, {**over, "onednn_linear": onednn})
            summaries[onednn] = run(stage, cfg, str(tmp_path / f"{stage}{onednn}"), overwrite=True)
            assert (len(calls) > 0) == onednn, (stage, onednn, len(calls))
        keys = [k for k, v in summaries[False].items() if isinstance(v, float) and ("loss" in k or "accuracy" in k)]
        assert keys, summaries[False]
        for k in keys:
            assert summaries[True][k] == pytest.approx(summaries[False][k], rel=1e-4, abs=1e-6), (stage, k)


def test_compile_blocks_finds_the_transformer_blocks():
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf.errors import ModelError
    from rlhf.models import compile_blocks

    from conftest import TINY_ARCH

    arch = {k: v for k, v in TINY_ARCH.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**arch, "num_hidden_layers": 3}))
    assert compile_blocks(model) == 3
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.lm_head._compiled_call_impl is None  # only the blocks
    stack = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2))
    assert compile_blocks(stack) == 2  # no _no_split_modules: the longest layer list
    with pytest.raises(ModelError, match="no transformer blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
def test_lora_sft_and_ppo(tmp_path, sft_checkpoint, task_dir):
    """LoRA through peft: SFT saves a merged model; PPO's reference is the policy with adapters off."""
    from transformers import AutoModelForCausalLM

    cfg = load_stage_config("sft", None, {
        "model.name_or_path": str(sft_checkpoint), "model.lora": {"enabled": True, "r": 4, "alpha": 8},
        "data.train": str(task_dir / "sft.jsonl"), "data.max_length": 48, "train.max_steps": 3,
        "train.batch_size": 8, "train.micro_batch_size": 8, "train.lr": 1e-2, "gen_eval_samples": 4,
        "max_new_tokens": 6})
    run("sft", cfg, str(tmp_path / "sft"), overwrite=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    base = AutoModelForCausalLM.from_pretrained(sft_checkpoint)
    assert not any("lora" in k for k in merged.state_dict())
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    pcfg = _ppo_cfg(sft_checkpoint, task_dir, **{"model.lora": {"enabled": True, "r": 4}}, steps=1)
    s = run("ppo", pcfg, str(tmp_path / "ppo"), overwrite=True)
    assert s["initial_eval_kl"] == pytest.approx(0.0, abs=1e-6) and "eval_kl" in s


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_weights(tmp_path, sft_checkpoint, task_dir):
    """Recomputing activations changes memory, not the math: SFT and RM with and without it end
    with the same weights."""
    from safetensors.torch import load_file

    for stage, extra in (("sft", {"data.train": str(task_dir / "sft.jsonl"), "data.max_length": 48,
                                  "gen_eval_samples": 0}),
                         ("rm", {"data.train": str(task_dir / "prefs.jsonl"), "data.max_length": 48,
                                 "train.micro_batch_size": 4})):
        w = {}
        for gc in (False, True):
            cfg = load_stage_config(stage, None, {"model.name_or_path": str(sft_checkpoint),
                                                  "model.gradient_checkpointing": gc, "train.max_steps": 3,
                                                  "train.batch_size": 8, "train.lr": 1e-3, **extra})
            run(stage, cfg, str(tmp_path / f"{stage}{gc}"), overwrite=True)
            w[gc] = load_file(str(tmp_path / f"{stage}{gc}" / "model.safetensors"))
        base = load_file(str(sft_checkpoint / "model.safetensors"))
        for k in w[False]:
            torch.testing.assert_close(w[True][k], w[False][k], rtol=1e-5, atol=1e-6)
        assert any(not torch.equal(w[True][k], base[k]) for k in base), stage  # it trained


def test_packing():
    from rlhf.stages.sft import pack

    feats = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [-100, 7, 8, 9])]
    packed = pack(feats, max_length=5)
    # positions restart per example; an example's first label is never a target (as unpacked, after the shift)
    assert packed == [([1, 2, 3, 4, 5], [-100, 2, 3, -100, 5], [0, 1, 2, 0, 1]),
                      ([6, 7, 8, 9], [-100, 7, 8, 9], [0, 1, 2, 3])]


def test_packed_rows_give_the_unpacked_loss(tiny_lm):
    """Packed examples neither see each other nor shift their positions: the loss summed over a
    packed batch (two rows of different widths, so one is padded) is the unpacked one."""
    from rlhf.algos.core import lm_loss_sum
    from rlhf.stages.sft import check_packed_attention, pack, sft_inputs

    g = torch.Generator().manual_seed(0)
    feats = []
    for n in (7, 5, 9, 4, 6):
        ids = torch.randint(3, tiny_lm.config.vocab_size, (n,), generator=g).tolist()
        feats.append((ids, [-100, -100] + ids[2:]))
    rows = pack(feats, max_length=16)
    assert [len(r[0]) for r in rows] == [12, 13, 6]
    with torch.no_grad():
        inputs, labels = sft_inputs(rows, 0, "cpu")
        assert "attention_mask" not in inputs
        packed, n_packed = lm_loss_sum(tiny_lm(**inputs).logits, labels)
        alone = [lm_loss_sum(*(lambda x, y: (tiny_lm(**x).logits, y))(*sft_inputs([f], 0, "cpu"))) for f in feats]
    assert n_packed == sum(n for _, n in alone)
    torch.testing.assert_close(packed, sum(s for s, _ in alone), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # flash attention's way: the micro-batch's packed rows as one row
        inputs, labels = sft_inputs(rows, 0, "cpu", flatten=True)
        assert inputs["input_ids"].shape == (1, 31)
        flat, n_flat = lm_loss_sum(tiny_lm(**inputs).logits, labels)
    assert n_flat == n_packed
    torch.testing.assert_close(flat, packed, rtol=1e-5, atol=1e-5)
    for flatten in (False, True):
        check_packed_attention(tiny_lm, feats, 0, "cpu", flatten)  # this model keeps them apart


@pytest.mark.slow
def test_packed_sft_trains_as_the_unpacked_one(tmp_path, task_dir):
    """`rlhf sft ... --packing true` from the CLI: fewer, fuller rows, the packing check passes on the
    prepared model, and at the same number of optimizer steps the held-out loss falls at least as
    far as unpacked training's (a step sees ~2x the examples). On this toy task cross-example
    attention would hurt the loss too little to tell: test_packed_rows_give_the_unpacked_loss is
    the test that guards the isolation."""
    from conftest import run_cli

    out = {}
    for packing in ("false", "true"):
        run_cli("sft", "recipes/tiny/sft.yaml", "--output_dir", tmp_path / packing, "--overwrite",
                "--data.train", task_dir / "sft.jsonl", "--train.max_steps", "30", "--gen_eval_samples", "0",
                "--packing", packing)
        out[packing] = json.loads((tmp_path / packing / "summary.json").read_text())
    assert out["true"]["train_examples"] <= 0.55 * out["false"]["train_examples"]  # rows of several examples
    assert out["true"]["eval_loss"] < 0.5 * out["true"]["initial_eval_loss"]
    assert out["true"]["eval_loss"] < 1.05 * out["false"]["eval_loss"], (out["true"]["eval_loss"],
                                                                         out["false"]["eval_loss"])


def test_packing_is_refused_for_a_model_that_lets_packed_examples_mix(tiny_lm):
    from rlhf.errors import RunError
    from rlhf.stages.sft import check_packed_attention

    class IgnoresPacking(torch.nn.Module):  # attention over the whole row, as older attention code does
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
            return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                              attention_mask=torch.ones_like(input_ids))

    feats = [([5, 6, 7, 8], [-100, 6, 7, 8]), ([9, 10, 11], [-100, 10, 11]), ([12, 13], [-100, 13])]
    with pytest.raises(RunError, match="packing: true.*set packing: false"):
        check_packed_attention(IgnoresPacking(tiny_lm), feats, 0, "cpu")
    from transformers import AutoConfig, AutoModelForCausalLM  # a state-space model carries its state across

    small = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2)
    jamba = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                 attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_dt_rank=4)
    for model_type, arch in {"mamba": dict(state_size=8), "jamba": jamba}.items():  # (Jamba leaks by ~1e-3 only)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **small, **arch))
        with pytest.raises(RunError, match="convolution / state-space layers.*set packing: false"):
            check_packed_attention(model, feats, 0, "cpu")
    # MiniMax's lightning (linear) attention has no convolution, and carries its state across too: the
    # logit comparison refuses it (a packed example off by 0.0103 against 0.0128 with no boundary)
    cfg = AutoConfig.for_model("minimax", **small, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                               layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    with pytest.raises(RunError, match="lets packed examples see each other.*set packing: false"):
        check_packed_attention(AutoModelForCausalLM.from_config(cfg), feats, 0, "cpu")




def test_compile_auto_compiles_only_cpu_runs_of_policies_of_100m_parameters_or_more(monkeypatch):
    """compile: auto: where compiling was measured to pay (a CPU run, SmolLM2-135M's size), never under
    DeepSpeed or LoRA, on a GPU (not measured yet) or where torch cannot compile (no C++ compiler)."""
    import types

    from accelerate.utils import DistributedType

    import torch._inductor.cpp_builder as cpp_builder
    from rlhf.config import load_stage_config
    from rlhf.stages.ppo_setup import AUTO_COMPILE_MIN_PARAMS, compile_pays_here

    cfg = load_stage_config("ppo", None, {"model.name_or_path": "x", "data.train": "x"})
    assert cfg.compile == "auto"
    cpu = types.SimpleNamespace(device=torch.device("cpu"), distributed_type=DistributedType.NO)
    big = torch.nn.Linear(AUTO_COMPILE_MIN_PARAMS // 1000, 1000, bias=False, device="meta")
    small = torch.nn.Linear(AUTO_COMPILE_MIN_PARAMS // 1000 - 1, 1000, bias=False, device="meta")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert compile_pays_here(cfg, cpu, big) and not compile_pays_here(cfg, cpu, small)
    ds = types.SimpleNamespace(device=torch.device("cpu"), distributed_type=DistributedType.DEEPSPEED)
    gpu = types.SimpleNamespace(device=torch.device("cuda"), distributed_type=DistributedType.NO)
    assert not compile_pays_here(cfg, ds, big) and not compile_pays_here(cfg, gpu, big)
    lora = load_stage_config("ppo", None, {"model.name_or_path": "x", "data.train": "x", "model.lora.enabled": True})
    assert not compile_pays_here(lora, cpu, big)
    ckpt = load_stage_config("ppo", None, {"model.name_or_path": "x", "data.train": "x",
                                           "model.gradient_checkpointing": True})
    assert not compile_pays_here(ckpt, cpu, big)

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert not compile_pays_here(cfg, cpu, big)

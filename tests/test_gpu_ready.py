"""What a GPU run depends on, shown on the CPU wherever the CPU can show it: the fp16 GradScaler
path with two optimizers, bf16 autocast in every stage, frozen models under the policy's
autocast, samplers and commands on the device accelerate picks, config ranges, the EMA and MFU
against the dtype that runs. (tests/test_gpu.py holds the same checks on a real GPU.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_ARCH, WeightCasts, run_cli


# ----------------------------------------------------------------------------- fp16 GradScaler


def _two_models(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)


def _scaler_accelerator(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_GRAD_SCALER", "1")
    from rlhf.engine import make_accelerator

    acc = make_accelerator("fp16")
    assert acc.scaler is not None and acc.native_amp  # the GPU path, on the CPU
    return acc


def test_fp16_two_optimizers_unscale_and_update_once(monkeypatch):
    """PPO steps a policy and a value optimizer with one GradScaler: each is unscaled once, the
    scale is updated once per step (accelerate's clip_grad_norm_ per model unscaled every
    optimizer twice and raised "unscale_() has already been called")."""
    from rlhf.config import OptimConfig
    from rlhf.engine import make_optimizer, step_models

    acc = _scaler_accelerator(monkeypatch)
    a, b = _two_models()
    optim = OptimConfig(lr=1e-2)
    oa, ob = make_optimizer(a.parameters(), optim), make_optimizer(b.parameters(), optim)
    a, b, oa, ob = acc.prepare(a, b, oa, ob)
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    x = torch.randn(8, 4)
    loss = a(x).pow(2).mean() + b(x).pow(2).mean()
    acc.backward(loss)
    scale = acc.scaler.get_scale()
    res = step_models(acc, [(a, oa, None), (b, ob, None)], max_grad_norm=1.0)
    assert res[0] and not res.overflow
    assert all(0 < n < 1e3 for n in res[1])  # unscaled norms (scaled ones would be ~65536x larger)
    assert acc.scaler.get_scale() == scale  # one update, no overflow: unchanged
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(not torch.equal(x, y) for x, y in zip(before, after))


def test_fp16_overflow_skips_step_halves_scale_once_and_is_not_a_nonfinite_streak(monkeypatch):
    from rlhf.config import OptimConfig
    from rlhf.engine import NonFiniteGuard, loss_scale, make_optimizer, step_models

    acc = _scaler_accelerator(monkeypatch)
    a, b = _two_models()
    optim = OptimConfig(lr=1e-2)
    oa, ob = make_optimizer(a.parameters(), optim), make_optimizer(b.parameters(), optim)
    a, b, oa, ob = acc.prepare(a, b, oa, ob)
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    x = torch.full((8, 4), 1e4)  # scaled gradients overflow in fp16
    acc.backward(a(x).pow(2).mean() + b(x).pow(2).mean())
    scale = loss_scale(acc)
    res = step_models(acc, [(a, oa, None), (b, ob, None)], max_grad_norm=1.0)
    assert not res[0] and res.overflow
    assert loss_scale(acc) == scale / 2  # halved once, not once per optimizer
    assert all(torch.equal(x, y) for x, y in zip(before, (*a.parameters(), *b.parameters())))
    guard = NonFiniteGuard(limit=1)
    guard.update(res[0], 1, overflow=res.overflow, scale=loss_scale(acc))  # no RunError at limit 1
    assert guard.streak == 0 and guard.overflows == 1 and guard.summary() == {"skipped_overflow_steps": 1}


def test_rm_refresh_is_refused_under_fp16(monkeypatch):
    """The online RM refresh trains the RM with no loss scaler: under fp16 autocast (a GPU, or the
    CPU's GradScaler test path) its gradients would underflow, or overflow into the weights. The
    run is refused before any model loads."""
    from rlhf.config import load_stage_config
    from rlhf.errors import RunError
    from rlhf.stages.ppo_setup import setup_models

    acc = _scaler_accelerator(monkeypatch)
    cfg = load_stage_config("ppo", None, {"model.name_or_path": "unused", "reward_fns": [{"fn": "gold"}],
                                          "mixed_precision": "fp16", "rm_refresh": {"every": 2}})
    with pytest.raises(RunError, match="'rm_refresh' trains the reward model without a loss scaler"):
        setup_models(cfg, acc, tok=None, split=None)


def test_rm_refresh_never_steps_on_a_non_finite_gradient():
    """A NaN or inf gradient in the refreshed RM skips its step: the weights and AdamW moments stay
    as they were (every later reward would be NaN otherwise); a finite one clips and steps."""
    from rlhf.config import OptimConfig
    from rlhf.engine import make_optimizer
    from rlhf.rm_refresh import step_if_finite

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = make_optimizer(model.parameters(), OptimConfig(lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf")):
        model(torch.randn(3, 4)).sum().backward()
        model.weight.grad[0, 1] = bad
        assert not step_if_finite(model, opt, max_norm=1.0)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
        opt.zero_grad(set_to_none=True)
    model(torch.full((3, 4), 100.0)).sum().backward()
    assert step_if_finite(model, opt, max_norm=1.0)
    assert model.weight.grad.norm() <= 1.0 + 1e-6  # clipped before the step
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_ppo_fp16_through_the_grad_scaler_runs_and_resumes_its_scale(sft_checkpoint, task_dir, tmp_path, monkeypatch):
    from rlhf.config import load_stage_config
    from rlhf.stages import run

    monkeypatch.setenv("RLHF_CPU_GRAD_SCALER", "1")
    cfg = load_stage_config("ppo", None, {
        "model.name_or_path": str(sft_checkpoint), "reward_fns": [{"fn": "gold"}], "value_init": "policy",
        "data.train": str(task_dir / "rl_prompts.jsonl"), "data.eval": str(task_dir / "eval_prompts.jsonl"),
        "steps": 2, "rollout_batch_size": 8, "minibatch_size": 4, "micro_batch_size": 2, "ppo_epochs": 1,
        "max_new_tokens": 8, "eval_samples": 8, "mixed_precision": "fp16", "save_every": 1, "sample_every": 0,
        "peak_tflops": 1.0})
    s = run("ppo", cfg, str(tmp_path / "ppo"))
    assert s["steps"] == 2 and math.isfinite(s["eval_reward"])
    state = json.loads((tmp_path / "ppo" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0  # the loss scale is part of the resumable state


# ----------------------------------------------------------------------------- bf16 autocast


@pytest.mark.slow
def test_every_stage_in_bf16_on_the_cpu(sft_checkpoint, task_dir, tmp_path, monkeypatch):
    """bf16 autocast through SFT, RM and PPO; PPO's frozen reference runs under the same autocast
    as the policy, so their KL before any update is exactly 0; PPO generates (rollouts and
    evaluation) inside one autocast region, so each weight is cast once per generation, and so
    does SFT's gold-accuracy sampling; every stage's training forwards take SDPA's math path
    (engine.backpropagated_attention)."""
    import rlhf.stages.ppo as ppo_mod
    import rlhf.stages.rm as rm_mod
    import rlhf.stages.sft as sft_mod
    from rlhf.config import load_stage_config
    from rlhf.stages import run

    import rlhf.evaluate as eval_mod

    in_region, generate = [], ppo_mod.generate
    monkeypatch.setattr(ppo_mod, "generate",
                        lambda *a, **k: in_region.append(torch.is_autocast_enabled("cpu")) or generate(*a, **k))
    sft_region = []  # SFT's gold-accuracy sampling (rlhf.evaluate.sample_texts), in one region too
    monkeypatch.setattr(eval_mod, "generate",
                        lambda *a, **k: sft_region.append(torch.is_autocast_enabled("cpu")) or generate(*a, **k))
    flash = []  # every stage's training forwards: SDPA's math path on the CPU in bf16; no-grad ones: flash
    for mod, name in ((sft_mod, "lm_loss_sum"), (rm_mod, "group_loss"), (ppo_mod, "policy_micro_loss"),
                      (ppo_mod, "value_micro_loss")):
        monkeypatch.setattr(mod, name, lambda *a, _f=getattr(mod, name), _n=name, **k: flash.append(
            (_n, torch.is_grad_enabled(), torch.backends.cuda.flash_sdp_enabled())) or _f(*a, **k))
    # ppo_update backpropagates the policy's loss before the value model's forward (ppo.loss_terms): by
    # then every trained policy parameter has its gradient, even on a minibatch's first micro-batch
    # and that backward freed the policy's graph (no retain_graph): backpropagating through it again fails
    value_after_policy, value_loss, policy_losses = [], ppo_mod.value_micro_loss, []
    policy_loss = ppo_mod.policy_micro_loss
    monkeypatch.setattr(ppo_mod, "policy_micro_loss", lambda *a, **k: policy_losses.append(policy_loss(*a, **k))
                        or policy_losses[-1])

    def graph_freed(loss, params):
        try:
            torch.autograd.grad(loss, params, allow_unused=True)
        except RuntimeError as e:
            return "backward through the graph a second time" in str(e)
        return False

    monkeypatch.setattr(ppo_mod, "value_micro_loss", lambda exp, rows, m, *a, **k: value_after_policy.append(all(
        p.grad is not None for p in m.policy.parameters() if p.requires_grad) and graph_freed(
        policy_losses.pop(), [p for p in m.policy.parameters() if p.requires_grad])) or value_loss(exp, rows, m, *a, **k))

    sft = load_stage_config("sft", None, {
        "model.init": "from_config", "model.arch": TINY_ARCH, "model.tokenizer_vocab_size": 300,
        "data.train": str(task_dir / "sft.jsonl"), "data.max_length": 48, "data.max_samples": 128,
        "train.max_steps": 6, "train.batch_size": 16, "train.micro_batch_size": 16, "train.lr": 3e-3,
        "train.log_every": 1, "train.mixed_precision": "bf16", "max_new_tokens": 6, "gen_eval_samples": 8})
    run("sft", sft, str(tmp_path / "sft"))
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "sft" / "metrics.jsonl") if '"loss"' in l]
    assert losses[-1] < losses[0]
    assert len(sft_region) >= 2 and all(sft_region)  # sampled and greedy gold accuracy
    rm = load_stage_config("rm", None, {
        "model.name_or_path": str(sft_checkpoint), "data.train": str(task_dir / "prefs.jsonl"),
        "data.max_length": 48, "data.max_samples": 64, "train.max_steps": 3, "train.batch_size": 16,
        "train.micro_batch_size": 16, "train.mixed_precision": "bf16", "normalize_max_samples": 32})
    s = run("rm", rm, str(tmp_path / "rm"))
    assert math.isfinite(s["eval_loss"])
    ppo = load_stage_config("ppo", None, {
        "model.name_or_path": str(sft_checkpoint), "reward_model": str(tmp_path / "rm"),
        "data.train": str(task_dir / "rl_prompts.jsonl"), "data.eval": str(task_dir / "eval_prompts.jsonl"),
        "steps": 2, "rollout_batch_size": 8, "minibatch_size": 4, "micro_batch_size": 4, "ppo_epochs": 1,
        "max_new_tokens": 6, "eval_samples": 8, "mixed_precision": "bf16", "sample_every": 0})
    s = run("ppo", ppo, str(tmp_path / "ppo"))
    assert s["initial_eval_kl"] == 0.0 and s["initial_eval_kl_k3"] == 0.0
    assert s["mfu_peak_dtype"] == "bfloat16" and math.isfinite(s["eval_reward"])
    assert s["old_logprobs"] == "recompute"  # (auto: bf16 sampling log-probs are too far from a recompute)
    assert len(in_region) >= 4 and all(in_region)  # 2 rollouts, 2+ evaluations
    assert {n for n, grad, _ in flash if grad} == {"lm_loss_sum", "group_loss", "policy_micro_loss",
                                                   "value_micro_loss"}
    assert len(value_after_policy) >= 4 and all(value_after_policy)
    assert all(on != grad for _, grad, on in flash) and torch.backends.cuda.flash_sdp_enabled()  # (restored after)


def test_frozen_reference_runs_under_the_policy_autocast():
    from rlhf.engine import compute_dtype, make_accelerator, prepare_frozen

    acc = make_accelerator("bf16")
    assert compute_dtype(acc) == torch.bfloat16 and compute_dtype(make_accelerator("no")) == torch.float32
    acc = make_accelerator("bf16")
    ref = prepare_frozen(acc, torch.nn.Linear(4, 4), "whole")
    assert ref(torch.randn(2, 4)).dtype == torch.float32  # autocast inside, fp32 out (as the policy)
    with torch.no_grad():
        x = torch.randn(2, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = torch.nn.functional.linear(x, ref.weight, ref.bias).float()
        assert torch.equal(ref(x), expected)


def test_frozen_models_hold_their_linear_weights_in_the_autocast_dtype(tiny_lm):
    """A frozen model under a bf16 autocast (reference, reward model) keeps bf16 copies of its
    linear layers' weights instead of casting them in every forward (autocast caches casts only
    for weights that require grad): the same logits bit for bit, no weight cast per call, the
    embeddings (tied to the LM head in this model) still fp32."""
    import copy

    from rlhf.engine import make_accelerator, prepare_frozen

    fp32 = prepare_frozen(make_accelerator("no"), copy.deepcopy(tiny_lm), "whole")  # fp32 runs: as it was
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert fp32.get_input_embeddings().weight is fp32.get_output_embeddings().weight
    acc = make_accelerator("bf16")  # (last: the process's accelerate state stays bf16, as the other tests expect)
    plain = acc.prepare_model(copy.deepcopy(tiny_lm).requires_grad_(False), evaluation_mode=True)
    held = prepare_frozen(acc, copy.deepcopy(tiny_lm), "whole")
    emb, head = held.get_input_embeddings().weight, held.get_output_embeddings().weight
    assert emb.dtype == torch.float32 and head.dtype == torch.bfloat16 and emb.data_ptr() != head.data_ptr()
    linears = [m for m in held.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    ids = torch.randint(3, 200, (3, 9))
    weights = [p for p in plain.parameters() if p.dim() == 2]
    with torch.no_grad(), WeightCasts(weights) as cast_plain:
        expected = plain(input_ids=ids).logits
    with torch.no_grad(), WeightCasts([p for p in held.parameters() if p.dim() == 2]) as cast_held:
        got = held(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert cast_plain.n >= len(linears) and cast_held.n == 0


def test_backpropagated_attention_takes_the_math_path_only_on_the_cpu_in_half_precision():
    """On the CPU in bf16/fp16, SDPA's flash-attention backward is the slow kernel: forwards that
    are backpropagated run SDPA's math path there (the same attention to rounding); fp32 and other
    devices keep flash attention."""
    import torch.nn.functional as F

    from rlhf.engine import backpropagated_attention

    for device, dtype, flash in (("cpu", torch.bfloat16, False), ("cpu", torch.float16, False),
                                 ("cpu", torch.float32, True), ("cuda", torch.bfloat16, True)):
        with backpropagated_attention(device, dtype):
            assert torch.backends.cuda.flash_sdp_enabled() is flash
    assert torch.backends.cuda.flash_sdp_enabled()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with backpropagated_attention("cpu", torch.bfloat16):
        math_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(math_out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)


def test_matmul_peak_in_the_dtype_that_runs():
    from rlhf.flops import measure_matmul_peak

    assert measure_matmul_peak(128, 2, dtype=torch.bfloat16) > 0


# ----------------------------------------------------------------------------- devices


def test_sampler_refuses_a_generator_on_another_device(tiny_lm):
    from rlhf.rollout import generate

    class FakeCuda:  # what a CPU generator looks like to a model on the GPU, seen from the other side
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="generator on cuda, model inputs on cpu"):
        generate(tiny_lm, [[5, 6]], eos_token_id=1, pad_token_id=0, max_new_tokens=2, generator=FakeCuda())


def test_sampling_sync_every_gives_the_same_shape(tiny_lm, tok):
    """Reading `finished` every 8 tokens (as on a GPU) cuts the all-padding tail: same shapes."""
    from rlhf.rollout import generate

    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=12, greedy=True)
    a = generate(tiny_lm, [[5, 6, 7], [8, 9]], sync_every=1, **kw)
    b = generate(tiny_lm, [[5, 6, 7], [8, 9]], sync_every=8, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)


@pytest.fixture
def device_spy(monkeypatch):
    """Records the device each command asks for and every model moved onto it."""
    import rlhf.engine

    seen = {"asked": 0, "moved": []}
    real_to = torch.nn.Module.to

    def runtime_device():
        seen["asked"] += 1
        return torch.device("cpu")

    def to(self, *args, **kwargs):
        dev = args[0] if args else kwargs.get("device")
        if isinstance(dev, torch.device):
            seen["moved"].append(type(self).__name__)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(rlhf.engine, "runtime_device", runtime_device)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "score", "eval", "sample", "chat"])
def test_every_command_puts_its_models_on_the_runtime_device(command, device_spy, sft_checkpoint, task_dir, tmp_path,
                                                              monkeypatch, capsys):
    """No command leaves its models on the CPU when accelerate picks a GPU: each asks for the
    device and moves every model it loads there (and sampling generators follow the model)."""
    import io

    from rlhf.cli import main

    ckpt = str(sft_checkpoint)
    prompts = str(task_dir / "eval_prompts.jsonl")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "sort: 3 1 2", "response": "1 2 3"}) + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("sort: 3 1 2\n/exit\n"))
    argv = {"generate": ["generate", ckpt, "--prompts", prompts, "--max_new_tokens", "4", "--out", str(tmp_path / "g")],
            "score": ["score", _as_reward_model(ckpt, tmp_path / "rm"), str(rows)],
            "eval": ["eval", ckpt, "--prompts", prompts, "--max_samples", "4", "--max_new_tokens", "4"],
            "sample": ["sample", ckpt, prompts, "--k", "2", "--max_prompts", "2", "--max_new_tokens", "4",
                       "--out", str(tmp_path / "s.jsonl")],
            "chat": ["chat", ckpt, "--max_new_tokens", "4"]}[command]
    assert main(argv) == 0
    assert device_spy["asked"] >= 1
    want = "ForSequenceClassification" if command == "score" else "ForCausalLM"
    assert any(name.endswith(want) for name in device_spy["moved"]), device_spy["moved"]


def _as_reward_model(policy: str, out) -> str:
    """The policy's weights under a fresh one-label head, saved as `rlhf rm` saves a reward model
    (`rlhf score` refuses a causal LM: it would score with a random head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- config ranges


@pytest.mark.parametrize("override, message", [
    ({"temperature": 0}, "temperature: must be > 0"),
    ({"gamma": 1.5}, "gamma: must be in [0.0, 1.0]"),
    ({"kl_estimator": "k4"}, "kl_estimator: must be one of k1, k2, k3"),
    ({"lr_scheduler": "cosin"}, "did you mean 'cosine'"),
    ({"rollout_batch_size": 24, "minibatch_size": 16}, "must be a multiple of minibatch_size"),
    ({"ptx_coef": 1.0}, "ptx_data: must be set when ptx_coef > 0"),
    ({"ema_decay": 1.0}, "ema_decay: must be in"),
])
def test_ppo_ranges_are_checked_when_the_recipe_loads(override, message):
    from rlhf.config import ConfigError, load_stage_config

    with pytest.raises(ConfigError) as e:
        load_stage_config("ppo", "recipes/tiny/ppo.yaml", override)
    assert message in str(e.value)


@pytest.mark.slow
def test_zero_temperature_on_the_command_line_is_a_one_line_error(sft_checkpoint):
    p = run_cli("generate", sft_checkpoint, "--temperature", "0", check=False)
    assert p.returncode == 2 and "must be > 0" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("ppo", "recipes/tiny/ppo.yaml", "--temperature", "0", check=False)
    assert p.returncode == 2 and "temperature: must be > 0" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- EMA


def test_ema_tracks_only_trained_parameters_beside_them(tiny_lm):
    from peft import LoraConfig, get_peft_model

    from rlhf.ema import EMA

    model = get_peft_model(tiny_lm, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ema = EMA(model, 0.5)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(ema.params) == len(trained) < len(list(model.parameters())) // 4
    assert all(e.device == p.device and e.dtype == torch.float32 for e, p in zip(ema.params, trained))
    with torch.no_grad():
        for p in trained:
            p.add_(1.0)
    ema.update(model)
    full = ema.full_state_dict(model, acc=None)
    sd = model.state_dict()
    frozen = next(k for k, p in model.named_parameters() if not p.requires_grad)
    assert torch.equal(full[frozen], sd[frozen])  # a frozen weight is its own average
    lora = next(k for k, p in model.named_parameters() if p.requires_grad)
    assert torch.allclose(full[lora], sd[lora] - 0.5)

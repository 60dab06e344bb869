"""FLOP accounting behind the logged MFU."""

import pytest

from rlhf.flops import count_flop_params, count_head_params, forward_flops, measure_matmul_peak, mfu, train_flops


def test_flop_formulas():
    assert forward_flops(1000, 10) == 20000
    assert train_flops(1000, 10) == 60000
    assert mfu(1e9, 2.0, 1e9) == pytest.approx(0.5)
    assert mfu(1e9, 1.0, 0.0) == 0.0


def test_count_flop_params_tied_and_untied(tiny_lm):
    n_all = sum(p.numel() for p in tiny_lm.parameters())  # tied: the embedding is the LM head, counted once
    assert count_flop_params(tiny_lm) == n_all
    backbone = tiny_lm.model  # no LM head: the lookup table does no matmul
    emb = backbone.get_input_embeddings().weight.numel()
    assert count_flop_params(backbone) == sum(p.numel() for p in backbone.parameters()) - emb
    # the LM head (tied here) is counted apart: PPO charges it only where logits are read
    assert count_head_params(tiny_lm) == emb == tiny_lm.config.vocab_size * tiny_lm.config.hidden_size
    assert count_head_params(backbone) == 0


def test_measure_matmul_peak_is_plausible():
    peak = measure_matmul_peak(256, 3)
    assert 1e8 < peak < 1e15


def test_retain_freed_cpu_memory_once_and_declinable(monkeypatch):
    import ctypes
    import sys

    from rlhf import engine

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(engine, "_MALLOC_SET", [])
    monkeypatch.setenv("RLHF_MALLOC", "system")
    assert engine.retain_freed_cpu_memory() is False and calls == []  # declined: glibc's defaults stay
    monkeypatch.setattr(engine, "_MALLOC_SET", [])
    monkeypatch.delenv("RLHF_MALLOC")
    expected = sys.platform.startswith("linux")
    assert engine.retain_freed_cpu_memory() is expected
    assert calls == ([(-4, 0), (-1, 2**31 - 1)] if expected else [])  # M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB
    assert engine.retain_freed_cpu_memory() is expected and len(calls) == (2 if expected else 0)  # once
    import torch  # with an accelerator the host's freed memory goes back to the system: nothing set

    calls.clear()
    monkeypatch.setattr(engine, "_MALLOC_SET", [])
    if getattr(torch, "accelerator", None) is not None:
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert engine.retain_freed_cpu_memory() is False and calls == []


@pytest.mark.parametrize("policy_pass, mfu_exp", [(True, 5.76), (False, 3.68)])
def test_phase_throughput_by_hand(policy_pass, mfu_exp):
    """Per-phase FLOPs counted by hand: 10 sequence tokens (6 prompt + 4 response), policy 100
    params + head 10, value 50, RM 30, 2 PPO epochs, peak 1000 FLOP/s. The experience phase runs
    the reference (and the policy, when the old log-probs are recomputed), the value model and RM."""
    from types import SimpleNamespace

    import torch

    from rlhf.stages.ppo import phase_throughput

    gen = SimpleNamespace(response_mask=torch.tensor([[1, 1, 1, 1]]), prompt_mask=torch.ones(1, 6))
    ro, exp = SimpleNamespace(gen=gen), SimpleNamespace(attention_mask=torch.ones(1, 10))
    times = {"generate": 1.0, "score": 0.5, "experience": 0.5, "train": 2.0}
    params = {"policy": 100, "policy_head": 10, "value": 50, "rm": 30}
    r = phase_throughput(ro, exp, times, params, ppo_epochs=2, peak=1000.0, policy_pass=policy_pass)
    assert r["mfu_generate"] == pytest.approx((2 * 100 * 10 + 2 * 10 * 4) / 1.0 / 1000)  # 2.08
    # 2 (2 x 100 + 50 + 30) 10 + 2 (2 x 10) 4 = 5760 with the policy pass; 2 (100 + 80) 10 + 2 x 10 x 4 = 3680
    assert r["mfu_experience"] == pytest.approx(mfu_exp)
    assert r["mfu_train"] == pytest.approx((6 * 150 * 10 + 6 * 10 * 4) * 2 / 2.0 / 1000)  # 9.24
    assert r["tokens_per_s_generate"] == 4.0 and r["tokens_per_s_train"] == 10.0

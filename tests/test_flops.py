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

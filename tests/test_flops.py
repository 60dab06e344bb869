"""FLOP accounting behind the logged MFU."""

import pytest

from rlhf.flops import count_flop_params, forward_flops, measure_matmul_peak, mfu, train_flops


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


def test_measure_matmul_peak_is_plausible():
    peak = measure_matmul_peak(256, 3)
    assert 1e8 < peak < 1e15

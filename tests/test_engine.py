"""rlhf.engine's small pieces."""

import pytest
import torch

from rlhf.engine import clip_grad_norm


def _params(grads):
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


def test_clip_grad_norm_hand_computed():
    """Gradients (3, 4): norm 5; a limit of 1 scales them by 1 / (5 + 1e-6); a limit of 10 leaves them."""
    ps = _params([torch.tensor([3.0]), torch.tensor([4.0])])
    assert clip_grad_norm(ps, 1.0) == 5.0
    assert [p.grad.item() for p in ps] == pytest.approx([0.6, 0.8], rel=1e-6)
    ps = _params([torch.tensor([3.0]), torch.tensor([4.0])])
    assert clip_grad_norm(ps, 10.0) == 5.0 and [p.grad.item() for p in ps] == [3.0, 4.0]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("limit", [1.0, 0.3, float("inf")])
def test_clip_grad_norm_is_torchs_bit_for_bit_and_writes_only_when_it_scales(scale, limit):
    torch.manual_seed(0)
    grads = [torch.randn(40, 30) * scale, torch.randn(30) * scale]
    ref, got = _params(grads), _params(grads)
    versions = [p.grad._version for p in got]
    assert clip_grad_norm(got, limit) == float(torch.nn.utils.clip_grad_norm_(ref, limit))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ref, got))
    scaled = limit / (float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))) + 1e-6) < 1
    assert [p.grad._version != v for p, v in zip(got, versions)] == [scaled] * 2


def test_clip_grad_norm_without_gradients():
    assert clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0) == 0.0


@pytest.mark.parametrize("n,world,size", [(9, 2, 4), (1, 2, 4), (0, 2, 4), (8, 2, 4), (17, 3, 2), (5, 8, 1)])
def test_rank_chunks_give_every_process_the_same_number_of_forwards_and_each_item_once(n, world, size):
    """Held-out evaluation under ZeRO-3 / DDP: every process runs as many chunks as the busiest
    (collective forwards), and the real chunks cover every item exactly once."""
    from types import SimpleNamespace

    from rlhf.engine import rank_chunks

    items = list(range(n))
    per_rank = [rank_chunks(items, SimpleNamespace(process_index=r, num_processes=world), size) for r in range(world)]
    assert len({len(c) for c in per_rank}) == 1  # the same number of forwards everywhere
    real = sorted(x for chunks in per_rank for c, ok in chunks if ok for x in c)
    assert real == items
    assert all(len(c) <= size and c for chunks in per_rank for c, _ in chunks)
    if (n, world, size) == (9, 2, 4):
        assert [ok for _, ok in per_rank[1]] == [True, False] and per_rank[1][1][0] == [0]


def test_each_stage_sets_its_matmul_precision():
    """matmul_precision reaches torch when a stage builds its Accelerator, and the next stage's
    default puts torch's back (a pipeline's stages do not inherit each other's); on a CPU 'medium'
    also turns ATen's flash attention off (slow under bf16 fpmath) and the next stage on again."""
    from rlhf.config import ConfigError, load_stage_config
    from rlhf.engine import make_accelerator

    try:
        make_accelerator("no", matmul_precision="medium")
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.cuda.flash_sdp_enabled() == torch.cuda.is_available()
        make_accelerator("no")
        assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.enable_flash_sdp(True)
    assert load_stage_config("sft", None, {"train.matmul_precision": "high"}).train.matmul_precision == "high"
    with pytest.raises(ConfigError, match="matmul_precision"):
        load_stage_config("ppo", None, {"matmul_precision": "low"})

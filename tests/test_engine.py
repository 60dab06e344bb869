"""rlhf.engine's small pieces."""

from pathlib import Path

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
    also routes transformers' SDPA attention through _cpu_medium_sdpa, and the next stage back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhf.config import ConfigError, load_stage_config
    from rlhf.engine import _cpu_medium_sdpa, make_accelerator

    try:
        make_accelerator("no", matmul_precision="medium")
        assert torch.get_float32_matmul_precision() == "medium"
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is (_cpu_medium_sdpa if not torch.cuda.is_available()
                                                   else sdpa_attention_forward)
        make_accelerator("no")
        assert torch.get_float32_matmul_precision() == "highest"
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    finally:
        torch.set_float32_matmul_precision("highest")
        ALL_ATTENTION_FUNCTIONS.register("sdpa", sdpa_attention_forward)
    assert load_stage_config("sft", None, {"train.matmul_precision": "high"}).train.matmul_precision == "high"
    with pytest.raises(ConfigError, match="matmul_precision"):
        load_stage_config("ppo", None, {"matmul_precision": "low"})


@pytest.mark.slow
def test_a_stage_gives_the_callers_matmul_precision_back():
    """A stage run in-process sets its recipe's precision (and attention) and, when it ends, even on
    an error, gives the caller's back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhf.config import load_stage_config
    from rlhf.errors import DataError
    from rlhf.stages import run

    with pytest.raises(DataError, match="no output directory"):  # (raised after make_accelerator set medium)
        run("sft", load_stage_config("sft", None, {"train.matmul_precision": "medium"}), None)
    assert torch.get_float32_matmul_precision() == "highest"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward

    def mine(*a, **k):  # a caller under 'medium' with an attention function of their own
        return sdpa_attention_forward(*a, **k)

    try:
        torch.set_float32_matmul_precision("medium")
        ALL_ATTENTION_FUNCTIONS.register("sdpa", mine)
        with pytest.raises(DataError, match="no output directory"):
            run("sft", load_stage_config("sft", None, {}), None)
        assert torch.get_float32_matmul_precision() == "medium" and ALL_ATTENTION_FUNCTIONS["sdpa"] is mine
    finally:
        torch.set_float32_matmul_precision("highest")
        ALL_ATTENTION_FUNCTIONS.register("sdpa", sdpa_attention_forward)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's 'medium' attention")
def test_a_callers_own_sdpa_attention_is_kept_and_given_back():
    """A caller who registered an "sdpa" attention function of their own keeps it: a stage under
    'highest' leaves it registered, one under 'medium' runs it inside SDPA's math path, and the next
    stage (and a stage's end, `restore_matmul_settings`) registers it again."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhf.engine import matmul_settings, restore_matmul_settings, set_matmul_precision

    calls = []

    def mine(module, q, k, v, mask, **kw):
        calls.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled())
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    q = torch.randn(1, 2, 5, 8)
    ALL_ATTENTION_FUNCTIONS.register("sdpa", mine)
    try:
        caller = matmul_settings()
        set_matmul_precision("highest")
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is mine
        set_matmul_precision("medium")
        assert ALL_ATTENTION_FUNCTIONS["sdpa"]._rlhf_below is mine
        ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, q, q, None)
        assert calls == [True]  # the caller's function, inside the math path
        set_matmul_precision("medium")  # (a pipeline's next stage: still the caller's below ours)
        ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, q, q, None)
        assert calls == [True, True]
        ours = ALL_ATTENTION_FUNCTIONS["sdpa"]  # someone wraps ours during a stage, and 'medium' is set again:
        ALL_ATTENTION_FUNCTIONS.register("sdpa", lambda *a, **k: ours(*a, **k))
        set_matmul_precision("medium")
        ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, q, q, None)  # a finite chain (it recursed when ours read a global)
        assert calls == [True, True, True]
        set_matmul_precision("highest")
        ALL_ATTENTION_FUNCTIONS.register("sdpa", mine)
        set_matmul_precision("highest")
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is mine
        set_matmul_precision("medium")
        set_matmul_precision("highest")
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is mine
        set_matmul_precision("medium")
        set_matmul_precision("medium")
        assert ALL_ATTENTION_FUNCTIONS["sdpa"]._rlhf_below is mine  # (not a wrapper's wrapper)
        set_matmul_precision("medium")
        restore_matmul_settings(caller)
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is mine and torch.get_float32_matmul_precision() == "highest"
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, q, q, None)
        assert calls == [True, True, True, False]  # (the probe tells the paths apart)
    finally:
        torch.set_float32_matmul_precision("highest")
        ALL_ATTENTION_FUNCTIONS.register("sdpa", sdpa_attention_forward)


def test_cpu_medium_attention_takes_the_math_path_in_every_pass():
    """Under 'medium' every attention is SDPA's math path, backpropagated or not (so a policy's
    no-grad passes compute what its training pass does), not ATen's flash, which is slow there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf.engine import _cpu_medium_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    try:
        torch.set_float32_matmul_precision("medium")
        flash, _ = sdpa_attention_forward(module, q, k, v, None)
        with sdpa_kernel([SDPBackend.MATH]):
            math, _ = sdpa_attention_forward(module, q, k, v, None)
        assert not torch.equal(flash, math)  # the test can tell the two apart
        with torch.no_grad():
            out, _ = _cpu_medium_sdpa(module, q, k, v, None)
        assert torch.equal(out, math)
        qg = q.clone().requires_grad_()
        out, _ = _cpu_medium_sdpa(module, qg, k, v, None)
        assert torch.equal(out, math)
        out.sum().backward()
        assert qg.grad is not None
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_deepspeed_json_is_checked_as_deepspeed_reads_it(tmp_path, caplog):
    """A DeepSpeed `scheduler` replaced the recipe's schedule with lr 0: the run trained nothing and
    exited 0. An `optimizer` section, an unknown or mistyped `zero_optimization` key were
    tracebacks from accelerate's prepare once the models had loaded; a ZeRO-3 JSON without
    `stage3_gather_16bit_weights_on_model_save` failed after training, at the save. Now one line
    at the start, naming the file and key, and the save flag is set for ZeRO-3."""
    import json

    from rlhf.engine import deepspeed_config
    from rlhf.errors import RunError

    pytest.importorskip("deepspeed")

    def config(doc: dict) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(doc))
        return deepspeed_config(str(path), "no", micro_batch_size=2, grad_accum=1, max_grad_norm=1.0, world_size=1)

    z2 = {"stage": 2}
    for doc, pattern in [
            ({"scheduler": {"type": "WarmupLR"}, "zero_optimization": z2}, r"ds\.json: 'scheduler': the recipe sets "
                                                                            r"the optimizer .*remove the 'scheduler'"),
            ({"optimizer": {"type": "AdamW"}, "zero_optimization": z2}, r"ds\.json: 'optimizer': the recipe sets"),
            ({"zero_optimization": {"stage": 2, "overlap_com": False}},
             r"ds\.json: 'zero_optimization\.overlap_com': Extra inputs are not permitted \(did you mean "
             r"'overlap_comm'\?\)$"),
            ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
             r"'zero_optimization\.reduce_bucket_size': Input should be a valid integer"),
            ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
             r"'zero_optimization\.stage3_gather_16bit_weights_on_model_save' must be true"),
            # the precision sections and the communication type too (tracebacks after the models loaded)
            ({"zero_optimization": z2, "bf16": {"enabled": "auto", "bogus": 1}},
             r"ds\.json: 'bf16\.bogus': Extra inputs are not permitted"),
            ({"zero_optimization": z2, "fp16": {"loss_scale": "big"}}, r"'fp16\.loss_scale': fp16\.loss_scale must be"),
            ({"zero_optimization": z2, "communication_data_type": "bogus"},
             r"'communication_data_type' must be fp32, fp16 or bf16, got 'bogus'"),
            ({"zero_optimization": {"stage": True}}, r"'zero_optimization\.stage' must be 0, 1, 2 or 3, got True"),
            ({"zero_optimization": z2, "communication_data_type": "auto"}, r"must be fp32, fp16 or bf16, got 'auto'")]:
        with pytest.raises(RunError, match=pattern):
            config(doc)
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):  # (it ran ~60 s, then failed to JIT-load the op)
        with pytest.raises(RunError, match=r"'zero_optimization\.offload_optimizer\.device' nvme: DeepSpeed's "
                                           r"async_io op cannot be built here"):
            config({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}})
    assert config({"zero_optimization": {"stage": 3}})["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in config({"zero_optimization": z2})["zero_optimization"]
    old_name = config({"zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}})
    assert "stage3_gather_fp16_weights_on_model_save" not in old_name["zero_optimization"]  # (not both: DeepSpeed
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # refuses the older name beside the new one)

    DeepSpeedZeroConfig(**old_name["zero_optimization"])
    with pytest.raises(RunError, match=r"'zero_optimization\.stage3_gather_fp16_weights_on_model_save' must be true"):
        config({"zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": False}})
    # the fields the recipe decides: a value given in the JSON is replaced, and said (it was silent)
    caplog.clear()
    filled = config({"zero_optimization": z2, "train_batch_size": 999, "gradient_accumulation_steps": "auto",
                     "gradient_clipping": 1e-9, "bf16": {"enabled": True}})
    assert filled["train_batch_size"] == 2 and filled["gradient_clipping"] == 1.0 and not filled["bf16"]["enabled"]
    assert "ds.json: the recipe sets train_batch_size 999 -> 2, gradient_clipping 1e-09 -> 1.0, bf16.enabled True " \
           "-> False" in caplog.text
    config({"zero_optimization": z2, "communication_data_type": "BF16"})  # (DeepSpeed lower-cases it)
    import sys

    with pytest.MonkeyPatch.context() as mp:  # a DeepSpeed before 0.17.1 (no precision_config): zero still checked
        mp.setitem(sys.modules, "deepspeed.runtime.precision_config", None)
        with pytest.raises(RunError, match=r"'zero_optimization\.overlap_com': Extra inputs"):
            config({"zero_optimization": {"stage": 2, "overlap_com": False}})
        config({"zero_optimization": z2, "bf16": {"bogus": 1}})  # (its own check, at its own start)
    caplog.clear()
    config({"zero_optimization": z2, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2})
    assert "the recipe sets" not in caplog.text  # ("auto", or the recipe's own value: nothing replaced)
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):  # the shipped ones pass
        deepspeed_config(str(Path(__file__).parents[1] / "recipes" / "deepspeed" / name), "bf16", 2, 1, 1.0, 1)


def test_a_busy_master_port_for_a_one_process_deepspeed_run_is_one_line(monkeypatch, tmp_path):
    """One process under DeepSpeed makes its own process group on MASTER_PORT when the user
    exported one: a port in use was torch's EADDRINUSE traceback, then a second from the cleanup."""
    import json
    import socket

    from rlhf.engine import make_accelerator
    from rlhf.errors import RunError

    pytest.importorskip("deepspeed")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        with pytest.raises(RunError, match=rf"^environment variable MASTER_PORT={busy.getsockname()[1]}: the port "
                                           r"is in use"):
            make_accelerator("no", str(ds))

"""fp32 linear layers through oneDNN (rlhf.cpu_linear): the same products as F.linear, forward and
backward, to float rounding."""

import copy

import pytest
import torch
import torch.nn.functional as F

import rlhf.cpu_linear
from rlhf.cpu_linear import (AUTO_MIN_WEIGHTS, OneDNNLinear, apply_onednn_linear, mkl_below_peak_here, onednn_linear,
                             onednn_linear_available, onednn_linear_pays_here, use_onednn_linear)

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN")


def test_onednn_linear_hand_computed():
    """y = x Wᵀ + b, ∂/∂x = g W, ∂/∂W = gᵀ x, ∂/∂b = Σ g, with g = 1 (exact in fp32)."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    b = torch.tensor([0.5, -1.0, 0.0], requires_grad=True)
    y = onednn_linear(x, w, b)
    assert y.tolist() == [[1.5, 1.0, 3.0], [3.5, 3.0, 7.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert w.grad.tolist() == [[4.0, 6.0], [4.0, 6.0], [4.0, 6.0]]
    assert b.grad.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear(bias):
    """3-D and transposed (strided) inputs, a random upstream gradient: outputs and all three
    gradients equal F.linear's to float rounding."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 48).transpose(0, 1)  # (3, 5, 48), not contiguous
    w, b = torch.randn(40, 48), torch.randn(40) if bias else None
    g = torch.randn(3, 5, 40)
    grads = []
    for fn in (F.linear, onednn_linear):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if bias else None
        y = fn(xs, ws, bs)
        y.backward(g)
        grads.append((y, xs.grad, ws.grad, bs.grad if bias else None))
    for ref, got in zip(*grads):
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # the no-grad path (one oneDNN call, no autograd node)
        torch.testing.assert_close(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_use_onednn_linear_switches_every_linear_and_keeps_the_numbers(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_ARCH

    arch = {k: v for k, v in TINY_ARCH.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **arch))
    switched = copy.deepcopy(model)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert use_onednn_linear(switched) == n_linear > 0
    assert sum(isinstance(m, torch.nn.Linear) for m in switched.modules()) == n_linear  # still nn.Linear
    assert not any(type(m) is torch.nn.Linear for m in switched.modules())  # every one switched
    ref_sd, got_sd = model.state_dict(), switched.state_dict()
    assert ref_sd.keys() == got_sd.keys() and all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)

    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    losses = []
    for m in (model, switched):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), switched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    calls = []
    orig = OneDNNLinear.forward  # the switched model's training pass really goes through OneDNNLinear
    monkeypatch.setattr(OneDNNLinear, "forward", staticmethod(lambda ctx, *a: calls.append(1) or orig(ctx, *a)))
    switched(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == n_linear

    half = copy.deepcopy(switched).to(torch.bfloat16)  # other dtypes run F.linear as before
    ref_half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(half(input_ids=ids).logits, ref_half(input_ids=ids).logits)


def test_onednn_linear_output_can_be_changed_in_place_like_f_linear():
    """TRL slices the logits and divides them by the temperature in place: allowed on F.linear's
    output, so it must be on ours (a view made inside an autograd.Function would forbid it)."""
    torch.manual_seed(0)
    x0, w0 = torch.randn(2, 3, 8), torch.randn(5, 8)
    grads = []
    for fn in (F.linear, onednn_linear):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        logits = fn(x, w)[:, 1:]
        logits /= 0.7
        (logits * torch.arange(5.0)).sum().backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


AMD_ZEN5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_vp2intersect\n"


@pytest.mark.parametrize("cpuinfo, slow", [
    (AMD_ZEN5, True),  # MKL runs AVX2 kernels on an AVX-512 CPU
    (AMD_ZEN5.replace(" avx512f avx512_vp2intersect", ""), False),  # AVX2 only: MKL's kernels fit
    (AMD_ZEN5.replace("AuthenticAMD", "GenuineIntel"), False),  # MKL's own vendor
    ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx512fp16\n", False),  # a flag is a whole word
    ("", False),  # no /proc/cpuinfo fields (another OS): leave MKL alone
])
def test_mkl_below_peak_here_reads_vendor_and_avx512(cpuinfo, slow):
    assert mkl_below_peak_here(cpuinfo) is slow


def test_onednn_linear_auto_switches_only_large_layers_where_it_pays(monkeypatch):
    """auto: where oneDNN pays, the layers of >= AUTO_MIN_WEIGHTS weights (not the small ones, whose
    per-call cost made the tiny model slower); where it does not, none; true: all; false: none."""
    def model():
        return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(64, 64), torch.nn.Linear(256, 255))

    assert 256 * 256 >= AUTO_MIN_WEIGHTS > 256 * 255
    monkeypatch.setattr(rlhf.cpu_linear, "onednn_linear_pays_here", lambda acc: True)
    m = model()
    assert apply_onednn_linear("auto", None, [m, None]) == 1
    assert [type(x) is torch.nn.Linear for x in m] == [False, True, True]
    assert apply_onednn_linear(False, None, [model()]) == 0
    assert apply_onednn_linear(True, None, [model()]) == 3
    monkeypatch.setattr(rlhf.cpu_linear, "onednn_linear_pays_here", lambda acc: False)
    m = model()
    assert apply_onednn_linear("auto", None, [m]) == 0 and all(type(x) is torch.nn.Linear for x in m)


def test_onednn_linear_pays_here_needs_fp32_on_the_cpu(monkeypatch):
    """auto never switches a mixed-precision, GPU or DeepSpeed run, nor one on a CPU where MKL is at
    its peak."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def acc(device="cpu", mp="no", dist=DistributedType.NO):
        return SimpleNamespace(device=torch.device(device), mixed_precision=mp, native_amp=mp != "no",
                               distributed_type=dist)

    monkeypatch.setattr(rlhf.cpu_linear, "mkl_below_peak_here", lambda cpuinfo=None: True)
    assert onednn_linear_pays_here(acc())
    assert not onednn_linear_pays_here(acc(mp="bf16"))
    assert not onednn_linear_pays_here(acc(device="cuda"))
    assert not onednn_linear_pays_here(acc(dist=DistributedType.DEEPSPEED))
    monkeypatch.setattr(rlhf.cpu_linear, "mkl_below_peak_here", lambda cpuinfo=None: False)
    assert not onednn_linear_pays_here(acc())

"""fp32 linear layers through oneDNN on the CPU (recipe key ``onednn_linear``: auto, true or false).

torch computes an fp32 ``nn.Linear`` on the CPU with MKL's sgemm. On the AMD CPUs this project is
measured on (AVX-512), MKL runs its AVX2 kernels and reaches about half of what the cores can do:
a 2048³ product at 176 GFLOP/s, where oneDNN, which torch also ships and which chooses its kernels
by the CPU's instruction sets, reaches 382 GFLOP/s, and SmolLM2's training products 2× as fast
(docs/performance-history.md, "The figure now: fp32 linear layers through oneDNN"). On Intel CPUs
MKL is already at the peak and the two are alike.

:func:`use_onednn_linear` makes a model's fp32 ``nn.Linear`` layers run :class:`OneDNNLinear`:
the same products, forward and backward, through ``torch.ops.mkldnn._linear_pointwise`` (the op
inductor itself emits for CPU linear layers). Results equal ``F.linear``'s to float rounding (a
different summation order); parameters, state dicts and checkpoints are untouched.

``onednn_linear: auto`` (the default) switches only where it is known to pay
(:func:`onednn_linear_pays_here`): an fp32 CPU run without DeepSpeed, on an x86 CPU with AVX-512
not made by Intel, and only layers of at least :data:`AUTO_MIN_WEIGHTS` weights (oneDNN's per-call
cost made a 149k-parameter model slower). Elsewhere, Intel CPUs and the tiny recipes included,
nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN and the linear op used here."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear_pointwise(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


@torch.library.custom_op("rlhf::onednn_mm", mutates_args=())
def _onednn_mm_op(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same product as an opaque op for torch.compile: inductor lowers mkldnn._linear_pointwise
    only for frozen (constant) weights, and a trained weight is not one."""
    return _linear_pointwise(a, b_t, bias)


@_onednn_mm_op.register_fake
def _(a, b_t, bias):
    return a.new_empty((*a.shape[:-1], b_t.shape[0]))


def onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b_tᵀ (+ bias) by oneDNN: a (..., K), b_t (N, K) -> (..., N). Strided views (transposes)
    are read in place, not copied."""
    if torch.compiler.is_compiling():
        return _onednn_mm_op(a, b_t, bias)
    return _linear_pointwise(a, b_t, bias)  # (eager: without the custom op's dispatch per call)


class OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b with the forward and both backward products by oneDNN.

    x: (M, K), weight: (N, K), bias: (N,) or None -> y: (M, N). Backward, with g = ∂L/∂y:
    ∂L/∂x = g W, ∂L/∂W = gᵀ x, ∂L/∂b = Σ_rows g (the same formulas as ``F.linear``'s autograd).
    Takes 2-D x only: oneDNN returns a 3-D result as a view, and a view made inside a custom
    Function may not be changed in place later (TRL divides its logits by the temperature in place)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_mm(grad, weight.t())  # g W = g (Wᵀ)ᵀ
        if ctx.needs_input_grad[1]:
            grad_w = onednn_mm(grad.t(), x.t())  # gᵀ x = gᵀ (xᵀ)ᵀ
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through :class:`OneDNNLinear`, x: (..., K) -> (..., N) (a plain
    oneDNN call without grad)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out = OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return onednn_mm(x, weight, bias)


class _OneDNNLinearLayer(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`onednn_linear` on CPU fp32 inputs; anything else
    (another device or dtype) runs ``F.linear`` as before. Only ever set as ``__class__`` of an
    existing ``nn.Linear`` by :func:`use_onednn_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32:
            return onednn_linear(x, self.weight, self.bias)
        return super().forward(x)


def use_onednn_linear(model: nn.Module, min_weights: int = 0) -> int:
    """Run every plain ``nn.Linear`` of `model` with at least `min_weights` weights through oneDNN on
    CPU fp32 inputs (its class becomes a subclass of ``nn.Linear`` with that forward; parameters,
    hooks and state dict unchanged). Returns the number of layers switched; 0 when this torch has
    no oneDNN."""
    if not onednn_linear_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.numel() >= min_weights:
            m.__class__ = _OneDNNLinearLayer
            n += 1
    return n


AUTO_MIN_WEIGHTS = 2**16
"""``onednn_linear: auto`` switches layers of at least this many weights (256 x 256): every layer of
the 6M bench model (1.50x TRL with them, 1.08x without), none of the tiny recipes' 149k-parameter
model (2.44x with them, 2.80x without; docs/performance-history.md)."""


def mkl_below_peak_here(cpuinfo: str | None = None) -> bool:
    """Whether this CPU is one where MKL's fp32 sgemm runs below the cores' peak: x86 with AVX-512,
    vendor not Intel (MKL chooses its kernels by vendor and runs AVX2 ones there; measured on an AMD
    EPYC Zen 5: 176 against oneDNN's 382-432 GFLOP/s). `cpuinfo`: /proc/cpuinfo's text (read when
    None; False where there is none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return False
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("vendor_id", "GenuineIntel") != "GenuineIntel" and "avx512f" in fields.get("flags", "").split()


def _run_takes_onednn(acc) -> bool:
    from .engine import compute_dtype, is_deepspeed

    return acc.device.type == "cpu" and not is_deepspeed(acc) and compute_dtype(acc) == torch.float32


def onednn_linear_pays_here(acc) -> bool:
    """What ``onednn_linear: auto`` decides for this run: an fp32 CPU run without DeepSpeed, a torch
    with oneDNN, and a CPU on which MKL runs below its peak (:func:`mkl_below_peak_here`)."""
    return _run_takes_onednn(acc) and onednn_linear_available() and mkl_below_peak_here()


def apply_onednn_linear(setting: bool | str, acc, models: list) -> int:
    """Switch the `models` (None entries skipped) as the recipe's ``onednn_linear`` says: true, every
    plain nn.Linear (:func:`check_onednn_linear` has passed); "auto", where
    :func:`onednn_linear_pays_here`, the layers of at least :data:`AUTO_MIN_WEIGHTS` weights;
    false, none. Returns the number of layers switched."""
    if setting is True:
        return sum(use_onednn_linear(m) for m in models if m is not None)
    if setting == "auto" and onednn_linear_pays_here(acc):
        return sum(use_onednn_linear(m, AUTO_MIN_WEIGHTS) for m in models if m is not None)
    return 0


def check_onednn_linear(acc) -> None:
    """One-line RunError unless this run can use ``onednn_linear: true``: fp32 on the CPU, without
    DeepSpeed, on a torch with oneDNN."""
    from .engine import compute_dtype, is_deepspeed
    from .errors import RunError

    if not _run_takes_onednn(acc):
        raise RunError("recipe: 'onednn_linear: true' is for fp32 runs on the CPU without DeepSpeed "
                       f"(this run: {acc.device.type}, {compute_dtype(acc)}, deepspeed={is_deepspeed(acc)})")
    if not onednn_linear_available():
        raise RunError("recipe: 'onednn_linear: true', but this torch build has no oneDNN linear op")

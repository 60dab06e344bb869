"""FLOP accounting for model FLOP utilisation (MFU), as nanoGPT's ``estimate_mfu`` does.

A transformer with N parameters spends about 2·N FLOPs per token in a forward pass and 6·N in a
forward + backward pass (Kaplan et al. 2020, §2.1; the attention term 2·n_layer·ctx·d is small at
the lengths used here and left out). The LM head (H = vocabulary x width parameters, 21% of
SmolLM2-135M) runs only where a next-token distribution is read, so it is counted only there:
N_policy below is the policy without its head. PPO's phases (tokens: real ones, never padding):

- generate:   2 · N_policy per token processed (prompt prefill + each sampled token, KV cache)
              + 2 · H per sampled token;
- experience: 2 · (N_policy + N_reference + N_value [+ N_rm]) per sequence token
              + 2 · 2 · H per response token (policy and reference; no-grad passes);
- train:      6 · (N_policy + N_value) per sequence token + 6 · H per response token, per PPO epoch.

MFU = FLOPs / seconds / peak, with the peak measured on the same machine by
:func:`measure_matmul_peak` (a large matmul in the dtype the run computes in: fp32, or bf16/fp16
under mixed precision), or given.
"""

from __future__ import annotations

import time

import torch


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partition knows its full size


def count_flop_params(model) -> int:
    """Parameters that do matmul work per token: all except input embedding tables (an
    embedding lookup costs no FLOPs); a tied LM head still multiplies, so it counts once."""
    params = {id(p): p for p in model.parameters()}
    n = sum(_numel(p) for p in params.values())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and (out is None or out.weight is not emb.weight):
        n -= _numel(emb.weight)
    return n


def count_head_params(model) -> int:
    """Parameters of the LM head (the output embedding), 0 for a model without one."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return _numel(out.weight) if out is not None else 0


def forward_flops(n_params: int, tokens: int) -> float:
    """2 · N · tokens."""
    return 2.0 * n_params * tokens


def train_flops(n_params: int, tokens: int) -> float:
    """6 · N · tokens (forward + backward)."""
    return 6.0 * n_params * tokens


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    return flops / max(seconds, 1e-12) / peak_flops if peak_flops > 0 else 0.0


def measure_matmul_peak(n: int | None = None, repeats: int = 5, dtype=torch.float32, device="cpu") -> float:
    """FLOP/s of the best of `repeats` n x n x n matmuls (2 n^3 FLOPs each) in `dtype` on `device`,
    at the current thread count: the peak MFU is quoted against. Measure it in the dtype the run's
    matmuls execute in (bf16 under bf16 autocast): a GPU's bf16 peak is ~15x its fp32 one.

    n defaults to 8192 on an accelerator (smaller products do not fill an H100/H200), 2048 for
    fp32 on the CPU and 512 for half precision on the CPU (emulated there, far slower).

    fp32 on the CPU: the best of torch's matmul (MKL) and oneDNN's (rlhf.cpu_linear), since on AMD
    CPUs MKL reaches only about half of what oneDNN shows the cores can do; MFU is quoted against the
    faster, whichever kernel the run uses."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if n is None:
        n = 8192 if device.type != "cpu" else 2048 if dtype == torch.float32 else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    products = [torch.matmul]
    if device.type == "cpu" and dtype == torch.float32:
        from .cpu_linear import onednn_linear_available, onednn_mm

        if onednn_linear_available():
            products.append(onednn_mm)  # a @ bᵀ: the same FLOPs
    best = float("inf")
    for product in products:
        product(a, b)  # warm-up
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            product(a, b)
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
    del a, b
    return 2.0 * n**3 / best

"""Batched sampling with a KV cache, and log-probs of given responses.

- Prompts are left-padded; position ids come from the attention mask (``cumsum - 1``) in the
  prefill and in every decoding step, and in every scoring pass, so padding never changes a
  result [N].
- Sampling divides the logits by ``temperature`` and :func:`response_logprobs` divides by the
  same temperature, so the rollout policy and the scored policy are the same distribution
  (otherwise the KL goes negative [N]; TRL issues #351, #925). Defaults are top_k = 0, top_p = 1.
- Generation stops at EOS: tokens after a row's EOS are PAD and masked out.

The decoding loop is deliberately lean: one model call per new token, no logits processors. On
the CPUs where MKL runs its fp32 kernels below the cores' peak (AMD with AVX-512) the linear layers
of a decoding step run as (W xᵀ)ᵀ (:class:`FewRowsLinear`), which MKL computes faster for a step's
few rows; on Intel CPUs that costs time, and plain ``F.linear`` runs (:func:`few_rows_pays_here`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .algos.core import token_logprobs
from .cpu_linear import mkl_below_peak_here
from .models import eager_blocks, unwrap


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_value: int, device=None) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


def row_extents(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per row of a left-padded prompt + right-padded response batch: the column its prompt
    starts in and its response length (read back once per rollout)."""
    start = prompt_mask.shape[1] - prompt_mask.sum(1)
    return start.tolist(), response_mask.sum(1).tolist()


def trim_columns(starts: list[int], lengths: list[int], rows, prompt_width: int) -> tuple[slice, int]:
    """(the columns of the sequence batch, the response width) that `rows` need: the left padding
    all of them share and the response columns after all of them ended are cut. Those columns are
    masked in every one of these rows, so no value at a kept position changes (attention is causal
    and masked; position ids come from the mask) beyond float rounding, and none of the work is
    done for padding."""
    width = max(1, max(lengths[i] for i in rows))
    return slice(min(starts[i] for i in rows), prompt_width + width), width


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens: cumsum(mask) - 1, 0 on left padding [N]."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k / nucleus filtering of (B, V) logits (-inf outside); identity at top_k=0, top_p=1."""
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` = x Wᵀ + b, computed as (W xᵀ)ᵀ + b: the same result to float
    rounding. x: (..., K), weight: (N, K); the result (..., N) is a view of the transposed product.

    For a decoding step's few rows (one per sequence) MKL's fp32 sgemm is faster this way round on
    the CPUs measured: it splits x Wᵀ over x's few rows, W xᵀ over W's many. SmolLM2-135M, 16 rows:
    1.4× on the 576 → 1536 and 1536 → 576 products, 1.3× on the 49k-vocabulary LM head, and never
    slower from 4 to 256 rows; one row is 3–13% slower (docs/performance-history.md, "Decoding:
    few-row products turned around")."""
    out = torch.mm(weight, x.reshape(-1, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of (B, V) probabilities -> (B,): ``torch.multinomial(probs, 1, generator)``,
    the same tokens from the same generator state, in less than half the time on the CPU.

    torch draws one sample by the exponential race: argmax_v p_v / q_v with q_v ~ Exp(1), one q per
    vocabulary entry (the Gumbel-max trick with the exp taken) [Gumbel 1954; torch's
    ``multinomial``]. On the CPU its ``exponential_`` draws each q serially: 53 random bits u per
    entry from the Mersenne twister, then ``-log1p(-u)`` in double precision, cast to float. Here
    the same 53-bit integers come from one ``random_`` call on the same generator, and the
    logarithm runs vectorised: for float32 probabilities the q are the same floats (checked bit for
    bit against ``exponential_`` in tests/test_rollout.py; a vectorised and a scalar double log can
    differ in the last bit, which changes the float only if it crosses a rounding boundary, about
    one value in 10^9), so the same token wins, and the generator ends in the same state. SmolLM2's
    49k vocabulary, 16 rows: 22-28 ms -> ~10 ms per decoding step on 2 cores. Other devices and
    dtypes call ``torch.multinomial``."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # torch.multinomial's own checks, with its messages
    if not bool((probs.max() < float("inf")) & (probs.min() >= 0)):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    if bool((probs.sum(1) == 0).any()):
        raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
    return (probs / cpu_exponentials(probs.shape, generator)).argmax(-1)


def cpu_exponentials(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 Exp(1) draws, the values ``torch.empty(shape).exponential_(generator=generator)``
    gives on the CPU (see :func:`sample_tokens`), drawn in one ``random_`` call: u = 53 random bits
    / 2^53, q = -log1p(-u) in double precision, cast to float."""
    bits = torch.empty(shape, dtype=torch.int64).random_(0, 2**53, generator=generator)
    return torch.log1p(bits.double().mul_(2.0**-53).neg_()).neg_().float()


class FewRowsLinear(TorchFunctionMode):
    """Inside, every ``F.linear`` (so every ``nn.Linear``) on a CPU fp32 input of 2 to
    `max_rows` rows runs as :func:`few_rows_linear`. :func:`generate` wraps its decoding steps in
    it where :func:`few_rows_pays_here`; anything else, and every other device or dtype, runs as
    before. So does everything under a CPU autocast (mixed_precision: bf16): the inputs still read fp32 here, but the product would run
    in bf16, where the transposed form is the slower one (SmolLM2, 16 rows, 32 tokens on an Intel
    Xeon with AMX: 3.6-4.1 s a rollout against 3.0-3.3 s)."""

    def __init__(self, max_rows: int = 256):
        super().__init__()
        self.max_rows = max_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(x.shape[-1], 1) if x is not None and x.dim() else 0
            if (2 <= rows <= self.max_rows and x.device.type == "cpu" and weight is not None and weight.dim() == 2
                    and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
                return few_rows_linear(x, weight, bias)
        return func(*args, **kwargs)


@functools.cache
def _cpu_is_below_mkl_peak() -> bool:
    return mkl_below_peak_here()


def few_rows_pays_here(model, cpuinfo: str | None = None) -> bool:
    """Whether :func:`generate` runs `model`'s decoding steps inside :class:`FewRowsLinear`: on a CPU
    where MKL runs its fp32 kernels below the cores' peak (:func:`rlhf.cpu_linear.mkl_below_peak_here`:
    x86 with AVX-512, not Intel; 1.09-1.17x a SmolLM2 rollout on an AMD EPYC), for a model with a
    plain ``nn.Linear`` left (not switched to oneDNN by ``onednn_linear``). On an Intel Xeon the
    transposed product is no faster and the mode's Python dispatch of every op, and the transposed
    outputs the next ops read, made a rollout slower: SmolLM2, 16 x 32 tokens, 4.6 against 3.7 s
    (docs/performance-history.md, "Decoding on Intel: plain products"). `cpuinfo`: /proc/cpuinfo's
    text (read once per process when None)."""
    below_peak = _cpu_is_below_mkl_peak() if cpuinfo is None else mkl_below_peak_here(cpuinfo)
    return below_peak and any(type(m) is torch.nn.Linear for m in model.modules())


@dataclass
class Generation:
    prompt_ids: torch.Tensor
    """(B, P) left-padded prompts."""
    prompt_mask: torch.Tensor
    """(B, P)."""
    response_ids: torch.Tensor
    """(B, R) sampled tokens, PAD after EOS."""
    response_mask: torch.Tensor
    """(B, R) 1 up to and including EOS."""
    has_eos: torch.Tensor
    """(B,) bool: the response ended with EOS within the budget."""
    logprobs: torch.Tensor | None = None
    """(B, R) log-probs of the sampled tokens under the sampling pass's logits / temperature (before
    top-k / top-p filtering), 0 outside the response mask; only with ``return_logprobs``."""


def _cache_kwarg(model) -> str:
    """transformers >= 5.x names the KV cache argument `cache`; older releases `past_key_values`."""
    import inspect

    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # peft wraps forward(**kwargs)
        model = model.get_base_model()
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


MASKLESS_DECODE_TYPES = frozenset({"mamba", "falcon_mamba"})
"""Model types whose cached decoding step must get no attention mask: they multiply the step's
input by the mask, so the whole mask so far turns one token into many (a cached step's log-probs
then differ from a full forward's by 0.1-0.4 nats). transformers' own generate passes them none
after the first step. Left padding needs none there: the prefill masks it out of the state."""


def decodes_without_mask(model) -> bool:
    """Whether `model` (DDP / DeepSpeed / peft wrappers allowed) is of :data:`MASKLESS_DECODE_TYPES`."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "model_type", None) in MASKLESS_DECODE_TYPES


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn: defaults are pure sampling at T = 1 (top_k = 0, top_p = 1) [N]."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    return_logprobs: bool = False
    """Keep each sampled token's log-prob (Generation.logprobs)."""


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, eos_token_id: int, pad_token_id: int,
             generator: torch.Generator | None = None, device=None, sync_every: int | None = None,
             **sampling) -> Generation:
    """Sample up to `max_new_tokens` for each prompt with a KV cache (one model call per token);
    `sampling` holds :class:`Sampling`'s fields (max_new_tokens, temperature, top_k, top_p, greedy,
    return_logprobs).

    `generator` must live on `device` (the model's): torch samples a CUDA tensor only with a
    CUDA generator. Whether every row has finished is read back from the device every
    `sync_every` tokens (default: every token on the CPU, where reading is free; every 8 on an
    accelerator, where each read stalls the queue); columns after the last EOS are cut, so the
    result has the same shape either way (only the generator's position differs).

    With `return_logprobs`, each sampled token's log-prob under logits / temperature (unfiltered:
    the policy's distribution, as the PPO ratio needs it) is kept: the same values as
    :func:`response_logprobs` over the finished sequences, to float rounding (the KV-cached pass
    adds up in a different order).
    """
    with eager_blocks():  # (compiled blocks, PPOConfig.compile: see models.compile_blocks)
        return _generate(model, prompts, eos_token_id, pad_token_id, generator, device, sync_every,
                         Sampling(**sampling))


def _generate(model, prompts, eos_token_id, pad_token_id, generator, device, sync_every,
              settings: Sampling) -> Generation:
    max_new_tokens, temperature, greedy = settings.max_new_tokens, settings.temperature, settings.greedy
    top_k, top_p = settings.top_k, settings.top_p
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"sampling generator on {generator.device}, model inputs on {device}: create it with "
                         f"torch.Generator(device=...) on the model's device")
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use greedy decoding instead")
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 8
    # (elsewhere, and on Intel CPUs, FewRowsLinear would only add Python to every op)
    few_rows = device.type == "cpu" and few_rows_pays_here(model)
    ids, mask = left_pad(prompts, pad_token_id, device)
    bsz = ids.shape[0]
    pos = position_ids_from_mask(mask)
    cache_kw = _cache_kwarg(model)
    maskless = decodes_without_mask(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, logits = _cache_of(out), out.logits[:, -1, :].float()
    responses = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((bsz, max_new_tokens), device=device) if settings.return_logprobs else None
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    next_pos = pos[:, -1:] + 1
    steps = 0
    for t in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            token = sample_tokens(probs, generator)  # (torch.multinomial's tokens, faster on the CPU)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        responses[:, t] = token
        if logprobs is not None:  # the same formula as response_logprobs, 0 after EOS
            scaled = logits / temperature if temperature != 1.0 else logits
            lp = token_logprobs(scaled[:, None], token[:, None], with_entropy=False)[0][:, 0]
            logprobs[:, t] = torch.where(finished, torch.zeros_like(lp), lp)
        finished |= token == eos_token_id
        steps = t + 1
        if t == max_new_tokens - 1 or ((t + 1) % sync_every == 0 and bool(finished.all())):
            break
        mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype, device=device)], dim=1)
        with FewRowsLinear() if few_rows else contextlib.nullcontext():  # one row per sequence: few_rows_linear
            out = model(input_ids=token[:, None], attention_mask=None if maskless else mask, position_ids=next_pos,
                        use_cache=True, **{cache_kw: cache})
        cache, logits = _cache_of(out), out.logits[:, -1, :].float()
        next_pos = next_pos + 1
    responses = responses[:, :steps]
    logprobs = logprobs[:, :steps] if logprobs is not None else None
    response_mask, has_eos = eos_mask(responses, eos_token_id)
    if sync_every > 1:  # columns sampled after every row had finished are all padding: cut them
        width = int(response_mask.sum(0).nonzero().max()) + 1 if response_mask.any() else 0
        responses, response_mask = responses[:, :width], response_mask[:, :width]
        logprobs = logprobs[:, :width] if logprobs is not None else None
    return Generation(ids, mask[:, : ids.shape[1]], responses, response_mask, has_eos, logprobs)


def eos_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) mask that is 1 up to and including the first EOS (all 1 if none), and (B,) has-EOS."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(-1)
    first = torch.where(has_eos, is_eos.float().argmax(-1), torch.full_like(has_eos, responses.shape[1], dtype=torch.long))
    idx = torch.arange(responses.shape[1], device=responses.device)[None, :]
    return (idx <= first[:, None]).long(), has_eos


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                      temperature: float = 1.0, return_entropy: bool = False, entropy_grad: bool = False):
    """Log-probs (B, R) of the last `response_len` tokens of `input_ids` under `model`.

    input_ids: (B, P + R) = left-padded prompt followed by the response. Logits are divided by
    `temperature` (the sampling temperature). The logit at position t predicts token t + 1,
    hence the slice ``[-R-1:-1]``. Optionally also returns the entropy (B, R) of each
    position's distribution (differentiable only with `entropy_grad`: see core.token_logprobs).
    """
    pos = position_ids_from_mask(attention_mask)
    # only the last R + 1 positions need the LM head (a large share of the work at big vocabularies)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                   logits_to_keep=response_len + 1).logits
    logits = logits[:, -response_len - 1 : -1, :].float()  # (B, R, V)
    if temperature != 1.0:  # (x / 1.0 is x: no copy of the (B, R, V) logits for nothing)
        logits = logits / temperature
    logp, entropy = token_logprobs(logits, input_ids[:, -response_len:], return_entropy, entropy_grad)
    return (logp, entropy) if return_entropy else logp

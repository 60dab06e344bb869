"""What every stage's loop shares: accelerator, optimizer + schedule, batching, logging, output.

Batches are global: a recipe's ``batch_size`` is the number of sequences per optimizer step
whatever the number of processes; each process takes its slice and gradient accumulation fills
the gap (``grad_accum = batch_size / (micro_batch_size * world_size)``). The data order of
epoch e is a permutation seeded by (seed, e), so a run's data position is just its step count.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import USER_ERRORS, ConfigError, RunError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_mixed_precision(mp: str) -> str:
    if mp not in ("auto", "no", "bf16", "fp16"):
        raise RunError(f"recipe: mixed_precision must be auto, no, bf16 or fp16, got '{mp}'")
    if mp != "auto":
        return mp
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"  # bf16 on a CPU without bf16 units is ~20x slower than fp32


_SET_DS_ENV = False


def set_matmul_precision(precision: str = "highest") -> None:
    """The recipe's `matmul_precision` for every fp32 product of this process (set by each stage, so
    one stage's choice does not leak into the next in a pipeline): 'highest' IEEE fp32, 'high' TF32
    on NVIDIA GPUs, 'medium' bf16 inputs with fp32 accumulation where the hardware has it (oneDNN on
    CPUs with AMX / AVX512-BF16). On a CPU under 'medium', transformers' "sdpa" attention runs on
    SDPA's math path (:func:`_cpu_medium_sdpa`) around whatever function was registered under that
    name (transformers' own, or one the caller registered); under any other precision that function
    is registered again."""
    if precision not in ("highest", "high", "medium"):
        raise RunError(f"recipe: matmul_precision must be highest, high or medium, got '{precision}'")
    torch.set_float32_matmul_precision(precision)
    from transformers import AttentionInterface

    current = AttentionInterface()["sdpa"]
    below = _transformers_sdpa() if current is _cpu_medium_sdpa else getattr(current, "_rlhf_below", current)
    if precision == "medium" and not torch.cuda.is_available():
        AttentionInterface.register("sdpa", _cpu_medium_sdpa if below is _transformers_sdpa() else _math_path(below))
    else:
        AttentionInterface.register("sdpa", below)


def matmul_settings() -> tuple:
    """What :func:`set_matmul_precision` changes, to give back with :func:`restore_matmul_settings`:
    torch's fp32 matmul precision and transformers' registered "sdpa" attention function."""
    from transformers import AttentionInterface

    return torch.get_float32_matmul_precision(), AttentionInterface()["sdpa"]


def restore_matmul_settings(saved: tuple) -> None:
    from transformers import AttentionInterface

    torch.set_float32_matmul_precision(saved[0])
    AttentionInterface.register("sdpa", saved[1])


def _cpu_medium_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention on a CPU under matmul_precision 'medium': SDPA's math path (bmm +
    softmax). There ATen's flash attention is 5-15x slower than in fp32 (torch 2.13, Intel Xeon with
    AMX; one SmolLM2 layer, 8 x 68 tokens: forward 5.9 against 1.1 ms, forward + backward 25 against
    4 ms, a 16-row decoding step 3.4 against 0.2 ms; the math path 2.6, 4.2 and 0.6 ms). Every pass
    takes the same path, backpropagated or not, so that a policy's no-grad passes (old log-probs,
    the reference's) compute what its training pass does: PPO's first ratio is 1 to float rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return _transformers_sdpa()(module, query, key, value, attention_mask, **kwargs)


def _math_path(below):
    """:func:`_cpu_medium_sdpa` around a caller's own "sdpa" attention function `below` (kept as
    `_rlhf_below`, so that the next stage registers `below` again rather than wrapping a wrapper)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_on_the_math_path(module, query, key, value, attention_mask, **kwargs):
        with sdpa_kernel([SDPBackend.MATH]):
            return below(module, query, key, value, attention_mask, **kwargs)

    sdpa_on_the_math_path._rlhf_below = below
    return sdpa_on_the_math_path


def _transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def make_accelerator(mixed_precision: str = "auto", deepspeed: str | None = None, *, micro_batch_size: int = 1,
                     grad_accum: int = 1, max_grad_norm: float = 1.0, matmul_precision: str = "highest"):
    """An accelerate Accelerator: DDP under torchrun / accelerate launch (gloo when there is no
    CUDA), DeepSpeed when the recipe names a ZeRO JSON (or the launcher set one through
    ACCELERATE_DEEPSPEED_CONFIG_FILE). Batch fields of the JSON are filled from the recipe, so the
    global batch is the recipe's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    global _SET_DS_ENV
    set_matmul_precision(matmul_precision)
    AcceleratorState._reset_state(reset_partial_state=False)  # each stage brings its own engine settings
    if _SET_DS_ENV:  # set by an earlier stage of this process, not by the launcher
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        _SET_DS_ENV = False
    _forget_deepspeed_process_type()
    distributed = world_size() > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    mp = resolve_mixed_precision(mixed_precision)
    ds_path = deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    launcher_ds = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if deepspeed and launcher_ds and Path(deepspeed).resolve() != Path(launcher_ds).resolve() and \
            os.environ.get("RANK", "0") == "0":
        log.warning("the recipe's DeepSpeed config %s is used, not the launcher's %s", deepspeed, launcher_ds)
    if not ds_path:
        acc = Accelerator(mixed_precision=mp, kwargs_handlers=handlers)
        if distributed and acc.distributed_type == DistributedType.NO:  # (each rank would run alone, then fail)
            raise RunError(f"a launcher started {os.environ['WORLD_SIZE']} processes (WORLD_SIZE), but accelerate "
                           f"set up no process group for them: on a machine without a GPU, launch with "
                           f"ACCELERATE_USE_CPU=1 torchrun ...")
        _cpu_grad_scaler_for_tests(acc, mp)
        log.info("accelerate: %s on %d process(es), mixed precision %s", acc.distributed_type, acc.num_processes, mp)
        return acc
    from accelerate.utils import DeepSpeedPlugin

    ds_config = deepspeed_config(ds_path, mp, micro_batch_size, grad_accum, max_grad_norm, world_size())
    mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE"))
    alone = "RANK" not in os.environ and not mpi  # one process, no launcher: a one-process group, not MPI discovery
    port = os.environ.get("MASTER_PORT")
    if alone and port and not _port_free(port):  # (torch's EADDRINUSE traceback, then a second from the cleanup)
        raise RunError(f"environment variable MASTER_PORT={port}: the port is in use (or not a port); unset it "
                       f"(a free one is chosen for a one-process DeepSpeed run) or give a free one")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        _SET_DS_ENV = True
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=port or str(_free_port()))
    use_cpu = os.environ.pop("ACCELERATE_USE_CPU", None)  # it makes accelerate drop DeepSpeed for plain DDP
    _start_deepspeed_comm()
    try:
        acc = Accelerator(mixed_precision=mp, kwargs_handlers=handlers,
                          deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    finally:
        if use_cpu is not None:
            os.environ["ACCELERATE_USE_CPU"] = use_cpu
    if not is_deepspeed(acc):
        log.warning("DeepSpeed config %s not used: accelerate runs this single process without DeepSpeed", ds_path)
    else:
        log.info("DeepSpeed ZeRO-%s on %d processes (%s)", ds_config.get("zero_optimization", {}).get("stage", 0),
                 acc.num_processes, ds_path)
    return acc


def launcher_deepspeed() -> bool:
    """Whether the launcher asks for DeepSpeed (`accelerate launch` with a DeepSpeed config), as
    opposed to a recipe's JSON, for which rlhf sets accelerate's variable itself."""
    return bool(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")) or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not _SET_DS_ENV


def _forget_deepspeed_process_type() -> None:
    """The process state accelerate keeps for the whole process (its PartialState, which holds the
    process group) says DEEPSPEED once a DeepSpeed stage ran in it; a later stage without DeepSpeed
    (a pipeline's DPO, or a stage with another engine) then failed in accelerate ("no attribute
    'mixed_precision'"). It is put back to what a launch without DeepSpeed makes of the processes."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    st = PartialState._shared_state
    if st.get("distributed_type") != DistributedType.DEEPSPEED:
        return
    kind = getattr(st.get("device"), "type", "cpu")  # (accelerate's own naming: MULTI_GPU, MULTI_XPU, MULTI_NPU, ...)
    multi = DistributedType.MULTI_GPU if kind == "cuda" else getattr(DistributedType, f"MULTI_{kind.upper()}",
                                                                       DistributedType.MULTI_CPU)
    st["distributed_type"] = DistributedType.NO if st.get("num_processes", 1) == 1 else multi


def _start_deepspeed_comm() -> None:
    """DeepSpeed's communication set up over the process group, as accelerate does only when DeepSpeed
    is the first engine of the process: after a stage without DeepSpeed (or a resumed pipeline's
    first check), a ZeRO-3 load (zero.Init) saw 1 process ("train_batch_size is not equal to
    micro_batch_per_gpu * gradient_acc_step * world_size"), and a one-process pipeline had no
    process group at all ("Default process group has not been initialized")."""
    from accelerate.state import PartialState

    if not PartialState._shared_state:  # (accelerate starts it, as for any first engine)
        return
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(auto_mpi_discovery=False, verbose=False)  # (its accelerator's backend)


def _cpu_grad_scaler_for_tests(acc, mp: str) -> None:
    """Test hook: RLHF_CPU_GRAD_SCALER=1 gives an fp16 run on the CPU the autocast + GradScaler path
    that accelerate uses on a GPU (accelerate itself runs CPU 'fp16' in plain fp32), so the
    scaler's rules (one unscale per step, one update per step) are exercised without a GPU."""
    if mp != "fp16" or acc.scaler is not None or acc.device.type != "cpu" or \
            os.environ.get("RLHF_CPU_GRAD_SCALER") != "1":
        return
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # (tiny test models overflow at 2**16)


def compute_dtype(acc, model_dtype: str = "float32") -> torch.dtype:
    """The dtype the matmuls of a training run actually execute in: the autocast / DeepSpeed
    precision if mixed precision is on, else the weights' dtype."""
    mp = _ds_precision(acc) if is_deepspeed(acc) else acc.mixed_precision if acc.native_amp else "no"
    # (accelerate runs 'fp16' on a CPU in plain fp32: no autocast there)
    if mp == "bf16":
        return torch.bfloat16
    if mp == "fp16":
        return torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_dtype, torch.float32)


def run_autocast(acc):
    """The run's mixed-precision autocast as a context factory, for one region around many
    forwards (a whole generation: autocast keeps a trained weight's bf16/fp16 copy until its
    outermost region exits): accelerate's; a no-op under DeepSpeed, which casts the weights itself."""
    return contextlib.nullcontext if is_deepspeed(acc) else acc.autocast


def hold_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the `nn.Linear` weights and biases of a frozen model that runs under a `dtype`
    autocast in `dtype`, once. Autocast casts a linear layer's fp32 weight to `dtype` in every
    forward and caches the copy only for weights that require grad, so a frozen model (reference,
    reward model) paid a full cast of its weights per call: ~0.12 s per 128M parameters on a
    2-core CPU, several calls an iteration. The products are the same bit for bit (autocast rounds
    the same fp32 value to the same `dtype` value) and everything else keeps its fp32 weights:
    embeddings, norms, and so the residual stream. An LM head tied to the input embeddings is
    untied for this (its own `dtype` copy; the embeddings stay fp32). Call it only on a model
    whose forward always runs under that autocast (accelerate's prepared forward). Returns the
    number of layers converted."""
    n = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.dtype != torch.float32:
            continue  # (subclasses such as LoRA or quantized layers do their own casting)
        for name in ("weight", "bias"):
            p = getattr(module, name)
            if p is not None:  # a new tensor: a weight shared with another module stays as it is there
                setattr(module, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
        n += 1
    return n


def backpropagated_attention(device, dtype: torch.dtype):
    """Context for forward passes that will be backpropagated: on the CPU in bf16/fp16, SDPA's math
    path instead of ATen's flash attention, whose CPU backward is the slow one there (forward +
    backward of one SmolLM2 layer's attention, 8 x 72 tokens, on an Intel Xeon with AMX: 17-18 ms
    flash, 4.5-4.9 ms math; fp32 flash 4.6-5.2 ms, so fp32 keeps it; flash's forward alone is the
    faster, so no-grad passes keep it too). A no-op on every other device and dtype."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _ds_precision(acc) -> str:
    ds = acc.state.deepspeed_plugin.deepspeed_config
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "no"


def runtime_device() -> torch.device:
    """The device accelerate picks for this process (cuda:LOCAL_RANK on a GPU machine, else the
    CPU): every command that runs a model puts it, its inputs and its sampling generator there."""
    from accelerate import PartialState

    return PartialState().device


def _port_free(port: str) -> bool:
    """Whether this machine can listen on `port` (the one-process group's rendezvous)."""
    import socket

    try:
        with socket.socket() as s:  # (as torch's TCPStore binds: a port in TIME_WAIT after the last run is free)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", int(port)))
        return True
    except (OSError, ValueError, OverflowError):
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(path: str, mixed_precision: str, micro_batch_size: int, grad_accum: int, max_grad_norm: float,
                     world_size: int) -> dict:
    """Read a ZeRO JSON and fill the fields the recipe decides (batch, accumulation, clipping, precision)."""
    cfg = read_deepspeed_json(path)
    given = {k: cfg.get(k) for k in RECIPE_FILLS[:4]} | {k: cfg.get(k.split(".")[0], {}).get("enabled")
                                                         for k in RECIPE_FILLS[4:]}
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch_size * grad_accum * world_size
    cfg["gradient_clipping"] = max_grad_norm if max_grad_norm > 0 else 0.0
    cfg.setdefault("zero_allow_untested_optimizer", True)  # our AdamW is the client optimizer
    if cfg["zero_optimization"].get("stage") == 3:  # saved whole (without it: a ValueError after training)
        cfg["zero_optimization"].pop(GATHER_KEYS[1], None)
        cfg["zero_optimization"][GATHER_KEYS[0]] = True
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": mixed_precision == "bf16"}
    if _ds_has_bf16_overflow_check():  # skip (not apply) a bf16 step whose gradient norm is NaN/inf
        cfg["bf16"].setdefault("check_grad_overflow", True)
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": mixed_precision == "fp16"}
    cfg.setdefault("steps_per_print", 10**9)
    now = {k: cfg[k] for k in RECIPE_FILLS[:4]} | {k: cfg[k.split(".")[0]]["enabled"] for k in RECIPE_FILLS[4:]}
    replaced = [f"{k} {given[k]!r} -> {now[k]!r}" for k in RECIPE_FILLS
                if given[k] not in (None, "auto") and given[k] != now[k]]
    if replaced and os.environ.get("RANK", "0") == "0":  # (said once per job)
        log.warning("%s: the recipe sets %s (the batch, accumulation, clipping and precision come from the recipe: "
                    "set them there)", path, ", ".join(replaced))
    return cfg


RECIPE_FILLS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping", "bf16.enabled", "fp16.enabled")
"""The DeepSpeed JSON fields the recipe decides (:func:`deepspeed_config`): a value given there is replaced."""


GATHER_KEYS = ("stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save")
"""ZeRO-3's "save the weights whole" flag, and its older name (DeepSpeed refuses both at once)."""


def read_deepspeed_json(path: str, key: str = "deepspeed") -> dict:
    """A ZeRO JSON, read and checked (:func:`check_deepspeed_json`): one line naming the file (or
    the recipe `key` that names a missing one) if not."""
    p = Path(path)
    if not p.is_file():
        raise RunError(f"recipe: '{key}' config not found: {path}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    check_deepspeed_json(cfg, path)
    return cfg


def check_deepspeed_json(cfg, path: str) -> None:
    """The shape rlhf fills in and DeepSpeed reads: a mapping, with a `zero_optimization` mapping
    whose `stage` is 0-3, and `bf16` / `fp16` mappings if given (one line, not a traceback from
    inside deepspeed.initialize)."""
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: a DeepSpeed config is a JSON object, got {type(cfg).__name__}")
    for key in ("zero_optimization", "bf16", "fp16"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise RunError(f"{path}: '{key}' must be an object, got {cfg[key]!r}")
    zero = cfg.get("zero_optimization")
    if zero is None:
        raise RunError(f"{path}: no 'zero_optimization' section (recipes/deepspeed/ has ZeRO-2 and ZeRO-3 examples)")
    if isinstance(zero.get("stage"), bool) or zero.get("stage", 0) not in (0, 1, 2, 3):  # (true ran as ZeRO-1)
        raise RunError(f"{path}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {zero.get('stage')!r}")
    for key in ("optimizer", "scheduler"):  # a scheduler here replaced the recipe's (lr 0: nothing trained, exit 0)
        if key in cfg:
            raise RunError(f"{path}: '{key}': the recipe sets the optimizer (AdamW, train.lr) and the learning-rate "
                           f"schedule (train.lr_scheduler, warmup_ratio); remove the '{key}' section")
    _check_fields(cfg, path)
    comm = cfg.get("communication_data_type")  # (DeepSpeed lower-cases it)
    if comm is not None and (not isinstance(comm, str) or comm.lower() not in ("fp32", "fp16", "bf16")):
        raise RunError(f"{path}: 'communication_data_type' must be fp32, fp16 or bf16, got "
                       f"{cfg['communication_data_type']!r}")
    for key in ("offload_optimizer", "offload_param"):  # NVMe offload needs DeepSpeed's async_io op built here
        if isinstance(zero.get(key), dict) and zero[key].get("device") == "nvme" and not _async_io_builds():
            raise RunError(f"{path}: 'zero_optimization.{key}.device' nvme: DeepSpeed's async_io op cannot be built "
                           f"here (libaio missing?); offload to 'cpu' instead")
    for key in GATHER_KEYS:  # (the older name too, still in many examples)
        if zero.get("stage") == 3 and zero.get(key, True) is not True:
            raise RunError(f"{path}: 'zero_optimization.{key}' must be true: rlhf saves the trained weights whole "
                           f"(model.safetensors); remove it or set it to true")


def _async_io_builds() -> bool:
    """Whether DeepSpeed's async_io op (NVMe offload) was built with it or can be built here."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return bool(installed_ops.get("async_io")) or bool(AsyncIOBuilder().is_compatible(verbose=False))
    except Exception:  # (no DeepSpeed, or an op builder of another shape: let DeepSpeed say)
        return True


def _check_fields(cfg: dict, path: str) -> None:
    """`zero_optimization`, `bf16` and `fp16` as the installed DeepSpeed reads them (its pydantic
    models refuse unknown keys and values of the wrong type): one line naming the key, at the
    start, not a traceback from inside accelerate's prepare once the models have loaded."""
    models = {}
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        models["zero_optimization"] = DeepSpeedZeroConfig
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config  # (DeepSpeed >= 0.17.1)

        models.update(bf16=DeepSpeedBF16Config, fp16=DeepSpeedFP16Config)
    except ImportError:  # (no DeepSpeed, or an older one: what it has is checked, DeepSpeed says the rest)
        pass
    for name, model in models.items():
        if name not in cfg:
            continue
        try:
            model(**cfg[name])
        except Exception as e:
            errors = getattr(e, "errors", None)
            if not callable(errors):
                raise
            first = errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            near = difflib.get_close_matches(where, list(model.model_fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near and first.get("type") == "extra_forbidden" else ""
            msg = str(first.get("msg", e)).removeprefix("Value error, ")
            raise RunError(f"{path}: '{name}.{where}': {msg}{hint}") from None


def _ds_has_bf16_overflow_check() -> bool:
    """Whether the installed DeepSpeed's bf16 config knows `check_grad_overflow` (older ones
    refuse unknown keys)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    return "check_grad_overflow" in getattr(DeepSpeedBF16Config, "model_fields", {})


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int:
    if not is_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def backward(acc, loss, grad_accum: int, last: bool) -> None:
    """Backward of one micro-batch whose `loss` is already its share of the global-batch mean.

    Tells accelerate (and DeepSpeed) whether this micro-batch closes the accumulation; DeepSpeed
    divides the loss by its gradient_accumulation_steps itself, so it gets loss x grad_accum.
    """
    acc.gradient_state._set_sync_gradients(last)
    acc.backward(loss * grad_accum if is_deepspeed(acc) else loss)


def gathered_params(acc, model):
    """Context in which a ZeRO-3 model's full weights are present on every rank (once, e.g. for a
    whole generation); a no-op otherwise."""

    if zero_stage(acc) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


FROZEN_PLACEMENTS = ("auto", "whole", "sharded", "offload")


def frozen_placement(acc, setting: str) -> str:
    """'whole', 'sharded' or 'offload': where frozen models (PPO's reference and reward model) go."""
    if setting not in FROZEN_PLACEMENTS:
        raise RunError(f"recipe: 'frozen_models' must be one of {', '.join(FROZEN_PLACEMENTS)}, got '{setting}'")
    if not is_deepspeed(acc):
        if setting in ("sharded", "offload"):
            raise RunError(f"recipe: 'frozen_models: {setting}' needs a DeepSpeed run ('deepspeed: <ZeRO JSON>')")
        return "whole"
    if setting == "auto":
        return "sharded" if zero_stage(acc) == 3 else "whole"
    return setting


def prepare_frozen(acc, model, placement: str, trained_later: bool = False):
    """A frozen model for no-grad forwards under the run's engine; returns the module to call.

    'whole': on this process's device. 'sharded'/'offload': a ZeRO-3 inference engine (no
    optimizer) built from the run's DeepSpeed config, as TRL's and OpenRLHF's reference models
    are: every process keeps 1/N of each parameter, and each submodule's forward gathers its
    weights for the moment it runs (so every process must make the same forward calls);
    'offload' keeps the shards in CPU memory (ZeRO-Inference). The model was loaded whole; its
    full copy is freed as it is partitioned here. Under a bf16/fp16 autocast its linear weights
    are held in that dtype (`hold_linear_weights`) unless it is `trained_later` (the RM of an
    online `rm_refresh`), which keeps fp32 weights for its optimizer.
    """
    model.eval().requires_grad_(False)
    if placement == "whole":
        if is_deepspeed(acc):  # the engine runs the policy in its precision: so runs the frozen copy
            dtype = compute_dtype(acc)
            model = model.to(acc.device)
            return model.to(dtype) if dtype != torch.float32 else model
        # on the device, and under the autocast the trained models run in (bf16/fp16), so the
        # reference sees exactly the policy's arithmetic: the KL at step 0 is exactly 0
        model, dtype = acc.prepare_model(model, evaluation_mode=True), compute_dtype(acc)
        if acc.native_amp and dtype != torch.float32 and not trained_later:
            hold_linear_weights(model, dtype)
        return model
    import copy

    import deepspeed

    cfg = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for k in ("optimizer", "scheduler"):
        cfg.pop(k, None)
    zo = cfg.setdefault("zero_optimization", {})
    zo.pop("offload_optimizer", None)
    for k in [k for k, v in zo.items() if v == "auto"]:  # filled by accelerate only for the trained engine
        zo.pop(k)
    zo["stage"] = 3
    if placement == "offload":
        zo["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        zo.pop("offload_param", None)
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if d:  # small buckets for a model that only runs forward [TRL prepare_deepspeed]
        zo.update({"reduce_bucket_size": d * d, "stage3_param_persistence_threshold": 10 * d,
                   "stage3_prefetch_bucket_size": int(0.9 * d * d)})
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    local, full = partition_sizes(engine.module)
    log.info("frozen %s: ZeRO-3 %s, %d of %d parameters on this process", type(engine.module).__name__,
             "offloaded to CPU" if placement == "offload" else "sharded", local, full)
    return engine.module


def partition_sizes(model) -> tuple[int, int]:
    """(parameters held by this process, parameters of the whole model) of a ZeRO-3 model."""
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return local, full


def world_size() -> int:
    """Processes of this run, known from the launcher's environment before accelerate starts
    (WORLD_SIZE, a whole number >= 1; unset: one process)."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.strip().isdigit() or int(value) < 1:  # (int() raised a traceback at the first stage that read it)
        raise ConfigError(f"environment variable WORLD_SIZE={value!r}: expected the number of processes (a "
                          f"launcher sets it); unset it to run one process")
    return int(value)


def grad_accum_steps(batch_size: int, micro_batch_size: int, world_size: int, what: str = "train") -> tuple[int, int]:
    """(micro-batches per process per optimizer step, micro-batch size) for a global `batch_size`.

    `micro_batch_size` is an upper bound per process: with more processes than the batch needs,
    each takes batch_size / world_size. The global batch never changes with the process count.
    """
    if batch_size % world_size:
        raise RunError(f"recipe: '{what}.batch_size' ({batch_size}) must be a multiple of the {world_size} processes")
    per_rank = batch_size // world_size
    micro = min(micro_batch_size, per_rank)
    if per_rank % micro:
        raise RunError(f"recipe: '{what}.batch_size' per process ({per_rank}) must be a multiple of "
                       f"'{what}.micro_batch_size' ({micro})")
    return per_rank // micro, micro


def optimizer_step(acc, model, optimizer, scheduler, max_grad_norm: float, loss_ok: bool = True):
    """One model: see :func:`step_models`. Returns (stepped, grad_norm) with `.overflow`."""
    res = step_models(acc, [(model, optimizer, scheduler)], max_grad_norm, loss_ok)
    return StepResult(res[0], res[1][0], overflow=res.overflow)


def step_models(acc, parts: list[tuple], max_grad_norm: float, loss_ok: bool = True) -> tuple[bool, list]:
    """Clip each model's gradient norm and step its optimizer and schedule, all or none.

    `parts` is [(model, optimizer, scheduler)]; each model is clipped to `max_grad_norm` on its
    own (<= 0: no clipping). Nothing steps if the loss was non-finite on any process or a
    gradient norm is non-finite, so no NaN/inf reaches the weights, the optimizer moments or the
    schedule. Returns (stepped, [grad norm per model]).

    - fp16 (GradScaler): the scaler unscales every optimizer once, steps them and updates its
      scale once per step, as torch's AMP recipe for several optimizers asks (one
      `clip_grad_norm_` per model through accelerate would unscale twice). An overflow skips the
      step and lowers the scale: :attr:`StepResult.overflow`.
    - DeepSpeed: the engine already stepped inside `backward` at the accumulation boundary,
      clipping the *joint* norm of everything it trains, and skipped the update itself if that
      norm was non-finite; `was_step_applied` says whether it did. The norm returned (once, for
      the whole engine) is the engine's.
    """
    bad = acc.reduce(torch.tensor(0.0 if loss_ok else 1.0, device=acc.device), "sum").item() > 0
    if is_deepspeed(acc):
        engine = acc.deepspeed_engine_wrapped.engine
        applied = engine.was_step_applied()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        if applied and (bad or (norm is not None and not math.isfinite(norm))):
            raise RunError("DeepSpeed applied an optimizer step whose loss or gradient was non-finite (this DeepSpeed "
                           "does not skip such steps in this precision); upgrade deepspeed and resume from the last "
                           "checkpoint")
        if applied:
            for _, opt, sched in parts:
                opt._opt_called = True  # (the engine stepped; what the schedule's step counter looks for)
                if sched is not None:
                    sched.step()
        overflow = not applied and not bad and engine.fp16_enabled()  # DeepSpeed's own loss scaler skipped it
        return StepResult(applied, [norm], overflow=overflow)
    acc.unscale_gradients()  # fp16: every optimizer unscaled once (a no-op otherwise)
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norms = [clip_grad_norm([p for p in m.parameters() if p.grad is not None], limit) for m, _, _ in parts]
    stepped = not bad and all(math.isfinite(n) for n in norms)
    scaler = acc.scaler
    if stepped:
        for _, opt, _ in parts:
            if scaler is not None:
                scaler.step(_plain(opt))  # (already unscaled: the scaler only steps)
                opt._opt_called = True  # (what the schedule's step counter on the wrapper looks for)
            else:
                opt.step()
    if scaler is not None:  # after every unscale, found inf or not: lowers the scale on inf/nan, resets its state
        scaler.update()
    overflow = scaler is not None and not bad and not stepped
    if stepped:
        for _, _, sched in parts:
            if sched is not None:
                sched.step()
    for _, opt, _ in parts:
        opt.zero_grad(set_to_none=True)
    return StepResult(stepped, norms, overflow=overflow)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``, bit for bit, returning the total L2
    norm of the gradients as a float: scale every gradient by min(1, max_norm / (norm + 1e-6)). torch
    multiplies even when that factor is exactly 1 (the norm below the limit, or no limit): a read and
    write of every gradient for nothing (~0.1 s a step for a 135M model on 2 CPU cores); here the
    gradients are only touched when they are scaled. A non-finite norm leaves them as they are
    (torch would fill them with NaN); the caller skips that step either way."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads)
    if bool(max_norm / (total + 1e-6) < 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def loss_scale(acc) -> float | None:
    """The current fp16 loss scale: accelerate's GradScaler or DeepSpeed's (None without one)."""
    if getattr(acc, "scaler", None) is not None:
        return float(acc.scaler.get_scale())
    if is_deepspeed(acc) and acc.deepspeed_engine_wrapped is not None:
        engine = acc.deepspeed_engine_wrapped.engine
        if engine.fp16_enabled():
            opt = engine.optimizer
            scale = getattr(opt, "loss_scale", None) or getattr(opt, "cur_scale", None)
            return float(scale) if scale is not None else None
    return None


class StepResult(tuple):
    """(stepped, norm(s)) with `.overflow`: an fp16 step the GradScaler skipped (loss finite,
    scaled gradients overflowed) -- expected while the scale settles, not a sign of bad data."""

    def __new__(cls, stepped: bool, norms: list, overflow: bool = False):
        obj = super().__new__(cls, (stepped, norms))
        obj.overflow = overflow
        return obj


def _plain(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one


@dataclass
class Training:
    """What the SFT and RM loops train with, prepared by :func:`prepare_training`."""

    model: object
    optimizer: object
    scheduler: object
    guard: "NonFiniteGuard"
    parts: object
    """The CheckpointParts of the run's resumable checkpoints."""
    start: int
    """The step to continue after (0 for a new run)."""
    state: dict
    """The resumed checkpoint's state ({} for a new run)."""


def prepare_training(acc, model, tc, total_steps: int, out: Path, resume: bool) -> Training:
    """The common start of the SFT and RM loops: AdamW as `tc` says, accelerate / DeepSpeed, the
    schedule (on the prepared optimizer: ZeRO-3 regroups its parameters), the non-finite guard and,
    with `resume`, the latest checkpoint restored."""
    from .checkpoint import CheckpointParts, resume_state

    optimizer = make_optimizer(model.parameters(), tc)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = make_scheduler(optimizer, tc.lr_scheduler, total_steps, tc.warmup_ratio)
    parts = CheckpointParts({"model": model}, {"model": optimizer}, {"model": scheduler})
    start, state = resume_state(acc, out, resume, parts, total=(total_steps, "train.max_steps / train.epochs"))
    return Training(model, optimizer, scheduler, NonFiniteGuard(tc.max_nonfinite_steps), parts, start, state)


class NonFiniteGuard:
    """Counts skipped non-finite steps; stops the run after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.streak, self.skipped, self.overflows = limit, 0, 0, 0

    def update(self, ok: bool, step: int, overflow: bool = False, scale: float | None = None) -> None:
        """`overflow`: an fp16 step the GradScaler skipped. It is counted (skipped_overflow) but
        does not feed the streak while the loss scale is >= 1: the scaler halves the scale until
        the gradients fit, which is how fp16 training starts. Below a scale of 1 an overflow is a
        real non-finite gradient."""
        if ok:
            self.streak = 0
            return
        if overflow and (scale is None or scale >= 1.0):
            self.overflows += 1
            log.info("step %d: fp16 gradient overflow, step skipped, loss scale lowered to %g", step, scale or 0)
            return
        self.streak += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.streak)
        if self.streak >= self.limit:
            raise RunError(f"{self.streak} optimizer steps in a row had a non-finite loss or gradient (last at step "
                           f"{step}); lower the learning rate or check the data. The last checkpoint is intact.")

    def check_trained(self, steps: int, fix: str = "lower the learning rate or check the data") -> None:
        """At the end of a run of `steps` optimizer steps, before its model is saved as the result: a
        RunError when every one was skipped as non-finite (fewer than `limit`, so the streak never
        stopped the run): the "trained" model would be the initial one, reported as a success."""
        if steps > 0 and self.skipped >= steps:
            raise RunError(f"every one of this run's {steps} optimizer steps had a non-finite loss or gradient: "
                           f"nothing was trained, and no model is saved as its result; {fix}")

    def summary(self) -> dict:
        """`skipped_overflow_steps` once an fp16 overflow happened (absent otherwise)."""
        return {"skipped_overflow_steps": self.overflows} if self.overflows else {}

    def state_dict(self) -> dict:
        return {"streak": self.streak, "skipped": self.skipped, "overflows": self.overflows}

    def load_state_dict(self, d: dict) -> None:
        self.streak, self.skipped, self.overflows = d["streak"], d["skipped"], d.get("overflows", 0)


def make_optimizer(params, optim, lr: float | None = None):
    """AdamW over the trainable `params` as `optim` (an OptimConfig) says; `lr` overrides its lr
    (PPO's value model). Weight decay only on matrices, not on biases and norms."""
    lr, weight_decay, eps = optim.lr if lr is None else lr, optim.weight_decay, optim.adam_eps
    betas = (optim.adam_beta1, optim.adam_beta2)
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups (LoRA has no 1-D weights)
    # the fused kernel (CPU and CUDA, torch >= 2.4) is ~4x faster per step than the for-loop one
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    except (RuntimeError, TypeError):  # older torch or an unsupported device
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def make_scheduler(optimizer, name: str, total_steps: int, warmup_ratio: float):
    from transformers import get_scheduler

    warmup = int(math.ceil(total_steps * warmup_ratio))
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
    except ValueError as e:
        raise RunError(f"recipe: unknown lr_scheduler '{name}' ({e})") from None


_MALLOC_SET: list[bool] = []


def retain_freed_cpu_memory() -> bool:
    """For runs on the CPU, on Linux with glibc: serve every allocation from the heap and keep
    freed memory there (``mallopt(M_MMAP_MAX, 0)``, ``M_TRIM_THRESHOLD`` 2 GiB), once per process.

    By default glibc gives each block over its mmap threshold (at most 32 MiB) fresh pages from
    the kernel and returns them when freed, so every activation, every (B, R, V) logits tensor
    and every vocabulary-sized gradient of a training step is page-faulted in again, zeroed by the
    kernel, at every micro-batch; on the CPU that costs ~10% of a SmolLM2-135M PPO step
    (docs/performance-history.md). Kept, the freed blocks are reused the next micro-batch. The cost:
    the process keeps the memory it has freed (its resident size stays near its peak instead of
    falling after it; the peak itself is unchanged in our measurements). Not applied when an
    accelerator is present (there the large tensors live on the device, and the host copies freed
    after partitioning or saving should go back to the system), nor with ``RLHF_MALLOC=system``.
    Returns whether it applied."""
    import ctypes
    import sys

    if _MALLOC_SET:
        return _MALLOC_SET[0]
    accelerator = getattr(torch, "accelerator", None)
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    on_cpu = not has_device or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    ok = False
    if on_cpu and sys.platform.startswith("linux") and malloc_choice() == "retain":
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
            ok = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to set
            ok = False
    _MALLOC_SET.append(ok)
    return ok


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(n: int, batch_size: int, seed: int, epochs: float, max_steps: int = -1):
    """Indices of each global batch, epoch after epoch (drop-last within an epoch)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise RunError(f"recipe: 'train.batch_size' ({batch_size}) is more than the {n} training examples: not one "
                       f"full batch (lower it, or add data)")
    total = max_steps if max_steps > 0 else int(math.ceil(per_epoch * epochs))
    out, epoch = [], 0
    while len(out) < total:
        perm = epoch_permutation(n, seed, epoch)
        for b in range(per_epoch):
            out.append(perm[b * batch_size : (b + 1) * batch_size])
            if len(out) == total:
                break
        epoch += 1
    return out


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of a global batch (contiguous, so micro-batches stay grouped)."""
    per = len(items) // world
    return items[rank * per : (rank + 1) * per]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def rank_chunks(items: list, acc, size: int) -> list[tuple[list, bool]]:
    """This process's share of `items` (every world-th) in chunks of `size`, as (chunk, True), then
    (filler, False) chunks until it has as many as the process with the most: every process must
    run the same number of forwards, because under ZeRO-3 each forward gathers the weights
    collectively and under DDP the first forward after training broadcasts buffers; a process that
    ran fewer would leave the others waiting. A filler is `items[:1]`: run it, count nothing."""
    n, world = len(items), acc.num_processes
    mine = chunks(items[acc.process_index :: world], size)
    most = -(-(-(-n // world)) // size)  # ceil(ceil(n / world) / size)
    return [(c, True) for c in mine] + [(items[:1], False)] * (most - len(mine) if n else 0)


# ----------------------------------------------------------------------------- output


def open_run(acc, output_dir, overwrite: bool = False, resume: bool = False, command: str | None = None, cfg=None):
    """Plan this run's folder (see :mod:`rlhf.rundir`): after finishing any promotion a crash
    interrupted, decide where the run writes. Touches nothing else; a problem with the folder is
    kept in `.problem` and reported by :func:`inputs_first` after the inputs were read. With the
    recipe `cfg`, an --overwrite that would delete one of the run's own inputs is such a problem."""
    from accelerate.utils import broadcast_object_list

    from . import rundir

    decided = [None]
    if acc.is_main_process:  # one process decides (a lagging rank or a stale NFS view must not disagree)
        live = rundir.busy(output_dir)  # (before recover: a live run's finished staging folder is its own to move)
        if live:
            decided = [rundir.RunFolder(Path(output_dir), Path(output_dir), live)]
        else:
            rundir.recover(output_dir)
            decided = [rundir.plan(output_dir, overwrite, resume, command)]
        rf = decided[0]
        inside = rundir.inputs_inside(cfg, rf.final) if cfg is not None and overwrite and not rf.problem \
            and not rf.done and rundir.holds_run(rf.final) else []
        if inside:
            key, path = inside[0]
            rf.problem = (f"{rf.final}: --overwrite would delete this run's own input {key} ({path}) when the new run "
                          f"replaces the folder; write the run to another folder")
    if acc.num_processes > 1:
        broadcast_object_list(decided, from_process=0)
    return decided[0]


def save_recipe(acc, cfg, out: Path, resume: bool) -> None:
    """The run's recipe.yaml: written by a new run (and by a resumed one killed before writing it);
    a resumed run keeps it, and warns of each key its recipe changes (the run goes on with the new
    values, but not as the uninterrupted run would have: a longer max_steps moves the LR schedule)."""
    from .config import dump_yaml, read_yaml, recipe_changes, to_dict

    path = Path(out) / "recipe.yaml"
    if not acc.is_main_process:
        return
    if not resume or not path.exists():
        dump_yaml(cfg, path)
        return
    changed = recipe_changes(read_yaml(path), to_dict(cfg))
    if changed:
        log.warning("resumed with a recipe that differs from %s: %s; the run goes on with the new values, not as "
                    "the uninterrupted run would have", path, "; ".join(changed))


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can fix: one line, exit status 2 (:mod:`rlhf.errors`)."""
    return USER_ERRORS


@contextlib.contextmanager
def inputs_first(rf):
    """Validate a run's inputs inside this block, then refuse a run folder that cannot take the
    run: the user fixes both at once (both are named when both are wrong)."""
    try:
        yield
    except user_errors() as e:
        if rf.problem:
            both = type(e)(f"{e}; and {rf.problem}")
            both.key = getattr(e, "key", None)  # (a ConfigError's key: the CLI puts where it was set in front)
            raise both from None
        raise
    if rf.problem:
        raise RunError(rf.problem)


OPEN_RUNS: list = []
"""Run folders this process has opened and not yet finished (`fail_open_runs` marks them)."""


def prepare_output_dir(acc, rf, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the folder this run writes into (the staging folder of a new run), once every
    input was validated; returns it."""
    from . import rundir

    failed = [None]
    if acc.is_main_process:
        try:
            rundir.open_folder(rf, overwrite, resume)
        except BaseException as e:  # (told to the other processes, not left waiting at the barrier below)
            failed = [e]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        said = [f"{type(failed[0]).__name__}: {failed[0]}" if failed[0] is not None else None]
        broadcast_object_list(said, from_process=0)
        if said[0] is not None and failed[0] is None:
            raise RunError(f"process 0 could not open the run folder {rf.work} ({said[0]})")
    if failed[0] is not None:  # (not in OPEN_RUNS: the folder may be a live run's, never to be cleaned up here)
        raise failed[0]
    acc.wait_for_everyone()
    OPEN_RUNS.append(rf)
    if rf.staged:
        log.info("writing the run into %s; it replaces %s when it finishes", rf.work, rf.final)
    return rf.work


def fail_open_runs(error: BaseException, is_main: bool = True, since: int = 0) -> str:
    """After an error: of the run folders opened since `since`, remove staged ones without a
    checkpoint, mark the others FAILED. Returns a note for the error message (where the
    resumable run is)."""
    from . import rundir

    try:
        notes = [rundir.fail(rf, error) for rf in OPEN_RUNS[since:]] if is_main else []
    finally:  # (a folder that cannot be written at all: still no longer this process's)
        for rf in OPEN_RUNS[since:]:
            rundir.release(rf)
        del OPEN_RUNS[since:]
    return "".join(notes)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLogger:
    """metrics.jsonl (one JSON object per logged step, with `step`) + TensorBoard when installed."""

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if enabled and wandb_project:
            try:
                import wandb
            except ImportError:
                raise RunError("recipe: 'wandb_project' is set but wandb is not installed (pip install wandb)") from None
            os.environ.setdefault("WANDB_MODE", "offline")  # offline-friendly: `wandb sync` later
            self.wandb = wandb.init(project=wandb_project, dir=str(out_dir), config=config or {},
                                    name=Path(out_dir).name, resume="allow")
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))
            except Exception:  # tensorboard not installed: metrics.jsonl is the record
                self.tb = None
        self.t0 = time.time()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time() - self.t0, 3)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            rec[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def warn_zero3_dtype(acc, dtype: str) -> None:
    """Under ZeRO-3 the weights are partitioned in DeepSpeed's precision (its bf16/fp16 section,
    which mixed_precision fills), whatever model.dtype asks: a bf16 model.dtype trained and saved
    in fp32, at twice the weight memory, without a word."""
    wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype)
    if wanted and acc.is_main_process and zero_stage(acc) == 3 and _ds_precision(acc) != wanted:
        log.warning("model.dtype %s is not what ZeRO-3 trains in: DeepSpeed partitions the weights in %s (its "
                    "precision, from mixed_precision); set mixed_precision: %s for %s weights", dtype,
                    {"no": "float32"}.get(_ds_precision(acc), _ds_precision(acc)), wanted, dtype)


def start_run(tc, output_dir, overwrite: bool, resume: bool, command: str | None = None, cfg=None):
    """Common start of the SFT and RM loops: accelerator (DDP / DeepSpeed with the recipe's batch
    split), the run folder planned (not yet touched), and the summary of a run --resume finds
    already complete. Returns (acc, grad_accum, micro_batch_size, run_folder, finished_summary | None)."""
    accum, micro_bs = grad_accum_steps(tc.batch_size, tc.micro_batch_size, world_size())
    acc = make_accelerator(tc.mixed_precision, tc.deepspeed, micro_batch_size=micro_bs, grad_accum=accum,
                           max_grad_norm=tc.max_grad_norm, matmul_precision=tc.matmul_precision)
    if cfg is not None:
        warn_zero3_dtype(acc, cfg.model.dtype)
    rf = open_run(acc, output_dir, overwrite, resume, command, cfg)  # nothing is written before the inputs check out
    return acc, accum, micro_bs, rf, finished_summary(rf, cfg) if rf.done else None


def finished_summary(rf, cfg=None) -> dict:
    """`--resume` of a run that has finished: its summary.json (a damaged one is a one-line
    error), after a warning naming each key of the recipe given now that differs from the run's
    (the run is not extended: a larger max_steps needs a new run)."""
    from .config import read_yaml, recipe_changes, to_dict

    path = rf.final / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: damaged, cannot be read ({type(e).__name__}: {e}); the run finished, but this "
                       f"file was cut short or edited: restore it, or pass --overwrite to run again") from None
    if not isinstance(summary, dict):
        raise RunError(f"{path}: damaged (a JSON {type(summary).__name__}, not a run summary); restore it, or pass "
                       f"--overwrite to run again")
    log.info("%s: run already complete", rf.final)
    recipe = rf.final / "recipe.yaml"
    if cfg is not None and recipe.is_file():
        try:
            changed = recipe_changes(read_yaml(recipe), to_dict(cfg))
        except Exception:  # (an unreadable old recipe: nothing to compare with)
            changed = []
        if changed:
            log.warning("--resume of a finished run: it is not run again, and the recipe given now differs from "
                        "its %s: %s; pass --overwrite (or another --output_dir) to run with these values",
                        recipe, "; ".join(changed))
    return summary


def finish_run(acc, logger: "MetricsLogger", out: Path) -> None:
    """Common end of every stage: close the logs, build the report, move a staged run to its
    final path, and wait until the model is there before any process moves on (the next stage
    reads it)."""

    logger.close()
    if acc.is_main_process:
        from .report import report_after_run

        report_after_run(out)
    finish_folder(acc, out)


def finish_folder(acc, out: Path) -> None:
    """A finished run (summary written) takes its final path if it was staged (collective)."""
    from . import rundir

    acc.wait_for_everyone()
    for rf in [rf for rf in OPEN_RUNS if rf.work == out]:
        if acc.is_main_process:
            rundir.promote(rf)
        rundir.release(rf)
        OPEN_RUNS.remove(rf)
    acc.wait_for_everyone()


def peak_memory(acc) -> dict:
    """Peak memory of the busiest process so far (collective): resident CPU memory in MiB
    (`peak_rss_mb`) and, on CUDA, the most GPU memory torch allocated (`peak_gpu_mb`)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    peak = acc.gather(torch.tensor([[rss, gpu]], dtype=torch.float64, device=acc.device)).amax(0).tolist()
    out = {"peak_rss_mb": round(peak[0], 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(peak[1], 1)
    return out


def write_summary(out_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(out_dir) / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")


@dataclass
class Timer:
    total: float = 0.0

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.total += time.perf_counter() - self.t


def malloc_choice() -> str:
    """RLHF_MALLOC: 'retain' (the default: keep freed CPU memory, :func:`retain_freed_cpu_memory`)
    or 'system' (glibc's defaults); any other value is a ConfigError naming it."""
    choice = os.environ.get("RLHF_MALLOC", "retain").strip().lower() or "retain"
    if choice not in ("retain", "system"):
        raise ConfigError(f"environment variable RLHF_MALLOC={os.environ['RLHF_MALLOC']!r}: expected 'retain' "
                          f"(the default) or 'system'")
    return choice


def check_environment() -> None:
    """The RLHF_* switches a run reads later (progress bars, malloc): a misspelt value is one line at
    the start, on every process, not an error on one rank once the models have loaded."""
    env_flag("RLHF_NO_PROGRESS")
    malloc_choice()


def env_flag(name: str) -> bool:
    """An on/off environment variable (RLHF_NO_PROGRESS): 1, true, yes, on, or 0, false, no, off, empty or
    unset, in any case; any other value is a ConfigError naming it (not silently 'off')."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment variable {name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off")


def progress(iterable=None, total=None, desc: str = "", disable: bool = False, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable or env_flag("RLHF_NO_PROGRESS"),
                dynamic_ncols=True, leave=False, **kwargs)

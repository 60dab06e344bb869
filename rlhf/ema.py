"""The EMA of the policy weights that InstructGPT releases (decay 0.992), ZeRO-3 aware."""

from __future__ import annotations

import torch

from .algos import core
from .models import unwrap


def local_part(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its ZeRO-3 partition (flat, padded), else the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class EMA:
    """Exponential moving average of the policy weights [IGPT: 0.992], in fp32.

    Only trained parameters are averaged (a frozen LoRA base never changes: its EMA is itself),
    kept beside them on their device, or in CPU memory with `offload`. Under ZeRO-3 each
    process averages only its own partition of every parameter (1/N of the weights, updated
    after each optimizer step like the partition itself); `full_state_dict` all-gathers the
    partitions when the EMA policy is saved. Tensors are keyed by the parameter's index in
    `model.parameters()`."""

    def __init__(self, model, decay: float, offload: bool = False):
        self.decay, self.offload = decay, offload
        params = list(unwrap(model).parameters())
        self.sharded = any(hasattr(p, "ds_tensor") for p in params)
        self.index = [i for i, p in enumerate(params) if p.requires_grad]
        self.params = [self._copy(local_part(params[i])) for i in self.index]

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu" if self.offload else t.device, torch.float32, copy=True)

    def update(self, model) -> None:
        params = list(unwrap(model).parameters())
        local = [local_part(params[i]).detach() for i in self.index]
        if self.offload:
            local = [p.to("cpu") for p in local]  # (blocking: the update reads them on the host at once)
        core.ema_update(self.params, local, self.decay)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {str(i): p.cpu() for i, p in zip(self.index, self.params)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """(Checkpoints from before the EMA skipped frozen parameters hold every index: the
        trained ones are read.)"""
        self.params = [tensors[str(i)].to(p.device, p.dtype) for i, p in zip(self.index, self.params)]

    def full_state_dict(self, model, acc) -> dict[str, torch.Tensor]:
        """name -> full EMA tensor in the model's dtype, on the CPU (collective under ZeRO-3;
        every process gets it)."""
        m = unwrap(model)
        names: dict[int, list[str]] = {}  # every name of each parameter (tied weights have two)
        for name, p in m.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        aliases = {n for ns in names.values() for n in ns}
        out = {k: v for k, v in m.state_dict().items() if k not in aliases}  # persistent buffers
        ema = dict(zip(self.index, self.params))
        for i, p in enumerate(m.parameters()):
            e = ema[i] if i in ema else local_part(p).detach()  # a frozen parameter is its own average
            if self.sharded and hasattr(p, "ds_tensor"):  # partitions are consecutive slices of the flat tensor
                e = acc.gather(e.to(acc.device))[: p.ds_numel].view(p.ds_shape)
            for name in names[id(p)]:
                out[name] = e.to("cpu", p.dtype)
        return out

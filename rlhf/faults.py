"""Test hooks, inert unless RLHF_FAULT is set: kill the process at a chosen point, or make a loss NaN.

- ``RLHF_FAULT=step:N``: SIGKILL right after optimizer step / PPO iteration N (``term:N``: SIGTERM there);
- ``RLHF_FAULT=checkpoint:N``: SIGKILL in the middle of writing the N-th checkpoint;
- ``RLHF_FAULT=promote:N``: SIGKILL between the halves of the N-th promotion of a staged run;
- ``RLHF_FAULT=nan:N``: the loss of step N is NaN (the non-finite guard must skip it).
"""

from __future__ import annotations

import os

import torch

def fault_point(where: str) -> None:
    """Test hook: RLHF_FAULT=checkpoint:N kills this process with SIGKILL at the N-th pass here."""
    spec = os.environ.get("RLHF_FAULT", "")
    if not spec.startswith(where + ":"):
        return
    global _FAULT_COUNT
    _FAULT_COUNT += 1
    if _FAULT_COUNT == int(spec.split(":")[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNT = 0


def fault_point_step(step: int) -> None:
    """Test hook: RLHF_FAULT=step:N kills this process with SIGKILL right after optimizer step N."""
    spec = os.environ.get("RLHF_FAULT", "")
    if spec in (f"step:{step}", f"term:{step}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL if spec.startswith("step") else signal.SIGTERM)




def inject_fault(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Test hook: RLHF_FAULT=nan:N makes the loss of optimizer step N NaN (the guard must skip it)."""
    spec = os.environ.get("RLHF_FAULT", "")
    if spec == f"nan:{step}" and step not in _NAN_DONE:  # once: the first micro-batch of that step
        _NAN_DONE.add(step)
        return loss * float("nan")
    return loss


_NAN_DONE: set[int] = set()

"""torch's Adam(W) inside megatron-core's optimizers: its fused kernel and where its ``step`` lives.

Without APEX or Transformer Engine, megatron-core 0.16.1 builds ``torch.optim.AdamW`` with
torch's defaults, which on a GPU take the foreach implementation: about a dozen
multi-tensor passes over the fp32 main parameters, their gradients and the two moments per
update. On an H200 that was 28 ms of Adam kernels in a 1.3B iteration (docs/RESULTS.md),
about three times what one pass over those tensors costs. :func:`fuse` switches it to
torch's ``fused=True`` kernel, which reads and writes each tensor once, as the
FusedAdam of APEX and Transformer Engine (NVIDIA's container) does.

The fused kernel reads each parameter's ``step`` from a float32 tensor on the parameter's
device; the foreach and single-tensor implementations keep it on the host.
:func:`step_tensor` makes a ``step`` where a group's implementation reads it. torch's
``load_state_dict`` gives each group the settings saved with it (``fused`` included), so
:func:`fuse` is applied again after optimizer state is loaded; it moves the steps as well.
"""

from __future__ import annotations

from typing import Any

import torch


def inner_optimizers(optimizer: Any) -> list[Any]:
    """The megatron optimizers that hold a torch optimizer (``ChainedOptimizer`` unwrapped)."""
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer]) if hasattr(opt, "optimizer")]


def is_torch_adam(torch_optimizer: torch.optim.Optimizer) -> bool:
    """torch's own Adam(W), which keeps a ``step`` per parameter (APEX's and TE's keep it per group)."""
    return isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW))


def torch_adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """torch's own Adam(W)s inside ``optimizer`` (APEX's or TE's FusedAdam are not among them)."""
    return [opt.optimizer for opt in inner_optimizers(optimizer) if is_torch_adam(opt.optimizer)]


def _step_device(group: dict, param: torch.Tensor) -> torch.device:
    """Where the group's kernel reads ``step``: the parameter's device for the fused (or
    capturable) kernel, the host for the others."""
    return param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def step_tensor(group: dict, param: torch.Tensor, value: float) -> torch.Tensor:
    """torch Adam's ``step`` of ``param`` in ``group``: float32, where the group's kernel reads it."""
    return torch.tensor(value, dtype=torch.float32, device=_step_device(group, param))


def _place_steps(torch_optimizer: torch.optim.Optimizer) -> None:
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            state = torch_optimizer.state.get(param)
            if not state or "step" not in state:
                continue
            step = state["step"]
            placed = torch.is_tensor(step) and step.dtype == torch.float32
            if not (placed and step.device == _step_device(group, param)):
                state["step"] = step_tensor(group, param, float(step))


def fuse(optimizer: Any) -> int:
    """Run every torch Adam(W) inside ``optimizer`` with torch's fused kernel; how many there are.

    Sets ``fused`` (and clears ``foreach``) in each parameter group and the defaults, and
    moves existing ``step`` tensors to their parameters' devices. Idempotent; optimizers
    of other kinds (APEX's or TE's FusedAdam) are left alone.
    """
    adams = torch_adams(optimizer)
    for adam in adams:
        adam.defaults.update(fused=True, foreach=False)
        for group in adam.param_groups:
            group.update(fused=True, foreach=False)
        _place_steps(adam)
    return len(adams)

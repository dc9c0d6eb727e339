"""The distributed optimizer's part of a ``dist_checkpointing`` checkpoint (GPU path).

Which of megatron-core's formats is saved, whether this run can load it, and two
repairs for megatron-core 0.16.1's DistributedOptimizer over torch's AdamW (its fallback
without Transformer Engine or Apex), whose loading mishandles AdamW's per-parameter
``step``.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch


def sharding(args: argparse.Namespace) -> Optional[str]:
    """The distributed optimizer's checkpoint format, None without it.

    megatron-core 0.16.1's default ('fully_sharded_model_space') cannot be saved any more
    (its ``flattened_range`` is rejected by its own validation); like Megatron-LM this
    saves 'dp_reshardable' unless ``--dist-ckpt-optim-fully-reshardable``.
    """
    if not args.use_distributed_optimizer:
        return None
    return "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


def metadata(saved_sharding: Optional[str]) -> Optional[dict[str, str]]:
    """``metadata`` for the optimizer's ``sharded_state_dict``."""
    return None if saved_sharding is None else {"distrib_optim_sharding_type": saved_sharding}


def sharding_mismatch(saved: Optional[str], args: argparse.Namespace, saved_layout: Any,
                      same_layout: bool) -> Optional[str]:
    """Why this run cannot load optimizer state saved as ``saved``, naming the flags; None if it can."""
    wanted = sharding(args)
    if (saved is None) != (wanted is None):
        return (f"the checkpoint's optimizer state was saved {'without' if saved is None else 'with'} "
                f"--use-distributed-optimizer and this run {'uses' if wanted else 'does not use'} it; "
                "pass --no-load-optim to load the model only")
    if saved == "dp_reshardable" and not same_layout:
        return (f"the checkpoint's distributed-optimizer state loads under its own tensor/pipeline sizes only "
                f"(checkpoint {saved_layout}, this run tp {args.tensor_model_parallel_size}, "
                f"pp {args.pipeline_model_parallel_size}); save with --dist-ckpt-optim-fully-reshardable, "
                "or pass --no-load-optim to load the model only")
    return None


def _torch_adam_distributed_optimizers(optimizer: Any) -> list[Any]:
    """The DistributedOptimizers in ``optimizer`` that wrap torch's AdamW (none with TE or Apex)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(opt, distrib_optimizer.DistributedOptimizer)]


def allocate_torch_adam_state(optimizer: Any) -> None:
    """Zero AdamW state with a ``step`` before loading: ``sharded_state_dict(is_loading=True)``
    reads the step of every parameter, which a fresh torch optimizer lacks (AssertionError)."""
    for opt in _torch_adam_distributed_optimizers(optimizer):
        if len(opt.optimizer.state) == 0:
            opt.init_state_fn(opt.optimizer, opt.config)
            for state in opt.optimizer.state.values():
                state["step"] = torch.zeros((), dtype=torch.float32)


def restore_torch_adam_steps(optimizer: Any) -> None:
    """One ``step`` tensor per parameter, the checkpoint's, after loading.

    megatron-core keeps the step in the param groups and restores it as one tensor shared
    by every parameter (which AdamW would then advance once per parameter), and the
    bucket state copied in afterwards overwrites its value.
    """
    for opt in _torch_adam_distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)

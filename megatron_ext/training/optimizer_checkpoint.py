"""The distributed optimizer's part of a ``dist_checkpointing`` checkpoint (GPU path).

Which of megatron-core's formats is saved, whether this run can load it (its buckets and
the order of their parameters; the order matters to the CPU path's optimizer state too), and the
repairs around megatron-core 0.16.1's optimizer checkpoints: state allocated before a
save or load where there is none yet, and torch AdamW's per-parameter ``step`` (the
DistributedOptimizer's fallback without Transformer Engine or Apex mishandles it).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

from megatron_ext.training.torch_adam import inner_optimizers, is_torch_adam, step_tensor


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


BUCKETS_KEY = "per_bucket_numel_unpadded"
ORDER_KEY = "bucket_param_order"


def _bucket_sizes(per_buffer: list[dict]) -> list[list[int]]:
    """Parameters per gradient bucket, one list per DDP buffer (model chunk, dtype)."""
    return [sizes for buffer in per_buffer for sizes in buffer.values()]


def bucket_order(optimizer: Any, names: dict[torch.nn.Parameter, str]) -> dict[str, Any]:
    """Each distributed optimizer's parameter names in bucket order, to save with 'dp_reshardable' state.

    That format lays each bucket's state out in the order of the bucket's parameters, and
    megatron-core stores only the bucket sizes: code that registers the same parameters in
    another order would load parts of other parameters' fp32 main weights and Adam moments
    into each, silently (the weights the model loaded by name are overwritten). One object per
    distributed optimizer and tensor/pipeline rank (``names``: parameter -> name).
    """
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    objects = {}
    for index, opt in enumerate(inner_optimizers(optimizer)):
        if not isinstance(opt, DistributedOptimizer):
            continue
        order = [names[param] for buffer in opt.buffers for bucket in buffer.buckets for param in bucket.params_list]
        key = f"optimizer.distributed.dp_group_idx_{opt.data_parallel_group_idx}.optimizer_{index}.{ORDER_KEY}"
        objects[key] = ShardedObject(key, order, (1,), (0,), replica_id=(
            opt.distributed_optimizer_instance_id, 0, opt.data_parallel_group.rank()))
    return objects


def order_mismatch(saved: Optional[list[str]], ours: list[str]) -> Optional[str]:
    """Where a checkpoint's parameter order (names; None if it records none) first differs from this run's."""
    if saved is None:
        return "the checkpoint does not record the order"
    for position, (saved_name, our_name) in enumerate(zip(saved, ours)):
        if saved_name != our_name:
            return f"parameter {position}: checkpoint {saved_name}, this run {our_name}"
    if len(saved) != len(ours):
        return f"checkpoint {len(saved)} parameters, this run {len(ours)}"
    return None


def order_error(kind: str, where: str) -> str:
    """The error for optimizer state of ``kind`` stored by parameter position, loaded in another order."""
    return (f"the checkpoint's optimizer state is stored {kind}, and this run's order differs ({where}), as after "
            "a change of megatron-ext or megatron-core between saving and loading: resume with the code that saved "
            "it, or pass --no-load-optim to load the model only")


def bucket_mismatch(optimizer_template: Any, order: dict[str, Any], directory: str) -> Optional[str]:
    """Why this rank's gradient buckets cannot take the checkpoint's 'dp_reshardable' state; None if they can.

    That format stores the state bucket by bucket, so it loads only where the buckets are
    the same: the same sizes (megatron-core would fail on a tensor shape or an assertion)
    and the same parameters in the same order (megatron-core would load them silently into
    the wrong parameters). Reads only the bucket sizes megatron-core saves with it
    (``optimizer_template`` is the optimizer's ``sharded_state_dict(is_loading=True)``) and
    the order of :func:`bucket_order`. Collective: every rank must call it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sizes = {obj.key: obj for obj in nested_values(optimizer_template)
             if isinstance(obj, ShardedObject) and obj.key.endswith(BUCKETS_KEY)}
    saved, _, absent = dist_checkpointing.load(dict(sizes, **order), directory,
                                               strict=StrictHandling.RETURN_UNEXPECTED)
    for key, obj in sizes.items():
        if saved[key] != obj.data:
            return (f"the checkpoint's distributed-optimizer state is stored per gradient bucket "
                    f"(parameters per bucket, per model chunk: checkpoint {_bucket_sizes(saved[key])}, "
                    f"this run {_bucket_sizes(obj.data)}); the buckets follow --overlap-grad-reduce, "
                    "--ddp-bucket-size (default max(40M, 1M x data-parallel size)) and "
                    "--num-layers-per-virtual-pipeline-stage: use the checkpoint's, save with "
                    "--dist-ckpt-optim-fully-reshardable, or pass --no-load-optim to load the model only")
    for key, obj in order.items():
        where = order_mismatch(None if key in absent else saved[key], obj.data)
        if where:
            return order_error("per gradient bucket in the order of the bucket's parameters", where)
    return None


def allocate_state(optimizer: Any) -> None:
    """Zero Adam state, as before a first update, where the optimizer has none yet.

    Before saving: a checkpoint written before the first update (e.g. fp16's first
    iterations, all skipped on loss-scale overflow) would otherwise hold no moments, and
    loading it would fail on the missing keys. Before loading: megatron-core's
    DistributedOptimizer over torch's AdamW reads every parameter's ``step`` in
    ``sharded_state_dict(is_loading=True)`` (an AssertionError on a fresh optimizer).
    Zero moments with step 0 update exactly as a fresh state does.
    """
    for opt in inner_optimizers(optimizer):
        if len(opt.optimizer.state) == 0 and opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
        if is_torch_adam(opt.optimizer):
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    state = opt.optimizer.state.get(param)
                    if state and "step" not in state:
                        state["step"] = step_tensor(group, param, 0.0)


def add_missing_common_step(optimizer: Any, loaded: Any) -> None:
    """Give loaded torch-Adam state without a step the step 0, before ``load_state_dict``.

    megatron-core's Float16/FP32 optimizers save torch Adam's step as ``common_step`` only
    when it is non-zero, so state allocated before the first update comes back without
    one, and torch's Adam refuses state without a step.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = inner_optimizers(optimizer)
    states = [loaded] if len(inner) == 1 else (loaded.values() if isinstance(loaded, dict) else loaded)
    for opt, state_dict in zip(inner, states):
        if isinstance(opt, DistributedOptimizer) or not is_torch_adam(opt.optimizer):
            continue
        per_param = state_dict.get("optimizer", state_dict)["state"]
        if per_param and "common_step" not in per_param and not any("step" in v for v in per_param.values()):
            per_param["common_step"] = torch.zeros((), dtype=torch.float32)


def restore_torch_adam_steps(optimizer: Any) -> None:
    """One ``step`` tensor per parameter, the checkpoint's, after loading.

    megatron-core's DistributedOptimizer keeps torch AdamW's step in the param groups and
    restores it as one tensor shared by every parameter (which AdamW would then advance
    once per parameter), and the bucket state copied in afterwards overwrites its value.
    Each step goes where the group's kernel reads it (:func:`~megatron_ext.training.torch_adam.step_tensor`).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in inner_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and is_torch_adam(opt.optimizer):
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    opt.optimizer.state[param]["step"] = step_tensor(group, param, float(group["step"]))

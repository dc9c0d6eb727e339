"""Checkpoints in Megatron-LM's layout: ``iter_{iteration:07d}/`` and the tracker file
``latest_checkpointed_iteration.txt``, which is replaced atomically only after every
rank has finished writing, so "latest" never names a partial checkpoint.

GPU: one ``megatron.core.dist_checkpointing`` checkpoint per iteration (loadable under
another TP/PP layout; the distributed optimizer's formats are in ``optimizer_checkpoint``).
CPU: one ``mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt`` per model-parallel rank, each
written to a temporary file and renamed.

Each checkpoint stores the iteration, consumed samples, skipped-step count, scheduler,
RNG states, the arguments and the method configs; what a resuming run must share with
them is checked by ``checkpoint_checks``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megatron_ext import prores
from megatron_ext.training import optimizer_checkpoint, torch_adam
from megatron_ext.training.arguments import serializable_args
from megatron_ext.training.checkpoint_checks import (CheckpointError, check_architecture, check_methods,
                                                    check_scheduler)
from megatron_ext.training.optimization import Engine, group_schedules, restore_group_schedules

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
CPU_FILE = "model_optim_rng.pt"

@dataclass
class TrainingState:
    """The loop's counters, saved and restored with the model."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0


def checkpoint_dir(root: str, iteration: int) -> str:
    """``root/iter_{iteration:07d}``, Megatron-LM's directory of one checkpoint."""
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under ``root``, or None."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _write_tracker(root: str, iteration: int) -> None:
    """Point the tracker at ``iteration`` atomically (temporary file, fsync, rename)."""
    tmp = os.path.join(root, f".{TRACKER}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))


def _cpu_rank_file(root: str, iteration: int) -> str:
    """This model-parallel rank's CPU checkpoint file."""
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    return os.path.join(checkpoint_dir(root, iteration), f"mp_rank_{tp:02d}_{pp:03d}", CPU_FILE)


def rng_state(use_cuda: bool) -> dict[str, Any]:
    """Python, numpy and torch RNG states; with ``use_cuda`` also CUDA's and megatron's tracker."""
    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if use_cuda:
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any], use_cuda: bool) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if use_cuda:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _common_state(args: argparse.Namespace, state: TrainingState, methods: dict) -> dict[str, Any]:
    """What every rank stores alike: counters, arguments, method configs, TP/PP layout."""
    return {
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "skipped_iterations": state.skipped_iterations,
        "args": serializable_args(args),
        "methods": methods,
        "layout": {"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size},
        "optimizer_sharding": optimizer_checkpoint.sharding(args),
    }


def _all_ranks_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (a MIN all-reduce)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save_checkpoint(root: str, state: TrainingState, engine: Engine, model_chunks: list[torch.nn.Module],
                    args: argparse.Namespace, methods: dict) -> str:
    """Write ``iter_XXXXXXX`` on every rank, then (rank 0) point the tracker at it."""
    directory = checkpoint_dir(root, state.iteration)
    common = _common_state(args, state, methods)
    error: Optional[BaseException] = None
    try:
        if args.use_cuda:
            _save_distributed(directory, common, engine, model_chunks)
        elif parallel_state.get_data_parallel_rank() == 0:
            _save_cpu_rank(_cpu_rank_file(root, state.iteration), common, engine, model_chunks)
    except Exception as exc:  # noqa: BLE001 - re-raised below after the ranks agree
        error = exc
    if not _all_ranks_ok(error is None):
        raise CheckpointError(f"saving {directory} failed; the tracker still names the previous checkpoint") from error
    if not dist.is_initialized() or dist.get_rank() == 0:
        _write_tracker(root, state.iteration)
    if dist.is_initialized():
        dist.barrier()
    logger.info("saved checkpoint at iteration %d to %s", state.iteration, directory)
    return directory


def _save_cpu_rank(path: str, common: dict, engine: Engine, model_chunks: list[torch.nn.Module]) -> None:
    """This model-parallel rank's model, optimizer, scheduler and RNG, written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = dict(common, model=[c.state_dict() for c in model_chunks], optimizer=engine.optimizer.state_dict(),
                   parameter_order=_parameter_order(model_chunks),
                   opt_param_scheduler=engine.scheduler.state_dict(), rng=rng_state(False))
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The GPT chunks' sharded state, keyed as Megatron-LM does ("decoder.layers...").

    The chunks are unwrapped first: megatron-core's DDP does not forward
    ``sharded_state_dict`` to its module, so it would prefix every key with "module."
    while its ``load_state_dict`` expects the unprefixed keys.
    """
    chunks = unwrap_model(list(model_chunks))
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _gather_params(model_chunks: list[torch.nn.Module]) -> None:
    """Finish the distributed optimizer's deferred parameter all-gather.

    With ``--overlap-param-gather`` the updated parameters reach the other data-parallel
    ranks only in the next forward pass; a checkpoint written before it would hold the
    previous step's weights outside this rank's shard.
    """
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _rng_sharded_object() -> Any:
    """This rank's RNG states (CUDA's included), one object per (PP, TP) rank, replicated over DP."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", rng_state(True), shape, (pp, tp),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _sharded_state_dict(common: dict, engine: Engine, model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """What ``dist_checkpointing.save`` writes: counters, model, optimizer, scheduler, RNG."""
    sharded = dict(common)
    sharded.update(_model_sharded_state_dict(model_chunks))
    sharded["optimizer"] = engine.optimizer.sharded_state_dict(
        sharded, is_loading=False, metadata=optimizer_checkpoint.metadata(common["optimizer_sharding"]))
    if common["optimizer_sharding"] == "dp_reshardable":
        sharded["optimizer_bucket_order"] = _bucket_order(engine, model_chunks)
    sharded["opt_param_scheduler"] = engine.scheduler.state_dict()
    sharded["rng_state"] = _rng_sharded_object()
    return sharded


def _parameter_names(model_chunks: list[torch.nn.Module]) -> dict[torch.nn.Parameter, str]:
    """Parameter -> name as in the model's state dict ("model<i>." first with several chunks), in registration order."""
    chunks = unwrap_model(list(model_chunks))
    return {param: (f"model{i}." if len(chunks) > 1 else "") + name
            for i, chunk in enumerate(chunks) for name, param in chunk.named_parameters()}


def _parameter_order(model_chunks: list[torch.nn.Module]) -> list[str]:
    """The parameter names in registration order, the order of torch's optimizer state."""
    return list(_parameter_names(model_chunks).values())


def _bucket_order(engine: Engine, model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The distributed optimizer's parameter names in bucket order."""
    return optimizer_checkpoint.bucket_order(engine.optimizer, _parameter_names(model_chunks))


def _save_distributed(directory: str, common: dict, engine: Engine, model_chunks: list[torch.nn.Module]) -> None:
    """One ``dist_checkpointing`` checkpoint written by all ranks together."""
    from megatron.core import dist_checkpointing

    created = True
    if dist.get_rank() == 0:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError:
            created = False
    if not _all_ranks_ok(created):  # every rank must reach dist_checkpointing.save's collectives
        raise CheckpointError(f"cannot create the checkpoint directory {directory}")
    _gather_params(model_chunks)
    optimizer_checkpoint.allocate_state(engine.optimizer)
    dist_checkpointing.save(_sharded_state_dict(common, engine, model_chunks), directory)


def load_checkpoint(root: str, engine: Engine, model_chunks: list[torch.nn.Module], args: argparse.Namespace,
                    methods: dict) -> Optional[TrainingState]:
    """Restore the latest checkpoint under ``root``; None when there is none.

    ``--no-load-optim`` skips the optimizer's state; the iteration, the data position and
    the schedule (learning rate and ProRes' step) still continue. ``--finetune`` loads the
    model only and restarts all of them at 0.
    """
    iteration = read_tracker(root)
    if iteration is None:
        logger.warning("no checkpoint under --load %s (no %s); starting from scratch", root, TRACKER)
        return None
    directory = checkpoint_dir(root, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} not found, though {TRACKER} names it")
    if args.override_checkpoint_methods:
        prores.allow_checkpoint_mismatch(model_chunks)
    if args.use_cuda:
        state = _load_distributed(directory, engine, model_chunks, args, methods)
    else:
        state = _load_cpu(root, iteration, engine, model_chunks, args, methods)
    if args.finetune:
        state = TrainingState()
    logger.info("resumed from checkpoint %s at iteration %d", directory, iteration)
    return state


def _loads_optimizer(args: argparse.Namespace) -> bool:
    """The optimizer's state is restored unless ``--finetune`` or ``--no-load-optim``."""
    return not (args.finetune or args.no_load_optim)


def _check_compatible(common: dict, engine: Engine, args: argparse.Namespace, methods: dict) -> None:
    """Model shape, methods and schedule against the checkpoint's, before anything is loaded."""
    check_architecture(common.get("args"), args)
    overridden = check_methods(common.get("methods"), methods, args.override_checkpoint_methods)
    if overridden:
        logger.warning("loading a checkpoint with other method settings (%s): --override-checkpoint-methods",
                       ", ".join(overridden))
    if not args.finetune:
        check_scheduler(common["opt_param_scheduler"], engine.scheduler.state_dict(), args)


def _load_optimizer_state(engine: Engine, state: dict, args: argparse.Namespace) -> None:
    """The saved optimizer state; its parameter groups keep this run's LR bounds and weight
    decay when an override asks for this run's schedule or method settings."""
    schedules = group_schedules(engine.optimizer)
    with torch.no_grad():  # the fp32 distributed optimizer's main parameters are views of the model's
        engine.optimizer.load_state_dict(state)
    if args.override_opt_param_scheduler or args.override_checkpoint_methods:
        restore_group_schedules(engine.optimizer, schedules)


def _restore(common: dict, engine: Engine, args: argparse.Namespace) -> TrainingState:
    """The scheduler state (not with ``--finetune``, which restarts it with the iteration) and
    the loop's counters."""
    if not args.finetune:
        engine.scheduler.load_state_dict(common["opt_param_scheduler"])
    return TrainingState(common["iteration"], common["consumed_train_samples"], common["skipped_iterations"])


def _load_cpu(root: str, iteration: int, engine: Engine, model_chunks: list[torch.nn.Module],
              args: argparse.Namespace, methods: dict) -> TrainingState:
    """This model-parallel rank's ``model_optim_rng.pt`` (same TP size only)."""
    payload, error = None, None
    try:
        payload = _read_cpu_rank(_cpu_rank_file(root, iteration), args)
    except CheckpointError as exc:
        error = exc
    if not _all_ranks_ok(error is None):  # no rank goes on to load while another stops
        raise error or CheckpointError(f"another rank cannot load its part of {checkpoint_dir(root, iteration)} "
                                       "(see its error)")
    _check_compatible(payload, engine, args, methods)
    for chunk, state in zip(model_chunks, payload["model"], strict=True):
        chunk.load_state_dict(state)
    load_optim = _loads_optimizer(args)
    if load_optim:
        # torch's optimizer state is keyed by parameter position, in the model's parameter order
        where = optimizer_checkpoint.order_mismatch(payload.get("parameter_order"), _parameter_order(model_chunks))
        if where:
            raise CheckpointError(optimizer_checkpoint.order_error("by parameter position", where))
        _load_optimizer_state(engine, payload["optimizer"], args)
    if not (args.finetune or args.no_load_rng):
        set_rng_state(payload["rng"], False)
    return _restore(payload, engine, args)


def _read_cpu_rank(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """The payload of one CPU checkpoint file, if it was saved with this run's tensor-parallel size."""
    expected = ("the CPU path loads checkpoints of the same tensor-parallel size "
                f"(this run: --tensor-model-parallel-size {args.tensor_model_parallel_size})")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: {expected}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc})") from None
    saved_tp = payload.get("layout", {}).get("tp", args.tensor_model_parallel_size)
    if saved_tp != args.tensor_model_parallel_size:
        raise CheckpointError(f"{path} was saved with --tensor-model-parallel-size {saved_tp}: {expected}")
    return payload


def _load_distributed(directory: str, engine: Engine, model_chunks: list[torch.nn.Module],
                      args: argparse.Namespace, methods: dict) -> TrainingState:
    """A ``dist_checkpointing`` checkpoint, resharded to this run's layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        common = dist_checkpointing.load_common_state_dict(directory)
    except (CheckpointingException, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{directory}: cannot read the checkpoint ({exc})") from None
    _check_compatible(common, engine, args, methods)
    same_layout = common.get("layout") == {"tp": args.tensor_model_parallel_size,
                                           "pp": args.pipeline_model_parallel_size}
    template = _model_sharded_state_dict(model_chunks)
    load_optim = _loads_optimizer(args)
    if load_optim:
        sharding = common.get("optimizer_sharding")
        mismatch = optimizer_checkpoint.sharding_mismatch(sharding, args, common.get("layout"), same_layout)
        if mismatch:
            raise CheckpointError(mismatch)
        optimizer_checkpoint.allocate_state(engine.optimizer)
        template["optimizer"] = engine.optimizer.sharded_state_dict(
            dict(template), is_loading=True, metadata=optimizer_checkpoint.metadata(sharding))
        if sharding == "dp_reshardable":
            mismatch = optimizer_checkpoint.bucket_mismatch(template["optimizer"], _bucket_order(engine, model_chunks),
                                                            directory)
            if not _all_ranks_ok(mismatch is None):
                raise CheckpointError(mismatch or "another rank's gradient buckets differ from the checkpoint's "
                                                  "distributed-optimizer state (see its error)")
    load_rng = same_layout and not (args.finetune or args.no_load_rng)
    if load_rng:
        template["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(template, directory)
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
    if load_optim:
        optimizer_checkpoint.add_missing_common_step(engine.optimizer, loaded["optimizer"])
        _load_optimizer_state(engine, loaded["optimizer"], args)
        optimizer_checkpoint.restore_torch_adam_steps(engine.optimizer)
        torch_adam.fuse(engine.optimizer)  # torch's load_state_dict restored the saved kernel choice
    else:
        # bf16/fp16: the optimizer's fp32 main parameters still hold the initial weights
        # and its next step would copy them back over the loaded ones (Megatron-LM does this too).
        engine.optimizer.reload_model_params()
    if load_rng:
        set_rng_state(loaded["rng_state"], True)
    elif not same_layout:
        logger.warning("checkpoint layout %s differs from this run's; RNG states not restored", common.get("layout"))
    return _restore(common, engine, args)

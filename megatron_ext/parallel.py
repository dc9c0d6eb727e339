"""Process groups and seeding for the CPU (gloo) path, and the CPU gradient finalisation.

megatron-core's ``model_parallel_cuda_manual_seed`` and its RNG tracker need CUDA; on
a CPU the tracker is replaced by megatron-core's no-op tracker (every ``fork()`` is a
null context), so dropout draws from torch's global generator. Weights are
initialised with ``use_cpu_initialization``, which draws every full matrix from the
global generator and keeps this rank's shard, so a seed gives the same model at every
tensor-parallel size.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as tp_random


def cpu_manual_seed(seed: int) -> None:
    """Seed torch and install megatron-core's CUDA-free RNG tracker."""
    torch.manual_seed(seed)
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def initialize_cpu_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
) -> None:
    """Join (or create) a gloo world and build megatron-core's parallel groups on it.

    Called again (tests rebuild the groups for each layout), it first destroys every
    process group but the default one: megatron-core's ``destroy_model_parallel`` only
    forgets most of them, and each forgotten gloo group keeps its threads and sockets for
    the life of the process.
    """
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            "gloo",
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )
    elif parallel_state.model_parallel_is_initialized():
        barrier_before_destroying_groups()  # every rank is here
        _destroy_subgroups()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    cpu_manual_seed(seed)


def barrier_before_destroying_groups() -> None:
    """Wait for every rank, with the GIL released, so that gloo's workers retire the
    collectives just finished before their groups are destroyed.

    Until torch 2.8 (pytorch/pytorch#154976) a gloo group's destructor holds the GIL while
    it waits for its workers, and a worker dropping the last reference to a tensor Python
    made needs the GIL: a deadlock, seen under torch 2.6 and 2.7 when the groups were
    rebuilt right after an all-gather. Call it only where every rank is sure to arrive.
    """
    dist.barrier()


def _destroy_subgroups() -> None:
    """Destroy every process group of this process but the default one (as megatron-core
    itself does for its gloo groups, through torch's group map)."""
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)


def allreduce_sequence_parallel_grads(model_chunks: Iterable[torch.nn.Module]) -> None:
    """Sum the gradients of ``sequence_parallel``-tagged parameters over the TP group.

    The CPU counterpart of that step of megatron-core's ``finalize_model_grads``.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    for chunk in model_chunks:
        for param in chunk.parameters():
            if getattr(param, "sequence_parallel", False) and param.grad is not None:
                dist.all_reduce(param.grad, group=group)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global L2 norm of the gradients of a model split over TP and PP ranks.

    Partitioned parameters contribute from every tensor-parallel rank, replicated ones
    from TP rank 0 only (megatron-core's duplicate rule); the squared sums are added
    over the model-parallel group, so every rank returns the norm of the whole model.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    squares = torch.zeros((), dtype=torch.float64)
    for param in params:
        if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
            squares += param.grad.detach().double().pow(2).sum().cpu()
    if dist.is_initialized():
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return float(squares.sqrt())

"""Who this process is in the job (torchrun or SLURM ``srun``) and the process groups.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under a
bare ``srun python pretrain_gpt.py`` they are derived from SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, the first host of SLURM_JOB_NODELIST and SLURM_JOB_ID. Without either,
the process is a world of one.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext.parallel import barrier_before_destroying_groups, initialize_cpu_parallel

DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def detect_environment(environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """Rank, world size, local rank and master address from torchrun's or SLURM's variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistributedEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        else:
            port = SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", 0)) % SLURM_PORT_RANGE
        return DistributedEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=port, launcher="slurm",
        )
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_local_port()
    return DistributedEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def _free_local_port() -> int:
    """A free TCP port for a world of one (no launcher to agree with)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(env: DistributedEnv, use_cuda: bool) -> bool:
    """Join the world (NCCL on GPU, gloo on CPU); returns whether this call created it."""
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    if dist.is_initialized():
        return False
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                      RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank, world_size=env.world_size)
    return True


def initialize_model_parallel(args: argparse.Namespace, use_cuda: bool) -> None:
    """megatron-core's TP/PP/DP groups and the seeded RNG (CUDA tracker on GPU)."""
    vp = args.virtual_pipeline_model_parallel_size
    if not use_cuda:
        initialize_cpu_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, vp, args.seed)
        return
    from megatron.core import tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vp,
    )
    # Megatron-LM's rule: pipeline stages get distinct seeds; TP ranks are handled by the tracker.
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown(created_group: bool, every_rank_finished: bool = False) -> None:
    """Tear down megatron's groups, and the world if this process created it.

    With ``every_rank_finished`` (all ranks got here from the same, completed run), the
    ranks first meet at :func:`~megatron_ext.parallel.barrier_before_destroying_groups`
    (torch < 2.8's gloo destructor deadlock). Without it (a rank that failed alone), no
    rank waits for the others.
    """
    if every_rank_finished and dist.is_initialized():
        barrier_before_destroying_groups()
    parallel_state.destroy_model_parallel()
    if created_group and dist.is_initialized():
        dist.destroy_process_group()

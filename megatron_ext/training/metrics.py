"""What a run reports: Megatron-LM's log line, TensorBoard, wandb and ``metrics.jsonl``.

Global rank 0 writes; every rank computes the same logged values (losses are broadcast
from the last pipeline stage), and per-layer scalars are gathered over pipeline stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_ext import prores, wesar
from megatron_ext.training.arguments import serializable_args

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def format_log_line(record: dict[str, Any], train_iters: int) -> str:
    """Megatron-LM's training log line for one logged iteration."""
    parts = [
        f" iteration {record['iteration']:8d}/{train_iters:8d}",
        f"consumed samples: {record['consumed_samples']:12d}",
        f"consumed tokens: {record['consumed_tokens']:14d}",
        f"elapsed time per iteration (ms): {record['iteration_time_ms']:.1f}",
        f"learning rate: {record['lr']:.6E}",
        f"global batch size: {record['global_batch_size']:5d}",
        f"lm loss: {record['lm_loss']:.6E}",
        f"grad norm: {record['grad_norm']:.3f}",
        f"number of skipped iterations: {record['skipped_iterations']:3d}",
        f"tokens per second: {record['tokens_per_s']:.1f}",
    ]
    for key, label, fmt in (
        ("tflops_per_gpu", "throughput per GPU (TFLOP/s/GPU)", ".1f"),
        ("mfu", "MFU (%)", ".1f"),
        ("mem_allocated_gb", "mem allocated (GB)", ".2f"),
        ("mem_max_allocated_gb", "mem max allocated (GB)", ".2f"),
        ("gpu_power_w", "power (W)", ".0f"),
        ("gpu_utilization", "GPU utilization (%)", ".0f"),
    ):
        if key in record:
            parts.append(f"{label}: {record[key]:{fmt}}")
    return " | ".join(parts) + " |"


def model_flops_per_iteration(args: argparse.Namespace, vocab_size: int) -> float:
    """Training FLOPs of one iteration: 6 x matmul parameters x tokens + attention.

    Per token and layer the attention scores and weighted sum cost ``12 s h``
    (forward and backward, no causal discount, Megatron-LM's convention).
    """
    h, L, s = args.hidden_size, args.num_layers, args.seq_length
    kv = h // args.num_attention_heads * args.num_query_groups
    mlp = args.ffn_hidden_size * h * (3 if args.swiglu else 2)
    matmul_params = L * (h * (h + 2 * kv) + h * h + mlp) + vocab_size * h
    tokens = args.global_batch_size * s
    return tokens * (6 * matmul_params + 12 * L * s * h)


class GpuMonitor:
    """Power and utilisation from NVML (nvidia-ml-py), when installed."""

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.pynvml = pynvml
        except Exception as exc:  # noqa: BLE001 - NVML is optional
            logger.info("NVML unavailable (%s); power and utilisation not logged", exc)

    def read(self) -> dict[str, float]:
        """Memory allocated now and at peak (GiB), and power (W) and utilisation (%) if NVML."""
        stats = {
            "mem_allocated_gb": torch.cuda.memory_allocated() / 2**30,
            "mem_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
        }
        if self.handle is not None:
            stats["gpu_power_w"] = self.pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
            stats["gpu_utilization"] = float(self.pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        return stats


def _gradient(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """megatron-core DDP's ``main_grad`` when present, else ``grad``."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def per_layer_grad_norms(model_chunks: Iterable[torch.nn.Module]) -> dict[int, float]:
    """Global layer number -> L2 norm of that decoder layer's gradient (whole model).

    Tensor-parallel shards are summed over the TP group (replicated parameters counted
    once) and stages are combined over the pipeline group.
    """
    chunks = list(model_chunks)
    layers = [layer for chunk in chunks if hasattr(chunk, "decoder") for layer in chunk.decoder.layers]
    num_layers = chunks[0].config.num_layers
    device = next(chunks[0].parameters()).device
    squares = torch.zeros(num_layers, dtype=torch.float64, device=device)
    for layer in layers:
        for param in layer.parameters():
            grad = _gradient(param)
            if grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares[layer.layer_number - 1] += grad.detach().double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    return {i + 1: float(v) for i, v in enumerate(squares.sqrt().cpu())}


def method_scalars(model_chunks: list[torch.nn.Module]) -> dict[str, float]:
    """Per-layer ProRes scalars and WeSaR gate values of the whole model (all stages)."""
    local: dict[str, float] = {f"prores_alpha/layer_{l:03d}": a for l, a in prores.prores_alphas(model_chunks).items()}
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage = f"stage{pp_rank}/" if parallel_state.get_pipeline_model_parallel_world_size() > 1 else ""
    for index, chunk in enumerate(model_chunks):
        chunk_prefix = f"chunk{index}/" if len(model_chunks) > 1 else ""
        for name, gate in wesar.gate_parameters(unwrap_model(chunk)).items():
            local[f"wesar_gate/{stage}{chunk_prefix}{name}"] = float(gate.detach().float().reshape(-1)[0])
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return local
    gathered: list[dict[str, float]] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(gathered, local, group=parallel_state.get_pipeline_model_parallel_group())
    return {k: v for part in gathered for k, v in part.items()}


class MetricsWriter:
    """Writes logged records to the log, ``metrics.jsonl``, TensorBoard and wandb (rank 0)."""

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.args = args
        self.active = rank == 0
        self.jsonl = None
        self.tensorboard = None
        self.wandb = None
        if not self.active:
            return
        directory = args.save or args.tensorboard_dir
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.jsonl = open(os.path.join(directory, METRICS_FILE), "a", encoding="utf-8")
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir)
        if args.wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("--wandb-project given but wandb is not installed; not logging to wandb")
            else:
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                        config=serializable_args(args))

    def write(self, record: dict[str, Any]) -> None:
        """One JSON line, and every numeric field as a scalar at ``record['iteration']``."""
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(clean) + "\n")
            self.jsonl.flush()
        step = record["iteration"]
        scalars = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        """Close the metrics file and finish TensorBoard and wandb."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

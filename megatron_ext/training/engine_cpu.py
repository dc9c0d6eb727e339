"""One training step on the CPU path (gloo): the smallest substitute for what needs CUDA.

PLATFORM.md lists megatron-core's pipeline schedules, DDP grad buffers and mixed-precision
optimizers as CUDA-bound. Here they become a plain micro-batch loop (gradient
accumulation, loss divided by the number of micro batches as megatron's schedules do; the
weight-side scales once per step as on the GPU path),
an all-reduce of the gradients over the data-parallel group, the TP/PP-aware global
grad norm and clip, and ``torch.optim.AdamW`` over the same parameter groups and the same
``OptimizerParamScheduler`` as the GPU path.
"""

from __future__ import annotations

import argparse
import math
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext import linear_scaling, wesar
from megatron_ext.extensions import ExtensionConfig
from megatron_ext.parallel import allreduce_sequence_parallel_grads, grad_norm
from megatron_ext.training.forward import forward_step
from megatron_ext.training.metrics import per_layer_grad_norms
from megatron_ext.training.optimization import (
    StepResult,
    build_scheduler,
    clip_grads_by_total_norm,
    once_per_step_scales,
    torch_param_groups,
    update_lr,
)


class CpuEngine:
    """Optimizer, scheduler and one train / eval step for single-stage model chunks."""

    def __init__(self, args: argparse.Namespace, model_chunks: list[torch.nn.Module],
                 extensions: ExtensionConfig) -> None:
        if len(model_chunks) != 1:
            raise ValueError("the CPU path runs one model chunk per rank (no pipeline parallelism)")
        self.args = args
        self.model_chunks = model_chunks
        self.optimizer = torch.optim.AdamW(
            torch_param_groups(model_chunks, args, extensions), lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay,
        )
        self.scheduler = build_scheduler(args, self.optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.clipped_params = wesar.clip_parameters(self.params, extensions.wesar)
        self.step_scales = once_per_step_scales(args, model_chunks)

    def _allreduce_data_parallel_grads(self) -> None:
        """Average the gradients over the data-parallel group in one flat all-reduce."""
        if parallel_state.get_data_parallel_world_size() == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        flat /= parallel_state.get_data_parallel_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def train_step(self, data_iterator: Iterator, layer_norms: bool = False) -> StepResult:
        """Forward/backward over all micro batches, reduce, clip and update (or skip)."""
        model = self.model_chunks[0]
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_microbatches = self.args.num_microbatches
        losses = []
        with linear_scaling.once_per_step(self.step_scales, num_microbatches):
            for _ in range(num_microbatches):
                output, loss_func = forward_step(data_iterator, model)
                loss, reported = loss_func(output)
                (loss / num_microbatches).backward()
                losses.append(reported["lm loss"])
        lm_loss = float(torch.stack(losses).mean())
        if self.args.sequence_parallel:
            allreduce_sequence_parallel_grads(self.model_chunks)
        self._allreduce_data_parallel_grads()
        norm = grad_norm(self.clipped_params)
        lr = update_lr(self.optimizer)
        layers = per_layer_grad_norms(self.model_chunks) if layer_norms else {}
        if not (math.isfinite(lm_loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(lm_loss, norm, True, lr, layers)
        clip_grads_by_total_norm([p.grad for p in self.clipped_params if p.grad is not None],
                                 self.args.clip_grad, norm)
        self.optimizer.step()
        self.scheduler.step(1)
        return StepResult(lm_loss, norm, False, lr, layers)

    @torch.no_grad()
    def evaluate(self, data_iterator: Iterator, num_batches: int) -> float:
        """Mean lm loss over ``num_batches`` global batches, dropout off."""
        model = self.model_chunks[0]
        model.eval()
        losses = []
        for _ in range(num_batches * self.args.num_microbatches):
            output, loss_func = forward_step(data_iterator, model)
            losses.append(loss_func(output)[1]["lm loss"])
        model.train()
        return float(torch.stack(losses).mean())

    @property
    def completed_updates(self) -> int:
        """Optimizer updates done so far (ProRes' t); skipped steps do not count."""
        return self.scheduler.num_steps

"""One training step on the GPU path: megatron-core's production engine.

Model chunks in ``Float16Module`` (bf16/fp16) and megatron-core's
``DistributedDataParallel``; ``get_megatron_optimizer`` (distributed optimizer when asked,
WeSaR's parameter-group overrides); ``OptimizerParamScheduler``;
``get_forward_backward_func`` (no pipelining, 1F1B or interleaved); and
``finalize_model_grads`` for the DP / sequence-parallel / embedding reductions. A step
whose loss or grad norm is not finite is skipped. Without APEX and Transformer Engine,
megatron-core's per-tensor multi-tensor fallbacks are replaced by sync-free foreach ones
(:mod:`megatron_ext.training.foreach_fallbacks`) and its torch AdamW runs torch's fused
kernel (:mod:`megatron_ext.training.torch_adam`). With several micro batches per step the
weight-side scales are applied once per step (``--weight-scale-once-per-step``,
:func:`megatron_ext.linear_scaling.once_per_step`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import Float16Module, param_is_not_shared
from megatron.core.utils import get_attr_wrapped_model, log_single_rank, unwrap_model

from megatron_ext import linear_scaling, wesar
from megatron_ext.extensions import ExtensionConfig
from megatron_ext.training import foreach_fallbacks, torch_adam
from megatron_ext.training.configs import ddp_config, optimizer_config
from megatron_ext.training.forward import forward_step
from megatron_ext.training.metrics import per_layer_grad_norms
from megatron_ext.training.optimization import (
    StepResult,
    build_scheduler,
    clip_grads_by_total_norm,
    once_per_step_scales,
    update_lr,
)

logger = logging.getLogger(__name__)


def wrap_model_chunks(args: argparse.Namespace, model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Move to the GPU, cast for half precision and wrap in megatron-core's DDP."""
    config = model_chunks[0].config
    wrapped = []
    for index, chunk in enumerate(model_chunks):
        chunk.cuda(torch.cuda.current_device())
        if args.bf16 or args.fp16:
            chunk = Float16Module(config, chunk)
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config(args), module=chunk,
                                               disable_bucketing=index > 0))
    return wrapped


def _broadcast_from_last_stage(value: float) -> float:
    """The last pipeline stage's ``value`` on every stage (only it computes the loss)."""
    tensor = torch.tensor([value], dtype=torch.float32, device="cuda")
    dist.broadcast(tensor, parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return float(tensor.item())


class GpuEngine:
    """megatron-core's optimizer, scheduler and schedules around DDP-wrapped model chunks."""

    def __init__(self, args: argparse.Namespace, model_chunks: list[torch.nn.Module],
                 extensions: ExtensionConfig) -> None:
        self.args = args
        self.extensions = extensions
        foreach_fallbacks.install()
        self.model_chunks = wrap_model_chunks(args, model_chunks)
        self.step_scales = once_per_step_scales(args, self.model_chunks)
        overrides = None
        if extensions.wesar is not None:
            overrides = wesar.optimizer_overrides(extensions.wesar, args.weight_decay, lr=args.lr, min_lr=args.min_lr)
        # Leaving WeSaR gates out of the clip: the engine clips the DDP gradients itself
        # (megatron's optimizer clips every parameter) and megatron's clip is switched off.
        self.clip_outside_optimizer = extensions.wesar is not None and extensions.wesar.exclude_gates_from_clip
        opt_config = optimizer_config(args)
        if self.clip_outside_optimizer:
            opt_config.clip_grad = 0.0
        self.optimizer = get_megatron_optimizer(opt_config, self.model_chunks, config_overrides=overrides)
        if torch_adam.fuse(self.optimizer):
            log_single_rank(logger, logging.INFO, "megatron-core fell back to torch's AdamW (no APEX or Transformer "
                            "Engine): it runs torch's fused kernel")
        self.scheduler = build_scheduler(args, self.optimizer)
        self.forward_backward = get_forward_backward_func()
        config = self.model_chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [chunk.no_sync for chunk in self.model_chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if args.overlap_grad_reduce:
            grad_sync = [chunk.start_grad_sync for chunk in self.model_chunks]
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
        # --overlap-param-gather: DDP's forward pre-hooks gather the parameters. A
        # config.param_sync_func belongs with DDP's align_param_gather (Megatron-LM's
        # --align-param-gather), which this driver does not offer.

    def _iterators(self, data_iterator: Iterator) -> Iterator | list[Iterator]:
        """One iterator per chunk for the interleaved schedule.

        Only a chunk that is the model's first stage (tokens) or last stage (labels)
        draws micro batches from the stream; every other virtual stage gets ``None``
        and takes its input from the previous stage. With one drawing chunk per rank
        the stream advances exactly once per micro batch.
        """
        if len(self.model_chunks) == 1:
            return data_iterator
        return [
            data_iterator
            if get_attr_wrapped_model(chunk, "pre_process") or get_attr_wrapped_model(chunk, "post_process")
            else itertools.repeat(None)
            for chunk in self.model_chunks
        ]

    def _run(self, data_iterator: Iterator, forward_only: bool) -> float:
        """One global batch through megatron-core's schedule; its mean lm loss on every rank."""
        num_microbatches = self.args.num_microbatches
        scaling = (contextlib.nullcontext() if forward_only
                   else linear_scaling.once_per_step(self.step_scales, num_microbatches))
        with scaling:
            losses = self.forward_backward(
                forward_step_func=forward_step, data_iterator=self._iterators(data_iterator),
                model=self.model_chunks if len(self.model_chunks) > 1 else self.model_chunks[0],
                num_microbatches=num_microbatches, seq_length=self.args.seq_length,
                micro_batch_size=self.args.micro_batch_size, forward_only=forward_only,
            )
        loss = float("nan")
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            loss = float(torch.stack([item["lm loss"] for item in losses]).mean())
        return _broadcast_from_last_stage(loss)

    def _clip_model_grads(self) -> float:
        """Global grad norm of the clipped parameters' DDP gradients, then clip them.

        Used when WeSaR gates are left out of the clip (not with the distributed
        optimizer, whose reduced gradients are sharded; arguments reject that). The
        norm is unscaled by the fp16 loss scale.
        """
        params = [p for chunk in self.model_chunks for p in chunk.parameters() if p.requires_grad]
        params = wesar.clip_parameters(params, self.extensions.wesar)
        squares = torch.zeros((), dtype=torch.float32, device="cuda")
        for p in params:
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                squares += p.main_grad.float().pow(2).sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        norm = float(squares.sqrt()) / float(self.optimizer.get_loss_scale())
        clip_grads_by_total_norm([p.main_grad for p in params], self.args.clip_grad, norm)
        return norm

    def _scale_can_drop(self) -> bool:
        """Whether fp16's dynamic loss scale is still above its floor (after this step's update)."""
        config = self.optimizer.config
        dynamic = self.args.fp16 and config.loss_scale is None
        return dynamic and float(self.optimizer.get_loss_scale()) > config.min_loss_scale

    def train_step(self, data_iterator: Iterator, layer_norms: bool = False) -> StepResult:
        """Forward/backward (pipelined), then an optimizer update unless non-finite."""
        for chunk in self.model_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lm_loss = self._run(data_iterator, forward_only=False)
        wesar.allreduce_tied_gate_grads(self.model_chunks)
        lr = update_lr(self.optimizer)
        layers = {}
        if layer_norms and not self.args.use_distributed_optimizer:
            # Before the clip, as on the CPU path; main_grad holds fp16's scaled gradients.
            scale = float(self.optimizer.get_loss_scale())
            layers = {layer: norm / scale for layer, norm in
                      per_layer_grad_norms(unwrap_model(self.model_chunks)).items()}
        clipped_norm = self._clip_model_grads() if self.clip_outside_optimizer else None
        found_inf = self.optimizer.prepare_grads()
        if found_inf or not math.isfinite(lm_loss):
            return StepResult(lm_loss, float("nan"), True, lr, layers,
                              loss_scale_overflow=bool(found_inf) and math.isfinite(lm_loss) and self._scale_can_drop())
        if clipped_norm is not None:
            grad_norm = clipped_norm
        elif self.args.clip_grad > 0:
            grad_norm = float(self.optimizer.clip_grad_norm(self.args.clip_grad))
        else:
            grad_norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            return StepResult(lm_loss, grad_norm, True, lr, layers)
        if not self.optimizer.step_with_ready_grads():
            return StepResult(lm_loss, grad_norm, True, lr, layers)
        self.scheduler.step(1)
        return StepResult(lm_loss, grad_norm, False, lr, layers)

    @torch.no_grad()
    def evaluate(self, data_iterator: Iterator, num_batches: int) -> float:
        """Mean lm loss over ``num_batches`` global batches (forward-only schedule)."""
        for chunk in self.model_chunks:
            chunk.eval()
        losses = [self._run(data_iterator, forward_only=True) for _ in range(num_batches)]
        for chunk in self.model_chunks:
            chunk.train()
        return sum(losses) / len(losses)

    @property
    def completed_updates(self) -> int:
        """Optimizer updates done so far (ProRes' t); skipped steps do not count."""
        return self.scheduler.num_steps

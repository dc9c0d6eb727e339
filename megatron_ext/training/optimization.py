"""Pieces of the optimizer set-up shared by both engines: parameter groups (WeSaR's or
megatron-core's standard rule), the learning-rate scheduler, the gradient clip, the
weight-side scales applied once per step, the engine interface and the step outcome."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Union

import torch
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, get_canonical_lr_for_logging
from megatron.core.utils import log_single_rank

from megatron_ext import linear_scaling, wesar
from megatron_ext.extensions import ExtensionConfig

logger = logging.getLogger(__name__)

Optimizer = Union[torch.optim.Optimizer, MegatronOptimizer]


@dataclass
class StepResult:
    """What one training iteration did; ``lr`` is the learning rate its update used.

    ``loss_scale_overflow``: a skipped fp16 step whose gradients overflowed while the
    dynamic loss scale could still come down (it halves; routine at the start of fp16).
    """

    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    layer_grad_norms: dict[int, float] = field(default_factory=dict)
    loss_scale_overflow: bool = False


class Engine(Protocol):
    """What the loop and the checkpoints need of an engine (CPU or GPU)."""

    model_chunks: list[torch.nn.Module]
    optimizer: Optimizer
    scheduler: OptimizerParamScheduler

    def train_step(self, data_iterator: Iterator, layer_norms: bool = False) -> StepResult:
        """One global batch: forward, backward, reductions, clip and update (or skip)."""

    def evaluate(self, data_iterator: Iterator, num_batches: int) -> float:
        """Mean lm loss over ``num_batches`` global batches, dropout off."""

    @property
    def completed_updates(self) -> int:
        """Optimizer updates done so far (ProRes' t); skipped steps do not count."""


def torch_param_groups(model_chunks: list[torch.nn.Module], args: argparse.Namespace,
                       extensions: ExtensionConfig) -> list[dict]:
    """Parameter groups for a torch optimizer, carrying what megatron's scheduler reads.

    ``max_lr``/``min_lr`` carry the group's LR multiplier (WeSaR gates) and
    ``start_wd``/``end_wd`` its weight decay, so :class:`OptimizerParamScheduler` sets
    every group's LR and decay exactly as it does for megatron-core's optimizer;
    ``default_config`` marks the groups on the base schedule, as megatron-core does.
    """
    out = []
    for group in wesar.param_groups(model_chunks, args.weight_decay, extensions.wesar):
        lr_mult = group.get("lr_mult", 1.0)
        out.append(dict(params=list(group["params"]), name=group.get("name", ""), default_config=lr_mult == 1.0,
                        weight_decay=group["weight_decay"], start_wd=group["weight_decay"],
                        end_wd=group["weight_decay"], max_lr=args.lr * lr_mult, min_lr=args.min_lr * lr_mult))
    return out


def build_scheduler(args: argparse.Namespace,
                    optimizer: Optimizer) -> OptimizerParamScheduler:
    """megatron-core's LR/WD scheduler, in optimizer iterations (one step per update)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        # checkpoint_checks.check_scheduler has rejected a difference the flags do not settle
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=args.lr_wsd_decay_iters,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
    )


GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd", "lr_mult", "wd_mult")


def group_schedules(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's own schedule values (its LR bounds with their multiplier,
    its weight decay), which an optimizer's ``load_state_dict`` replaces by the saved ones."""
    return [{k: group[k] for k in GROUP_SCHEDULE_KEYS if k in group} for group in optimizer.param_groups]


def restore_group_schedules(optimizer: Optimizer, schedules: list[dict[str, Any]]) -> None:
    """Put back the values of :func:`group_schedules`, group by group."""
    for group, schedule in zip(optimizer.param_groups, schedules, strict=True):
        group.update(schedule)


def update_lr(optimizer: Optimizer) -> float:
    """The base-schedule learning rate the next optimizer update uses.

    The scheduler sets it after each update (and at construction), so read before the
    update and the scheduler step it is the LR that update applies. Groups restored from
    a checkpoint written without ``default_config`` fall back to the first group.
    """
    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(optimizer.param_groups[0]["lr"] if lr is None else lr)


def clip_grads_by_total_norm(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale ``grads`` in place by ``max_norm / (total_norm + 1e-6)`` when that is below 1
    (megatron-core's clip rule). ``max_norm`` 0 (``--clip-grad 0``) or a non-finite
    ``total_norm`` leaves them unchanged."""
    coefficient = max_norm / (total_norm + 1e-6)
    if max_norm > 0 and math.isfinite(total_norm) and coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)


def once_per_step_scales(args: argparse.Namespace,
                         model_chunks: Iterable[torch.nn.Module]) -> list[linear_scaling.StepScale]:
    """The weight-side scales the engine applies once per step (``--weight-scale-once-per-step``
    with more than one micro batch per step; none otherwise), logged with their number."""
    if not (args.weight_scale_once_per_step and args.num_microbatches > 1):
        return []
    scales = linear_scaling.step_scales(model_chunks)
    if scales:
        log_single_rank(logger, logging.INFO, "%d weight-side scales (WeSaR gates, NormFormer head scales) "
                        "applied once per step of %d micro batches", len(scales), args.num_microbatches)
    return scales

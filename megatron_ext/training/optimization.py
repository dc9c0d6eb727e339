"""Pieces of the optimizer set-up shared by both engines: parameter groups (WeSaR's or
megatron-core's standard rule), the learning-rate scheduler and the step outcome."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext import wesar
from megatron_ext.extensions import ExtensionConfig


@dataclass
class StepResult:
    """What one training iteration did."""

    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    layer_grad_norms: dict[int, float] = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def torch_param_groups(model_chunks: list[torch.nn.Module], args: argparse.Namespace,
                       extensions: ExtensionConfig) -> list[dict]:
    """Parameter groups for a torch optimizer, carrying what megatron's scheduler reads.

    ``max_lr``/``min_lr`` carry the group's LR multiplier (WeSaR gates) and
    ``start_wd``/``end_wd`` its weight decay, so :class:`OptimizerParamScheduler` sets
    every group's LR and decay exactly as it does for megatron-core's optimizer.
    """
    out = []
    groups = wesar.param_groups(model_chunks, args.weight_decay, extensions.wesar)
    for group in groups:
        lr_mult = group.get("lr_mult", 1.0)
        out.append(dict(params=list(group["params"]), name=group.get("name", ""), lr_mult=lr_mult,
                        weight_decay=group["weight_decay"], start_wd=group["weight_decay"],
                        end_wd=group["weight_decay"], max_lr=args.lr * lr_mult, min_lr=args.min_lr * lr_mult))
    return out


def build_scheduler(args: argparse.Namespace, optimizer) -> OptimizerParamScheduler:
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
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=args.lr_wsd_decay_iters,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
    )


def current_lr(optimizer) -> float:
    """The learning rate of the first group with multiplier 1 (what Megatron-LM logs)."""
    groups = optimizer.param_groups
    for group in groups:
        if group.get("lr_mult", 1.0) == 1.0:
            return float(group["lr"])
    return float(groups[0]["lr"]) if groups else 0.0

"""The forward step and loss shared by the GPU schedules and the CPU micro-batch loop.

Megatron-LM's contract: ``forward_step(data_iterator, model) -> (output, loss_func)``
where ``loss_func(output) -> (loss, {"lm loss": loss averaged over data-parallel ranks})``.
The loss is the mean next-token cross entropy over the unmasked tokens of the micro batch.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext.training.data import Batch

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def masked_mean_loss(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum(loss * mask) / sum(mask)``, and its data-parallel average for logging."""
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1.0)
    reported = loss.detach().clone()
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(reported, group=parallel_state.get_data_parallel_group())
        reported /= parallel_state.get_data_parallel_world_size()
    return loss, {"lm loss": reported}


def forward_step(data_iterator: Iterator[Optional[Batch]], model: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]:
    """Run ``model`` on the next micro batch; labels make GPTModel return per-token losses."""
    batch = next(data_iterator)
    if batch is None:  # a middle pipeline stage: input comes from the previous stage
        return model(None, None, None), partial(masked_mean_loss, None)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(masked_mean_loss, batch["loss_mask"])

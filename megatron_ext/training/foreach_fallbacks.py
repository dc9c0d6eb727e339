"""Sync-free stand-ins for megatron-core's multi-tensor fallbacks (no APEX, no Transformer Engine).

Without APEX or Transformer Engine, megatron-core's optimizer and gradient clipping bind
``megatron.core.utils.local_multi_tensor_l2_norm`` and ``local_multi_tensor_scale`` in
place of the fused ``multi_tensor_l2norm`` / ``multi_tensor_scale``. The l2 norm builds a
host tensor from one device norm per gradient, a device-to-host copy and synchronisation
per parameter tensor; the scale launches a multiply and a copy per tensor. On an H200
(docs/RESULTS.md, bench/profile_step.py) that was 292 synchronisations per 1.3B iteration
and most of its 49 ms outside the forward-backward, and every parameter a method adds
(WeSaR's gates, NormFormer's norms) added one more synchronisation.

:func:`install` rebinds those two names, only where megatron-core bound its own fallback,
to :func:`foreach_l2_norm` and :func:`foreach_scale`: the same results from
``torch._foreach_norm`` / ``torch._foreach_mul_`` / ``torch._foreach_copy_`` (a few
multi-tensor kernels, no synchronisation; megatron-core's clipping still reads the total
norm once). With APEX or Transformer Engine installed (NVIDIA's container) nothing changes.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.optimizer as megatron_optimizer
import torch
from megatron.core import utils as core_utils
from megatron.core.utils import log_single_rank

logger = logging.getLogger(__name__)


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: Sequence[Sequence[torch.Tensor]],
                    per_tensor: bool, *args) -> tuple[torch.Tensor, None]:
    """``||concat(tensor_lists[0])||_2`` as a one-element fp32 tensor on the tensors' device
    (the interface of ``amp_C.multi_tensor_l2norm`` without per-tensor norms)."""
    norms = torch._foreach_norm(list(tensor_lists[0]))
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: Sequence[Sequence[torch.Tensor]],
                  scale: float) -> None:
    """``dst = src * scale`` for ``src, dst`` in ``zip(*tensor_lists)`` (``amp_C.multi_tensor_scale``);
    in place where the two lists are the same tensors, a cast where their dtypes differ."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if all(s is d for s, d in zip(src, dst)):
        if scale != 1.0:
            torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


_REPLACEMENTS = (
    (clip_grads, "l2_norm_impl", core_utils.local_multi_tensor_l2_norm, foreach_l2_norm),
    (clip_grads, "multi_tensor_scale_impl", core_utils.local_multi_tensor_scale, foreach_scale),
    (megatron_optimizer, "multi_tensor_scale_impl", core_utils.local_multi_tensor_scale, foreach_scale),
)


def install(replacements: Optional[Sequence[tuple]] = None) -> list[str]:
    """Rebind megatron-core's local multi-tensor fallbacks to the foreach versions; the names
    rebound (none with APEX or Transformer Engine, or when already installed)."""
    done = []
    for module, name, fallback, replacement in _REPLACEMENTS if replacements is None else replacements:
        if getattr(module, name, None) is fallback:
            setattr(module, name, replacement)
            done.append(f"{module.__name__}.{name}")
    if done:
        log_single_rank(logger, logging.INFO, "megatron-core runs without APEX and Transformer Engine: %s now "
                        "use torch foreach kernels (no synchronisation per parameter)", ", ".join(done))
    return done

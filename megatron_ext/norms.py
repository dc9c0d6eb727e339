"""Torch LayerNorm / RMSNorm usable under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel``; without Apex or
Transformer Engine there is then no norm for it in the local spec. Under sequence
parallelism every rank normalises its own slice of the sequence, so a norm's gain and
bias gradients are partial sums over tokens: their parameters are tagged
``sequence_parallel = True`` and all-reduced over the tensor-parallel group, by
megatron-core's ``finalize_model_grads`` on the GPU path and by
:func:`megatron_ext.parallel.allreduce_sequence_parallel_grads` on the CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class TorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` from ``config.normalization``."""

    def __new__(
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused
    ) -> torch.nn.Module:
        if config.normalization not in _NORMS:
            raise ValueError(
                f"normalization must be one of {sorted(_NORMS)}, got {config.normalization!r}"
            )
        norm = _NORMS[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def norm_last_dim(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: Optional[float], rms: bool
) -> torch.Tensor:
    """torch's ``layer_norm`` (``rms=False``) or ``rms_norm`` over the last dimension of ``x``."""
    shape = (x.shape[-1],)
    if rms:
        return torch.nn.functional.rms_norm(x, shape, weight, eps)
    return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)

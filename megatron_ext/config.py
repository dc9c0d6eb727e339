"""megatron-core's ``TransformerConfig`` with megatron-ext's own kernel switch."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class ExtTransformerConfig(TransformerConfig):
    """``TransformerConfig`` plus the switches of megatron-ext's own kernels.

    A plain ``TransformerConfig`` works everywhere and means every switch here is off.
    """

    weight_scale_fusion: bool = False
    """Multiply per-feature scales into linear weights (WeSaR's gates, NormFormer's head
    scale) with one ``torch.compile``'d kernel each way: the scaled weight forward, the
    weight's and the scale's gradients together backward (``--weight-scale-fusion``)."""


def weight_scale_fusion(config: TransformerConfig) -> bool:
    """Whether ``config`` asks for :attr:`ExtTransformerConfig.weight_scale_fusion`."""
    return isinstance(config, ExtTransformerConfig) and config.weight_scale_fusion

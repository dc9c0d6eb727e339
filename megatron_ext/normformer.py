"""NormFormer (Shleifer, Weston, Ott, arXiv 2110.09456): extra normalisation in a Pre-LN block.

Head scale before the output projection, a norm on the attention output, a norm after
the FFN activation over the full ``ffn_hidden_size`` (exact under tensor parallelism)
and an optional learned scale on the FFN skip path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NormFormerConfig:
    """NormFormer parts to switch on (METHODS.md section 3)."""

    head_scale: bool = True
    post_attention_norm: bool = True
    ffn_norm: bool = True
    residual_scale: bool = False

"""A core attention for megatron-core's local spec that runs on CPU and GPU alike.

megatron-core's local ``DotProductAttention`` allocates its score buffer on
``torch.cuda.current_device()``; this module computes the same function with
``torch.nn.functional.scaled_dot_product_attention`` over megatron's
``[s, b, heads, head_dim]`` layout (flash / memory-efficient kernels on a GPU).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * scale + causal mask) v per head; drop-in for ``DotProductAttention``.

    Inputs: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (``ng`` query groups,
    GQA when ``ng < np``). Output: ``[sq, b, np * hn]``. For a causal mask type the
    causal mask is implied and ``attention_mask`` is ignored (as megatron's fused
    causal softmax does); otherwise a boolean ``attention_mask`` marks masked-out
    positions with True, megatron's convention.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if softmax_scale is None:
            softmax_scale = getattr(config, "softmax_scale", None)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        tp_size = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None if causal or attention_mask is None else ~attention_mask
        sq, b = query.shape[:2]
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.heads_per_partition != self.groups_per_partition:
            repeat = self.heads_per_partition // self.groups_per_partition
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p, q):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _dropout_rng(self, dropout_p: float, like: torch.Tensor):
        """Megatron's tensor-parallel RNG fork for attention dropout on a GPU."""
        if dropout_p > 0.0 and like.is_cuda and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

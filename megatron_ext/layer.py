"""A megatron-core ``TransformerLayer`` with hooks on its two residual branches.

The methods plug into the layer through three optional submodules of
:class:`ExtTransformerLayerSubmodules`, each built with megatron-core's ``build_module``:

* ``branch_scale``: called as ``scale(output, bias) -> (output, bias)`` on both branch
  outputs before the residual add (ProRes' a(l, t)); built with ``layer_number``.
* ``post_attention_norm``: a norm on the attention branch output after the output
  projection and its bias, before dropout and the residual add (NormFormer).
* ``mlp_skip_scale``: a module applied to the skip path of the MLP sublayer
  (NormFormer's residual scale).

With all three unset the layer computes exactly what ``TransformerLayer`` computes:
the bias-dropout-add callables are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Union

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

SubmoduleSpec = Optional[Union[ModuleSpec, type]]


@dataclass
class ExtTransformerLayerSubmodules(TransformerLayerSubmodules):
    """``TransformerLayerSubmodules`` plus the residual-branch hooks (``None`` = off)."""

    branch_scale: SubmoduleSpec = None
    post_attention_norm: SubmoduleSpec = None
    mlp_skip_scale: SubmoduleSpec = None

    @classmethod
    def from_base(cls, base: TransformerLayerSubmodules) -> "ExtTransformerLayerSubmodules":
        """Copy the fields of megatron-core's submodules, hooks off."""
        return cls(**{f.name: getattr(base, f.name) for f in fields(TransformerLayerSubmodules)})


class BranchBiasDropoutAdd:
    """``residual' + dropout(scale(norm(out + bias)))`` around megatron's bias-dropout-add.

    ``bda_factory(training, fused)`` is megatron-core's ``get_bias_dropout_add``; the
    layer calls this object the same way, so fusion and dropout stay megatron's.
    """

    def __init__(
        self,
        bda_factory: Callable,
        branch_norm: Optional[torch.nn.Module] = None,
        branch_scale: Optional[torch.nn.Module] = None,
        skip_scale: Optional[torch.nn.Module] = None,
    ) -> None:
        self.bda_factory = bda_factory
        self.branch_norm = branch_norm
        self.branch_scale = branch_scale
        self.skip_scale = skip_scale

    def __call__(self, training: bool, fused: bool) -> Callable:
        bda = self.bda_factory(training, fused)

        def bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            out, bias = x_with_bias
            if self.branch_norm is not None:
                out = self.branch_norm(out if bias is None else out + bias)
                bias = None
            if self.branch_scale is not None:
                out, bias = self.branch_scale(out, bias)
            if self.skip_scale is not None:
                residual = self.skip_scale(residual)
            return bda((out, bias), residual, prob)

        return bias_dropout_add


class ExtTransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose residual branches carry the optional hooks above."""

    def __init__(self, config, submodules: ExtTransformerLayerSubmodules, *args, **kwargs) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        norm_kwargs = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.branch_scale = self._build(submodules.branch_scale, config=config, layer_number=self.layer_number)
        self.post_attention_norm = self._build(submodules.post_attention_norm, **norm_kwargs)
        self.mlp_skip_scale = self._build(submodules.mlp_skip_scale, config=config)
        if self.branch_scale is not None or self.post_attention_norm is not None:
            self.self_attn_bda = BranchBiasDropoutAdd(
                self.self_attn_bda, self.post_attention_norm, self.branch_scale
            )
        if self.branch_scale is not None or self.mlp_skip_scale is not None:
            self.mlp_bda = BranchBiasDropoutAdd(
                self.mlp_bda, None, self.branch_scale, self.mlp_skip_scale
            )

    @staticmethod
    def _build(spec: SubmoduleSpec, **kwargs) -> Optional[torch.nn.Module]:
        return None if spec is None else build_module(spec, **kwargs)

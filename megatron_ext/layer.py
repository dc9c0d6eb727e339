"""A megatron-core ``TransformerLayer`` with hooks on its two residual branches.

The methods plug into the layer through three optional submodules of
:class:`ExtTransformerLayerSubmodules`, each built with megatron-core's ``build_module``:

* ``branch_scale``: a module whose ``scale_factor()`` multiplies both branch outputs
  (bias included) before dropout and the residual add (ProRes' a(l, t)); built with
  ``layer_number``.
* ``post_attention_norm``: a norm on the attention branch output after the output
  projection and its bias, before dropout and the residual add (NormFormer); a torch
  norm is compiled into the fused bias-dropout-add too.
* ``mlp_skip_scale``: a module whose ``scale_factor()`` multiplies the skip path of the
  MLP sublayer (NormFormer's residual scale).

Both scale factors go INTO megatron's bias-dropout-add: with ``bias_dropout_fusion``
(``--bias-dropout-fusion``) the layer's add is one kernel compiled with megatron-core's
``jit_fuser``, scales included, so they cost no memory traffic of their own. With all
three unset the layer computes exactly what ``TransformerLayer`` computes: the
bias-dropout-add callables are left untouched.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, fields
from typing import Callable, Optional, Union

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.jit import jit_fuser
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_ext.norms import norm_last_dim
from megatron_ext.param_gather import gathered, register_after

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


def scaled_bias_dropout_add(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    branch_scale: Optional[torch.Tensor],
    skip_scale: Optional[torch.Tensor],
    prob: float,
    training: bool,
) -> torch.Tensor:
    """``skip_scale * residual + dropout(branch_scale * (x + bias))``; ``None`` terms are left out.

    megatron's bias-dropout-add with the two scales of the residual branches; the result
    has ``x``'s dtype (a half-precision ``x`` is not promoted by a 0-d fp32 scale).
    """
    if bias is not None:
        x = x + bias
    if branch_scale is not None:
        x = x * branch_scale
    if skip_scale is not None:
        residual = residual * skip_scale
    return residual.to(x.dtype) + torch.nn.functional.dropout(x, p=prob, training=training)


def normed_scaled_bias_dropout_add(
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: Optional[torch.Tensor],
    eps: Optional[float],
    rms: bool,
    branch_scale: Optional[torch.Tensor],
    skip_scale: Optional[torch.Tensor],
    prob: float,
    training: bool,
) -> torch.Tensor:
    """:func:`scaled_bias_dropout_add` of ``norm(x + bias)``, torch's LayerNorm (``rms=False``) or RMSNorm."""
    normed = norm_last_dim(x if bias is None else x + bias, norm_weight, norm_bias, eps, rms)
    return scaled_bias_dropout_add(normed, None, residual, branch_scale, skip_scale, prob, training)


fused_scaled_bias_dropout_add = jit_fuser(scaled_bias_dropout_add)
fused_normed_scaled_bias_dropout_add = jit_fuser(normed_scaled_bias_dropout_add)


class BranchBiasDropoutAdd:
    """``skip * residual + dropout(scale * norm(out + bias))`` in place of megatron's bias-dropout-add.

    The layer calls this object as it calls megatron's ``get_bias_dropout_add(training,
    fused)``: ``fused`` selects :data:`fused_scaled_bias_dropout_add` (one compiled
    kernel) over the eager :func:`scaled_bias_dropout_add`; a torch LayerNorm / RMSNorm
    on the branch is compiled into the same kernel
    (:data:`fused_normed_scaled_bias_dropout_add`), any other norm (TE's) runs before it.
    """

    def __init__(
        self,
        branch_norm: Optional[torch.nn.Module] = None,
        branch_scale: Optional[torch.nn.Module] = None,
        skip_scale: Optional[torch.nn.Module] = None,
    ) -> None:
        self.branch_norm = branch_norm
        self.branch_scale = branch_scale
        self.skip_scale = skip_scale

    def __call__(self, training: bool, fused: bool) -> Callable:
        add = fused_scaled_bias_dropout_add if fused else scaled_bias_dropout_add

        def bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            out, bias = x_with_bias
            scales = (_factor(self.branch_scale), _factor(self.skip_scale), prob, training)
            norm = self.branch_norm
            if fused and isinstance(norm, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                norm_bias = getattr(norm, "bias", None)
                rms = isinstance(norm, torch.nn.RMSNorm)
                gathered(norm)  # its weights go to the kernel, not through its forward
                return fused_normed_scaled_bias_dropout_add(
                    out, bias, residual, norm.weight, norm_bias, norm.eps, rms, *scales
                )
            if norm is not None:
                out = norm(out if bias is None else out + bias)
                bias = None
            return add(out, bias, residual, *scales)

        return bias_dropout_add


def _factor(scale: Optional[torch.nn.Module]) -> Optional[torch.Tensor]:
    return None if scale is None else gathered(scale).scale_factor()


class _UnknownMLPTypeFilter(logging.Filter):
    """Drops megatron's "Unknown MLP type" warning (see :func:`_building_mlp_subclass`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


@contextlib.contextmanager
def _building_mlp_subclass(submodules: TransformerLayerSubmodules):
    """megatron-core's ``TransformerLayer`` hands its TP group only to an MLP spec whose
    module is exactly ``MLP`` and warns, once per layer, for any other class. A subclass of
    ``MLP`` (NormFormer's FFN-norm MLP) then takes megatron's default TP group, the same one
    for the default process groups this project uses, so the warning is dropped for it."""
    mlp = submodules.mlp
    module = mlp.module if isinstance(mlp, ModuleSpec) else None
    if not (isinstance(module, type) and issubclass(module, MLP) and module is not MLP):
        yield
        return
    layer_logger, quiet = logging.getLogger(TransformerLayer.__module__), _UnknownMLPTypeFilter()
    layer_logger.addFilter(quiet)
    try:
        yield
    finally:
        layer_logger.removeFilter(quiet)


class ExtTransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose residual branches carry the optional hooks above."""

    def __init__(self, config, submodules: ExtTransformerLayerSubmodules, *args, **kwargs) -> None:
        with _building_mlp_subclass(submodules):
            super().__init__(config, submodules, *args, **kwargs)
        norm_kwargs = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.branch_scale = self._build(submodules.branch_scale, config=config, layer_number=self.layer_number)
        self.post_attention_norm = self._build(submodules.post_attention_norm, **norm_kwargs)
        self.mlp_skip_scale = self._build(submodules.mlp_skip_scale, config=config)
        # the attention branch's hooks act before the MLP sublayer: registered there (forward order)
        register_after(self, "post_attention_norm", "self_attention")
        register_after(self, "branch_scale", "self_attention")
        hooked = (self.branch_scale, self.post_attention_norm, self.mlp_skip_scale)
        if any(hook is not None for hook in hooked):
            self._check_bias_dropout_add()
        if self.branch_scale is not None or self.post_attention_norm is not None:
            self.self_attn_bda = BranchBiasDropoutAdd(self.post_attention_norm, self.branch_scale)
        if self.branch_scale is not None or self.mlp_skip_scale is not None:
            self.mlp_bda = BranchBiasDropoutAdd(None, self.branch_scale, self.mlp_skip_scale)

    def _check_bias_dropout_add(self) -> None:
        for name in ("self_attn_bda", "mlp_bda"):
            if getattr(self, name) is not get_bias_dropout_add:
                raise NotImplementedError(
                    f"the residual-branch hooks replace megatron's get_bias_dropout_add; this layer "
                    f"spec's {name} is {getattr(self, name)!r}"
                )

    @staticmethod
    def _build(spec: SubmoduleSpec, **kwargs) -> Optional[torch.nn.Module]:
        return None if spec is None else build_module(spec, **kwargs)

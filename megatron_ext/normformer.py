"""NormFormer (Shleifer, Weston, Ott, arXiv 2110.09456): extra normalisation in a Pre-LN block.

With every part on, a layer computes (METHODS.md section 3)::

    h = x + PostNorm(W^O(HeadScale(Attn(Norm(x)))))
    y = lambda * h + fc2(FFNNorm(act(fc1(Norm(h)))))

* Head scale (paper section 3): one learned scalar per attention head, initialised to 1,
  multiplying that head's output BEFORE the output projection W^O (the paper's form;
  fairseq's ``--scale-heads`` applies it after W^O). It is folded into W^O's columns,
  ``W^O diag(s)``, where that is cheaper (:class:`FoldedHeadScaleMixin`). Under tensor
  parallelism the vector is partitioned with the heads.
* Post-attention norm: the model's norm (LayerNorm or RMSNorm) on the attention output
  after W^O and its bias, before dropout and the residual add.
* FFN norm: the model's norm after fc1's activation (after the gated product under
  SwiGLU), before fc2, over the FULL ``ffn_hidden_size``: under tensor parallelism the
  per-token statistics are all-reduced over the TP group, so every TP size computes the
  same model.
* Residual scale ``lambda`` (off by default): a learned per-channel vector, initialised
  to 1, on the FFN sublayer's skip path.

The head scale wraps whatever linear_proj class the layer spec holds (megatron's,
Transformer Engine's, or WeSaR's gated linear), the FFN norm megatron-core's dense MLP
class; the other two parts use the hooks of :class:`~megatron_ext.layer.ExtTransformerLayer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.jit import jit_fuser
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import divide

from megatron_ext.config import weight_scale_fusion
from megatron_ext.linear_scaling import StepScale, scale_on_weight, scale_weight
from megatron_ext.norms import TorchNorm, norm_last_dim
from megatron_ext.param_gather import gathered, register_after

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


@dataclass(frozen=True)
class NormFormerConfig:
    """NormFormer parts to switch on (METHODS.md section 3)."""

    head_scale: bool = True
    post_attention_norm: bool = True
    ffn_norm: bool = True
    residual_scale: bool = False

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, bool):
                raise TypeError(f"NormFormerConfig.{field.name} must be a bool, got {value!r}")


def _param_device(config: TransformerConfig) -> torch.device:
    """Where megatron-core's own layers put new parameters for ``config``."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _tp_sharded_state_dict(state: dict, prefix: str, sharded_offsets: tuple, metadata) -> dict:
    """The tensors of ``state`` as checkpoint tensors sharded over TP along dim 0."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    return make_sharded_tensors_for_checkpoint(
        state, prefix, {name: 0 for name in state}, sharded_offsets,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_cp_group=metadata["dp_cp_group"],
    )


def _replace_sharded(sharded: dict, prefix: str, own: dict) -> dict:
    """``sharded`` with the entries under ``prefix`` replaced by ``own``."""
    kept = {key: value for key, value in sharded.items() if not key.startswith(prefix)}
    kept.update(own)
    return kept


# ---------------------------------------------------------------------------------------
# FFN norm: LayerNorm / RMSNorm over a width sharded across the tensor-parallel group.
# ---------------------------------------------------------------------------------------


def _sum_over_group(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _normalized(x32: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor) -> torch.Tensor:
    centred = x32 if mean is None else x32 - mean.unsqueeze(-1)
    return centred * rstd.unsqueeze(-1)


def _statistics(sums: torch.Tensor, width: int, eps: float,
                rms: bool) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(mean, or None for RMSNorm; rstd) per token from the full-width sums of :func:`_moments`."""
    moments = sums / width
    if rms:
        return None, torch.rsqrt(moments[0] + eps)
    mean = moments[0]
    return mean, torch.rsqrt((moments[1] - mean.square()).clamp_min(0.0) + eps)


def _moments(x: torch.Tensor, rms: bool) -> torch.Tensor:
    """Per-token sums over this rank's slice of the width, in at least fp32, stacked:
    ``[sum x^2]`` (RMSNorm) or ``[sum x, sum x^2]`` (LayerNorm)."""
    x32 = _at_least_fp32(x)
    squares = x32.square().sum(-1)
    return squares.unsqueeze(0) if rms else torch.stack((x32.sum(-1), squares))


def _normalize_affine(x: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y * weight + bias`` with ``y = (x - mean) * rstd``, in at least fp32, in ``x``'s dtype."""
    out = _normalized(_at_least_fp32(x), mean, rstd) * weight
    return (out if bias is None else out + bias).to(x.dtype)


def _grad_sums(grad: torch.Tensor, x: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor,
               weight: torch.Tensor) -> torch.Tensor:
    """Per-token sums over this rank's slice for the backward, ``g = grad * weight``:
    ``[sum g y]`` (RMSNorm, ``mean`` None) or ``[sum g, sum g y]`` (LayerNorm)."""
    g = _at_least_fp32(grad) * weight
    gy = (g * _normalized(_at_least_fp32(x), mean, rstd)).sum(-1)
    return gy.unsqueeze(0) if mean is None else torch.stack((g.sum(-1), gy))


def _grads(grad: torch.Tensor, x: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor,
           weight: torch.Tensor, means: torch.Tensor,
           has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(d x, d weight, d bias or None): ``dx = rstd (g - mean(g) - y mean(g y))`` with the
    means over the full width (``means``, no ``mean(g)`` for RMSNorm), ``d weight`` and
    ``d bias`` the sums over tokens of ``grad * y`` and ``grad``."""
    grad32 = _at_least_fp32(grad)
    y = _normalized(_at_least_fp32(x), mean, rstd)
    g = grad32 * weight
    centred = g if mean is None else g - means[0].unsqueeze(-1)
    dx = rstd.unsqueeze(-1) * (centred - y * means[-1].unsqueeze(-1))
    tokens = tuple(range(grad.dim() - 1))
    dbias = grad32.sum(tokens).to(weight.dtype) if has_bias else None
    return dx.to(x.dtype), (grad32 * y).sum(tokens).to(weight.dtype), dbias


class _NormKernels(NamedTuple):
    """The functions of :class:`_ShardedWidthNorm`, two on each side of its all-reduce."""

    moments: Callable
    normalize_affine: Callable
    grad_sums: Callable
    grads: Callable


_EAGER_KERNELS = _NormKernels(_moments, _normalize_affine, _grad_sums, _grads)
_COMPILED_KERNELS = _NormKernels(*(jit_fuser(kernel) for kernel in _EAGER_KERNELS))


class _ShardedWidthNorm(torch.autograd.Function):
    """``y * weight + bias``, ``y = (x - mean) * rstd`` (LayerNorm) or ``x * rstd`` (RMSNorm),
    over the full width of an ``x`` whose last dimension is sharded over ``group``.

    The per-token moments over the full ``width`` come from ONE all-reduce over ``group``
    (of the stacked sum and sum of squares for LayerNorm, of the sum of squares for
    RMSNorm); so does the backward, with ``g = grad * weight``::

        LayerNorm: dx = rstd * (g - mean(g) - y * mean(g * y))
        RMSNorm:   dx = rstd * (g - y * mean(g * y))

    with the means over the full width, all in fp32 (or the input's wider dtype). The
    gain and bias are this rank's slices; their gradients are sums over tokens. Each side
    of the all-reduce is one function (:class:`_NormKernels`), ``torch.compile``'d into
    its own kernels when ``fused``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], width: int, eps: float,
                rms: bool, group, fused: bool) -> torch.Tensor:
        kernels = _COMPILED_KERNELS if fused else _EAGER_KERNELS
        mean, rstd = _statistics(_sum_over_group(kernels.moments(x, rms), group), width, eps, rms)
        ctx.width, ctx.group, ctx.kernels, ctx.has_bias = width, group, kernels, bias is not None
        ctx.save_for_backward(x, weight, mean, rstd)
        return kernels.normalize_affine(x, mean, rstd, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        kernels = ctx.kernels
        means = _sum_over_group(kernels.grad_sums(grad_output, x, mean, rstd, weight), ctx.group) / ctx.width
        dx, dweight, dbias = kernels.grads(grad_output, x, mean, rstd, weight, means, ctx.has_bias)
        return dx, dweight, dbias, None, None, None, None, None


def sharded_width_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    width: int,
    eps: float,
    rms: bool,
    group: Optional[dist.ProcessGroup],
    fused: bool = False,
) -> torch.Tensor:
    """LayerNorm (``rms=False``) or RMSNorm of a tensor whose last dim is sharded over ``group``.

    ``x``, ``weight`` and ``bias`` hold this rank's slice of the ``width`` features; the
    result is this rank's slice of ``norm(gathered x) * gathered weight + gathered bias``.
    ``fused``: compiled kernels on each side of the all-reduce (:class:`_ShardedWidthNorm`).
    """
    return _ShardedWidthNorm.apply(x, weight, bias, width, eps, rms, group, fused)


class FFNNorm(MegatronModule):
    """NormFormer's FFN norm over the full ``ffn_hidden_size``, its gain and bias TP-partitioned.

    Gain (init 1) and, for LayerNorm, bias (init 0) are partitioned along the FFN
    dimension like fc1's output (``partition_dim=0``); every token's statistics cover the
    whole width, also under sequence parallelism, where fc2's input holds the full
    sequence and this rank's FFN slice. Without tensor parallelism it is torch's
    ``layer_norm`` / ``rms_norm`` (one fused kernel each way), else
    :func:`sharded_width_norm`, compiled on each side of its all-reduce with megatron's
    fused activation (``bias_activation_fusion``).
    """

    def __init__(self, config: TransformerConfig, width: int, tp_group: Optional[dist.ProcessGroup]) -> None:
        super().__init__(config=config)
        if config.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"NormFormer's FFN norm supports normalization in {NORMALIZATIONS}, "
                f"got {config.normalization!r}"
            )
        self.width = width
        self.eps = config.layernorm_epsilon
        self.rms = config.normalization == "RMSNorm"
        self.fused = config.bias_activation_fusion
        self.tp_group = tp_group
        self.tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
        shape = (divide(width, self.tp_size),)
        device, dtype = _param_device(config), config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        for param in self.parameters():
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:  # the whole width is local: torch's own fused kernel
            return norm_last_dim(x, self.weight, self.bias, self.eps, self.rms)
        return sharded_width_norm(
            x, self.weight, self.bias, width=self.width, eps=self.eps, rms=self.rms, group=self.tp_group,
            fused=self.fused,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        state = dict(self.named_parameters(recurse=False))
        return _tp_sharded_state_dict(state, prefix, sharded_offsets, metadata)

    def extra_repr(self) -> str:
        return f"width={self.width}, {'RMSNorm' if self.rms else 'LayerNorm'}, eps={self.eps}"


def ffn_activation(
    x: torch.Tensor, bias: Optional[torch.Tensor], glu: bool, silu: bool, approximate: str
) -> torch.Tensor:
    """``act(x + bias)`` as megatron's dense MLP computes it: GeLU (``approximate="tanh"`` is
    megatron's fused bias-GeLU) or SiLU, gated (``act(x_1) * x_2`` over the halves) when ``glu``."""
    if bias is not None:
        x = x + bias
    if glu:
        x, linear = torch.chunk(x, 2, dim=-1)
    out = torch.nn.functional.silu(x) if silu else torch.nn.functional.gelu(x, approximate=approximate)
    return out * linear if glu else out


def ffn_activation_norm(
    x: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor, norm_bias: Optional[torch.Tensor],
    eps: float, rms: bool, glu: bool, silu: bool, approximate: str,
) -> torch.Tensor:
    """``FFNNorm(act(x + bias))`` over the whole (unsharded) FFN width, for one compiled kernel."""
    return norm_last_dim(ffn_activation(x, bias, glu, silu, approximate), weight, norm_bias, eps, rms)


fused_ffn_activation = jit_fuser(ffn_activation)
fused_ffn_activation_norm = jit_fuser(ffn_activation_norm)


class FFNNormMixin:
    """Mixed in front of megatron-core's dense ``MLP`` class: ``fc2(FFNNorm(act(fc1(x) + b1)))``.

    The activation is megatron's (:func:`ffn_activation`); with ``bias_activation_fusion``
    (``--bias-gelu-fusion`` / ``--bias-swiglu-fusion``) it is compiled with megatron-core's
    ``jit_fuser`` and, without tensor parallelism, together with the norm: one kernel
    reads fc1's output and writes the normalised activation, so the activation's output
    is neither written nor read in between. Under TP the norm's statistics need an
    all-reduce, so the activation is fused alone and :func:`sharded_width_norm` follows,
    compiled on each side of its all-reduce.
    """

    def __init__(self, config: TransformerConfig, *args, ffn_hidden_size: Optional[int] = None, **kwargs) -> None:
        super().__init__(config, *args, ffn_hidden_size=ffn_hidden_size, **kwargs)
        self.activation_kind = _activation_kind(config)
        self.ffn_norm = FFNNorm(config, ffn_hidden_size or config.ffn_hidden_size, self.tp_group)
        register_after(self, "ffn_norm", "linear_fc1")  # forward order: fc1, norm, fc2

    def forward(self, hidden_states: torch.Tensor, per_token_scale: Optional[torch.Tensor] = None, **kwargs):
        if per_token_scale is not None:
            raise NotImplementedError("NormFormer's FFN norm supports dense MLPs only (no per-token scale)")
        intermediate, bias = self.linear_fc1(hidden_states)
        glu, silu, approximate = self.activation_kind
        fused = self.config.bias_activation_fusion
        norm = self.ffn_norm
        if fused and norm.tp_size == 1:
            gathered(norm)  # its weights go to the kernel, not through its forward
            normalized = fused_ffn_activation_norm(
                intermediate, bias, norm.weight, norm.bias, norm.eps, norm.rms, glu, silu, approximate
            )
        else:
            activation = fused_ffn_activation if fused else ffn_activation
            normalized = norm(activation(intermediate, bias, glu, silu, approximate))
        return self.linear_fc2(normalized)


def _activation_kind(config: TransformerConfig) -> tuple[bool, bool, str]:
    """(gated, SiLU, GeLU approximation) of megatron's dense MLP activation; an error for others."""
    silu = config.activation_func is torch.nn.functional.silu
    if not (silu or config.activation_func is torch.nn.functional.gelu):
        raise NotImplementedError(
            f"NormFormer's FFN norm supports GeLU and SiLU (SwiGLU) activations, got {config.activation_func!r}"
        )
    if config.use_te_activation_func or config.activation_func_clamp_value is not None or config.glu_linear_offset:
        raise NotImplementedError(
            "NormFormer's FFN norm does not support use_te_activation_func, activation_func_clamp_value "
            "or glu_linear_offset"
        )
    # megatron's fused bias-GeLU / bias-GeGLU use the tanh approximation; unfused, the exact GeLU.
    return config.gated_linear_unit, silu, "tanh" if config.bias_activation_fusion else "none"


# ---------------------------------------------------------------------------------------
# Head scale (on the attention output projection), residual scale.
# ---------------------------------------------------------------------------------------


class HeadScaleMixin:
    """Mixed in front of the attention output projection W^O (a row-parallel linear).

    NormFormer's head scale (paper section 3) multiplies head ``h``'s attention output by
    a learned ``s_h`` (init 1) before W^O. W^O's input features are the heads' outputs
    side by side, so ``W^O (s * heads) = (W^O diag(s)) heads``: the scale is one per
    input column of W^O, ``s_h`` repeated over head ``h``'s ``kv_channels`` columns.
    ``head_scale`` has this rank's ``[np]`` heads and is partitioned over TP with them
    (``partition_dim=0``), as W^O's input columns are.

    Two forms: :class:`FoldedHeadScaleMixin` (megatron-core's local linears) and
    :class:`InputHeadScaleMixin` (any other linear, e.g. Transformer Engine's).
    """

    def __init__(self, input_size: int, output_size: int, *args, config: TransformerConfig, **kwargs) -> None:
        super().__init__(input_size, output_size, *args, config=config, **kwargs)
        self.head_dim = divide(input_size, config.num_attention_heads)
        heads = divide(config.num_attention_heads, config.tensor_model_parallel_size)
        self.head_scale = torch.nn.Parameter(
            torch.ones(heads, device=_param_device(config), dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.head_scale, is_parallel=True, dim=0, stride=1)

    def column_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """``s_h`` for each of this rank's input columns of W^O: ``[np * kv_channels]``."""
        return self.head_scale.to(dtype).repeat_interleave(self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = _tp_sharded_state_dict({"head_scale": self.head_scale}, prefix, sharded_offsets, metadata)
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return _replace_sharded(sharded, f"{prefix}head_scale", own)


class FoldedHeadScaleMixin(HeadScaleMixin):
    """The head scale folded into W^O's columns, ``x (W^O diag(s))^T``, inside megatron's ``_forward_impl``.

    Used whenever the weight is the smaller tensor (more token rows than W^O has output
    features, see :mod:`megatron_ext.linear_scaling`): the scale then costs no activation-sized kernel
    and no saved activation; else it multiplies the input. Inside
    :func:`~megatron_ext.linear_scaling.once_per_step` it is always folded, once per step.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_scale_step = StepScale(dim=1)

    def _forward_impl(self, input, weight, *args, **kwargs):
        step, fused = self.head_scale_step, weight_scale_fusion(self.config)
        if step.defers(self.weight):
            in_main_grad = kwargs.get("gradient_accumulation_fusion", False)
            folded = step(weight, self.column_scale(weight.dtype), self.weight, fused, in_main_grad)
            return super()._forward_impl(input, folded, *args, **kwargs)
        if scale_on_weight(input, weight, weight.shape[1]):
            # The effective weight has no main_grad to accumulate into: megatron returns its gradient.
            kwargs["gradient_accumulation_fusion"] = False
            folded = scale_weight(weight, self.column_scale(weight.dtype), dim=1, fused=fused)
            return super()._forward_impl(input, folded, *args, **kwargs)
        return super()._forward_impl(input * self.column_scale(input.dtype), weight, *args, **kwargs)


class InputHeadScaleMixin(HeadScaleMixin):
    """The head scale on W^O's input, ``(s * heads) W^O^T``: for linears without ``_forward_impl`` (TE)."""

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        return super().forward(input_ * self.column_scale(input_.dtype), *args, **kwargs)


class ResidualScale(torch.nn.Module):
    """``lambda * residual``: a learned per-channel vector (init 1) on the FFN skip path.

    Replicated over TP. Under sequence parallelism each rank scales its own slice of the
    sequence, so the gradient is a partial sum over tokens: the parameter is tagged
    ``sequence_parallel`` and all-reduced over TP like the norms' gains.
    """

    def __init__(self, config: TransformerConfig, **unused) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.ones(config.hidden_size, device=_param_device(config), dtype=config.params_dtype)
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def scale_factor(self) -> torch.Tensor:
        """``lambda``; the layer multiplies the skip path by it inside its bias-dropout-add."""
        return self.weight


# ---------------------------------------------------------------------------------------
# Spec and model.
# ---------------------------------------------------------------------------------------

Submodule = Union[ModuleSpec, type]
_WRAPPED: dict[tuple[type, type], type] = {}


def _with_mixin(submodule: Submodule, mixin: type, name: str) -> Submodule:
    """``submodule`` (a class or a ModuleSpec of one) with ``mixin`` in front of its class."""
    base = submodule.module if isinstance(submodule, ModuleSpec) else submodule
    if not isinstance(base, type):
        raise TypeError(f"NormFormer can only wrap a module class for {name}, got {base!r}")
    if not issubclass(base, mixin):
        key = (mixin, base)
        if key not in _WRAPPED:
            prefix = mixin.__name__.removesuffix("Mixin")
            _WRAPPED[key] = type(f"{prefix}{base.__name__}", (mixin, base), {"__module__": __name__})
        base = _WRAPPED[key]
    return replace(submodule, module=base) if isinstance(submodule, ModuleSpec) else base


def _is_transformer_engine(submodule: Submodule) -> bool:
    cls = submodule.module if isinstance(submodule, ModuleSpec) else submodule
    return any(c.__module__.startswith("megatron.core.extensions.transformer_engine") for c in cls.__mro__)


def _post_attention_norm(core_attention: Submodule) -> type:
    if _is_transformer_engine(core_attention):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm


def _check(config: TransformerConfig, cfg: NormFormerConfig) -> None:
    if (cfg.post_attention_norm or cfg.ffn_norm) and config.normalization not in NORMALIZATIONS:
        raise ValueError(
            f"NormFormer's norms support normalization in {NORMALIZATIONS}, got {config.normalization!r}"
        )
    if cfg.ffn_norm:
        _activation_kind(config)
    if cfg.ffn_norm and config.num_moe_experts is not None:
        raise ValueError(
            "NormFormer's FFN norm supports dense MLPs only; disable it "
            "(--normformer-no-ffn-norm) or num_moe_experts"
        )


def apply_to_layer_spec(spec: ModuleSpec, config: TransformerConfig, cfg: NormFormerConfig) -> ModuleSpec:
    """``spec`` with the enabled NormFormer parts; the classes already in it are wrapped, not replaced."""
    _check(config, cfg)
    layer = spec.submodules
    attention, mlp = layer.self_attention, layer.mlp
    updates = {}
    if cfg.head_scale:
        proj = attention.submodules.linear_proj
        proj_class = proj.module if isinstance(proj, ModuleSpec) else proj
        mixin = FoldedHeadScaleMixin if issubclass(proj_class, RowParallelLinear) else InputHeadScaleMixin
        submodules = replace(attention.submodules, linear_proj=_with_mixin(proj, mixin, "linear_proj"))
        updates["self_attention"] = replace(attention, submodules=submodules)
    if cfg.post_attention_norm:
        updates["post_attention_norm"] = _post_attention_norm(attention.submodules.core_attention)
    if cfg.ffn_norm:
        mlp_class = mlp.module if isinstance(mlp, ModuleSpec) else mlp
        if not (isinstance(mlp_class, type) and issubclass(mlp_class, MLP)):
            raise NotImplementedError(
                f"NormFormer's FFN norm needs megatron-core's dense MLP, the layer spec has {mlp!r}"
            )
        updates["mlp"] = _with_mixin(mlp, FFNNormMixin, "mlp")
    if cfg.residual_scale:
        updates["mlp_skip_scale"] = ResidualScale
    return replace(spec, submodules=replace(layer, **updates))


def normformer_parameters(model: GPTModel) -> list[torch.nn.Parameter]:
    """The parameters NormFormer added to this rank's part of ``model``."""
    params = []
    for layer in getattr(model.decoder, "layers", ()):
        proj = layer.self_attention.linear_proj
        if isinstance(proj, HeadScaleMixin):
            params.append(proj.head_scale)
        if isinstance(layer.mlp, FFNNormMixin):
            params.extend(layer.mlp.ffn_norm.parameters())
        for hook in (layer.post_attention_norm, layer.mlp_skip_scale):
            if hook is not None:
                params.extend(hook.parameters())
    return params


def parameter_overhead(model: GPTModel) -> tuple[int, int]:
    """(parameters NormFormer added, parameters without them) on this rank."""
    added = sum(p.numel() for p in normformer_parameters(model))
    return added, sum(p.numel() for p in model.parameters()) - added


def apply_to_model(model: GPTModel, config: TransformerConfig, cfg: NormFormerConfig) -> None:
    """Log NormFormer's parameter overhead on this rank (its TP shard of its pipeline stage)."""
    added, base = parameter_overhead(model)
    logger.info(
        "NormFormer %s adds %d parameters to the %d of this rank (TP rank %d of %d, "
        "PP rank %d of %d): +%.3f%%",
        cfg, added, base,
        parallel_state.get_tensor_model_parallel_rank(), config.tensor_model_parallel_size,
        parallel_state.get_pipeline_model_parallel_rank(), config.pipeline_model_parallel_size,
        100.0 * added / base,
    )

"""WeSaR: weight scaling as reparameterization (Nishida et al., EMNLP 2024, arXiv 2410.05052).

Every weight matrix W is replaced by ``a_W * W~``: one trainable scalar gate ``a_W``
per matrix, all base weights ``W~`` drawn from one common ``N(0, std^2)`` and each
gate initialised to ``target_std / std`` so the model equals its backbone at step 0
(METHODS.md section 2). With Adam the update of ``W~`` does not depend on ``a_W``, so
every matrix moves by the same relative amount ``~ lr / std``.

A linear computes ``x (a_W W~)^T + b`` (the bias is not gated). A fused QKV linear has
one gate each for q, k and v, and a SwiGLU fc1 one each for its gate and up halves: their
output rows are scaled by a per-row vector built from the gates in megatron-core's local
layout.

Where the gate is multiplied (``WeSaRConfig.placement``): into the weight, ``a_W * W~``
(weight-sized elementwise work and saved tensor per micro-batch), or onto the matmul's
output, ``a_W * (x W~^T)`` (output-sized). ``auto`` picks, per call, whichever is
smaller: the weight when the matmul has more token rows than the weight has input
columns (every linear of the 125M to 1.3B examples; see :mod:`megatron_ext.linear_scaling`),
so the gate costs no activation-sized kernel. With several micro batches per step the
gates are multiplied into the weights once per step instead, their gradients taken from
the accumulated weight gradient (:class:`~megatron_ext.linear_scaling.StepScale`; not for
``output``, nor for a tied output layer).

Tensor parallelism: a gate is replicated on every TP rank. The local linears gate the
rank's own shard inside megatron's ``_forward_impl`` (before any gather or reduction),
so the gate gradient is always a partial sum over TP ranks: the gate passes through
megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce
backward), or, for gates applied once per step, its gradient is summed once, in the
step's last backward (:meth:`~megatron_ext.linear_scaling.StepScale.sum_at_finish`).
The embedding is gated on its output; its gradient is partial only when the output is
reduce-scattered (sequence parallelism). The reduction lives inside autograd,
so the CPU and GPU paths need no extra gradient hook (except for a tied output layer on
its own pipeline stage, see :func:`allreduce_tied_gate_grads`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_defaults_if_not_set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import (
    get_pg_rank,
    get_pg_size,
    get_tensor_model_parallel_group_if_none,
    init_method_normal,
    log_single_rank,
)

from megatron_ext.config import weight_scale_fusion
from megatron_ext.linear_scaling import StepScale, scale_on_weight, scale_weight

logger = logging.getLogger(__name__)

BACKBONES: tuple[str, ...] = ("he", "megatron")
PLACEMENTS: tuple[str, ...] = ("auto", "weight", "output")


@dataclass(frozen=True)
class WeSaRConfig:
    """WeSaR options (METHODS.md section 2; items marked "decision" there are flags)."""

    std: float = 0.006325
    backbone: str = "he"
    gate_weight_decay: float = 0.0
    gate_lr_mult: float = 1.0
    exclude_gates_from_clip: bool = False
    embedding: bool = True
    output_layer: bool = True
    placement: str = "auto"

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"WeSaR std must be > 0 (common base-weight std), got {self.std}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown WeSaR backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if self.gate_weight_decay < 0:
            raise ValueError(f"WeSaR gate_weight_decay must be >= 0, got {self.gate_weight_decay}")
        if not self.gate_lr_mult > 0:
            raise ValueError(f"WeSaR gate_lr_mult must be > 0, got {self.gate_lr_mult}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown WeSaR placement {self.placement!r}; expected one of {', '.join(PLACEMENTS)}")


# ---------------------------------------------------------------------------------------
# Target stds (METHODS.md section 2) and gate values.
# ---------------------------------------------------------------------------------------

# Matrix kinds, each with its own gate. "ffn_in" is a plain fc1; a gated-linear-unit fc1
# has "ffn_gate" (the activated half) and "ffn_up".
_SCALED_KINDS = ("attention_output", "ffn_out")


def _normal_std(init_method, attribute: str) -> float:
    """The std of megatron-core's ``init_method_normal(std)``; a clear error for anything else."""
    if (
        isinstance(init_method, functools.partial)
        and init_method.func is torch.nn.init.normal_
        and init_method.keywords.get("mean", 0.0) == 0.0
        and "std" in init_method.keywords
    ):
        return float(init_method.keywords["std"])
    raise ValueError(
        f"WeSaR rescales megatron-core's normal initialisation of the embedding and output layer "
        f"and needs TransformerConfig.{attribute} = init_method_normal(std); got {init_method!r}"
    )


def target_std(kind: str, config: TransformerConfig, backbone: str) -> float:
    """Std the backbone prescribes for a matrix of ``kind`` (d = hidden, L = layers, f = FFN width).

    ``he`` (paper): sqrt(1/d) for q, k, v, FFN input and LM head; sqrt(1/(2Ld)) for the
    attention output; sqrt(2/(2Lf)) for the FFN output. ``megatron`` (decision):
    ``init_method_std`` for all, divided by sqrt(2L) for attention output and FFN output.
    The word embedding keeps megatron's embedding init std under both (decision).
    """
    if kind == "embedding":
        return _normal_std(config.embedding_init_method, "embedding_init_method")
    d, layers = config.hidden_size, config.num_layers
    if backbone == "megatron":
        scale = math.sqrt(2 * layers) if kind in _SCALED_KINDS else 1.0
        return config.init_method_std / scale
    if kind == "attention_output":
        return math.sqrt(1.0 / (2 * layers * d))
    if kind == "ffn_out":
        return math.sqrt(2.0 / (2 * layers * config.ffn_hidden_size))
    return math.sqrt(1.0 / d)


def _gate_values(kinds: Iterable[str], config: TransformerConfig, cfg: WeSaRConfig) -> dict[str, float]:
    return {kind: target_std(kind, config, cfg.backbone) / cfg.std for kind in kinds}


def gate_table(config: TransformerConfig, cfg: WeSaRConfig, tied_output: bool = True) -> list[tuple[str, float, float]]:
    """(matrix kind, target std, initial gate) for every kind of gated matrix of the model."""
    fc1 = ("ffn_gate", "ffn_up") if config.gated_linear_unit else ("ffn_in",)
    kinds = ["query", "key", "value", "attention_output", *fc1, "ffn_out"]
    if cfg.embedding:
        kinds.insert(0, "embedding")
    if cfg.output_layer and not tied_output:
        kinds.append("lm_head")
    return [(kind, target_std(kind, config, cfg.backbone), value) for kind, value in _gate_values(kinds, config, cfg).items()]


_LOGGED_TABLES: set = set()


def _log_gate_table(config: TransformerConfig, cfg: WeSaRConfig, tied_output: bool) -> None:
    table = tuple(gate_table(config, cfg, tied_output))
    if table in _LOGGED_TABLES:
        return
    _LOGGED_TABLES.add(table)
    rows = "\n".join(f"  {kind:<17s} target std {std:.6f}  gate {gate:.4f}" for kind, std, gate in table)
    log_single_rank(logger, logging.INFO, "WeSaR: base std %g, backbone %s%s\n%s", cfg.std, cfg.backbone,
                    ", embedding tied to output layer" if tied_output and cfg.embedding else "", rows)


# ---------------------------------------------------------------------------------------
# Gates.
# ---------------------------------------------------------------------------------------


def is_gate(param: torch.Tensor) -> bool:
    """Whether ``param`` is a WeSaR gate."""
    return bool(getattr(param, "wesar_gate", False))


def _new_gate(value: float, device: torch.device) -> torch.nn.Parameter:
    gate = torch.nn.Parameter(torch.tensor(value, dtype=torch.float32, device=device))
    gate.wesar_gate = True
    set_defaults_if_not_set_tensor_model_parallel_attributes(gate)  # replicated over TP
    return gate


class WeSaRGates(torch.nn.Module):
    """The gates of one linear or embedding.

    Each gate is a 0-d parameter named after its matrix kind, created fp32. ``column_gate``
    maps every local output feature (a column of the output, a row of the weight) to the
    index of its gate (``None``: one gate for all); it is kept as the one-hot matrix
    ``column_onehot`` [features, gates], and the per-feature scale is ``column_onehot @ gates``:
    its backward is one small matrix-vector product, where indexing's backward (an
    accumulating scatter of every feature onto a few gates) took 0.2 ms per fused QKV
    linear on an H200 (docs/RESULTS.md). ``reduce_grad`` all-reduces the
    gates' gradient over ``tp_group`` (see module doc). Under bf16/fp16 the gates are cast
    with the model, like megatron's norm gains: the mixed-precision optimizer keeps their
    fp32 master values and fp32 state (METHODS.md's "gates in fp32"), and megatron-core's
    Float16 and distributed optimizers cannot checkpoint fp32 parameters inside a
    half-precision parameter group.
    """

    def __init__(
        self,
        gates: dict[str, torch.nn.Parameter],
        column_gate: Optional[torch.Tensor],
        reduce_grad: bool,
        tp_group: Optional[dist.ProcessGroup],
    ) -> None:
        super().__init__()
        for name, gate in gates.items():
            self.register_parameter(name, gate)
        onehot = None if column_gate is None else torch.nn.functional.one_hot(column_gate, len(gates)).float()
        self.register_buffer("column_onehot", onehot, persistent=False)
        self.reduce_grad = reduce_grad
        self.tp_group = tp_group
        # A tied output layer's gates: "shared" (the embedding's own parameter) or "copy"
        # (the last pipeline stage's); they checkpoint as the embedding's gate.
        self.tied_to_embedding: Optional[str] = None

    @classmethod
    def create(
        cls, values: dict[str, float], device: torch.device, column_gate: Optional[torch.Tensor] = None,
        reduce_grad: bool = False, tp_group: Optional[dist.ProcessGroup] = None,
    ) -> "WeSaRGates":
        """New gates initialised to ``values`` (kind -> initial gate)."""
        gates = {kind: _new_gate(value, device) for kind, value in values.items()}
        return cls(gates, None if column_gate is None else column_gate.to(device), reduce_grad, tp_group)

    def forward(self, step: Optional[StepScale] = None) -> torch.Tensor:
        """Scale of each local output feature: shape [1] or [local output features].

        Read through the module call (``self()``): megatron-core's DDP finishes a module's
        parameter all-gather in its forward pre-hook (``--overlap-param-gather``), and the
        gates are this module's parameters, not their linear's. ``step``: the linear's
        :class:`StepScale` where it applies the gates once per step; their gradient is then
        summed over TP once per step, at its last backward (:meth:`StepScale.sum_at_finish`).
        """
        params = list(self._parameters.values())
        gates = params[0].view(1) if len(params) == 1 else torch.stack(params)  # a view: no copy kernel
        if self.reduce_grad and step is not None:
            gates = step.sum_at_finish(gates, self.tp_group)
        elif self.reduce_grad:
            gates = copy_to_tensor_model_parallel_region(gates, group=self.tp_group)
        return gates if self.column_onehot is None else torch.mv(self.column_onehot.to(gates.dtype), gates)

    def scale_output(self, output: torch.Tensor) -> torch.Tensor:
        """``a * output``, the gates indexed by the last dim of ``output``."""
        return output * self().to(output.dtype)

    def scale_weight(self, weight: torch.Tensor, feature_dim: int = 0, fused: bool = False) -> torch.Tensor:
        """``a * weight``, the gates indexed by dim ``feature_dim`` of ``weight`` (``fused``: compiled)."""
        return scale_weight(weight, self().to(weight.dtype), feature_dim, fused)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """The gates as checkpoint tensors replicated over TP (never TP-partitioned).

        A tied output layer's gate is the embedding's: one checkpoint entry, loadable under
        any pipeline split. Where it is the embedding's own parameter (one stage) it is not
        stored again; the last pipeline stage's copy is stored under the embedding gate's
        key as a non-main replica, as megatron-core does for the tied matrix.
        """
        if self.tied_to_embedding == "shared":
            return {f"{prefix}{name}": LocalNonpersistentObject(gate) for name, gate in self._parameters.items()}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, None, sharded_offsets,
            tp_group=get_tensor_model_parallel_group_if_none(self.tp_group), dp_cp_group=metadata["dp_cp_group"],
        )
        if self.tied_to_embedding == "copy":
            model_prefix = prefix.removesuffix("output_layer.wesar.")
            for name, tensor in sharded.items():
                tensor.key = f"{model_prefix}embedding.word_embeddings.wesar.{name.removeprefix(prefix)}"
                tensor.replica_id = (1, *tensor.replica_id[1:])
        return sharded

    def extra_repr(self) -> str:
        gates = ", ".join(f"{k}={float(v):.4g}" for k, v in self._parameters.items())
        return f"{gates}, reduce_grad={self.reduce_grad}"


def _qkv_column_gate(config: TransformerConfig, tp_size: int, tp_rank: int) -> torch.Tensor:
    """q/k/v gate index (0/1/2) of each local column of megatron's fused QKV output.

    megatron-core lays the QKV output out per query group as
    ``[ng, (np/ng + 2), hn]`` (the group's query heads, then its key, then its value)
    and splits it contiguously over TP ranks (a rank may hold part of a group when
    ng < TP).
    """
    groups = config.num_query_groups or config.num_attention_heads
    head_dim = config.kv_channels
    queries_per_group = config.num_attention_heads // groups
    one_group = torch.tensor([0] * (queries_per_group * head_dim) + [1] * head_dim + [2] * head_dim)
    full = one_group.repeat(groups)
    local = full.numel() // tp_size
    return full[tp_rank * local:(tp_rank + 1) * local]


def _glu_column_gate(output_size: int, tp_size: int) -> torch.Tensor:
    """Gate index of each local column of a gated-linear-unit fc1: [gate half; up half].

    megatron-core initialises fc1 with stride 2, so every rank holds its shard of the
    activated (gate) projection followed by its shard of the up projection.
    """
    half = output_size // tp_size // 2
    return torch.tensor([0] * half + [1] * half)


def _column_gates(
    matrix: str, config: TransformerConfig, cfg: WeSaRConfig, output_size: int,
    tp_group: dist.ProcessGroup, device: torch.device,
) -> WeSaRGates:
    tp_size, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
    if matrix == "qkv":
        kinds, column_gate = ("query", "key", "value"), _qkv_column_gate(config, tp_size, tp_rank)
    elif matrix == "ffn_in" and config.gated_linear_unit:
        kinds, column_gate = ("ffn_gate", "ffn_up"), _glu_column_gate(output_size, tp_size)
    elif matrix == "ffn_in":
        kinds, column_gate = ("ffn_in",), None
    else:
        raise ValueError(f"WeSaR column-parallel matrix must be 'qkv' or 'ffn_in', got {matrix!r}")
    # Every rank holds different output columns: the gate gradient is a partial sum.
    return WeSaRGates.create(_gate_values(kinds, config, cfg), device, column_gate, reduce_grad=True, tp_group=tp_group)


def _row_gates(
    matrix: str, config: TransformerConfig, cfg: WeSaRConfig, tp_group: dist.ProcessGroup, device: torch.device,
    on_shard: bool,
) -> WeSaRGates:
    if matrix not in _SCALED_KINDS:
        raise ValueError(f"WeSaR row-parallel matrix must be one of {_SCALED_KINDS}, got {matrix!r}")
    # On this rank's shard (before the reduction) the gradient is a partial sum; after the
    # all-reduce the output is complete on every rank, unless sequence parallelism
    # reduce-scatters it over the sequence.
    reduce = on_shard or config.sequence_parallel
    return WeSaRGates.create(_gate_values([matrix], config, cfg), device, reduce_grad=reduce, tp_group=tp_group)


def _add_bias(layer: torch.nn.Module, output: torch.Tensor, bias: Optional[torch.Tensor]):
    """The gated ``output`` plus the (ungated) bias where the caller did not ask for it back."""
    if layer.wesar_adds_bias and bias is not None:
        return output + bias, None
    return output, bias


def gate_on_weight(placement: str, input_: torch.Tensor, weight: torch.Tensor, gathered_input: int = 1) -> bool:
    """Whether a linear multiplies its gates into the weight (else onto the matmul output).

    ``auto``: the weight when the matmul's token rows (``input_``'s rows times
    ``gathered_input``, the sequence-parallel all-gather) outnumber the weight's input
    columns, i.e. when ``a * W~`` touches fewer elements than ``a * (x W~^T)``.
    """
    if placement != "auto":
        return placement == "weight"
    return scale_on_weight(input_, weight, weight.shape[0], gathered_input)


# ---------------------------------------------------------------------------------------
# Gated linears for the layer spec.
# ---------------------------------------------------------------------------------------


class _CheckpointsGates:
    """Mixin: the module's ``wesar`` gates checkpoint through ``WeSaRGates.sharded_state_dict``."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        sharded.update(self.wesar.sharded_state_dict(f"{prefix}wesar.", sharded_offsets, metadata))
        return sharded


class _Gating(_CheckpointsGates):
    """Mixin for a tensor-parallel linear: base weight from N(0, std^2), WeSaR gates.

    ``matrix`` names the gated matrix: ``"qkv"`` (q, k, v gates), ``"ffn_in"`` (two
    gates under a gated linear unit), ``"attention_output"`` or ``"ffn_out"``.
    megatron's ``init_method`` is replaced by ``init_method_normal(std)``, drawn through
    megatron-core's own initialisation (TP-invariant on the CPU path). The base class
    always returns the bias unadded; it is added after the gate.
    """

    column_parallel: bool
    gates_on_shard: bool  # whether the gate acts before the output gather/reduction

    def __init__(self, input_size: int, output_size: int, *, wesar: WeSaRConfig, matrix: str,
                 skip_bias_add: bool = False, **kwargs) -> None:
        kwargs.update(init_method=init_method_normal(wesar.std), skip_bias_add=True)
        super().__init__(input_size, output_size, **kwargs)
        self.wesar_adds_bias = not skip_bias_add
        self.wesar_placement = wesar.placement
        self.wesar_step: Optional[StepScale] = StepScale()
        tp_group = get_tensor_model_parallel_group_if_none(kwargs.get("tp_group"))
        config, device = kwargs["config"], self.weight.device
        if self.column_parallel:
            self.wesar = _column_gates(matrix, config, wesar, output_size, tp_group, device)
        else:
            self.wesar = _row_gates(matrix, config, wesar, tp_group, device, self.gates_on_shard)


class _ShardGating(_Gating):
    """Gates megatron-core's local linears on this rank's shard, inside ``_forward_impl``."""

    gates_on_shard = True

    def _forward_impl(self, input, weight, *args, **kwargs):
        """The gates on the weight (once per step unless the placement is ``output``) or on the output."""
        step, fused = self.wesar_step, weight_scale_fusion(self.config)
        if step is not None and step.defers(self.weight) and self.wesar_placement != "output":
            in_main_grad = kwargs.get("gradient_accumulation_fusion", False)
            scaled = step(weight, self.wesar(step).to(weight.dtype), self.weight, fused, in_main_grad)
            return super()._forward_impl(input, scaled, *args, **kwargs)
        gathered = get_pg_size(self.tp_group) if kwargs.get("sequence_parallel") else 1
        if gate_on_weight(self.wesar_placement, input, weight, gathered):
            # The effective weight has no main_grad to accumulate into: megatron returns its gradient.
            kwargs["gradient_accumulation_fusion"] = False
            return super()._forward_impl(input, self.wesar.scale_weight(weight, fused=fused), *args, **kwargs)
        return self.wesar.scale_output(super()._forward_impl(input, weight, *args, **kwargs))


class _OutputGating(_Gating):
    """Gates a linear's complete output in ``forward`` (Transformer Engine linears)."""

    gates_on_shard = False

    def forward(self, *args, **kwargs):
        output, bias = super().forward(*args, **kwargs)
        return _add_bias(self, self.wesar.scale_output(output), bias)


class WeSaRColumnParallelLinear(_ShardGating, ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear`` with WeSaR gates (also the gated LM head)."""

    column_parallel = True

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        # The local bias is added before the output gather.
        output, bias = _add_bias(self, *super().forward(input_, weight, runtime_gather_output=False))
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, bias

    @classmethod
    def gate_in_place(cls, layer: ColumnParallelLinear, gates: WeSaRGates, cfg: WeSaRConfig, tied: bool) -> None:
        """Turn a built ``ColumnParallelLinear`` (GPTModel's output layer) into a gated one.

        A ``tied`` layer's matrix also gets the embedding's gradient, so its gate is
        applied per micro batch, never once per step (:class:`StepScale`).
        """
        layer.__class__ = cls
        layer.wesar_adds_bias = not layer.skip_bias_add
        layer.wesar_placement = cfg.placement
        layer.wesar_step = None if tied else StepScale()
        layer.skip_bias_add = True
        layer.wesar = gates


class WeSaRRowParallelLinear(_ShardGating, RowParallelLinear):
    """megatron-core's ``RowParallelLinear`` with a WeSaR gate."""

    column_parallel = False

    def forward(self, input_: torch.Tensor):
        return _add_bias(self, *super().forward(input_))


class WeSaRVocabParallelEmbedding(_CheckpointsGates, VocabParallelEmbedding):
    """megatron-core's ``VocabParallelEmbedding`` with a WeSaR gate on its output."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return self.wesar.scale_output(super().forward(input_))

    @classmethod
    def gate_in_place(cls, embedding: VocabParallelEmbedding, gates: WeSaRGates) -> None:
        """Turn a built ``VocabParallelEmbedding`` into a gated one."""
        embedding.__class__ = cls
        embedding.wesar = gates


_GATED: dict[type, type] = {ColumnParallelLinear: WeSaRColumnParallelLinear, RowParallelLinear: WeSaRRowParallelLinear}

if importlib.util.find_spec("transformer_engine") is not None:  # pragma: no cover - needs NVIDIA TE
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    class WeSaRTEColumnParallelLinear(_OutputGating, TEColumnParallelLinear):
        """Transformer Engine column-parallel linear with WeSaR gates."""

        column_parallel = True

    class WeSaRTELayerNormColumnParallelLinear(_OutputGating, TELayerNormColumnParallelLinear):
        """Transformer Engine fused-norm column-parallel linear with WeSaR gates (norm not gated)."""

        column_parallel = True

    class WeSaRTERowParallelLinear(_OutputGating, TERowParallelLinear):
        """Transformer Engine row-parallel linear with a WeSaR gate."""

        column_parallel = False

    _GATED.update({
        TEColumnParallelLinear: WeSaRTEColumnParallelLinear,
        TELayerNormColumnParallelLinear: WeSaRTELayerNormColumnParallelLinear,
        TERowParallelLinear: WeSaRTERowParallelLinear,
    })


# ---------------------------------------------------------------------------------------
# Applying WeSaR to a layer spec and a built model.
# ---------------------------------------------------------------------------------------

Submodule = Union[ModuleSpec, type]


def _gated_class(submodule: Submodule, role: str) -> type:
    cls = submodule.module if isinstance(submodule, ModuleSpec) else submodule
    if cls not in _GATED:
        raise NotImplementedError(
            f"WeSaR has no gated version of {getattr(cls, '__name__', cls)!r} ({role}); it gates "
            f"{', '.join(c.__name__ for c in _GATED)}"
        )
    return _GATED[cls]


def _gated_spec(submodule: Submodule, role: str, cfg: WeSaRConfig, matrix: str) -> ModuleSpec:
    params = {"wesar": cfg, "matrix": matrix}
    if isinstance(submodule, ModuleSpec):
        return replace(submodule, module=_gated_class(submodule, role), params={**submodule.params, **params})
    return ModuleSpec(module=_gated_class(submodule, role), params=params)


def apply_to_layer_spec(spec: ModuleSpec, config: TransformerConfig, cfg: WeSaRConfig) -> ModuleSpec:
    """Gate linear_qkv, linear_proj, linear_fc1 and linear_fc2 of every layer built from ``spec``."""
    if config.attention_output_gate:
        raise NotImplementedError("WeSaR does not support attention_output_gate (a fourth block in linear_qkv)")
    attention, mlp = spec.submodules.self_attention, spec.submodules.mlp
    if not (isinstance(mlp, ModuleSpec) and issubclass(mlp.module, MLP)):
        raise NotImplementedError(f"WeSaR gates a dense MLP only, the layer spec has {mlp!r}")
    qkv = attention.submodules.linear_qkv
    attention = replace(attention, submodules=replace(
        attention.submodules,
        # SelfAttention calls linear_qkv directly (no build_module): a callable, not a ModuleSpec.
        linear_qkv=functools.partial(_gated_class(qkv, "linear_qkv"), wesar=cfg, matrix="qkv"),
        linear_proj=_gated_spec(attention.submodules.linear_proj, "linear_proj", cfg, "attention_output"),
    ))
    mlp = replace(mlp, submodules=replace(
        mlp.submodules,
        linear_fc1=_gated_spec(mlp.submodules.linear_fc1, "linear_fc1", cfg, "ffn_in"),
        linear_fc2=_gated_spec(mlp.submodules.linear_fc2, "linear_fc2", cfg, "ffn_out"),
    ))
    return replace(spec, submodules=replace(spec.submodules, self_attention=attention, mlp=mlp))


@torch.no_grad()
def _rescale_to_base_std(weight: torch.Tensor, init_std: float, config: TransformerConfig, cfg: WeSaRConfig) -> None:
    """Turn megatron's N(0, init_std^2) draw into the base weight's N(0, std^2) draw.

    Rescaling (instead of drawing again) keeps megatron's TP-invariant draw and keeps a
    tied embedding's copy on the last pipeline stage equal to the first stage's.
    """
    if config.perform_initialization:
        weight.mul_(cfg.std / init_std)


def _mark_tied_gate(gate: torch.nn.Parameter, last_stage_copy: bool) -> None:
    """Tag the gate of a tied embedding whose matrix lives on the first and the last stage.

    Like megatron-core's tied embedding weight: ``shared_embedding`` gives it a bucket of
    its own under the distributed optimizer, so both stages shard it the same way and
    :func:`allreduce_tied_gate_grads` may sum it after the data-parallel reduce-scatter;
    the last stage's copy is ``shared`` so the gradient norm counts it once.
    """
    gate.wesar_tied_embedding = True
    gate.shared_embedding = True
    if last_stage_copy:
        gate.shared = True


def apply_to_model(model: GPTModel, config: TransformerConfig, cfg: WeSaRConfig) -> None:
    """Gate the word embedding (``cfg.embedding``) and the output layer of a built GPTModel.

    Untied output layer: its own gate (kind ``lm_head``) when ``cfg.output_layer``. Tied:
    the output layer uses the embedding's matrix, so it uses the embedding's gate (the
    same parameter on a one-stage model; on a last pipeline stage a copy with the same
    value whose gradient :func:`allreduce_tied_gate_grads` sums with the first stage's).
    With tied weights ``cfg.embedding`` alone decides whether that matrix is gated.
    """
    tied = model.share_embeddings_and_output_weights
    _log_gate_table(config, cfg, tied)
    pipelined = config.pipeline_model_parallel_size > 1
    tp_group = parallel_state.get_tensor_model_parallel_group()
    embedding_std = target_std("embedding", config, cfg.backbone)
    embedding_gates = None
    if model.pre_process and cfg.embedding:
        word = model.embedding.word_embeddings
        _rescale_to_base_std(word.weight, embedding_std, config, cfg)
        embedding_gates = WeSaRGates.create(
            {"embedding": embedding_std / cfg.std}, word.weight.device,
            reduce_grad=word.reduce_scatter_embeddings, tp_group=tp_group,
        )
        WeSaRVocabParallelEmbedding.gate_in_place(word, embedding_gates)
        if tied and pipelined:
            _mark_tied_gate(embedding_gates.embedding, last_stage_copy=False)
    if not model.post_process:
        return
    output = model.output_layer
    if tied and cfg.embedding:
        if embedding_gates is not None:
            gates = WeSaRGates(dict(embedding_gates.named_parameters()), None, reduce_grad=True, tp_group=tp_group)
            gates.tied_to_embedding = "shared"
        else:  # last pipeline stage: its own copy of the embedding and of its gate
            _rescale_to_base_std(output.weight, embedding_std, config, cfg)
            gates = WeSaRGates.create({"embedding": embedding_std / cfg.std}, output.weight.device,
                                      reduce_grad=True, tp_group=tp_group)
            _mark_tied_gate(gates.embedding, last_stage_copy=True)
            gates.tied_to_embedding = "copy"
    elif not tied and cfg.output_layer:
        _rescale_to_base_std(output.weight, _normal_std(config.init_method, "init_method"), config, cfg)
        gates = WeSaRGates.create(_gate_values(["lm_head"], config, cfg), output.weight.device,
                                  reduce_grad=True, tp_group=tp_group)
    else:
        return
    WeSaRColumnParallelLinear.gate_in_place(output, gates, cfg, tied)


# ---------------------------------------------------------------------------------------
# Gates of a model: listing, folding, tied-gate gradient, export.
# ---------------------------------------------------------------------------------------

ModelChunks = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def _chunks(model_chunks: ModelChunks) -> list[torch.nn.Module]:
    return [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)


def gate_parameters(model_chunks: ModelChunks) -> dict[str, torch.nn.Parameter]:
    """Parameter name -> gate. Names of several chunks are prefixed by ``"<chunk index>."``."""
    chunks = _chunks(model_chunks)
    prefix = (lambda i: f"{i}.") if len(chunks) > 1 else (lambda i: "")
    return {
        prefix(i) + name: param
        for i, chunk in enumerate(chunks)
        for name, param in chunk.named_parameters()
        if is_gate(param)
    }


@torch.no_grad()
def fold_gates(model_chunks: ModelChunks) -> None:
    """Multiply every gate into its weight and set the gate to 1; the function is unchanged.

    Afterwards ``without_gates(model.state_dict())`` is an ordinary megatron-core GPT.
    """
    folds = []
    for chunk in _chunks(model_chunks):
        for module in chunk.modules():
            gates = getattr(module, "wesar", None)
            if isinstance(gates, WeSaRGates) and getattr(module, "weight", None) is not None:
                feature_dim = 1 if isinstance(module, VocabParallelEmbedding) else 0
                folds.append((gates, module.weight, feature_dim))
    for gates, weight, feature_dim in folds:  # fold first: a tied gate is shared by two modules
        weight.copy_(gates.scale_weight(weight, feature_dim))
    for gate in gate_parameters(model_chunks).values():
        gate.fill_(1.0)


def without_gates(state_dict: dict) -> dict:
    """``state_dict`` without the WeSaR gates (after :func:`fold_gates`: an ordinary GPT)."""
    return {key: value for key, value in state_dict.items() if ".wesar." not in f".{key}"}


def allreduce_tied_gate_grads(model_chunks: ModelChunks) -> None:
    """Sum the tied embedding gate's gradient over the first and last pipeline stages.

    Only needed with tied embeddings and pipeline parallelism, where the last stage holds
    a copy of the embedding gate; call it where megatron all-reduces the embedding grads
    (after ``finalize_model_grads``). A no-op otherwise.
    """
    group = parallel_state.get_embedding_group(check_initialized=False)
    if group is None or get_pg_size(group) == 1:
        return
    for gate in gate_parameters(model_chunks).values():
        if getattr(gate, "wesar_tied_embedding", False):
            grad = gate.main_grad if hasattr(gate, "main_grad") else gate.grad
            if grad is not None:
                dist.all_reduce(grad, group=group)


# ---------------------------------------------------------------------------------------
# Optimizer integration.
# ---------------------------------------------------------------------------------------


def _no_weight_decay(param: torch.Tensor, name: str) -> bool:
    """megatron's rule: biases and 1-D parameters (norm gains) get no weight decay."""
    return name.endswith(".bias") or param.dim() == 1


def param_groups(model_chunks: ModelChunks, weight_decay: float, cfg: Optional[WeSaRConfig]) -> list[dict]:
    """Parameter groups for a plain torch optimizer, each with name, params, weight_decay, lr_mult.

    ``decay``: weight matrices (``weight_decay``); ``no_decay``: biases and 1-D
    parameters; ``wesar_gates``: the gates with ``cfg.gate_weight_decay`` and
    ``cfg.gate_lr_mult``. The caller sets each group's lr to ``lr * lr_mult``. Empty
    groups are left out; frozen parameters are skipped.
    """
    groups = {"decay": [], "no_decay": [], "wesar_gates": []}
    seen = set()
    for chunk in _chunks(model_chunks):
        for name, param in chunk.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if is_gate(param):
                groups["wesar_gates"].append(param)
            else:
                groups["no_decay" if _no_weight_decay(param, name) else "decay"].append(param)
    if groups["wesar_gates"] and cfg is None:
        raise ValueError("the model has WeSaR gates but param_groups got cfg=None; pass its WeSaRConfig")
    settings = {"decay": (weight_decay, 1.0), "no_decay": (0.0, 1.0)}
    if cfg is not None:
        settings["wesar_gates"] = (cfg.gate_weight_decay, cfg.gate_lr_mult)
    return [
        {"name": name, "params": groups[name], "weight_decay": wd, "lr_mult": lr_mult}
        for name, (wd, lr_mult) in settings.items()
        if groups[name]
    ]


def optimizer_overrides(
    cfg: WeSaRConfig, weight_decay: float, *, lr: Optional[float] = None, min_lr: float = 0.0
) -> dict[ParamKey, ParamGroupOverride]:
    """``config_overrides`` for megatron-core's ``get_megatron_optimizer`` (0.16.1).

    megatron's standard rule (no weight decay for biases and 1-D parameters, which never
    match a 0-d gate) plus one override for the gates. megatron-core matches a
    checkpoint's parameter groups to the optimizer's by ``(wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr)`` alone, so the gates' settings live in those
    fields and equal fields mean equal settings:

    - weight decay ``cfg.gate_weight_decay``: 0 is ``wd_mult = 0`` (the vectors' group
      when the LR is the same); otherwise ``wd_mult = gate_weight_decay`` on a constant
      ``start_wd = end_wd = 1``, exact for any model ``weight_decay``;
    - ``cfg.gate_lr_mult != 1``: ``max_lr``/``min_lr`` are ``lr``/``min_lr`` times the
      multiplier (megatron's scheduler reads no lr_mult; that scales the whole schedule
      exactly when its ``init_lr`` is 0), and ``lr_mult`` names the group.

    A gate weight decay of exactly 1 at the base LR would share the matrices' key and
    is rejected.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    no_wd = ParamKey(name="*.bias", predicate=ParamPredicate(name="param_len_1", fn=lambda p: len(p.shape) == 1))
    if cfg.gate_weight_decay == 0.0:
        gate_override = ParamGroupOverride(wd_mult=0.0)
    elif cfg.gate_weight_decay == 1.0 and cfg.gate_lr_mult == 1.0:
        raise ValueError("WeSaR gate weight decay 1.0 at gate LR multiplier 1 (--wesar-gate-weight-decay, "
                         "--wesar-gate-lr-mult) gives the gates the weight matrices' parameter-group key "
                         "(wd_mult 1, lr_mult 1), which megatron-core's checkpoint loading cannot tell apart")
    else:
        gate_override = ParamGroupOverride(wd_mult=cfg.gate_weight_decay, start_wd=1.0, end_wd=1.0)
    if cfg.gate_lr_mult != 1.0:
        if lr is None:
            raise ValueError("WeSaR gate_lr_mult != 1 (--wesar-gate-lr-mult) needs optimizer_overrides(lr=..., min_lr=...)")
        gate_override.update(lr_mult=cfg.gate_lr_mult, max_lr=lr * cfg.gate_lr_mult, min_lr=min_lr * cfg.gate_lr_mult)
    return {no_wd: ParamGroupOverride(wd_mult=0.0), ParamKey(attr="wesar_gate"): gate_override}


def clip_parameters(params: Iterable[torch.nn.Parameter], cfg: Optional[WeSaRConfig]) -> list[torch.nn.Parameter]:
    """The parameters the global grad-norm clip acts on.

    With ``cfg.exclude_gates_from_clip`` the gates are left out: their gradients neither
    count in the clip norm nor get scaled by the clip coefficient.
    """
    params = list(params)
    if cfg is None or not cfg.exclude_gates_from_clip:
        return params
    return [p for p in params if not is_gate(p)]

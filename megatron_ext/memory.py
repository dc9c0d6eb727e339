"""Per-GPU memory of a megatron-ext GPT for a parallel layout, before you queue it.

``tools/estimate_memory.py`` is its command line. Example::

    python tools/estimate_memory.py --config examples/configs/gpt-13b/baseline.yaml --num-gpus 16

Reads the same YAML as ``pretrain_gpt.py --config``, with the driver's own reader (a key
it does not know is an error; flags override the file), and prints the vocabulary size it
assumed (the driver takes it from the tokenizer; ``--vocab-size``, else GPT-2's) and, for
the most loaded pipeline stage:

* parameters: the model's total and the count one GPU holds (tensor-parallel shards,
  replicated norms and biases, the embedding on the first stage, the output layer or
  the tied copy of the embedding on the last stage, the methods' extra parameters);
* model state: 16-bit weights (2 B), fp32 gradients (4 B, megatron-core's DDP
  accumulates in fp32) and Adam's fp32 master weights, first and second moments
  (12 B), the last divided by the data-parallel size under the distributed optimizer
  (``6 + 12/d`` bytes per parameter; fp32 training: ``4 + 4 + 8``);
* activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", sections 4.1-4.2, no recomputation): per layer
  ``sbh * (10 + 24/t) + 5as^2b/t`` bytes with tensor parallelism, ``sbh * 34/t + 5as^2b/t``
  with sequence parallelism, generalised here to any FFN width, SwiGLU and grouped
  query attention; the ``5as^2b`` attention-score term is dropped with flash or fused
  attention (the default: Transformer Engine and torch SDPA do not store the scores).
  The first stage holds the activations of every micro-batch in flight under the 1F1B
  schedule (``p`` of them, ``p + (p-1)/v`` chunks' worth when interleaved); the last
  stage adds the logits and the fp32 softmax of the loss (``6sbv/t`` bytes) and, with
  WeSaR, what its gate on the output layer saves; with several micro batches per step
  the weight-side scales (WeSaR's gates, NormFormer's head scale) hold one scaled copy of
  each weight for the step (``--weight-scale-once-per-step``, the driver's default) and
  save nothing per micro batch;
* the optimizer step's temporaries: none for a fused Adam (APEX's or Transformer
  Engine's in NVIDIA's container, or torch's fused AdamW, which the driver's GPU engine
  selects without them); torch's foreach AdamW (``--adam-kernel foreach``, megatron-core's
  fallback as it builds it) allocates ``sqrt(v)`` for every parameter it updates, 4 bytes
  each, all at once;
* peak: model state plus the larger of the two phases, activations at the turn from
  forward to backward or the optimizer step's temporaries, on the worse stage. CUDA
  context, NCCL buffers, communication buckets and allocator fragmentation are not
  included: keep 10-15 % of the GPU free for them.

On one H200 the 13B layer shape's peaks (bench/memory_13b.py, 1 to 18 layers) were the
foreach optimizer step's or, for all three methods at 1-4 layers, the activations, each
within 0.7 % of this model (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

GIB = 1024**3
PRECISIONS = ("bf16", "fp16", "fp32")
ADAM_KERNELS = ("fused", "foreach")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
DEFAULT_VOCAB_SIZE = 50257  # GPT-2's
EXIT_USAGE_ERROR = 2  # argparse's status for a bad command line, and pretrain_gpt.py's for a bad config


def _check_positive(**values: Optional[int]) -> None:
    """ValueError naming the flag of the first given value below 1."""
    for dest, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= 1, got {value}")


@dataclass(frozen=True)
class ModelShape:
    """The architecture knobs that decide parameter and activation counts."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    swiglu: bool = False
    normalization: str = "LayerNorm"
    add_bias_linear: bool = True
    position_embedding_type: str = "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    wesar: bool = False
    normformer_head_scale: bool = False
    normformer_post_attention_norm: bool = False
    normformer_ffn_norm: bool = False
    normformer_residual_scale: bool = False

    def __post_init__(self) -> None:
        _check_positive(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            seq_length=self.seq_length, vocab_size=self.vocab_size, ffn_hidden_size=self.ffn_hidden_size,
            num_query_groups=self.num_query_groups, max_position_embeddings=self.max_position_embeddings,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} must be divisible by --num-attention-heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"--num-attention-heads {self.num_attention_heads} must be divisible by "
                f"--num-query-groups {self.query_groups}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"--position-embedding-type must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding_type!r}"
            )

    @property
    def ffn_size(self) -> int:
        """FFN width: ``--ffn-hidden-size``, else 4h (pretrain_gpt.py's default, SwiGLU too)."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_size(self) -> int:
        """Width of the queries, W^O's input: heads x kv_channels."""
        return self.kv_channels * self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        """Output width of the fused QKV linear: queries plus keys and values of every group."""
        return self.query_size + 2 * self.kv_channels * self.query_groups

    @property
    def fc1_size(self) -> int:
        """Output width of fc1: the FFN width, twice it under SwiGLU (gate and up halves)."""
        return 2 * self.ffn_size if self.swiglu else self.ffn_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded to a multiple of ``make_vocab_size_divisible_by`` (pretrain_gpt.py does
        not multiply it by the TP size, so the model is the same at every TP size)."""
        multiple = self.make_vocab_size_divisible_by
        return math.ceil(self.vocab_size / multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """How the model is split over GPUs and how it is trained.

    ``activation_fusion``: megatron's fused bias-GeLU / bias-SwiGLU (the driver's CUDA
    default); with it and without TP, NormFormer's FFN norm is compiled into the same
    kernel and saves no input of its own. ``adam_kernel``: ``fused`` (what the driver runs)
    or ``foreach`` (torch's multi-tensor AdamW, which megatron-core builds without APEX or
    Transformer Engine). ``weight_scale_once_per_step``: the driver's default; with more
    than one micro batch per step (a known ``global_batch_size``) the weight-side scales
    hold one scaled weight per linear for the step instead of saving their product per
    micro batch (:func:`scaled_weight_elements`).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_gpus: int = 1
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    precision: str = "bf16"
    flash_attention: bool = True
    activation_fusion: bool = True
    adam_kernel: str = "fused"
    weight_scale_once_per_step: bool = True

    def __post_init__(self) -> None:
        _check_positive(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size, num_gpus=self.num_gpus,
            micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size,
            num_layers_per_virtual_pipeline_stage=self.num_layers_per_virtual_pipeline_stage,
            decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=self.decoder_last_pipeline_num_layers,
        )
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.num_gpus % model_parallel:
            raise ValueError(
                f"--num-gpus {self.num_gpus} must be a multiple of --tensor-model-parallel-size x "
                f"--pipeline-model-parallel-size = {model_parallel}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.adam_kernel not in ADAM_KERNELS:
            raise ValueError(f"--adam-kernel must be one of {ADAM_KERNELS}, got {self.adam_kernel!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.global_batch_size is not None and self.global_batch_size % (self.micro_batch_size * self.data_parallel_size):
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} must be a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size}"
            )

    @property
    def data_parallel_size(self) -> int:
        return self.num_gpus // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def num_microbatches(self) -> Optional[int]:
        if self.global_batch_size is None:
            return None
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def scales_once_per_step(self) -> bool:
        """Whether the weight-side scales are applied once per step (several micro batches per step)."""
        return self.weight_scale_once_per_step and (self.num_microbatches or 1) > 1


def stage_layers(model: ModelShape, layout: Layout) -> list[int]:
    """Decoder layers on each pipeline stage (uniform, or with uneven first/last stages)."""
    pp = layout.pipeline_model_parallel_size
    first, last = layout.decoder_first_pipeline_num_layers, layout.decoder_last_pipeline_num_layers
    fixed = [n for n in (first, last) if n is not None]
    chunk = layout.num_layers_per_virtual_pipeline_stage
    if chunk is not None and (pp == 1 or fixed):
        raise ValueError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1 "
                         "and no --decoder-first/last-pipeline-num-layers")
    if chunk is not None and model.num_layers % (pp * chunk):
        raise ValueError(f"--num-layers {model.num_layers} is not --pipeline-model-parallel-size {pp} x a multiple "
                         f"of --num-layers-per-virtual-pipeline-stage {chunk}")
    if pp == 1:
        return [model.num_layers]
    middle_stages = pp - len(fixed)
    remaining = model.num_layers - sum(fixed)
    if remaining < 0 or (middle_stages and remaining % middle_stages) or (not middle_stages and remaining):
        raise ValueError(
            f"--num-layers {model.num_layers} cannot be split over {pp} pipeline stages with "
            f"first={first}, last={last} layers"
        )
    per_stage = remaining // middle_stages if middle_stages else 0
    layers = [per_stage] * pp
    if first is not None:
        layers[0] = first
    if last is not None:
        layers[-1] = last
    return layers


def _norm_parameters(model: ModelShape, width: int) -> int:
    return width * (2 if model.normalization == "LayerNorm" else 1)


def layer_parameters(model: ModelShape, tensor_parallel: int = 1) -> int:
    """Parameters of one decoder layer on one tensor-parallel rank.

    Column-parallel weights and biases (QKV, fc1) and row-parallel weights (proj, fc2)
    are split over TP; row-parallel biases and the norms are replicated. NormFormer adds
    a head scale (split with the heads), a post-attention norm, an FFN norm over the
    full FFN width (split with it) and an optional residual scale; WeSaR adds one scalar
    gate per matrix (q, k and v separately; two for a SwiGLU fc1).
    """
    t = tensor_parallel
    h, f = model.hidden_size, model.ffn_size
    query, qkv, fc1 = model.query_size, model.qkv_size, model.fc1_size
    count = 2 * _norm_parameters(model, h)
    count += (qkv * h + query * h + fc1 * h + f * h) // t
    if model.add_bias_linear:
        count += (qkv + fc1) // t + 2 * h
    if model.normformer_head_scale:
        count += model.num_attention_heads // t
    if model.normformer_post_attention_norm:
        count += _norm_parameters(model, h)
    if model.normformer_ffn_norm:
        count += _norm_parameters(model, f) // t
    if model.normformer_residual_scale:
        count += h
    if model.wesar:
        count += 3 + 1 + (2 if model.swiglu else 1) + 1
    return count


def embedding_parameters(model: ModelShape, tensor_parallel: int = 1) -> int:
    """Word embedding (split over TP), learned position embedding (replicated), WeSaR gate."""
    count = model.padded_vocab_size * model.hidden_size // tensor_parallel
    if model.position_embedding_type == "learned_absolute":
        count += model.max_positions * model.hidden_size
    return count + (1 if model.wesar else 0)


def output_parameters(model: ModelShape, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> int:
    """Final norm plus the output layer held by the last stage.

    An untied output layer is its own matrix (and WeSaR gate); a tied one costs nothing
    on a single stage and a synchronised copy of the embedding (and of its gate) on a
    separate last stage.
    """
    count = _norm_parameters(model, model.hidden_size)
    if model.untie_embeddings_and_output_weights or pipeline_parallel > 1:
        count += model.padded_vocab_size * model.hidden_size // tensor_parallel + (1 if model.wesar else 0)
    return count


def total_parameters(model: ModelShape) -> int:
    """Distinct trainable parameters of the whole model."""
    return model.num_layers * layer_parameters(model) + embedding_parameters(model) + output_parameters(model)


def stage_parameters(model: ModelShape, layout: Layout) -> list[int]:
    """Parameters one GPU of each pipeline stage holds."""
    t, p = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    counts = [n * layer_parameters(model, t) for n in stage_layers(model, layout)]
    counts[0] += embedding_parameters(model, t)
    counts[-1] += output_parameters(model, t, p)
    return counts


def state_bytes_per_parameter(layout: Layout) -> dict[str, float]:
    """Bytes per parameter of weights, gradients and optimizer state on one GPU."""
    if layout.precision == "fp32":
        weights, grads, optimizer = 4.0, 4.0, 8.0
    else:
        weights, grads, optimizer = 2.0, 4.0, 12.0
    if layout.use_distributed_optimizer:
        optimizer /= layout.data_parallel_size
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def optimizer_step_bytes_per_parameter(layout: Layout) -> float:
    """Bytes per parameter the optimizer step allocates on top of the model state.

    torch's foreach AdamW computes ``sqrt(v_hat) + eps`` as a new fp32 tensor for every
    parameter of a device and dtype in one call (``torch._foreach_sqrt``), so for the whole
    step; under the distributed optimizer a rank updates only its ``1/d`` of them. A fused
    kernel updates in place.
    """
    if layout.adam_kernel == "fused":
        return 0.0
    return 4.0 / (layout.data_parallel_size if layout.use_distributed_optimizer else 1)


def layer_activation_bytes(model: ModelShape, layout: Layout) -> float:
    """Bytes one decoder layer stores for the backward pass of one micro-batch.

    Korthikanti et al. (2022) section 4.1 with 16-bit activations and 1-byte dropout
    masks: replicated across TP ranks unless sequence parallel are the two norm inputs
    (4sbh), the QKV and fc1 inputs (4sbh) and the two dropout masks (2sbh); split over
    TP are Q, K, V, the projection input, fc1's output and the activation's output;
    ``5as^2b`` for scores, softmax and its dropout unless attention is fused.
    """
    s, b, h = model.seq_length, layout.micro_batch_size, model.hidden_size
    t = layout.tensor_model_parallel_size
    f = model.ffn_size
    kv = model.kv_channels * model.query_groups
    replicated = s * b * (10 * h)
    split = s * b * (2 * h + 4 * kv + 2 * h + 2 * model.fc1_size + 2 * f)
    if model.normformer_ffn_norm and not (layout.activation_fusion and t == 1):
        split += s * b * 2 * f  # the norm's input, the activation's output
    if model.normformer_post_attention_norm:
        replicated += s * b * 2 * h
    if layout.sequence_parallel:
        total = (replicated + split) / t
    else:
        total = replicated + split / t
    total += 2 * scaled_linear_saved_elements(model, layout)
    if not layout.flash_attention:
        total += 5 * model.num_attention_heads * s * s * b / t
    return total


def _scaled_linears(model: ModelShape, layout: Layout) -> list[tuple[int, int]]:
    """(input features, features the scale multiplies) of every scaled linear of a layer on one TP rank.

    WeSaR's gates multiply the outputs of qkv, proj, fc1 and fc2; NormFormer's head scale
    W^O's inputs. On a weight of ``inputs x outputs`` the product has the weight's size.
    """
    t = layout.tensor_model_parallel_size
    h, f = model.hidden_size, model.ffn_size
    query, qkv, fc1 = model.query_size, model.qkv_size, model.fc1_size
    linears = []
    if model.wesar:
        linears += [(h, qkv // t), (query // t, h), (h, fc1 // t), (f // t, h)]
    if model.normformer_head_scale:  # scales W^O's input: the weight is h x query/t
        linears.append((h, query // t))
    return linears


def scaled_linear_saved_elements(model: ModelShape, layout: Layout) -> int:
    """Elements one layer saves for the backward of each micro batch because of scales on its linears (per TP rank).

    A per-feature scale (WeSaR's gates on all four linears, NormFormer's head scale on
    W^O's input) is folded into the weight or applied to an activation, whichever is
    smaller (``--wesar-placement auto``, :mod:`megatron_ext.linear_scaling`); either way the
    product is saved for the backward: the effective weight or the scaled activation.
    Applied once per step (:attr:`Layout.scales_once_per_step`) they save nothing per
    micro batch: :func:`scaled_weight_elements` instead.
    """
    if layout.scales_once_per_step:
        return 0
    rows = model.seq_length * layout.micro_batch_size
    return sum(min(inputs * features, rows * features) for inputs, features in _scaled_linears(model, layout))


def scaled_weight_elements(model: ModelShape, layout: Layout) -> int:
    """Elements of the scaled weights one layer holds for a step when its scales are applied
    once per step (one per scale: W^O has two, WeSaR's and the head scale's); else 0."""
    if not layout.scales_once_per_step:
        return 0
    return sum(inputs * features for inputs, features in _scaled_linears(model, layout))


def inflight_layer_microbatches(model: ModelShape, layout: Layout) -> float:
    """Layer-micro-batches of activations the first stage holds at the peak of 1F1B.

    Without interleaving the first stage keeps ``min(p, m)`` micro-batches of its
    layers; interleaved with ``v`` chunks it keeps ``min(2(p-1) + (v-1)p + 1, mv)``
    micro-batches of one chunk (Korthikanti et al. section 4.2.3: ``L(1 + (p-1)/(pv))``).
    """
    p = layout.pipeline_model_parallel_size
    if layout.num_layers_per_virtual_pipeline_stage is None:
        return stage_layers(model, layout)[0] * inflight_microbatches(layout)
    chunk = layout.num_layers_per_virtual_pipeline_stage
    v = model.num_layers // (p * chunk)
    m = layout.num_microbatches or p
    return chunk * min(2 * (p - 1) + (v - 1) * p + 1, m * v)


def inflight_microbatches(layout: Layout) -> int:
    """Micro-batches whose activations the first stage holds at once under 1F1B: ``min(p, m)``."""
    p = layout.pipeline_model_parallel_size
    return p if layout.num_microbatches is None else min(p, layout.num_microbatches)


def logits_bytes(model: ModelShape, layout: Layout) -> float:
    """The last stage's output-layer input, 16-bit logits and fp32 softmax for one micro-batch.

    With WeSaR the output layer's gate saves its product too (as a decoder linear's does,
    :func:`scaled_linear_saved_elements`): the effective weight ``[v/t, h]`` or the
    ungated logits ``[sb, v/t]``, whichever is smaller; the effective weight when an
    untied output layer's gate is applied once per step.
    """
    s, b, h, t = model.seq_length, layout.micro_batch_size, model.hidden_size, layout.tensor_model_parallel_size
    vocab = model.padded_vocab_size
    hidden = 2 * s * b * h / (t if layout.sequence_parallel else 1)
    gated = 0.0
    if model.wesar:  # once per step an untied output layer holds its scaled weight (a tied one never does)
        once = layout.scales_once_per_step and model.untie_embeddings_and_output_weights
        gated = 2 * vocab / t * (h if once else min(h, s * b))
    return hidden + 6 * s * b * vocab / t + gated


@dataclass(frozen=True)
class MemoryEstimate:
    """What one GPU of the fuller stage holds; bytes unless named otherwise.

    ``peak_phase`` is ``"forward-backward"`` when the activations at the turn from forward
    to backward are at least the optimizer step's temporaries, else ``"optimizer step"``.
    """

    total_parameters: int
    parameters_per_gpu: int
    weights: float
    gradients: float
    optimizer: float
    activations_per_layer: float
    activations: float
    optimizer_step_temporaries: float
    peak: float
    peak_stage: int
    peak_phase: str

    @property
    def model_state(self) -> float:
        return self.weights + self.gradients + self.optimizer


def estimate(model: ModelShape, layout: Layout) -> MemoryEstimate:
    """Per-GPU memory of the pipeline stage whose model state plus its larger phase is largest."""
    per_param = state_bytes_per_parameter(layout)
    per_layer = layer_activation_bytes(model, layout)
    params = stage_parameters(model, layout)
    embedding_dropout = model.seq_length * layout.micro_batch_size * model.hidden_size
    if layout.sequence_parallel:
        embedding_dropout /= layout.tensor_model_parallel_size
    first = per_layer * inflight_layer_microbatches(model, layout)
    first += embedding_dropout * inflight_microbatches(layout)
    scaled_weights = 2 * scaled_weight_elements(model, layout)
    activations = [scaled_weights * n for n in stage_layers(model, layout)]
    activations[0] += first
    if len(params) > 1:
        activations[-1] += per_layer * stage_layers(model, layout)[-1]
    activations[-1] += logits_bytes(model, layout)
    temporaries = [n * optimizer_step_bytes_per_parameter(layout) for n in params]
    state = [n * sum(per_param.values()) for n in params]
    peaks = [s + max(a, o) for s, a, o in zip(state, activations, temporaries)]
    stage = max(range(len(peaks)), key=peaks.__getitem__)
    return MemoryEstimate(
        total_parameters=total_parameters(model),
        parameters_per_gpu=params[stage],
        weights=params[stage] * per_param["weights"],
        gradients=params[stage] * per_param["gradients"],
        optimizer=params[stage] * per_param["optimizer"],
        activations_per_layer=per_layer,
        activations=activations[stage],
        optimizer_step_temporaries=temporaries[stage],
        peak=peaks[stage],
        peak_stage=stage,
        peak_phase="forward-backward" if activations[stage] >= temporaries[stage] else "optimizer step",
    )


# ---------------------------------------------------------------------------------------
# Command line: the driver's YAML and flag names.
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, action="append", metavar="FILE",
                        help="a pretrain_gpt.py YAML config, read as the driver reads it (a key it does not know "
                             "is an error; --num-gpus, --vocab-size, --adam-kernel and --no-flash-attention are "
                             "flags only); repeated, each overrides the ones before it, and flags override them all")
    model = parser.add_argument_group("model")
    for flag in ("num-layers", "hidden-size", "num-attention-heads", "seq-length", "ffn-hidden-size",
                 "num-query-groups", "max-position-embeddings"):
        model.add_argument(f"--{flag}", type=int)
    model.add_argument("--vocab-size", type=int,
                       help=f"tokenizer vocabulary before padding (default: GPT-2's {DEFAULT_VOCAB_SIZE}; "
                            "pretrain_gpt.py takes it from the tokenizer)")
    model.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    model.add_argument("--normalization", choices=NORMALIZATIONS, default="LayerNorm")
    model.add_argument("--position-embedding-type", choices=POSITION_EMBEDDINGS, default="learned_absolute")
    for flag in ("swiglu", "disable-bias-linear", "untie-embeddings-and-output-weights", "wesar", "normformer",
                 "normformer-no-head-scale", "normformer-no-post-attention-norm", "normformer-no-ffn-norm",
                 "normformer-residual-scale"):
        model.add_argument(f"--{flag}", action="store_true", default=None)
    layout = parser.add_argument_group("layout")
    for flag, default in (("tensor-model-parallel-size", 1), ("pipeline-model-parallel-size", 1),
                          ("micro-batch-size", 1), ("global-batch-size", None),
                          ("num-layers-per-virtual-pipeline-stage", None),
                          ("decoder-first-pipeline-num-layers", None), ("decoder-last-pipeline-num-layers", None)):
        layout.add_argument(f"--{flag}", type=int, default=default)
    layout.add_argument("--num-gpus", type=int, help="world size (default: TP x PP, one data-parallel replica)")
    for flag in ("sequence-parallel", "use-distributed-optimizer", "bf16", "fp16"):
        layout.add_argument(f"--{flag}", action="store_true", default=None)
    layout.add_argument("--no-flash-attention", action="store_true", default=None,
                        help="count the 5as^2b bytes of materialised attention scores")
    layout.add_argument("--adam-kernel", choices=ADAM_KERNELS, default="fused",
                        help="fused: what pretrain_gpt.py runs (APEX's or Transformer Engine's FusedAdam, else "
                             "torch's fused AdamW); foreach: torch's multi-tensor AdamW, megatron-core's fallback "
                             "as it builds it, with a 4-byte temporary per parameter in the step")
    layout.add_argument("--weight-scale-once-per-step", action=argparse.BooleanOptionalAction, default=True,
                        help="as pretrain_gpt.py (default: on): with several micro batches per step, one scaled "
                             "copy of each scaled weight for the step instead of a saved product per micro batch")
    for flag in ("bias-gelu-fusion", "bias-swiglu-fusion"):
        layout.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                            help="as pretrain_gpt.py (default: on, the CUDA default)")
    return parser


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    """The values of ``parser``'s flags in a pretrain_gpt.py YAML config, by argparse destination.

    pretrain_gpt.py's own reader checks the file (ValueError naming it: unreadable, not a
    mapping, a key the driver does not know, a value of the wrong type); the driver's keys
    the estimator does not use are dropped. Importing the driver's parser loads torch and
    megatron-core (5-7 s on a CPU machine), so it happens only here, when a config is given.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's import-time notes on absent GPU packages
        from megatron_ext.training.arguments import build_parser as driver_parser, load_config_file
    try:
        values = load_config_file(str(path), driver_parser())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path}: cannot read YAML: {error}") from None
    known = {action.dest for action in parser._actions}
    return {dest: value for dest, value in values.items() if dest in known}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags over the ``--config`` files layered in order; ValueError for a file the driver would reject."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    for path in args.config or ():
        parser.set_defaults(**load_config(path, parser))
    args = parser.parse_args(argv)
    missing = [f"--{n.replace('_', '-')}" for n in ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
               if getattr(args, n) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (give them as flags or in --config)")
    return args


def from_args(args: argparse.Namespace) -> tuple[ModelShape, Layout]:
    """The model and layout of parsed arguments (ValueError for an inconsistent one)."""
    normformer = bool(args.normformer)
    model = ModelShape(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        seq_length=args.seq_length, vocab_size=DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_query_groups=args.num_query_groups, max_position_embeddings=args.max_position_embeddings,
        swiglu=bool(args.swiglu), normalization=args.normalization, add_bias_linear=not args.disable_bias_linear,
        position_embedding_type=args.position_embedding_type,
        untie_embeddings_and_output_weights=bool(args.untie_embeddings_and_output_weights),
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, wesar=bool(args.wesar),
        normformer_head_scale=normformer and not args.normformer_no_head_scale,
        normformer_post_attention_norm=normformer and not args.normformer_no_post_attention_norm,
        normformer_ffn_norm=normformer and not args.normformer_no_ffn_norm,
        normformer_residual_scale=normformer and bool(args.normformer_residual_scale),
    )
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    layout = Layout(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_gpus=tp * pp if args.num_gpus is None else args.num_gpus,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        sequence_parallel=bool(args.sequence_parallel), use_distributed_optimizer=bool(args.use_distributed_optimizer),
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        flash_attention=not args.no_flash_attention,
        activation_fusion=_activation_fusion(args),
        adam_kernel=args.adam_kernel, weight_scale_once_per_step=args.weight_scale_once_per_step,
    )
    return model, layout


def _activation_fusion(args: argparse.Namespace) -> bool:
    """The driver's CUDA default: megatron's fused activation where it applies, unless switched off."""
    if args.swiglu:
        return args.bias_swiglu_fusion is not False
    return args.bias_gelu_fusion is not False and not args.disable_bias_linear


def vocabulary_source(args: argparse.Namespace) -> str:
    """Where the vocabulary size of parsed arguments came from, for :func:`report`."""
    if args.vocab_size is None:
        return "default --vocab-size: GPT-2's; give --vocab-size for your tokenizer"
    return "--vocab-size"


def report(model: ModelShape, layout: Layout, result: MemoryEstimate, vocab_source: str) -> str:
    """A human-readable summary of ``result``; ``vocab_source`` says where the vocabulary size came from."""
    per_param = state_bytes_per_parameter(layout)
    scaled_weights = scaled_weight_elements(model, layout)
    options = [name for name, on in (("sequence parallel", layout.sequence_parallel),
                                     ("distributed optimizer", layout.use_distributed_optimizer)) if on]
    rows = [
        ("vocabulary", f"{model.vocab_size:,d}, padded to {model.padded_vocab_size:,d}  ({vocab_source})"),
        ("parameters, total", f"{result.total_parameters:,d}"),
        ("parameters, per GPU", f"{result.parameters_per_gpu:,d}  (pipeline stage {result.peak_stage})"),
        (f"weights ({per_param['weights']:g} B/param)", f"{result.weights / GIB:.2f} GiB"),
        (f"gradients ({per_param['gradients']:g} B/param)", f"{result.gradients / GIB:.2f} GiB"),
        (f"optimizer ({per_param['optimizer']:g} B/param)", f"{result.optimizer / GIB:.2f} GiB"),
        ("activations per layer", f"{result.activations_per_layer / GIB:.2f} GiB  (one micro-batch)"),
        *([("scaled weights per layer",
            f"{2 * scaled_weights / GIB:.2f} GiB  (once per step, within the activations)")] if scaled_weights else []),
        ("activations", f"{result.activations / GIB:.2f} GiB"),
        ("optimizer-step temporaries", f"{result.optimizer_step_temporaries / GIB:.2f} GiB  "
                                       f"({optimizer_step_bytes_per_parameter(layout):g} B/param, {layout.adam_kernel} Adam)"),
        ("peak per GPU", f"{result.peak / GIB:.2f} GiB  (at the {result.peak_phase}; + CUDA context, NCCL buffers, "
                         "fragmentation)"),
    ]
    header = (f"layout: TP={layout.tensor_model_parallel_size} PP={layout.pipeline_model_parallel_size} "
              f"DP={layout.data_parallel_size} on {layout.num_gpus} GPUs, micro-batch {layout.micro_batch_size}, "
              + ", ".join(options + [layout.precision]))
    return "\n".join([header] + [f"{label + ':':<28}{value}" for label, value in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """tools/estimate_memory.py: the report on stdout, or ``error: ...`` on stderr and exit status 2."""
    try:
        args = parse_args(argv)
        model, layout = from_args(args)
        result = estimate(model, layout)
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return EXIT_USAGE_ERROR
    sys.stdout.write(report(model, layout, result, vocabulary_source(args)) + "\n")
    return 0


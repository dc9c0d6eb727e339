"""The one entry point that builds a megatron-core ``GPTModel`` with the methods switched on.

The layer spec starts as megatron-core's own (local or Transformer Engine), its layer
class becomes :class:`~megatron_ext.layer.ExtTransformerLayer`, and each enabled
method rewrites the parts of the spec it owns (``apply_to_layer_spec`` in its module).
Methods that touch modules outside the decoder layers (WeSaR's embedding and output
layer) adjust the built model (``apply_to_model``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from typing import Optional, Union

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext import normformer, prores, wesar
from megatron_ext.attention import SDPACoreAttention
from megatron_ext.extensions import ExtensionConfig
from megatron_ext.layer import ExtTransformerLayer, ExtTransformerLayerSubmodules
from megatron_ext.norms import TorchNorm

logger = logging.getLogger(__name__)

BACKENDS = ("local", "te")


def have_transformer_engine() -> bool:
    """Whether Transformer Engine's PyTorch extension can be imported."""
    return importlib.util.find_spec("transformer_engine") is not None


def local_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """megatron-core's local GPT layer spec with the CPU/GPU SDPA core attention."""
    spec = get_gpt_layer_local_spec(
        normalization=config.normalization, qk_layernorm=config.qk_layernorm
    )
    attention = spec.submodules.self_attention
    attention.submodules = replace(attention.submodules, core_attention=SDPACoreAttention)
    return spec


def te_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """megatron-core's Transformer Engine GPT layer spec; a clear error without TE."""
    if not have_transformer_engine():
        raise RuntimeError(
            "backend='te' (--transformer-impl transformer_engine) needs NVIDIA Transformer "
            "Engine, which is not installed here; it ships in NVIDIA's PyTorch containers. "
            "Use backend='local' (--transformer-impl local) instead."
        )
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)


def _with_sequence_parallel_norms(submodules: ExtTransformerLayerSubmodules) -> ExtTransformerLayerSubmodules:
    swap = {
        name: TorchNorm
        for name in ("input_layernorm", "pre_mlp_layernorm")
        if getattr(submodules, name) is WrappedTorchNorm
    }
    return replace(submodules, **swap)


def build_layer_spec(
    config: TransformerConfig, extensions: ExtensionConfig, backend: str = "local"
) -> ModuleSpec:
    """The decoder layer spec for ``backend`` with every enabled method applied."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    base = local_layer_spec(config) if backend == "local" else te_layer_spec(config)
    submodules = ExtTransformerLayerSubmodules.from_base(base.submodules)
    if config.sequence_parallel:
        submodules = _with_sequence_parallel_norms(submodules)
    spec = ModuleSpec(module=ExtTransformerLayer, params=dict(base.params), submodules=submodules)
    if extensions.wesar is not None:
        spec = wesar.apply_to_layer_spec(spec, config, extensions.wesar)
    if extensions.normformer is not None:
        spec = normformer.apply_to_layer_spec(spec, config, extensions.normformer)
    if extensions.prores is not None:
        spec = prores.apply_to_layer_spec(spec, extensions.prores)
    return spec


def _block_spec(
    config: TransformerConfig, layer_spec: ModuleSpec, vp_stage: Optional[int]
) -> Union[ModuleSpec, TransformerBlockSubmodules]:
    """Give the final norm the sequence-parallel-capable torch norm where megatron has none."""
    if not (config.sequence_parallel and layer_spec.submodules.input_layernorm is TorchNorm):
        return layer_spec
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=TorchNorm)


def gpt_model(
    config: TransformerConfig,
    extensions: ExtensionConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    backend: str = "local",
    share_embeddings_and_output_weights: bool = True,
    position_embedding_type: str = "learned_absolute",
    rotary_percent: float = 1.0,
    rotary_base: int = 10000,
    parallel_output: bool = True,
) -> GPTModel:
    """Build one pipeline stage (or virtual-stage chunk ``vp_stage``) of a GPT.

    ``extensions`` switches the methods on; with every method off the result computes
    exactly what megatron-core's ``GPTModel`` over ``get_gpt_layer_local_spec()``
    (``backend="local"``) or the Transformer Engine spec (``backend="te"``) computes.
    The keyword arguments after ``backend`` are passed to ``GPTModel``; embeddings and
    output layer are tied by default, as in Megatron-LM.
    """
    layer_spec = build_layer_spec(config, extensions, backend)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_block_spec(config, layer_spec, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_percent=rotary_percent,
        rotary_base=rotary_base,
        parallel_output=parallel_output,
        vp_stage=vp_stage,
    )
    if extensions.wesar is not None:
        wesar.apply_to_model(model, config, extensions.wesar)
    if extensions.normformer is not None:
        normformer.apply_to_model(model, config, extensions.normformer)
    return model


def gpt_model_chunks(
    config: TransformerConfig, extensions: ExtensionConfig, **kwargs
) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one without virtual stages).

    Each chunk gets ``pre_process`` / ``post_process`` from megatron-core's parallel
    state; ``kwargs`` go to :func:`gpt_model`.
    """
    from megatron.core import parallel_state

    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = None if vp_size is None else vp_stage
        chunks.append(
            gpt_model(
                config,
                extensions,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
                **kwargs,
            )
        )
    return chunks

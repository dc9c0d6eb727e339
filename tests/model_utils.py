"""Tiny GPT configurations and numerics helpers shared by the model tests."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext import ExtensionConfig
from megatron_ext.config import ExtTransformerConfig
from megatron_ext.model import gpt_model
from megatron_ext.parallel import cpu_manual_seed

VOCAB = 96
SEQ = 16


def tiny_config(**overrides) -> ExtTransformerConfig:
    """A 4-layer GPT small enough for CPU tests; dropout off so runs are deterministic."""
    kwargs = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    kwargs.update(overrides)
    return ExtTransformerConfig(**kwargs)


# SwiGLU + grouped-query attention + RMSNorm + untied output layer.
LLAMA_LIKE = dict(
    gated_linear_unit=True, activation_func=torch.nn.functional.silu, num_query_groups=2,
    normalization="RMSNorm", add_bias_linear=False,
)


def build(config: TransformerConfig, extensions: ExtensionConfig = ExtensionConfig(), seed: int = 7, **kwargs):
    """Seed, then build a model with megatron_ext.model.gpt_model."""
    cpu_manual_seed(seed)
    return gpt_model(config, extensions, vocab_size=VOCAB, max_sequence_length=SEQ, **kwargs)


def build_fp64(config: TransformerConfig, extensions: ExtensionConfig = ExtensionConfig(), seed: int = 7, **kwargs):
    """:func:`build` in double precision, for checks that compare sums taken in different orders.

    megatron's torch norms take the default dtype and the WeSaR gates are created fp32, so
    both are made fp64 too; megatron's vocab-parallel cross entropy still computes in fp32.
    """
    config = dataclasses.replace(config, params_dtype=torch.float64, pipeline_dtype=torch.float64)
    original = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return build(config, extensions, seed, **kwargs).double()
    finally:
        torch.set_default_dtype(original)


def assert_grads_close_to_scale(actual: dict, expected: dict, rel: float, what: str = "") -> None:
    """Each gradient (by name) within ``rel`` of its tensor's largest entry. A WeSaR gate's
    gradient is a sum with cancellation: an elementwise relative tolerance would measure that."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        error = float((actual[name] - grad).abs().max())
        assert error <= rel * float(grad.abs().max()), f"{what} {name}: {error:.3g}"


def batch(seed: int = 0, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """Token ids, position ids and next-token labels from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).expand(batch_size, SEQ)
    return {"input_ids": tokens[:, :-1], "position_ids": positions, "labels": tokens[:, 1:]}


def forward_loss(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross entropy (vocab-parallel under TP)."""
    return model(data["input_ids"], data["position_ids"], None, labels=data["labels"]).mean()


def logits(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V], gathered over tensor-parallel ranks."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    out = model(data["input_ids"], data["position_ids"], None)
    return gather_from_tensor_model_parallel_region(out)

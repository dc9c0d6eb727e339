"""NormFormer under tensor, sequence and pipeline parallelism (gloo worlds on the CPU)."""

from __future__ import annotations

import pytest
import torch
from model_utils import LLAMA_LIKE
from mp_utils import run_distributed
from parallel_checks import (
    ffn_norm_tp_vs_full,
    normformer_sharded_keys,
    pipeline_split_logits,
    run_checks,
    tp_cases_loss_and_grads,
)

from megatron_ext import ExtensionConfig, NormFormerConfig, ProResConfig, WeSaRConfig

SMALL = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4)
SHAPES = {"gpt": SMALL, "llama-like": {**SMALL, **LLAMA_LIKE}}  # GELU/MHA/LayerNorm; SwiGLU/GQA/RMSNorm
# 32 token rows per micro-batch outnumber 16 features: the head scale (and WeSaR's gates)
# fold into the weights instead of multiplying activations.
FOLDING = {"narrow": {**SMALL, "hidden_size": 16, "ffn_hidden_size": 32}}
# megatron's fused activations (--bias-gelu-fusion / --bias-swiglu-fusion): at TP=1 the
# activation and the FFN norm are one compiled kernel, at TP=2 the activation is fused alone
# and the norm compiled on each side of its all-reduce.
FUSED = {f"{shape}-fused": {**overrides, "bias_activation_fusion": True} for shape, overrides in SHAPES.items()}
PARTS = ("head_scale", "post_attention_norm", "ffn_norm", "residual_scale")
OPTIONS = {  # each part alone, then all four
    **{part: NormFormerConfig(**{name: name == part for name in PARTS}) for part in PARTS},
    "all": NormFormerConfig(residual_scale=True),
}
PARALLEL = {"tp": {}, "tp+sp": {"sequence_parallel": True}}
CASES = [(shape, option, parallel) for shape in SHAPES for option in OPTIONS for parallel in PARALLEL]
CASES += [(shape, option, parallel) for shape in FOLDING for option in ("head_scale", "all") for parallel in PARALLEL]
CASES += [(shape, "ffn_norm", parallel) for shape in FUSED for parallel in PARALLEL]
ALL_THREE = ExtensionConfig(
    prores=ProResConfig(warmup=2), wesar=WeSaRConfig(), normformer=NormFormerConfig(residual_scale=True)
)


def assert_same_grads(grads_tp2: dict, grads_tp1: dict) -> None:
    """Replicated grads equal, partitioned grads (gathered over TP) equal, every parameter."""
    assert grads_tp2.keys() == grads_tp1.keys()
    for name, expected in grads_tp1.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(grads_tp2[name], expected, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=name)


@pytest.fixture(scope="module")
def normformer_world():
    """One TP=2 world: the FFN-norm kernel, the checkpoint layout and every model case."""
    cases = [
        (ExtensionConfig(normformer=OPTIONS[option]), {**SHAPES, **FOLDING, **FUSED}[shape], PARALLEL[parallel])
        for shape, option, parallel in CASES
    ]
    kernel, sharded, models = run_distributed(
        run_checks, 2, [
            (ffn_norm_tp_vs_full, (["LayerNorm", "RMSNorm"],)),
            (normformer_sharded_keys, (ExtensionConfig(normformer=OPTIONS["all"]), SHAPES["gpt"])),
            (tp_cases_loss_and_grads, (cases, 0, 11)),
        ],
    )[0]
    return kernel, sharded, dict(zip(CASES, models))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_ffn_norm_tp2_equals_full_width_norm(normformer_world, normalization, fused):
    ours, reference = normformer_world[0][normalization, fused]
    for name, got, expected in zip(("output", "input grad", "gain grad", "bias grad"), ours, reference):
        if expected is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_sharded_checkpoint_partitions_head_scale_and_ffn_norm(normformer_world):
    sharded = normformer_world[1]
    layers, heads = SMALL["num_layers"], SMALL["num_attention_heads"]
    ffn, hidden = SMALL["ffn_hidden_size"], SMALL["hidden_size"]
    # (local shape, global shape, global offset) on TP rank 0; the layer axis is prepended.
    for layer in range(layers):
        at = f"decoder.layers.{layer}."
        assert sharded[f"{at}self_attention.linear_proj.head_scale"] == ((heads // 2,), (layers, heads), (layer, 0))
        for param in ("weight", "bias"):
            assert sharded[f"{at}mlp.ffn_norm.{param}"] == ((ffn // 2,), (layers, ffn), (layer, 0))
            assert sharded[f"{at}post_attention_norm.{param}"] == ((hidden,), (layers, hidden), (layer, 0))
        assert sharded[f"{at}mlp_skip_scale.weight"] == ((hidden,), (layers, hidden), (layer, 0))


@pytest.mark.parametrize("shape,option,parallel", CASES)
def test_tp2_equals_tp1(normformer_world, shape, option, parallel):
    results = normformer_world[2][(shape, option, parallel)]
    (loss2, grads2), (loss1, grads1) = results[2], results[1]
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    assert_same_grads(grads2, grads1)


@pytest.fixture(scope="module")
def all_three_world():
    """ProRes + WeSaR + NormFormer: TP=2 vs TP=1 and a two-stage pipeline split, per shape."""
    shapes = {**SHAPES, **FOLDING}
    tp_cases = [(ALL_THREE, overrides, {"sequence_parallel": True}) for overrides in shapes.values()]
    calls = [(tp_cases_loss_and_grads, (tp_cases, 3, 5))]
    calls += [(pipeline_split_logits, (ALL_THREE, overrides, 3)) for overrides in shapes.values()]
    ranks = run_distributed(run_checks, 2, calls)
    tp_results, split_results = ranks[0][0], ranks[1][1:]  # rank 0 compares TP; rank 1 is the last stage
    return dict(zip(shapes, tp_results)), dict(zip(shapes, split_results))


@pytest.mark.parametrize("shape", [*SHAPES, *FOLDING])
def test_all_three_methods_tp2_equals_tp1(all_three_world, shape):
    (loss2, grads2), (loss1, grads1) = all_three_world[0][shape][2], all_three_world[0][shape][1]
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    assert_same_grads(grads2, grads1)


@pytest.mark.parametrize("shape", [*SHAPES, *FOLDING])
def test_all_three_methods_two_stage_split_equals_unsplit(all_three_world, shape):
    max_diff, scale = all_three_world[1][shape]
    assert scale > 0.01 and max_diff <= 1e-6 * scale

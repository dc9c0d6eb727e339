"""ProRes under pipeline and tensor parallelism (gloo worlds on the CPU)."""

from __future__ import annotations

import pytest
import torch
from model_utils import LLAMA_LIKE
from mp_utils import run_distributed
from parallel_checks import pipeline_alphas, pipeline_split_logits, tp_loss_and_grads

from megatron_ext import ExtensionConfig, ProResConfig
from megatron_ext.prores import prores_alpha

PRORES = ExtensionConfig(prores=ProResConfig(schedule="linear", warmup=2))

LAYOUTS = [
    dict(num_layers=8, pp=4),
    dict(num_layers=8, pp=2, vpp=2),
    dict(num_layers=8, tp=2, pp=2, vpp=2),
    dict(num_layers=8, pp=4, num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=1),
    dict(num_layers=12, pp=4, vpp=2, num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=2),
]


def test_global_layer_numbers_under_pipeline_layouts():
    step = 5
    per_rank = run_distributed(pipeline_alphas, 4, LAYOUTS, PRORES, step)
    for index, layout in enumerate(LAYOUTS):
        num_layers = layout["num_layers"]
        replicas: dict[tuple, list] = {}
        for rank_results in per_rank:
            pp_rank, tp_rank, dp_rank, alphas = rank_results[index]
            replicas.setdefault((tp_rank, dp_rank), []).append((pp_rank, alphas))
        for stages in replicas.values():
            assert sorted(pp for pp, _ in stages) == list(range(layout["pp"]))
            layers = [layer for _, alphas in stages for layer in alphas]
            assert sorted(layers) == list(range(1, num_layers + 1)), (layout, layers)
            for _, alphas in stages:
                for layer, alpha in alphas.items():
                    assert alpha == pytest.approx(prores_alpha("linear", layer, step, num_layers, 2), abs=1e-7)
        # Pipeline stages really hold different layers (not every stage all of them).
        assert all(len(alphas) < num_layers for *_, alphas in (r[index] for r in per_rank))


@pytest.mark.parametrize("shape", ["gpt", "llama-like"])
def test_two_stage_split_equals_unsplit(shape):
    overrides = {} if shape == "gpt" else LLAMA_LIKE
    _, (max_diff, scale) = run_distributed(pipeline_split_logits, 2, PRORES, overrides, 3)
    assert scale > 0.01 and max_diff <= 1e-6 * scale


@pytest.mark.parametrize("shape", ["gpt", "llama-like"])
def test_tp2_equals_tp1(shape):
    overrides = {} if shape == "gpt" else LLAMA_LIKE
    results = run_distributed(tp_loss_and_grads, 2, PRORES, overrides, 3)[0]
    (loss2, norm2, _), (loss1, norm1, _) = results[2], results[1]
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    assert norm2 == pytest.approx(norm1, rel=1e-5)

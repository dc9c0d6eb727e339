"""WeSaR under tensor parallelism (GQA, MQA, sequence parallelism) and a pipeline split; one gloo world."""

from __future__ import annotations

import pytest
from model_utils import LLAMA_LIKE
from mp_utils import run_distributed
from parallel_checks import wesar_tp_step

from megatron_ext import ExtensionConfig
from megatron_ext.wesar import WeSaRConfig

SP = {"sequence_parallel": True}
UNTIED = {"share_embeddings_and_output_weights": False}


def wesar(placement: str) -> ExtensionConfig:
    return ExtensionConfig(wesar=WeSaRConfig(gate_weight_decay=0.01, gate_lr_mult=2.0, placement=placement))


# name -> (extensions, config overrides, gpt_model kwargs). The tiny shapes have fewer
# token rows than input features, so "auto" gates outputs; "weight" forces the other path.
CASES = {
    "llama-like GQA": (wesar("auto"), LLAMA_LIKE, UNTIED),
    "gpt tied": (wesar("auto"), {}, {}),
    "llama-like MQA (groups < TP)": (wesar("auto"), {**LLAMA_LIKE, "num_query_groups": 1}, UNTIED),
    "gpt tied, sequence parallel": (wesar("auto"), SP, {}),
    "llama-like GQA, rope, sequence parallel": (
        wesar("auto"), {**LLAMA_LIKE, **SP}, {**UNTIED, "position_embedding_type": "rope"}),
    "gates on weights: llama-like GQA": (wesar("weight"), LLAMA_LIKE, UNTIED),
    "gates on weights: gpt tied, sequence parallel": (wesar("weight"), SP, {}),
    "gates on weights: llama-like MQA, sequence parallel": (
        wesar("weight"), {**LLAMA_LIKE, **SP, "num_query_groups": 1}, UNTIED),
}


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(wesar_tp_step, 2, list(CASES.values()))


@pytest.mark.parametrize("index, case", list(enumerate(CASES)))
def test_tp2_equals_tp1_loss_gate_grads_and_step(per_rank, index, case):
    """Gate gradients are reduced exactly where TP ranks hold different parts (a missing
    reduction gives a partial sum, a superfluous one TP times the value)."""
    tp2, tp1 = per_rank[0][0][index][2], per_rank[0][0][index][1]
    assert tp2["loss"] == pytest.approx(tp1["loss"], rel=1e-5)
    assert tp2["grads"].keys() == tp1["grads"].keys() and len(tp1["grads"]) >= 4 * 6 + 1
    for name, grad in tp1["grads"].items():
        assert tp2["grads"][name] == pytest.approx(grad, rel=1e-4, abs=1e-8), name
    for name, value in tp1["gates"].items():
        assert tp2["gates"][name] == pytest.approx(value, rel=1e-6), name
    assert tp2["loss_after"] == pytest.approx(tp1["loss_after"], rel=1e-5)
    assert tp1["loss_after"] != pytest.approx(tp1["loss"], rel=1e-4)  # the step did move the model


@pytest.mark.parametrize("index, case", list(enumerate(CASES)))
def test_gates_identical_on_tp_ranks_and_checkpointed_replicated(per_rank, index, case):
    rank0, rank1 = (per_rank[r][0][index][2] for r in (0, 1))
    assert rank0["grads"] == rank1["grads"] and rank0["gates"] == rank1["gates"]
    for rank, results in enumerate((rank0, rank1)):
        for name, (global_shape, local_shape, replica_id) in results["sharded"].items():
            # No TP axis: the local tensor is the whole gate (decoder gates carry megatron's
            # layer axis) and TP rank r is replica r.
            assert local_shape == () and replica_id[1] == rank, (name, global_shape, replica_id)
            assert global_shape in ((), (4,)), name


def test_two_stage_pipeline_split_equals_unsplit(per_rank):
    max_diff, scale = per_rank[1][1]
    assert scale > 0.01 and max_diff <= 1e-6 * scale

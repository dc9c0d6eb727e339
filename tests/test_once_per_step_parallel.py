"""--weight-scale-once-per-step under tensor parallelism: the gradients of scaling every micro
batch at TP=2 and TP=1, and one all-reduce of each deferred WeSaR gate's gradient per step."""

from __future__ import annotations

import pytest
from model_utils import LLAMA_LIKE, assert_grads_close_to_scale
from mp_utils import run_distributed
from parallel_checks import UNTIED, once_per_step_tp

from megatron_ext import ExtensionConfig, NormFormerConfig, ProResConfig, WeSaRConfig

ALL = ExtensionConfig(prores=ProResConfig(warmup=2), wesar=WeSaRConfig(), normformer=NormFormerConfig())
MICRO_BATCHES = 3
# name -> (config overrides, gpt_model kwargs, TP=2 overrides, WeSaR linears deferred: 4 per
# layer, plus an untied output layer; a tied one keeps its gate per micro batch).
CASES = {
    "llama-like GQA, untied": (LLAMA_LIKE, UNTIED, {}, 17),
    "gpt tied, sequence parallel": ({}, {}, {"sequence_parallel": True}, 16),
}


@pytest.fixture(scope="module")
def rank0():
    cases = [case[:3] for case in CASES.values()]
    return run_distributed(once_per_step_tp, 2, ALL, cases, MICRO_BATCHES)[0]


@pytest.mark.parametrize("index, case", list(enumerate(CASES)))
def test_tp2_once_per_step_equals_per_micro_batch_and_tp1(rank0, index, case):
    """In double precision: once per step against per micro batch at the same TP size (only
    the order of the sums differs), and TP=2 against TP=1 (megatron's vocab-parallel cross
    entropy computes in fp32)."""
    runs = rank0[index]
    for tp in (1, 2):
        assert runs[(tp, True)][0] == pytest.approx(runs[(tp, False)][0], rel=1e-12)
        assert_grads_close_to_scale(runs[(tp, True)][1], runs[(tp, False)][1], 1e-9, f"TP={tp}")
    assert runs[(2, True)][0] == pytest.approx(runs[(1, True)][0], rel=1e-6)
    assert_grads_close_to_scale(runs[(2, True)][1], runs[(1, True)][1], 1e-5, "TP=2 against TP=1")


@pytest.mark.parametrize("index, case", list(enumerate(CASES)))
def test_a_deferred_gate_gradient_is_all_reduced_once_per_step(rank0, index, case):
    """Micro batches 1..M-1 give the deferred gates zero gradients: no all-reduce for them."""
    runs, deferred = rank0[index], CASES[case][3]
    per_micro_batch, once = runs[(2, False)][2], runs[(2, True)][2]
    assert runs[(2, True)][3] == runs[(1, True)][3] == deferred
    assert per_micro_batch >= MICRO_BATCHES * deferred
    assert once == per_micro_batch - (MICRO_BATCHES - 1) * deferred
    assert runs[(1, False)][2] == runs[(1, True)][2] == 0  # TP=1: megatron's bypass, and ours

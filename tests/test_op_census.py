"""bench/op_census.py and megatron_ext.op_census: what each method adds, counted op by op."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.op_census import OpCensus, census_of

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_census_counts_reads_and_writes_of_memory_bound_ops_only():
    a, b = torch.randn(8, 16, requires_grad=True), torch.randn(16, 4)
    with OpCensus() as census:
        y = (a * 2.0) @ b           # mul: reads 128, writes 128; mm is compute-bound
        y.view(-1).sum()            # view skipped; sum reads 32, writes a 0-d tensor
    assert census.written["mul"] == 128 and census.read["mul"] == 128
    assert census.read["sum"] == 32 and census.written["sum"] == 0
    assert census.compute_bound["mm"] == 1 and "mm" not in census.written and "view" not in census.written
    assert census.traffic() == 128 + 128 + 32
    backward = census_of(lambda: (a * b.sum()).sum())
    assert backward.written["mul"] >= 2 * a.numel()  # forward product and its backward


def test_a_batch_of_dot_products_counts_as_memory_bound():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    with OpCensus() as census:
        torch.einsum("ij,ij->i", a, b)   # bmm of [8, 1, 16] x [8, 16, 1]: reads both, writes 8
        torch.bmm(a.view(2, 4, 16), b.view(2, 16, 4))  # real matrix products: compute-bound
    assert census.read["bmm"] == 256 and census.written["bmm"] == 8
    assert census.compute_bound["bmm"] == 1


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    import op_census

    output = tmp_path_factory.mktemp("census") / "census.json"
    assert op_census.main(["--tiny", "--output", str(output)]) == 0
    return json.loads(output.read_text())


def test_prores_adds_four_activation_passes_per_branch(tiny_report):
    """out * a(l, t) forward and grad * a(l, t) backward, each reading and writing [T, h]."""
    shape = tiny_report["shapes"]["tiny"]
    tokens = shape["seq_length"] * shape["micro_batch_size"]
    h, layers = shape["hidden_size"], shape["num_layers"]
    extra = tiny_report["results"]["tiny"]["prores"]["extra_elements"]
    activation_passes = 2 * layers * 4 * tokens * h  # two branches per layer
    assert activation_passes <= extra <= activation_passes + 16 * layers * h  # plus the biases' scaling


def test_gates_on_weights_cost_less_than_gates_on_outputs(tiny_report):
    results = tiny_report["results"]["tiny"]
    assert results["baseline"]["extra_elements"] == 0
    assert 0 < results["wesar"]["extra_elements"] < results["wesar-on-outputs"]["extra_elements"]
    assert results["all"]["extra_elements"] > results["normformer"]["extra_elements"] > 0
    assert {"native_layer_norm", "native_layer_norm_backward"} <= set(results["normformer"]["top_extra_ops"])

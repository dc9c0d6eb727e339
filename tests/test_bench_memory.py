"""bench/memory_13b.py's fit, confirmation run and estimator correction, on synthetic peaks.

The GPU measurements themselves need a GPU; what is checked here is the arithmetic that
turns them into the per-layer figures and the largest layer count that fits.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MEMORY = 141 * GIB  # an H200's


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory_13b", REPO / "bench" / "memory_13b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def estimated(bench, layers: int, variant: str):
    shape = bench.LAYER_13B
    layout = bench.em.Layout(micro_batch_size=shape.micro_batch_size, precision="bf16")
    return bench.em.estimate(bench.estimator_model(shape, layers, variant), layout)


def synthetic_peak(bench, layers: int, variant: str) -> float:
    """The estimator's peak with 10% more activations and 1 GiB it does not model."""
    est = estimated(bench, layers, variant)
    return est.peak + 0.1 * est.activations + GIB


@pytest.mark.parametrize("variant", ["baseline", "all"])
def test_fit_confirms_the_largest_count_that_fits_and_corrects_the_estimator(bench, monkeypatch, variant):
    tried = []

    def try_measure(shape, layers, *rest):
        tried.append(layers)
        if len(tried) == 1:
            return None  # out of memory: the next count down is run
        return {"layers": layers, "peak_allocated": synthetic_peak(bench, layers, variant)}

    monkeypatch.setattr(bench, "try_measure", try_measure)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (MEMORY, MEMORY))
    points = [{"layers": n, "peak_allocated": synthetic_peak(bench, n, variant)} for n in (1, 2, 4)]
    args = argparse.Namespace(fill=0.95, layers=[1, 2, 4], device="cuda", iterations=2)
    result = bench.fit_and_confirm(bench.LAYER_13B, variant, points, Path("unused"), args)

    a = synthetic_peak(bench, 1, variant) - (synthetic_peak(bench, 2, variant) - synthetic_peak(bench, 1, variant))
    b = synthetic_peak(bench, 2, variant) - synthetic_peak(bench, 1, variant)
    fits = math.floor((0.95 * MEMORY - a) / b)
    assert 4 < fits < 40 and tried == [fits, fits - 1]
    assert result["max_layers_fitting"] == fits - 1 and len(points) == 4
    assert synthetic_peak(bench, fits - 1, variant) <= 0.95 * MEMORY
    assert result["activation_ratio"] == pytest.approx(1.1, rel=1e-9)
    one = estimated(bench, 1, variant)
    unmodelled = GIB + 0.1 * (one.activations - one.activations_per_layer)
    assert result["unmodelled_constant_gib"] == pytest.approx(unmodelled / GIB, rel=1e-9)
    assert result["measured_per_layer_gib"] == pytest.approx(b / GIB, rel=1e-9)


def test_a_peak_that_does_not_grow_with_the_layers_is_no_fit(bench, monkeypatch):
    monkeypatch.setattr(bench, "try_measure", lambda *a: pytest.fail("no confirmation run without a fit"))
    points = [{"layers": n, "peak_allocated": 0} for n in (1, 2, 4)]
    args = argparse.Namespace(fill=0.95, layers=[1, 2, 4], device="cuda", iterations=2)
    result = bench.fit_and_confirm(bench.LAYER_13B, "baseline", points, Path("unused"), args)
    assert "did not grow" in result["fit_error"] and "max_layers_fitting" not in result


def test_layouts_are_extrapolated_with_the_measured_correction(bench):
    corrections = {"baseline": {"activation_ratio": 1.1, "unmodelled_constant_gib": 1.0}}
    configs = sorted((REPO / "examples" / "configs" / "gpt-13b").glob("*.yaml"))
    layouts = bench.extrapolate(corrections, configs, 16)
    assert set(layouts) == {p.name for p in configs}
    for path in configs:
        model, layout = bench.em.from_args(bench.em.parse_args(["--config", str(path), "--num-gpus", "16"]))
        est = bench.em.estimate(model, layout)
        entry = layouts[path.name]
        assert entry["correction_from"] == "baseline"
        assert entry["extrapolated_peak_gib"] * GIB == pytest.approx(est.peak + 0.1 * est.activations + GIB, rel=1e-9)

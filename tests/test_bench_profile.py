"""bench/profile_step.py's bookkeeping: variant specs, GPU busy time, differences, synchronisations,
and a CPU run of the whole script (the GPU numbers themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_profile_step", REPO / "bench" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_specs(bench):
    assert bench.variant_flags("wesar+dopt") == ["--wesar", "--use-distributed-optimizer"]
    assert bench.variant_flags("baseline") == []
    assert bench.variant_flags("all+scale-fusion") == ["--prores", "--wesar", "--normformer", "--weight-scale-fusion"]
    assert bench.variant_flags("wesar+per-micro-batch") == ["--wesar", "--no-weight-scale-once-per-step"]
    for bad in ("wesar+fast", "nothing"):
        with pytest.raises(SystemExit, match=re.escape(f"{bad!r} is not NAME")):
            bench.variant_flags(bad)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "7b"], "--shapes: unknown ['7b']"),
    (["--iters", "0"], "--iters, --profile-iters and --micro-batches >= 1"),
    (["--micro-batches", "0"], "--iters, --profile-iters and --micro-batches >= 1"),
])
def test_bad_arguments_are_clear_errors(bench, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.main(argv + ["--device", "cpu", "--output", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


def test_busy_time_is_the_union_of_kernel_intervals(bench):
    assert bench._busy_us([(20, 25), (0, 10), (5, 15), (6, 7)]) == 20
    assert bench._busy_us([]) == 0


def test_difference_covers_names_of_either_table_largest_first(bench):
    base = {"a": {"count": 2, "ms": 1.0}, "b": {"count": 1, "ms": 5.0}}
    run = {"a": {"count": 4, "ms": 4.0}, "c": {"count": 1, "ms": 0.5}}
    delta = bench.difference(run, base)
    assert list(delta) == ["b", "a", "c"]
    assert delta["b"] == {"count": -1, "ms": -5.0} and delta["a"] == {"count": 2, "ms": 3.0}


def test_synchronising_calls_are_counted_at_their_line(bench, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "set_sync_debug_mode", lambda mode: None)

    class Engine:
        model_chunks: list = []
        completed_updates = 0

        def train_step(self, batches):
            for _ in range(3):
                warnings.warn("called a synchronizing CUDA operation")
            warnings.warn("Warning: tp_group is None")  # not a synchronisation

    sites = bench.synchronizing_calls(Engine(), None)
    assert list(sites.values()) == [3] and "called a synchronizing" in next(iter(sites))


def test_cpu_run_writes_phases_profiles_and_differences(bench, tmp_path):
    output = tmp_path / "profile.json"
    assert bench.main(["--device", "cpu", "--tiny", "--variants", "baseline", "wesar", "--primitives",
                       "--warmup", "1", "--iters", "3", "--profile-iters", "1", "--output", str(output)]) == 0
    results = json.loads(output.read_text())["shapes"]["tiny"]
    assert set(results) == {"primitives", "baseline", "wesar"}
    assert all(r["gpu_ms"] > 0 for r in results["primitives"].values())
    for name in ("baseline", "wesar"):
        assert results[name]["iteration_ms"] > 0 and results[name]["profile"]["host_ops"]
    assert "vs_first" not in results["baseline"]
    # WeSaR adds its gate multiplies: more aten::mul calls per iteration than the baseline.
    assert results["wesar"]["vs_first"]["host_ops"]["aten::mul"]["count"] > 0


def test_cpu_run_with_gradient_accumulation_sets_per_micro_batch_scaling_against_once_per_step(bench, tmp_path):
    """--micro-batches 2 on the 2-layer toy (128 token rows per micro batch): once per step,
    all four gated linears of each layer go through the once-per-step scale in both micro
    batches (fc2 too, whose 256 inputs would put its gate on the output per micro batch),
    the tied output layer's gate per micro batch; +per-micro-batch, the weight-side scale
    of qkv, proj and fc1 and the output layer in every micro batch."""
    output = tmp_path / "profile.json"
    assert bench.main(["--device", "cpu", "--tiny", "--micro-batches", "2", "--variants", "wesar",
                       "wesar+per-micro-batch", "--warmup", "1", "--iters", "2", "--profile-iters", "1",
                       "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["micro_batches"] == 2
    ops = {name: r["profile"]["host_ops"] for name, r in report["shapes"]["tiny"].items()}
    assert ops["wesar"]["_ScaleOncePerStep"]["count"] == 2 * 4 * 2 and ops["wesar"]["_ScaleRows"]["count"] == 2
    assert "_ScaleOncePerStep" not in ops["wesar+per-micro-batch"]
    assert ops["wesar+per-micro-batch"]["_ScaleRows"]["count"] == (2 * 3 + 1) * 2

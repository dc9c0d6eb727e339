"""A benchmark variant or primitive that raises (a kernel that does not compile on the device,
say) is recorded with its error in the JSON and the log, the run goes on with the ones after
it, and the script's exit status says that something failed: the device's time is too short
to lose a whole stage to one variant."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
import memory_13b  # noqa: E402
import profile_step  # noqa: E402
import step_time  # noqa: E402

CPU_TINY = ["--device", "cpu", "--tiny"]


def failing_for(name: str, real, message: str):
    """``real``, except that it raises RuntimeError(message) when its second argument is ``name``."""
    def call(*args, **kwargs):
        if args[1] == name:
            raise RuntimeError(message)
        return real(*args, **kwargs)
    return call


def test_measured_returns_the_result_or_the_error_and_logs_its_traceback(caplog):
    assert harness.measured("fine", lambda: {"ms": 1.0}) == {"ms": 1.0}

    def broken() -> dict:
        raise ValueError("no kernel image")

    with caplog.at_level(logging.ERROR, logger="bench.harness"):
        assert harness.measured("1.3b wesar", broken) == {"error": "ValueError: no kernel image"}
    assert "1.3b wesar failed" in caplog.text and "Traceback" in caplog.text
    with pytest.raises(SystemExit):  # a bad flag is not a measurement to go on from
        harness.measured("flags", lambda: sys.exit("--bad"))


def test_failures_names_failed_variants_and_primitives():
    shapes = {"1.3b": {"primitives": {"a": {"gpu_ms": 1.0}, "b": {"error": "E: x"}},
                       "baseline": {"ms": 1.0}, "wesar": {"error": "E: y"}},
              "125m": {"baseline": {"ms": 1.0}}}
    assert harness.failures(shapes) == ["1.3b b", "1.3b wesar"]


def test_step_time_goes_on_after_a_failed_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(step_time, "time_variant",
                        failing_for("wesar", step_time.time_variant, "inductor: no kernel for this GPU"))
    output = tmp_path / "step_time.json"
    code = step_time.main(CPU_TINY + ["--variants", "baseline", "wesar", "normformer", "--warmup", "1",
                                      "--iters", "3", "--output", str(output)])
    assert code == 1
    results = json.loads(output.read_text())["results"]["tiny"]
    assert results["wesar"] == {"error": "RuntimeError: inductor: no kernel for this GPU"}
    assert results["baseline"]["overhead"] == 0.0
    assert math.isfinite(results["normformer"]["overhead"]) and results["normformer"]["mfu"] > 0
    table = step_time.markdown({"tiny": results}, 1.0)
    assert "| tiny | wesar | failed: RuntimeError: inductor: no kernel for this GPU |" in table
    assert "| tiny | normformer |" in table


def test_step_time_without_a_measured_baseline_has_no_overheads():
    variants = {"baseline": {"error": "E: x"}, "wesar": {"ms_per_iteration": 2.0}}
    step_time.add_overheads(variants)
    assert math.isnan(variants["wesar"]["overhead"]) and "overhead" not in variants["baseline"]


def test_profile_goes_on_after_a_failed_primitive_and_variant(tmp_path, monkeypatch):
    real_compile = profile_step.torch.compile

    def compile_without_multi_kernel(fn=None, **kwargs):
        if "triton.multi_kernel" in (kwargs.get("options") or {}):
            def broken(*args, **kw):
                raise RuntimeError("multi_kernel does not compile here")
            return broken
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(profile_step.torch, "compile", compile_without_multi_kernel)
    monkeypatch.setattr(profile_step, "measure_variant",
                        failing_for("wesar", profile_step.measure_variant, "the device ran out of memory"))
    output = tmp_path / "profile.json"
    code = profile_step.main(CPU_TINY + ["--primitives", "--variants", "baseline", "wesar", "normformer",
                                         "--warmup", "1", "--iters", "2", "--profile-iters", "1",
                                         "--output", str(output)])
    assert code == 1
    report = json.loads(output.read_text())
    results = report["shapes"]["tiny"]
    primitives = results["primitives"]
    failed = [name for name, r in primitives.items() if "error" in r]
    assert len(failed) == 1 and "multi_kernel" in failed[0]
    assert primitives[failed[0]]["error"] == "RuntimeError: multi_kernel does not compile here"
    assert all(r["gpu_ms"] > 0 for name, r in primitives.items() if name not in failed)
    assert results["wesar"] == {"error": "RuntimeError: the device ran out of memory"}
    assert results["normformer"]["iteration_ms"] > 0 and "vs_first" in results["normformer"]
    summary = profile_step.summary(report)
    assert "tiny wesar failed: RuntimeError: the device ran out of memory" in summary
    assert "multi_kernel does not compile here" in summary and "tiny normformer {'iteration_ms'" in summary


def test_memory_goes_on_after_a_failed_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_13b, "variant_entry", failing_for("baseline", memory_13b.variant_entry, "no fit"))
    output = tmp_path / "memory.json"
    code = memory_13b.main(CPU_TINY + ["--layers", "1", "2", "--output", str(output)])
    assert code == 1
    variants = json.loads(output.read_text())["variants"]
    assert variants["baseline"] == {"error": "RuntimeError: no fit"}
    assert [p["layers"] for p in variants["all"]["points"]] == [1, 2]

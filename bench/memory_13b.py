#!/usr/bin/env python
"""Peak GPU memory of the 13B layer shape on one GPU, against tools/estimate_memory.py.

    python bench/memory_13b.py --output memory_13b.json                    # one GPU, bf16
    python bench/memory_13b.py --device cpu --tiny --output /tmp/m.json    # CPU smoke test

The 13B decoder layer (hidden 5120, 40 heads, FFN 20480, sequence 2048, GPT-2 vocabulary,
tied embeddings) is trained for ``--iterations`` driver iterations (bf16, megatron-core
DDP and Adam, TP = PP = DP = 1, no recomputation) with ``--layers`` layers, and the peak
of ``torch.cuda.max_memory_allocated`` is recorded for the whole run and for each phase of
an iteration: the forward-backward (the engine's schedule call, whose peak is the
activations at the turn to the backward) and the rest (the optimizer step, whose peak is
its temporaries). A least-squares line through the points gives the measured bytes per
layer ``b`` and the fixed part ``a``, overall and per phase; the largest layer count that
fits the GPU (``a + b L`` under ``--fill`` of its memory) is then run to confirm it. Each
point is set beside ``tools/estimate_memory.py``'s peak for the same run, with the Adam
kernel the run used.

Extrapolation to the layouts in ``--configs`` (default: examples/configs/gpt-13b): the
estimator's model state (weights, gradients, optimizer; exact counts) plus the larger of
its optimizer-step temporaries and its activations scaled by the forward-backward phase's
measured ratio ``r = (b - estimated state per layer) / estimated activations per layer``
plus that phase's unmodelled constant ``a - estimated fixed part``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from megatron_ext import memory as em  # noqa: E402
from megatron_ext.training import torch_adam  # noqa: E402
from megatron_ext.training.distributed import shutdown  # noqa: E402
from megatron_ext.training.setup import padded_vocab_size  # noqa: E402

logger = logging.getLogger("bench.memory_13b")
REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
LAYER_13B = harness.Shape("13b-layer", 1, 5120, 40, 2048, micro_batch_size=2, ffn_hidden_size=20480)
LAYER_TINY = harness.Shape("tiny-layer", 1, 64, 4, 32, micro_batch_size=2, ffn_hidden_size=256)


def estimator_model(shape: harness.Shape, num_layers: int, variant: str):
    flags = harness.METHOD_FLAGS[variant]
    normformer = "--normformer" in flags
    return em.ModelShape(
        num_layers=num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_attention_heads,
        seq_length=shape.seq_length, vocab_size=harness.GPT2_VOCAB_SIZE, ffn_hidden_size=shape.ffn_hidden_size,
        wesar="--wesar" in flags, normformer_head_scale=normformer, normformer_post_attention_norm=normformer,
        normformer_ffn_norm=normformer,
    )


class PhasePeaks:
    """Peak allocated bytes of each phase of the engine's iterations, the largest over all.

    ``forward_backward``: the engine's schedule call (``GpuEngine._run``); ``optimizer_step``:
    the rest of the iteration (gradient norm, clip, update, parameter copies); ``build``:
    before the first iteration; ``reserved``: the allocator's peak reserved bytes over all.
    """

    def __init__(self, engine) -> None:
        self.reserved = 0
        self.build = self._peak()
        self.forward_backward = self.optimizer_step = 0
        torch.cuda.reset_peak_memory_stats()
        run = engine._run

        def phased_run(data_iterator, forward_only):
            self.optimizer_step = max(self.optimizer_step, self._peak())
            torch.cuda.reset_peak_memory_stats()
            result = run(data_iterator, forward_only)
            self.forward_backward = max(self.forward_backward, self._peak())
            torch.cuda.reset_peak_memory_stats()
            return result

        engine._run = phased_run

    def _peak(self) -> int:
        """Allocated bytes' peak since the last reset (reserved bytes' kept in ``reserved``)."""
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())
        return torch.cuda.max_memory_allocated()

    def end_iteration(self) -> None:
        self.optimizer_step = max(self.optimizer_step, self._peak())

    @property
    def overall(self) -> int:
        return max(self.build, self.forward_backward, self.optimizer_step)


def adam_kernel(engine) -> str:
    """The estimator's name for the engine's Adam: ``foreach`` where a torch Adam(W) runs
    unfused (megatron-core's fallback as it builds it), else ``fused``."""
    unfused = [adam for adam in torch_adam.torch_adams(engine.optimizer) if not adam.defaults.get("fused")]
    return "foreach" if unfused else "fused"


def measure(shape: harness.Shape, num_layers: int, variant: str, data: Path, device: str, iterations: int) -> dict:
    """Peak allocated / reserved bytes of ``iterations`` driver iterations, overall and per
    phase (None on the CPU)."""
    flags = harness.Shape(**{**vars(shape), "num_layers": num_layers}).flags()
    args = harness.driver_args(flags + ["--train-iters", str(iterations)] + list(harness.METHOD_FLAGS[variant]),
                               data, device)
    engine, batches = harness.build_run(args, padded_vocab_size(harness.GPT2_VOCAB_SIZE, args.make_vocab_size_divisible_by))
    cuda = args.use_cuda
    phases = PhasePeaks(engine) if cuda else None
    losses = []
    for _ in range(iterations):
        losses.append(harness.train_iteration(engine, batches).loss)
        if phases is not None:
            phases.end_iteration()
    point = {
        "layers": num_layers, "last_loss": losses[-1], "adam_kernel": adam_kernel(engine),
        "peak_allocated": phases.overall if cuda else None,
        "peak_forward_backward": phases.forward_backward if cuda else None,
        "peak_optimizer_step": phases.optimizer_step if cuda else None,
        "peak_reserved": phases.reserved if cuda else None,
    }
    del engine, batches
    harness.free_memory()
    if cuda:
        point["allocated_after_release"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    return point


def try_measure(*args) -> Optional[dict]:
    """:func:`measure`, or None when the GPU runs out of memory."""
    try:
        return measure(*args)
    except torch.OutOfMemoryError:
        logger.info("out of memory with %d layers", args[1])
    harness.free_memory()
    torch.cuda.reset_peak_memory_stats()
    return None


def fit_line(points: list[dict], key: str = "peak_allocated") -> tuple[float, float]:
    """Least-squares ``points[key] = a + b * layers`` -> (a, b)."""
    b, a = np.polyfit([p["layers"] for p in points], [p[key] for p in points], 1)
    return float(a), float(b)


def _estimates(shape: harness.Shape, variant: str, layers: int, adam: str) -> em.MemoryEstimate:
    layout = em.Layout(micro_batch_size=shape.micro_batch_size, precision="bf16", adam_kernel=adam)
    return em.estimate(estimator_model(shape, layers, variant), layout)


def _phase_line(points: list[dict], key: str, one: float, two: float) -> dict:
    """The measured line of one phase beside the estimator's (``one``, ``two``: its peaks at 1 and 2 layers)."""
    a, b = fit_line(points, key)
    return {"measured_per_layer_gib": b / GIB, "measured_fixed_gib": a / GIB,
            "estimated_per_layer_gib": (two - one) / GIB, "estimated_fixed_gib": (2 * one - two) / GIB}


def correction(shape: harness.Shape, variant: str, points: list[dict]) -> dict:
    """The measured lines, overall and per phase, against the estimator's for the same runs.

    The forward-backward phase gives the activation ratio (measured activations per layer
    over the estimator's) and the unmodelled constant; the optimizer step gives the
    temporaries per parameter of the run's Adam kernel.
    """
    adam = points[0].get("adam_kernel", "fused")
    for p in points:
        p["estimated_peak"] = _estimates(shape, variant, p["layers"], adam).peak
    one, two = (_estimates(shape, variant, n, adam) for n in (1, 2))
    result = {"adam_kernel": adam, **_phase_line(points, "peak_allocated", one.peak, two.peak)}
    if not all(p.get("peak_forward_backward") for p in points):
        return result  # no per-phase peaks
    state_per_layer = two.model_state - one.model_state
    forward_backward = _phase_line(points, "peak_forward_backward", one.model_state + one.activations,
                                   two.model_state + two.activations)
    b = forward_backward["measured_per_layer_gib"] * GIB
    forward_backward["activation_ratio"] = (b - state_per_layer) / one.activations_per_layer
    forward_backward["unmodelled_constant_gib"] = (
        forward_backward["measured_fixed_gib"] - forward_backward["estimated_fixed_gib"])
    optimizer_step = _phase_line(points, "peak_optimizer_step", one.model_state + one.optimizer_step_temporaries,
                                 two.model_state + two.optimizer_step_temporaries)
    b = optimizer_step["measured_per_layer_gib"] * GIB
    optimizer_step["temporary_bytes_per_parameter"] = (
        (b - state_per_layer) / (two.parameters_per_gpu - one.parameters_per_gpu))
    return {**result, "forward_backward": forward_backward, "optimizer_step": optimizer_step,
            "activation_ratio": forward_backward["activation_ratio"],
            "unmodelled_constant_gib": forward_backward["unmodelled_constant_gib"]}


def extrapolate(corrections: dict[str, dict], configs: list[Path], num_gpus: int) -> dict:
    """Each 13B layout's estimated and corrected peak; a config named like a measured
    variant (``all.yaml``) takes that variant's correction, the others the baseline's."""
    layouts = {}
    for path in configs:
        source = path.stem if path.stem in corrections else "baseline"
        if source not in corrections:
            continue
        c = corrections[source]
        model, layout = em.from_args(em.parse_args(["--config", str(path), "--num-gpus", str(num_gpus)]))
        est = em.estimate(model, layout)
        activations = c["activation_ratio"] * est.activations + c["unmodelled_constant_gib"] * GIB
        corrected = est.model_state + max(activations, est.optimizer_step_temporaries)
        layouts[path.name] = {
            "layout": f"TP={layout.tensor_model_parallel_size} PP={layout.pipeline_model_parallel_size} "
                      f"DP={layout.data_parallel_size} micro-batch {layout.micro_batch_size} on {num_gpus} GPUs",
            "estimated_peak_gib": est.peak / GIB, "extrapolated_peak_gib": corrected / GIB, "correction_from": source,
        }
    return layouts


def fit_and_confirm(shape: harness.Shape, variant: str, points: list[dict], data: Path,
                    args: argparse.Namespace) -> dict:
    """The line through ``points``, the largest layer count it says fits ``--fill`` of the
    GPU (run to confirm, stepping down on out-of-memory) and the estimator's correction."""
    a, b = fit_line(points)
    if not b > 0:
        return {"fit_error": f"the peak did not grow with the layer count ({b:.0f} bytes per layer); no fit"}
    fits = math.floor((args.fill * torch.cuda.mem_get_info()[1] - a) / b)
    largest = None
    for n in range(fits, max(fits - 3, max(args.layers)), -1):
        largest = try_measure(shape, n, variant, data, args.device, args.iterations)
        if largest is not None:
            points.append(largest)
            break
    return {"max_layers_fitting": largest["layers"] if largest else None, **correction(shape, variant, points)}


def variant_entry(shape: harness.Shape, variant: str, data: Path, args: argparse.Namespace, use_cuda: bool) -> dict:
    """One variant's points (every ``--layers`` count) and, on a GPU, their fit and confirmation."""
    points = [measure(shape, n, variant, data, args.device, args.iterations) for n in sorted(set(args.layers))]
    entry: dict = {"points": points}
    if use_cuda:
        entry.update(fit_and_confirm(shape, variant, points, data, args))
    return entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a toy layer shape (CPU smoke test)")
    parser.add_argument("--variants", nargs="+", choices=tuple(harness.METHOD_FLAGS), default=["baseline", "all"])
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2, 4], help="layer counts for the fit")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="the 13B examples' micro batch")
    parser.add_argument("--iterations", type=int, default=2, help="iterations per point (Adam state appears in the first)")
    parser.add_argument("--fill", type=float, default=0.95, help="fraction of GPU memory the largest run may fill")
    parser.add_argument("--configs", nargs="*", type=Path,
                        default=sorted((REPO / "examples" / "configs" / "gpt-13b").glob("*.yaml")))
    parser.add_argument("--num-gpus", type=int, default=16, help="world size for the extrapolated layouts")
    parser.add_argument("--output", type=Path, required=True, help="JSON file of the results")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    harness.start_logging()
    shape = harness.Shape(**{**vars(LAYER_TINY if args.tiny else LAYER_13B), "micro_batch_size": args.micro_batch_size})
    if len(set(args.layers)) < 2 or min(args.layers) < 1:
        raise SystemExit("--layers needs at least two distinct counts >= 1")
    report: dict = {"shape": vars(shape), "iterations": args.iterations, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = harness.write_synthetic_dataset(Path(tmp) / "tokens", harness.GPT2_VOCAB_SIZE, 16, 2 * shape.seq_length)
        world_args = harness.driver_args(shape.flags() + ["--train-iters", "1"], data, args.device)
        created = harness.init_world(world_args)
        try:
            if world_args.use_cuda:
                report["device"] = torch.cuda.get_device_name(0)
                report["device_memory_gib"] = torch.cuda.mem_get_info()[1] / GIB
            for variant in args.variants:
                entry = harness.measured(variant, functools.partial(
                    variant_entry, shape, variant, data, args, world_args.use_cuda))
                report["variants"][variant] = entry
                logger.info("%s: %s", variant, json.dumps({k: v for k, v in entry.items() if k != "points"}))
                harness.write_report(args.output, report)  # what is measured so far, should a later run stall
            corrections = {v: e for v, e in report["variants"].items() if "activation_ratio" in e}
            report["layouts_13b"] = extrapolate(corrections, args.configs, args.num_gpus)
        finally:
            shutdown(created)
    harness.write_report(args.output, report)
    return harness.exit_status({shape.name: report["variants"]}, args.output)


if __name__ == "__main__":
    sys.exit(main())

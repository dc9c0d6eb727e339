#!/usr/bin/env python
"""Training-iteration time of the baseline, each method alone and all three, in one process.

    python bench/step_time.py --output step_time.json                       # one GPU, bf16
    python bench/step_time.py --device cpu --tiny --output /tmp/st.json     # CPU smoke test

For each GPT shape (125M, 350M, 1.3B at sequence 2048; micro batches as in
examples/configs) and each variant the driver's engine is built (megatron-core DDP,
optimizer and no-pipelining schedule, bf16; see bench/harness.py), ``--warmup`` iterations
are run and then ``--iters`` iterations are timed one by one (each ends in the loss's
host copy, a device sync). Reported per variant: median ms/iteration (and the 10th/90th
percentiles), tokens/s, model TFLOP/s from the driver's formula
(:func:`megatron_ext.training.metrics.model_flops_per_iteration`, the baseline's FLOPs for
every variant, padded vocabulary), MFU against the dense bf16 matmul ceiling measured in
the same process, and the overhead ``median / median(baseline) - 1``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from megatron_ext.training.distributed import shutdown  # noqa: E402
from megatron_ext.training.metrics import model_flops_per_iteration  # noqa: E402
from megatron_ext.training.setup import padded_vocab_size  # noqa: E402

logger = logging.getLogger("bench.step_time")

SHAPES = {
    "125m": harness.Shape("125m", 12, 768, 12, 2048, micro_batch_size=16),
    "350m": harness.Shape("350m", 24, 1024, 16, 2048, micro_batch_size=8),
    "1.3b": harness.Shape("1.3b", 24, 2048, 16, 2048, micro_batch_size=4),
}
TINY_SHAPES = {"tiny": harness.Shape("tiny", 2, 64, 4, 64, micro_batch_size=2)}


def select_shapes(names: Optional[Sequence[str]], tiny: bool) -> list[harness.Shape]:
    """The shapes named by ``--shapes`` (all by default) of :data:`SHAPES`, or of
    :data:`TINY_SHAPES` with ``--tiny``; a clear error for an unknown name."""
    table = TINY_SHAPES if tiny else SHAPES
    names = list(names or table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; expected {', '.join(table)}")
    return [table[n] for n in names]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_variant(shape: harness.Shape, variant: str, data_prefix: Path, device: str, warmup: int,
                 iters: int, extra_flags: Sequence[str] = ()) -> dict:
    """Median and spread of ``iters`` timed iterations of one shape and variant."""
    flags = shape.flags() + ["--train-iters", str(warmup + iters)] + list(harness.METHOD_FLAGS[variant])
    flags += list(extra_flags)
    args = harness.driver_args(flags, data_prefix, device)
    vocab = padded_vocab_size(harness.GPT2_VOCAB_SIZE, args.make_vocab_size_divisible_by)
    engine, batches = harness.build_run(args, vocab)
    dev = harness.device_of(args)
    for _ in range(warmup):
        harness.train_iteration(engine, batches)
    times, skipped = [], 0
    for _ in range(iters):
        harness.synchronize(dev)
        start = time.perf_counter()
        result = harness.train_iteration(engine, batches)
        harness.synchronize(dev)
        times.append(time.perf_counter() - start)
        skipped += result.skipped
    peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    del engine, batches
    harness.free_memory()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    median = statistics.median(times)
    tokens = args.global_batch_size * args.seq_length
    tflops = model_flops_per_iteration(args, vocab) / median / 1e12
    return {
        "ms_per_iteration": 1e3 * median, "p10_ms": 1e3 * percentile(times, 0.1),
        "p90_ms": 1e3 * percentile(times, 0.9), "tokens_per_s": tokens / median, "model_tflops": tflops,
        "skipped_iterations": skipped, "peak_memory_gib": peak_gib, "micro_batch_size": args.micro_batch_size,
        "tokens_per_iteration": tokens,
    }


def markdown(results: dict, ceiling: float) -> str:
    lines = [f"matmul ceiling (measured): {ceiling:.1f} TFLOP/s", "",
             "| shape | variant | ms/iter (p10-p90) | tokens/s | model TFLOP/s | MFU | overhead |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape, variants in results.items():
        for name, r in variants.items():
            if "error" in r:
                lines.append(f"| {shape} | {name} | failed: {r['error'][:200].replace('|', '/')} | | | | |")
                continue
            lines.append(f"| {shape} | {name} | {r['ms_per_iteration']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f}) | "
                         f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.1f} | {100 * r['mfu']:.1f}% | "
                         f"{100 * r['overhead']:+.2f}% |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy shape (CPU smoke test)")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--variants", nargs="+", choices=tuple(harness.METHOD_FLAGS), default=list(harness.METHOD_FLAGS))
    parser.add_argument("--micro-batch-size", type=int, default=None, help="override every shape's micro batch")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations per variant")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per variant")
    parser.add_argument("--ceiling-size", type=int, default=8192, help="n of the n^3 matmul ceiling")
    parser.add_argument("--extra-flags", default="",
                        help="pretrain_gpt.py flags added to every variant, one quoted string, "
                             "given with '=', e.g. --extra-flags='--no-bias-dropout-fusion --no-bias-gelu-fusion'")
    parser.add_argument("--output", type=Path, required=True, help="JSON file of the results")
    return parser


def add_overheads(variants: dict[str, dict]) -> None:
    """Each measured variant's ``overhead``: its ms/iteration over the same shape's baseline, minus 1
    (NaN without a measured baseline)."""
    base = variants.get("baseline")
    base_ms = base["ms_per_iteration"] if base and "error" not in base else float("nan")
    for r in variants.values():
        if "error" not in r:
            r["overhead"] = r["ms_per_iteration"] / base_ms - 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    harness.start_logging()
    shapes = select_shapes(args.shapes, args.tiny)
    if args.micro_batch_size is not None:
        shapes = [harness.Shape(**{**vars(s), "micro_batch_size": args.micro_batch_size}) for s in shapes]
    if args.warmup < 1 or args.iters < 3:
        raise SystemExit("--warmup must be >= 1 and --iters >= 3")

    with tempfile.TemporaryDirectory() as tmp:
        longest = max(s.seq_length for s in shapes)
        data = harness.write_synthetic_dataset(Path(tmp) / "tokens", harness.GPT2_VOCAB_SIZE, 64, 2 * longest)
        world_args = harness.driver_args(shapes[0].flags() + ["--train-iters", "1"], data, args.device)
        created = harness.init_world(world_args)
        try:
            dev = harness.device_of(world_args)
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            ceiling = harness.matmul_ceiling_tflops(dev, dtype, args.ceiling_size if dev.type == "cuda" else 512)
            logger.info("%s matmul ceiling: %.1f TFLOP/s on %s", dtype, ceiling,
                        torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU")
            results: dict[str, dict] = {}
            report = {
                "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                "torch": torch.__version__, "dtype": str(dtype), "matmul_ceiling_tflops": ceiling,
                "warmup": args.warmup, "timed_iterations": args.iters, "extra_flags": args.extra_flags,
                "shapes": {s.name: vars(s) for s in shapes}, "results": results,
            }
            for shape in shapes:
                results[shape.name] = {}
                for variant in args.variants:
                    r = harness.measured(f"{shape.name} {variant}", functools.partial(
                        time_variant, shape, variant, data, args.device, args.warmup, args.iters,
                        shlex.split(args.extra_flags)))
                    results[shape.name][variant] = r
                    if "error" not in r:
                        r["mfu"] = r["model_tflops"] / ceiling
                        logger.info("%s %s: %.2f ms/iteration", shape.name, variant, r["ms_per_iteration"])
                    add_overheads(results[shape.name])
                    # After every variant: a run stopped by a time limit keeps what it finished.
                    harness.write_report(args.output, report)
        finally:
            shutdown(created)
    print(markdown(results, ceiling))
    return harness.exit_status(results, args.output)


if __name__ == "__main__":
    sys.exit(main())

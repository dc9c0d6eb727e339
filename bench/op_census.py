#!/usr/bin/env python
"""Memory-bound work each method adds to a training micro-batch, counted op by op on a CPU.

    python bench/op_census.py --output docs/op_census.json     # prints the markdown table

For the step-time shapes (bench/step_time.py) and every variant, the driver's model is
built under ``FakeTensorMode`` (no memory, no compute) and one micro-batch's forward and
backward runs through :class:`megatron_ext.op_census.OpCensus`, which counts the tensor
elements every memory-bound aten op reads and writes (pointwise ops, norms, reductions,
copies; matmuls and fused attention are compute-bound and not counted). A method's
extra traffic over the baseline, at 2 bytes per element (bf16), divided by the HBM
bandwidth, is the time its extra elementwise kernels need at best; against the step time
implied by the model FLOPs at a given MFU, that is a predicted overhead. It predicts,
it does not measure: the GPU benchmark (bench/step_time.py) is the measurement, and this
census says where to look when the two disagree. Ops are dispatched as on the CPU (a
few composite ops decompose differently on a GPU); the methods' own ops are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from step_time import SHAPES, TINY_SHAPES  # noqa: E402

from megatron_ext.op_census import OpCensus  # noqa: E402
from megatron_ext.training import setup  # noqa: E402
from megatron_ext.training.configs import extension_config  # noqa: E402
from megatron_ext.training.distributed import shutdown  # noqa: E402
from megatron_ext.training.metrics import model_flops_per_iteration  # noqa: E402

logger = logging.getLogger("bench.op_census")
BYTES_PER_ELEMENT = 2  # bf16 activations and weights


@contextlib.contextmanager
def _one_rank_all_reduce_skipped() -> Iterator[None]:
    """``torch.distributed.all_reduce`` over a one-rank group returns at once.

    The census runs one rank, where megatron-core's vocab-parallel cross entropy still
    all-reduces (the identity); torch 2.7 and earlier have no fake kernel for c10d's
    all-reduce, so on fake tensors it would raise.
    """
    all_reduce = torch.distributed.all_reduce

    def skip_one_rank(tensor: torch.Tensor, *args, group=None, **kwargs):
        if torch.distributed.get_world_size(group) == 1:
            return None
        return all_reduce(tensor, *args, group=group, **kwargs)

    with mock.patch.object(torch.distributed, "all_reduce", skip_one_rank):
        yield


def census_of_variant(shape: harness.Shape, variant: str, data_prefix: Path) -> tuple[OpCensus, float]:
    """Census of one fake micro-batch (forward + backward) and the micro-batch's model FLOPs."""
    flags = shape.flags() + ["--train-iters", "1"] + list(harness.METHOD_FLAGS[variant])
    args = harness.driver_args(flags, data_prefix, "cpu")
    vocab = setup.padded_vocab_size(harness.GPT2_VOCAB_SIZE, args.make_vocab_size_divisible_by)
    with FakeTensorMode(allow_non_fake_inputs=True), _one_rank_all_reduce_skipped():
        (model,) = setup.build_model_chunks(args, extension_config(args), vocab)
        tokens = torch.zeros(shape.micro_batch_size, shape.seq_length, dtype=torch.long)
        positions = torch.arange(shape.seq_length).expand_as(tokens)
        with OpCensus() as census:
            model(tokens, positions, None, labels=tokens).float().mean().backward()
    flops = model_flops_per_iteration(argparse.Namespace(**{**vars(args), "global_batch_size": shape.micro_batch_size}),
                                      vocab)
    return census, flops


def summarise(census: OpCensus, baseline: OpCensus, flops: float, mfu: float, peak_tflops: float,
              bandwidth_tbs: float) -> dict:
    extra = census.traffic() - baseline.traffic()
    extra_by_op = Counter(census.written) + Counter(census.read)
    extra_by_op.subtract(Counter(baseline.written) + Counter(baseline.read))
    compute_s = flops / (mfu * peak_tflops * 1e12)
    extra_s = extra * BYTES_PER_ELEMENT / (bandwidth_tbs * 1e12)
    return {
        "traffic_elements": census.traffic(), "extra_elements": extra,
        "extra_ms": 1e3 * extra_s, "step_ms_at_mfu": 1e3 * compute_s, "predicted_overhead": extra_s / compute_s,
        "top_extra_ops": {name: n for name, n in extra_by_op.most_common(5) if n > 0},
    }


def markdown(results: dict, mfu: float, peak: float, bandwidth: float) -> str:
    lines = [
        f"Predicted from op counts at {BYTES_PER_ELEMENT} B/element, {bandwidth} TB/s and the model FLOPs at "
        f"{100 * mfu:.0f}% MFU of {peak} TFLOP/s (one micro-batch, forward + backward).", "",
        "| shape | variant | memory-bound traffic (G elements) | extra vs baseline (G elements) | extra ms | "
        "micro-batch ms at MFU | predicted overhead | largest extra ops (G elements) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for shape, variants in results.items():
        for name, r in variants.items():
            ops = ", ".join(f"{op} {n / 1e9:.2f}" for op, n in r["top_extra_ops"].items()) or "-"
            lines.append(f"| {shape} | {name} | {r['traffic_elements'] / 1e9:.2f} | {r['extra_elements'] / 1e9:+.3f} | "
                         f"{r['extra_ms']:.2f} | {r['step_ms_at_mfu']:.1f} | {100 * r['predicted_overhead']:+.1f}% | {ops} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy shape (smoke test)")
    parser.add_argument("--variants", nargs="+", choices=tuple(harness.METHOD_FLAGS), default=list(harness.METHOD_FLAGS))
    parser.add_argument("--mfu", type=float, default=0.45, help="MFU the step time is taken at (default 0.45)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="dense bf16 matmul ceiling (default: H100 measured, ../shared/spec/PLATFORM.md)")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.0, help="HBM bandwidth in TB/s (default H100: 3.0)")
    parser.add_argument("--output", type=Path, required=True, help="JSON file of the results")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    harness.start_logging()
    if not 0 < args.mfu <= 1:
        raise SystemExit(f"--mfu must be in (0, 1], got {args.mfu}")
    if "baseline" not in args.variants:
        raise SystemExit("--variants must include baseline (overheads are relative to it)")
    shapes = list((TINY_SHAPES if args.tiny else SHAPES).values())
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = harness.write_synthetic_dataset(Path(tmp) / "tokens", harness.GPT2_VOCAB_SIZE, 4, 2 * shapes[0].seq_length)
        created = harness.init_world(harness.driver_args(shapes[0].flags() + ["--train-iters", "1"], data, "cpu"))
        try:
            for shape in shapes:
                counted = {v: census_of_variant(shape, v, data) for v in args.variants}
                base = counted["baseline"][0]
                results[shape.name] = {
                    v: summarise(census, base, flops, args.mfu, args.peak_tflops, args.bandwidth_tbs)
                    for v, (census, flops) in counted.items()
                }
                logger.info("%s: %s", shape.name, {v: f"{100 * r['predicted_overhead']:+.1f}%"
                                                   for v, r in results[shape.name].items()})
        finally:
            shutdown(created)
    report = {"mfu": args.mfu, "peak_tflops": args.peak_tflops, "bandwidth_tbs": args.bandwidth_tbs,
              "bytes_per_element": BYTES_PER_ELEMENT, "torch": torch.__version__,
              "shapes": {s.name: vars(s) for s in shapes}, "results": results}
    harness.write_report(args.output, report)
    print(markdown(results, args.mfu, args.peak_tflops, args.bandwidth_tbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

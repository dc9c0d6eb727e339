#!/usr/bin/env python
"""Where a method's step-time overhead goes: phases, kernels, host ops and synchronisations.

    python bench/profile_step.py --shapes 1.3b --variants baseline wesar normformer --output profile.json
    python bench/profile_step.py --device cpu --tiny --output /tmp/profile.json   # CPU smoke test

For each variant (a name of :data:`harness.METHOD_FLAGS`, optionally with ``+dopt`` for
``--use-distributed-optimizer``, ``+eager`` for no fused bias-dropout-add / bias-GeLU,
``+scale-fusion`` for ``--weight-scale-fusion`` or ``+per-micro-batch`` for
``--no-weight-scale-once-per-step``) the driver's engine is built as in
``bench/step_time.py``, with ``--micro-batches`` micro batches per iteration (default 1;
from 2 the weight-side scales are applied once per step unless ``+per-micro-batch``),
and, after ``--warmup`` iterations:

* phases: ``--iters`` iterations timed whole and in their forward-backward part (the
  engine's schedule call, synchronised on both sides); the rest is the optimizer step
  (gradient norm, clip, update, parameter copies);
* profile: ``--profile-iters`` iterations under ``torch.profiler``: the GPU's busy time
  (the union of its kernel and copy intervals) against the wall time, kernels launched,
  and per host op and per kernel their count and time per iteration;
* synchronisations: one iteration under ``torch.cuda.set_sync_debug_mode("warn")``, each
  synchronising call counted at the innermost line of our code or megatron-core's.

Each variant's host ops and kernels are then set against the first variant's (the
baseline), largest difference first. ``--primitives`` adds timings of the kernels the
methods and the optimizer run, at the shape's own sizes, each beside its alternatives: the
weight-side scales eager and compiled, NormFormer's FFN norm in four forms, and one AdamW
update foreach and fused.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import step_time  # noqa: E402

from megatron_ext import normformer  # noqa: E402
from megatron_ext.linear_scaling import scale_weight  # noqa: E402
from megatron_ext.training.distributed import shutdown  # noqa: E402
from megatron_ext.training.setup import padded_vocab_size  # noqa: E402

logger = logging.getLogger("bench.profile_step")
SUFFIX_FLAGS = {
    "dopt": ("--use-distributed-optimizer",),
    "eager": ("--no-bias-dropout-fusion", "--no-bias-gelu-fusion"),
    "scale-fusion": ("--weight-scale-fusion",),
    "per-micro-batch": ("--no-weight-scale-once-per-step",),
}
TOP = 25


def variant_flags(spec: str) -> list[str]:
    """Flags of ``name[+suffix...]``; a clear error for an unknown part."""
    name, *suffixes = spec.split("+")
    if name not in harness.METHOD_FLAGS or any(s not in SUFFIX_FLAGS for s in suffixes):
        raise SystemExit(f"--variants: {spec!r} is not NAME[+SUFFIX...] with NAME of "
                         f"{', '.join(harness.METHOD_FLAGS)} and SUFFIX of {', '.join(SUFFIX_FLAGS)}")
    return list(harness.METHOD_FLAGS[name]) + [f for s in suffixes for f in SUFFIX_FLAGS[s]]


def time_phases(engine, batches, device: torch.device, iters: int) -> dict:
    """Median ms of whole iterations and of their forward-backward (the GPU engine's ``_run``;
    the CPU engine reports whole iterations only)."""
    run, spans = getattr(engine, "_run", None), []

    def timed_run(data_iterator, forward_only):
        harness.synchronize(device)
        start = time.perf_counter()
        result = run(data_iterator, forward_only)
        harness.synchronize(device)
        spans.append(time.perf_counter() - start)
        return result

    if run is not None:
        engine._run = timed_run
    whole = []
    try:
        for _ in range(iters):
            harness.synchronize(device)
            start = time.perf_counter()
            harness.train_iteration(engine, batches)
            harness.synchronize(device)
            whole.append(time.perf_counter() - start)
    finally:
        if run is not None:
            del engine._run
    iteration = 1e3 * statistics.median(whole)
    forward_backward = 1e3 * statistics.median(spans) if spans else float("nan")
    return {"iteration_ms": iteration, "forward_backward_ms": forward_backward,
            "optimizer_ms": iteration - forward_backward}


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals``."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def profile_iterations(engine, batches, device: torch.device, iters: int) -> dict:
    """Wall and GPU-busy ms per iteration; per host op and per kernel: count and ms per iteration."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        harness.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            harness.train_iteration(engine, batches)
        harness.synchronize(device)
        wall = time.perf_counter() - start
    host = collections.defaultdict(lambda: [0, 0.0])
    kernels = collections.defaultdict(lambda: [0, 0.0])
    intervals = []
    for event in prof.events():
        if getattr(event, "is_user_annotation", False):
            continue  # a named range (e.g. the optimizer step's on the GPU), not a kernel
        if event.device_type == DeviceType.CUDA:
            interval = (event.time_range.start, event.time_range.end)
            intervals.append(interval)
            kernels[event.name][0] += 1
            kernels[event.name][1] += interval[1] - interval[0]
        else:
            host[event.name][0] += 1
            host[event.name][1] += event.self_cpu_time_total

    def per_iteration(table: dict) -> dict:
        return {name: {"count": count / iters, "ms": us / 1e3 / iters} for name, (count, us) in table.items()}

    return {
        "wall_ms": 1e3 * wall / iters, "gpu_busy_ms": _busy_us(intervals) / 1e3 / iters,
        "kernels_per_iteration": len(intervals) / iters,
        "host_ops": per_iteration(host), "kernels": per_iteration(kernels),
    }


def synchronizing_calls(engine, batches) -> dict[str, int]:
    """Synchronising CUDA calls of one iteration, counted at our or megatron-core's innermost line."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" not in str(message):
            return  # another warning (or the mode's own notice)
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                  and "warnings" not in f.filename]
        ours = [f for f in frames if "megatron" in f.filename or "bench" in f.filename] or frames
        site = ours[-1]
        sites[f"{Path(site.filename).name}:{site.lineno} {site.name}: {str(message)[:60]}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            harness.train_iteration(engine, batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(sites.most_common())


def difference(table: dict, base: dict, n: int = TOP) -> dict:
    """Per name: count and ms per iteration minus the baseline's, the largest |ms| first."""
    names = set(table) | set(base)
    zero = {"count": 0.0, "ms": 0.0}
    delta = {name: {key: table.get(name, zero)[key] - base.get(name, zero)[key] for key in zero} for name in names}
    return dict(sorted(delta.items(), key=lambda kv: -abs(kv[1]["ms"]))[:n])


def measure_variant(shape: harness.Shape, spec: str, data: Path, args: argparse.Namespace) -> dict:
    flags = shape.flags() + ["--train-iters", str(args.warmup + args.iters + args.profile_iters + 1),
                             "--global-batch-size", str(args.micro_batches * shape.micro_batch_size)]
    method_flags = variant_flags(spec)
    driver = harness.driver_args(flags + method_flags, data, args.device)
    engine, batches = harness.build_run(driver, padded_vocab_size(harness.GPT2_VOCAB_SIZE,
                                                                  driver.make_vocab_size_divisible_by))
    device = harness.device_of(driver)
    for _ in range(args.warmup):
        harness.train_iteration(engine, batches)
    result = {"flags": method_flags, **time_phases(engine, batches, device, args.iters)}
    result["profile"] = profile_iterations(engine, batches, device, args.profile_iters)
    if device.type == "cuda":
        try:
            result["synchronizing_calls"] = synchronizing_calls(engine, batches)
        except (RuntimeError, AssertionError) as error:  # no sync debug mode (emulated CUDA)
            result["synchronizing_calls"] = {"error": repr(error)}
    del engine, batches
    harness.free_memory()
    return result


def _gpu_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> dict:
    """GPU ms per call (events; wall on the CPU) and host ms per call of ``fn``."""
    for _ in range(3):
        fn()
    harness.synchronize(device)
    start = time.perf_counter()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps
    if device.type == "cuda":
        end.record()
        end.synchronize()
        return {"gpu_ms": begin.elapsed_time(end) / reps, "host_ms": 1e3 * host}
    return {"gpu_ms": 1e3 * host, "host_ms": 1e3 * host}


def _timed_primitive(label: str, fn: Callable[[], None], device: torch.device) -> dict:
    """:func:`_gpu_ms` of ``fn``, or its error: a primitive that does not compile on this device
    must not cost the run the primitives and variants after it."""
    return harness.measured(label, functools.partial(_gpu_ms, fn, device))


def _forward_backward(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                      grad: torch.Tensor) -> Callable[[], None]:
    """One forward and backward of ``fn(*inputs)`` against ``grad``, the inputs' grads dropped after."""
    def run() -> None:
        torch.autograd.backward(fn(*inputs), grad)
        for tensor in inputs:
            tensor.grad = None
    return run


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in tensors]


def weight_scale_primitives(shape: harness.Shape, device: torch.device, dtype: torch.dtype) -> dict:
    """WeSaR's gates and NormFormer's head scale on the shape's weights, forward and backward:
    eager (the default) against compiled (``--weight-scale-fusion``)."""
    h, f = shape.hidden_size, shape.ffn_size
    cases = {  # label: (rows, columns, scale length, dim)
        f"one gate, fc1 {f}x{h}": (f, h, 1, 0),
        f"a gate per row, QKV {3 * h}x{h}": (3 * h, h, 3 * h, 0),
        f"head scale per column, W^O {h}x{h}": (h, h, h, 1),
    }
    out = {}
    for label, (rows, columns, length, dim) in cases.items():
        weight, scale = _leaves(torch.randn(rows, columns, device=device, dtype=dtype),
                                torch.rand(length, device=device, dtype=dtype))
        grad = torch.randn(rows, columns, device=device, dtype=dtype)
        for fused, name in ((False, "eager"), (True, "compiled")):
            scaled = functools.partial(scale_weight, dim=dim, fused=fused)
            key = f"weight scale, {label}, forward+backward: {name}"
            out[key] = _timed_primitive(key, _forward_backward(scaled, (weight, scale), grad), device)
    return out


def ffn_norm_primitives(shape: harness.Shape, device: torch.device, dtype: torch.dtype) -> dict:
    """NormFormer's FFN norm after the bias-GeLU of one micro batch (TP = 1), forward and
    backward: the baseline's activation alone, the compiled activation + LayerNorm the
    library runs, the same compiled with inductor's multi-kernel (persistent reductions
    tried against looped ones), and the compiled activation followed by torch's LayerNorm."""
    f = shape.ffn_size
    tokens = shape.seq_length * shape.micro_batch_size
    x, bias, weight, norm_bias = _leaves(torch.randn(tokens, f, device=device, dtype=dtype),
                                         torch.randn(f, device=device, dtype=dtype),
                                         torch.ones(f, device=device, dtype=dtype),
                                         torch.zeros(f, device=device, dtype=dtype))
    grad = torch.randn(tokens, f, device=device, dtype=dtype)
    act = (False, False, "tanh")  # GeLU, megatron's fused (tanh) form
    multi_kernel = torch.compile(normformer.ffn_activation_norm, options={"triton.multi_kernel": 1})
    variants = {
        "bias-GeLU alone (the baseline)": lambda x, b, w, nb: normformer.fused_ffn_activation(x, b, *act),
        "bias-GeLU + LayerNorm compiled together (the library)":
            lambda x, b, w, nb: normformer.fused_ffn_activation_norm(x, b, w, nb, 1e-5, False, *act),
        "bias-GeLU + LayerNorm compiled with triton.multi_kernel":
            lambda x, b, w, nb: multi_kernel(x, b, w, nb, 1e-5, False, *act),
        "compiled bias-GeLU, then torch's layer_norm":
            lambda x, b, w, nb: F.layer_norm(normformer.fused_ffn_activation(x, b, *act), (f,), w, nb, 1e-5),
    }
    out = {}
    for name, fn in variants.items():
        key = f"FFN norm {tokens}x{f}, forward+backward: {name}"
        out[key] = _timed_primitive(key, _forward_backward(fn, (x, bias, weight, norm_bias), grad), device)
    return out


def adam_primitives(shape: harness.Shape, vocab_size: int, device: torch.device) -> dict:
    """One AdamW update over fp32 tensors of the shape's parameter sizes (the mixed-precision
    optimizer's main parameters): torch's foreach kernels (megatron-core's fallback as it
    builds it) against the fused kernel the GPU engine switches it to."""
    h, f = shape.hidden_size, shape.ffn_size
    layer = [(3 * h, h), (3 * h,), (h, h), (h,), (f, h), (f,), (h, f), (h,)] + [(h,)] * 4
    sizes = layer * shape.num_layers + [(vocab_size, h), (shape.seq_length, h), (h,), (h,)]
    count = sum(math.prod(size) for size in sizes)

    def update(fused: Optional[bool]) -> dict:
        params = [torch.zeros(size, device=device, requires_grad=True) for size in sizes]
        for param in params:
            param.grad = torch.full_like(param, 1e-3)
        return _gpu_ms(torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=fused).step, device, reps=5)

    out = {}
    for fused, name in ((None, "torch's default, foreach on a GPU (megatron-core's fallback)"),
                        (True, "fused (the GPU engine)")):
        key = f"AdamW update of {count / 1e9:.2f}B fp32 parameters in {len(sizes)} tensors: {name}"
        out[key] = harness.measured(key, functools.partial(update, fused))
        harness.free_memory()
    return out


def primitives(shape: harness.Shape, vocab_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The methods' kernels at ``shape``'s sizes as the library runs them, each beside its alternatives."""
    return {**weight_scale_primitives(shape, device, dtype), **ffn_norm_primitives(shape, device, dtype),
            **adam_primitives(shape, vocab_size, device)}


def summary(report: dict) -> str:
    """A few lines per shape for a log's end: each variant's phases and synchronising calls, each
    primitive's GPU and host ms; an entry that failed, with its error."""
    lines = [f"micro batches per iteration {report.get('micro_batches', 1)}"]
    for shape, results in report["shapes"].items():
        for name, r in results.items():
            if name == "primitives":
                continue
            if "error" in r:
                lines.append(f"{shape} {name} failed: {r['error'][:300]}")
                continue
            phases = {key: round(r[key], 1) for key in ("iteration_ms", "forward_backward_ms", "optimizer_ms")}
            syncs = sum(n for site, n in r.get("synchronizing_calls", {}).items() if site != "error")
            lines.append(f"{shape} {name} {phases} synchronisations {syncs}")
        for name, r in results.get("primitives", {}).items():
            timing = r["error"][:300] if "error" in r else f"GPU ms {r['gpu_ms']:.3f}, host ms {r['host_ms']:.3f}"
            lines.append(f"{shape} {name}: {timing}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer toy shape (CPU smoke test)")
    parser.add_argument("--shapes", nargs="+", default=["1.3b"], help="of step_time.py's shapes")
    parser.add_argument("--variants", nargs="+", default=["baseline", "wesar", "normformer"],
                        help="NAME[+SUFFIX...]; the first is the one the others are set against")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro batches per iteration (gradient accumulation; the global batch is this "
                             "times the shape's micro batch)")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--iters", type=int, default=10, help="iterations timed in phases")
    parser.add_argument("--profile-iters", type=int, default=3)
    parser.add_argument("--primitives", action="store_true", help="also time the methods' primitives")
    parser.add_argument("--output", type=Path, required=True, help="JSON file of the results")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    harness.start_logging()
    for spec in args.variants:
        variant_flags(spec)
    if args.warmup < 0 or args.iters < 1 or args.profile_iters < 1 or args.micro_batches < 1:
        raise SystemExit("--warmup must be >= 0, --iters, --profile-iters and --micro-batches >= 1")
    shapes = step_time.select_shapes(None if args.tiny else args.shapes, args.tiny)
    report: dict = {"torch": torch.__version__, "micro_batches": args.micro_batches, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = harness.write_synthetic_dataset(Path(tmp) / "tokens", harness.GPT2_VOCAB_SIZE, 64,
                                               2 * max(s.seq_length for s in shapes))
        world = harness.driver_args(shapes[0].flags() + ["--train-iters", "1"], data, args.device)
        created = harness.init_world(world)
        try:
            device = harness.device_of(world)
            report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            for shape in shapes:
                results: dict = {}
                report["shapes"][shape.name] = results
                if args.primitives:
                    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                    vocab = padded_vocab_size(harness.GPT2_VOCAB_SIZE, 128)
                    results["primitives"] = primitives(shape, vocab, device, dtype)
                    harness.write_report(args.output, report)
                for spec in args.variants:
                    r = harness.measured(f"{shape.name} {spec}",
                                         functools.partial(measure_variant, shape, spec, data, args))
                    first = results.get(args.variants[0])
                    if "error" not in r:
                        if spec != args.variants[0] and "error" not in first:
                            r["vs_first"] = {kind: difference(r["profile"][kind], first["profile"][kind])
                                             for kind in ("host_ops", "kernels")}
                        logger.info("%s %s: %.1f ms (forward-backward %.1f, optimizer %.1f), GPU busy %.1f of %.1f ms",
                                    shape.name, spec, r["iteration_ms"], r["forward_backward_ms"], r["optimizer_ms"],
                                    r["profile"]["gpu_busy_ms"], r["profile"]["wall_ms"])
                    results[spec] = r
                    harness.write_report(args.output, report)
        finally:
            shutdown(created)
    return harness.exit_status(report["shapes"], args.output)


if __name__ == "__main__":
    sys.exit(main())

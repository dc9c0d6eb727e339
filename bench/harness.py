"""What the GPU benchmarks share: the training driver's own engine, built for a model shape.

A benchmark describes a run with ``pretrain_gpt.py`` flags, validates them with the
driver's :func:`validate_args`, and builds the driver's model chunks, engine (megatron-core's
DDP, optimizer and schedules on the GPU; the CPU engine with ``--device cpu``) and data
stream, so the timed iterations are the driver's iterations. The data is a synthetic
token dataset (uniform random ids) written with megatron-core's ``IndexedDatasetBuilder``:
timing and memory do not depend on the text.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from megatron_ext import prores
from megatron_ext.data.tokenizers import ByteLevelTokenizer
from megatron_ext.files import write_atomically
from megatron_ext.training import setup
from megatron_ext.training.arguments import parse_args, validate_args
from megatron_ext.training.configs import extension_config
from megatron_ext.training.distributed import detect_environment, init_process_group, initialize_model_parallel
from megatron_ext.training.optimization import StepResult

logger = logging.getLogger("bench.harness")

GPT2_VOCAB_SIZE = 50257
METHOD_FLAGS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "prores": ("--prores",),
    "wesar": ("--wesar",),
    "wesar-on-outputs": ("--wesar", "--wesar-placement", "output"),  # gates on matmul outputs, for comparison
    "normformer": ("--normformer",),
    "all": ("--prores", "--wesar", "--normformer"),
}


@dataclass(frozen=True)
class Shape:
    """A GPT shape (GPT-3 table 2.1 style: Pre-LN, GeLU, learned positions, tied embeddings)."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    micro_batch_size: int
    ffn_hidden_size: int | None = None

    @property
    def ffn_size(self) -> int:
        """FFN width: ``ffn_hidden_size``, else 4h."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    def flags(self) -> list[str]:
        return [
            "--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
            "--num-attention-heads", str(self.num_attention_heads), "--seq-length", str(self.seq_length),
            "--ffn-hidden-size", str(self.ffn_size),
            "--micro-batch-size", str(self.micro_batch_size),
        ]


class SyntheticTokenizer(ByteLevelTokenizer):
    """The synthetic data's tokenizer as the data streams see it: ids anywhere in the model's
    ``vocab_size`` (the driver checks every batch against it), EOD the byte tokenizer's.
    The benchmarks never tokenize text."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size


def use_cuda(device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return device == "cuda"


def write_synthetic_dataset(prefix: Path, vocab_size: int, num_documents: int, document_length: int,
                            seed: int = 0) -> Path:
    """``prefix.bin/.idx`` of ``num_documents`` documents of uniform random token ids."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size < 2**16 else np.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    rng = np.random.default_rng(seed)
    for _ in range(num_documents):
        tokens = rng.integers(0, vocab_size, document_length, dtype=np.int64)
        builder.add_document(torch.from_numpy(tokens), [document_length])
    builder.finalize(f"{prefix}.idx")
    return prefix


def driver_args(flags: list[str], data_prefix: Path, device: str) -> argparse.Namespace:
    """``pretrain_gpt.py`` arguments for one process, validated as the driver does.

    Adds the synthetic data, ``--bf16`` on the GPU (fp32 on the CPU path), no dropout,
    no evaluation and the driver's ``--device``.
    """
    cuda = use_cuda(device)
    argv = flags + [
        "--data-path", str(data_prefix), "--split", "1,0,0", "--tokenizer-type", "ByteLevelTokenizer",
        "--eval-iters", "0", "--lr", "1e-4", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--device", device, "--log-interval", "1000000",
    ] + (["--bf16"] if cuda else [])
    args = parse_args(argv)
    validate_args(args, 1, cuda)
    return args


def init_world(args: argparse.Namespace) -> bool:
    """This process as a world of one (NCCL or gloo) with megatron's parallel state."""
    created = init_process_group(detect_environment(), args.use_cuda)
    initialize_model_parallel(args, args.use_cuda)
    return created


def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if args.use_cuda else torch.device("cpu")


def build_run(args: argparse.Namespace, vocab_size: int) -> tuple[object, Iterator]:
    """The driver's engine for ``args`` (model of ``vocab_size`` tokens) and its train stream."""
    extensions = extension_config(args)
    engine = setup.build_engine(args, setup.build_model_chunks(args, extensions, vocab_size), extensions)
    train_batches, _ = setup.build_data_streams(args, SyntheticTokenizer(vocab_size), 0, device_of(args))
    return engine, train_batches


def train_iteration(engine, batches: Iterator) -> StepResult:
    """One driver iteration: the ProRes step update, then forward, backward and update."""
    prores.set_prores_step(engine.model_chunks, engine.completed_updates)
    return engine.train_step(batches)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_logging() -> None:
    """INFO messages of the benchmark on stderr; megatron-core's only from WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def write_report(path: Path, report: dict) -> None:
    """``report`` as indented JSON at ``path``, written to a temporary name and renamed."""
    write_atomically(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))


def free_memory() -> None:
    """Collect dropped engines and hand their cached GPU memory back (call after ``del``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measured(label: str, measure: Callable[[], dict]) -> dict:
    """``measure()``, or ``{"error": "<type>: <message>"}`` when it raises (the traceback goes to
    the log): a variant that fails on the device (a kernel that does not compile there, say)
    must not cost a time-limited run the variants after it. The failed run's memory is
    handed back and the peak counter reset before the next."""
    try:
        return measure()
    except Exception as error:  # recorded in the report and logged; the caller's exit status says so
        logger.exception("%s failed; going on with the next", label)
        failure = {"error": f"{type(error).__name__}: {error}"}
    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return failure


def failures(shapes: dict[str, dict]) -> list[str]:
    """``"<shape> <entry>"`` of every variant, or primitive (under a shape's ``"primitives"``),
    that :func:`measured` recorded as failed."""
    failed = []
    for shape, results in shapes.items():
        for name, entry in results.items():
            entries = entry.items() if name == "primitives" else [(name, entry)]
            failed += [f"{shape} {label}" for label, r in entries if "error" in r]
    return failed


def exit_status(shapes: dict[str, dict], output: Path) -> int:
    """1 when :func:`failures` finds any in ``shapes`` (logged, with the report ``output`` that
    holds their errors), else 0: a benchmark's exit status."""
    failed = failures(shapes)
    if failed:
        logger.error("failed (errors in %s): %s", output, "; ".join(failed))
    return 1 if failed else 0


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, n: int, rounds: int = 10,
                          products: int = 10) -> float:
    """Dense ``n x n x n`` matmul throughput on random data (``2 n^3`` FLOPs per product).

    The best of ``rounds`` rounds of ``products`` back-to-back products, after a warm-up round.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for round_ in range(rounds + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(products):
            torch.matmul(a, b, out=out)
        synchronize(device)
        if round_:  # round 0 warms up
            best = min(best, (time.perf_counter() - start) / products)
    return 2 * n**3 / best / 1e12

"""Building a run from validated arguments: logging, model chunks, engine, data streams."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state

from megatron_ext.data.tokenizers import Tokenizer
from megatron_ext.extensions import ExtensionConfig
from megatron_ext.model import gpt_model_chunks
from megatron_ext.training.configs import transformer_config
from megatron_ext.training.data import MicroBatches, build_datasets
from megatron_ext.training.optimization import Engine

LOG_FORMAT = "%(message)s"


def configure_logging(rank: int) -> None:
    """Rank 0 logs INFO to stdout; other ranks warnings only; megatron-core quiet."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package = logging.getLogger("megatron_ext")
    for old in list(package.handlers):
        if getattr(old, "megatron_ext_driver", False):
            package.removeHandler(old)
    handler.megatron_ext_driver = True
    package.addHandler(handler)
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    package.propagate = False
    logging.getLogger("megatron").setLevel(logging.WARNING)


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Vocabulary padded to a multiple of ``divisible_by`` (independent of the TP size)."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


def build_model_chunks(args: argparse.Namespace, extensions: ExtensionConfig,
                       vocab_size: int) -> list[torch.nn.Module]:
    """This rank's GPT chunks (one per virtual pipeline stage), on the CPU."""
    return gpt_model_chunks(
        transformer_config(args), extensions,
        vocab_size=padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by),
        max_sequence_length=args.max_position_embeddings,
        backend="te" if args.transformer_impl == "transformer_engine" else "local",
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
    )


def build_engine(args: argparse.Namespace, model_chunks: list[torch.nn.Module], extensions: ExtensionConfig) -> Engine:
    """megatron-core's engine on the GPU path, its CPU substitute otherwise."""
    if args.use_cuda:
        from megatron_ext.training.engine_gpu import GpuEngine

        return GpuEngine(args, model_chunks, extensions)
    from megatron_ext.training.engine_cpu import CpuEngine

    return CpuEngine(args, model_chunks, extensions)


def build_data_streams(args: argparse.Namespace, tokenizer: Tokenizer, consumed_samples: int,
                       device: torch.device) -> tuple[Iterator, Optional[Callable[[], Iterator]]]:
    """The resumable training stream and a factory of fresh validation streams."""
    train, valid, _ = build_datasets(args, tokenizer)
    vocab = tokenizer.vocab_size
    train_batches = MicroBatches(train, consumed_samples, args.micro_batch_size, args.seq_length, device, vocab)
    if args.eval_iters == 0:
        return train_batches, None
    return train_batches, lambda: MicroBatches(valid, 0, args.micro_batch_size, args.seq_length, device, vocab)


def describe_parallelism(args: argparse.Namespace, world_size: int) -> str:
    """One log line: world size, TP/PP(/virtual)/DP sizes and the platform path."""
    vp = args.virtual_pipeline_model_parallel_size
    return (f"world size: {world_size} (tensor {args.tensor_model_parallel_size}, pipeline "
            f"{args.pipeline_model_parallel_size}{f' x {vp} virtual' if vp else ''}, data "
            f"{parallel_state.get_data_parallel_world_size()}); "
            f"{'GPU (NCCL)' if args.use_cuda else 'CPU (gloo)'} path")

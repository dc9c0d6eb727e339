#!/usr/bin/env python
"""Pretrain a GPT with megatron-core and the megatron-ext methods (ProRes, WeSaR, NormFormer).

    python pretrain_gpt.py --config examples/tiny_cpu.yaml                 # one process
    torchrun --nproc_per_node 8 pretrain_gpt.py --config my.yaml ...      # torchrun
    srun python pretrain_gpt.py --config my.yaml ...                      # SLURM

See docs/TRAINING.md for the flags, the outputs and the exit codes.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional, Sequence

# megatron-core warns on import about optional GPU packages; the CPU path never needs them.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")

import torch  # noqa: E402

from megatron_ext.training.arguments import ConfigError, parse_args, validate_args  # noqa: E402
from megatron_ext.training.checkpointing import CheckpointError, TrainingState, load_checkpoint  # noqa: E402
from megatron_ext.training.distributed import (  # noqa: E402
    detect_environment,
    init_process_group,
    initialize_model_parallel,
    shutdown,
)

logger = logging.getLogger("megatron_ext.pretrain_gpt")
EXIT_CONFIG_ERROR = 2


def _config_error(exc: Exception) -> int:
    """Report a configuration, tokenizer or checkpoint mismatch on stderr; the exit code for it."""
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_CONFIG_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, build, train; returns the exit code (see megatron_ext.training.loop)."""
    env = detect_environment()
    try:
        args = parse_args(argv)
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        validate_args(args, env.world_size, use_cuda)
    except ConfigError as exc:
        return _config_error(exc)
    if not use_cuda:  # megatron-core's advice on CUDA kernel queues for TP > 1 means nothing here
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")

    from megatron_ext import prores
    from megatron_ext.data.tokenizers import build_tokenizer
    from megatron_ext.training import setup
    from megatron_ext.training.configs import extension_config, method_settings
    from megatron_ext.training.data import DataError
    from megatron_ext.training.loop import Trainer
    from megatron_ext.training.metrics import GpuMonitor, MetricsWriter, model_flops_per_iteration

    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    except (ImportError, OSError, ValueError) as exc:  # each names the model file or the missing package
        return _config_error(exc)
    args.padded_vocab_size = setup.padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by)

    setup.configure_logging(env.rank)
    created = init_process_group(env, use_cuda)
    every_rank_finished = False  # set once training returned, a collective decision
    try:
        initialize_model_parallel(args, use_cuda)
        logger.info(setup.describe_parallelism(args, env.world_size))
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        extensions = extension_config(args)
        methods = method_settings(extensions)
        logger.info("methods: %s", ", ".join(extensions.enabled) or "none (baseline)")
        if extensions.prores is not None:
            logger.info(prores.describe_schedule(extensions.prores, args.num_layers))
        engine = setup.build_engine(args, setup.build_model_chunks(args, extensions, tokenizer.vocab_size), extensions)
        state = TrainingState()
        if args.load:
            try:
                state = load_checkpoint(args.load, engine, engine.model_chunks, args, methods) or state
            except CheckpointError as exc:
                return _config_error(exc)
        train_batches, valid_batches = setup.build_data_streams(args, tokenizer, state.consumed_train_samples, device)
        writer = MetricsWriter(args, env.rank)
        try:
            trainer = Trainer(
                args, engine, state, writer, train_batches, valid_batches, methods,
                model_flops_per_iteration(args, tokenizer.vocab_size), device,
                GpuMonitor() if use_cuda else None,
            )
            code = trainer.train()
            every_rank_finished = True
            return code
        except DataError as exc:
            return _config_error(exc)
        finally:
            writer.close()
    finally:
        shutdown(created, every_rank_finished)


if __name__ == "__main__":
    sys.exit(main())

"""Training data: megatron-core's ``GPTDataset`` (blended when weighted) over .bin/.idx
files, sampled in Megatron-LM's order from the consumed-sample count, read by
tensor-parallel rank 0 of the first and last pipeline stages (which checks every micro
batch's ids against the tokenizer's vocabulary) and broadcast to the other
tensor-parallel ranks.
"""

from __future__ import annotations

import argparse
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_ext.data.tokenizers import Tokenizer
from megatron_ext.training.arguments import dataset_sizes, parse_data_path

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
Batch = dict[str, torch.Tensor]


def stage_needs_data() -> bool:
    """Only the first stage (tokens) and the last stage (labels, loss mask) read data."""
    return parallel_state.is_pipeline_first_stage(ignore_virtual=True) or parallel_state.is_pipeline_last_stage(
        ignore_virtual=True
    )


def is_reader() -> bool:
    """Tensor-parallel rank 0 of a stage that needs data builds the datasets and reads."""
    return parallel_state.get_tensor_model_parallel_rank() == 0 and stage_needs_data()


class DatasetTokenizer:
    """What megatron-core's datasets read from a tokenizer: vocabulary size, EOD and an identity.

    ``unique_identifiers`` enter the dataset description whose hash names the cached
    sample indices, so another tokenizer never reuses them.
    """

    def __init__(self, tokenizer: Tokenizer, tokenizer_model: Optional[str]) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.unique_identifiers = {"class": type(tokenizer).__name__, "model": tokenizer_model,
                                   "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}


def build_datasets(args: argparse.Namespace, tokenizer: Tokenizer) -> list[Optional[GPTDataset]]:
    """Train, valid and test datasets (``None`` on ranks that do not read)."""
    prefixes, weights = parse_data_path(args.data_path)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=(prefixes, weights),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=DatasetTokenizer(tokenizer, args.tokenizer_model),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = dataset_sizes(args)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_reader, config).build()


class DataError(ValueError):
    """The training data does not fit this run (ids outside the tokenizer's vocabulary)."""


def check_token_ids(tokens: torch.Tensor, vocab_size: int, first_sample: int) -> None:
    """Raise :class:`DataError` unless every id in ``tokens`` is in ``[0, vocab_size)``.

    An id outside would index past the embedding table (an opaque IndexError on the CPU,
    a device-side assert on the GPU); it means the data was tokenized with another
    tokenizer. One max and min over a micro batch on the host, before it is copied.
    """
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise DataError(f"--data-path: the micro batch from sample {first_sample} holds token id "
                        f"{high if high >= vocab_size else low}, outside the tokenizer's {vocab_size} ids "
                        "(--tokenizer-type/--tokenizer-model): preprocess the data with the tokenizer this run uses")


def sample_indices(consumed_samples: int, micro_batch_size: int, dp_rank: int) -> range:
    """Dataset indices of this data-parallel rank's next micro batch (Megatron-LM's sampler).

    The ``micro_batch_size`` x data-parallel-size samples starting at ``consumed_samples``
    form one micro step; rank ``r`` takes the ``r``-th slice.
    """
    start = consumed_samples + dp_rank * micro_batch_size
    return range(start, start + micro_batch_size)


class MicroBatches:
    """Endless micro batches of a dataset for this data-parallel rank, resumable.

    ``consumed_samples`` counts samples taken by all data-parallel ranks together, so a
    run resumed with the saved count continues the data order exactly.
    """

    def __init__(self, dataset: Optional[GPTDataset], consumed_samples: int, micro_batch_size: int,
                 seq_length: int, device: torch.device, vocab_size: int) -> None:
        self.dataset = dataset
        self.vocab_size = vocab_size
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.seq_length = seq_length
        self.device = device
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

    def __iter__(self) -> Iterator[Optional[Batch]]:
        return self

    def __next__(self) -> Optional[Batch]:
        batch = None
        if self.dataset is not None:
            indices = sample_indices(self.consumed_samples, self.micro_batch_size, self.dp_rank)
            n = len(self.dataset)
            samples = [self.dataset[i % n] for i in indices]
            batch = {k: torch.stack([s[k] for s in samples]) for k in BATCH_KEYS}
            check_token_ids(batch["tokens"], self.vocab_size, indices.start)
        self.consumed_samples += self.micro_batch_size * self.dp_size
        if not stage_needs_data():
            return None
        return broadcast_batch(batch, self.micro_batch_size, self.seq_length, self.device)


def broadcast_batch(batch: Optional[Batch], micro_batch_size: int, seq_length: int, device: torch.device) -> Batch:
    """Send tensor-parallel rank 0's batch to the other ranks of its TP group."""
    if batch is not None:
        batch = {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS}
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return batch
    shape = (micro_batch_size, seq_length)
    packed = torch.empty((len(BATCH_KEYS),) + shape, dtype=torch.int64, device=device)
    if batch is not None:
        for i, key in enumerate(BATCH_KEYS):
            packed[i].copy_(batch[key])
    dist.broadcast(packed, parallel_state.get_tensor_model_parallel_src_rank(),
                   group=parallel_state.get_tensor_model_parallel_group())
    out = {key: packed[i] for i, key in enumerate(BATCH_KEYS)}
    out["loss_mask"] = out["loss_mask"].float()
    return out

"""Streaming conversion of raw corpora into Megatron ``.bin``/``.idx`` datasets.

Documents are read in order, grouped into chunks of about ``chunk_bytes`` and
tokenized either in this process (``workers=1``) or by a pool of worker
processes with a bounded number of chunks in flight, so memory does not grow
with the corpus. Results are written in input order, so the output does not
depend on the number of workers. Each key's dataset is written under
temporary names beside the output and renamed into place only when complete;
on any error or interrupt the temporaries are removed.

Empty documents (empty or whitespace-only text, or text that tokenizes to no
tokens) are not written; they are counted in :class:`PreprocessStats`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from megatron_ext.data.corpus import BadLines, Document, expand_inputs, iter_documents
from megatron_ext.data.tokenizers import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

# One chunk's result per key: all token ids concatenated, and each document's length.
EncodedKey = tuple[np.ndarray, np.ndarray]


@dataclass
class PreprocessConfig:
    """Options of :func:`preprocess` (mirrors ``tools/preprocess_data.py``)."""

    inputs: Sequence[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str | None = None
    json_keys: Sequence[str] = ("text",)
    input_format: str = "auto"
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 10000
    skip_bad_lines: bool = False
    chunk_bytes: int = 1 << 20
    progress: bool | None = None  # None: a progress bar only on a terminal


@dataclass
class PreprocessStats:
    """What :func:`preprocess` did."""

    documents_read: int = 0
    bytes_read: int = 0
    documents: dict[str, int] = field(default_factory=dict)  # written, per key
    tokens: dict[str, int] = field(default_factory=dict)  # written (EOD included), per key
    empty_documents: dict[str, int] = field(default_factory=dict)  # not written, per key
    skipped_lines: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    outputs: list[str] = field(default_factory=list)  # dataset prefixes written

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        elapsed = max(self.elapsed, 1e-9)
        lines = [
            f"documents read: {self.documents_read}",
            f"input: {self.bytes_read / 1e6:.1f} MB",
        ]
        for key in self.documents:
            lines.append(
                f"[{key}] documents: {self.documents[key]}  tokens: {self.tokens[key]}  "
                f"empty documents skipped: {self.empty_documents[key]}"
            )
        lines.append(f"skipped lines: {self.skipped_lines}")
        lines.extend(f"  {example}" for example in self.skipped_examples)
        total_tokens = sum(self.tokens.values())
        lines.append(
            f"elapsed: {self.elapsed:.2f} s  throughput: {self.documents_read / elapsed:.1f} docs/s, "
            f"{self.bytes_read / 1e6 / elapsed:.2f} MB/s, {total_tokens / elapsed:.0f} tokens/s"
        )
        lines.extend(f"wrote {prefix}.bin/.idx" for prefix in self.outputs)
        return "\n".join(lines)


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron naming: ``<prefix>_<key>_document``."""
    return f"{output_prefix}_{key}_document"


def token_dtype(vocab_size: int) -> type[np.number]:
    """Smallest index dtype for the vocabulary, as megatron-core chooses it."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


# ---------------------------------------------------------------- encoding


class ChunkEncoder:
    """Tokenizes chunks of documents into flat arrays (one per key)."""

    def __init__(self, tokenizer: Tokenizer, append_eod: bool, dtype: type[np.number]) -> None:
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.dtype = dtype

    def encode(self, chunk: Sequence[Sequence[str]]) -> list[EncodedKey]:
        """``chunk[k]`` holds key ``k``'s texts; empty documents get length 0."""
        return [self._encode_texts(texts) for texts in chunk]

    def _encode_texts(self, texts: Sequence[str]) -> EncodedKey:
        ids = self.tokenizer.tokenize_batch([t if t and not t.isspace() else "" for t in texts])
        if self.append_eod:
            eod = self.tokenizer.eod
            for doc in ids:
                if doc:
                    doc.append(eod)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths


_WORKER_ENCODER: ChunkEncoder | None = None


def _init_worker(tokenizer_type: str, tokenizer_model: str | None, append_eod: bool) -> None:
    """Pool initializer: build the tokenizer once per worker; signals are the parent's job."""
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool.terminate() must end a worker quietly
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    _WORKER_ENCODER = ChunkEncoder(tokenizer, append_eod, token_dtype(tokenizer.vocab_size))


def _encode_in_worker(chunk: Sequence[Sequence[str]]) -> list[EncodedKey]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(chunk)


def _chunks(documents: Iterable[Document], n_keys: int, chunk_bytes: int) -> Iterator[tuple[list[list[str]], int]]:
    """Group documents into (texts per key, input bytes) of about ``chunk_bytes``."""
    texts: list[list[str]] = [[] for _ in range(n_keys)]
    size = 0
    for doc in documents:
        for k, text in enumerate(doc.texts):
            texts[k].append(text)
        size += doc.nbytes
        if size >= chunk_bytes:
            yield texts, size
            texts, size = [[] for _ in range(n_keys)], 0
    if texts[0]:
        yield texts, size


def _encode_ordered(
    chunks: Iterator[tuple[list[list[str]], int]], config: PreprocessConfig, encoder: ChunkEncoder
) -> Iterator[tuple[int, int, list[EncodedKey]]]:
    """Yield (documents, bytes, encoded) per chunk, in input order."""
    if config.workers <= 1:
        for texts, size in chunks:
            yield len(texts[0]), size, encoder.encode(texts)
        return
    max_in_flight = 2 * config.workers
    pool = multiprocessing.Pool(
        config.workers, _init_worker, (config.tokenizer_type, config.tokenizer_model, config.append_eod)
    )
    try:
        pending: collections.deque = collections.deque()
        for texts, size in chunks:
            pending.append((len(texts[0]), size, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= max_in_flight:
                n, nbytes, result = pending.popleft()
                yield n, nbytes, result.get()
        while pending:
            n, nbytes, result = pending.popleft()
            yield n, nbytes, result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------- writing


class _DatasetWriter:
    """One key's ``.bin``/``.idx``, written under hidden temporary names, then renamed."""

    def __init__(self, prefix: str, dtype: type[np.number]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        directory, name = os.path.split(prefix)
        tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        self.final = {ext: f"{prefix}.{ext}" for ext in ("bin", "idx")}
        self.tmp = {ext: f"{tmp}.{ext}" for ext in ("bin", "idx")}
        self.builder = IndexedDatasetBuilder(self.tmp["bin"], dtype=dtype)
        self.documents = 0
        self.tokens = 0
        self.empty = 0

    def write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append a chunk's documents, dropping empty ones."""
        offset = 0
        for length in lengths.tolist():
            if length:
                self.builder.add_document(flat[offset : offset + length], [length])
                offset += length
            else:
                self.empty += 1
        self.documents += int(np.count_nonzero(lengths))
        self.tokens += offset

    def finalize(self) -> None:
        """Write the index; the files stay under temporary names until :meth:`commit`."""
        self.builder.finalize(self.tmp["idx"])

    def commit(self) -> None:
        """Rename the data file, then the index, to their final names."""
        for ext in ("bin", "idx"):
            os.replace(self.tmp[ext], self.final[ext])

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self.builder.data_file.close()
        for path in self.tmp.values():
            if os.path.exists(path):
                os.remove(path)


# ---------------------------------------------------------------- driver


def preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Tokenize ``config.inputs`` into ``<prefix>_<key>_document.bin/.idx``.

    Raises CorpusError for bad input (unless ``skip_bad_lines``), ValueError or
    FileNotFoundError for bad options; nothing is left under the prefix then.
    """
    if config.workers < 1:
        raise ValueError("--workers must be at least 1")
    keys = list(config.json_keys)
    if len(set(keys)) != len(keys):
        raise ValueError(f"--json-keys has duplicates: {keys}")
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    paths = expand_inputs(config.inputs)  # before megatron-core's import, seconds, in token_dtype
    dtype = token_dtype(tokenizer.vocab_size)
    directory = os.path.dirname(config.output_prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)

    bad_lines = BadLines(skip=config.skip_bad_lines)
    stats = PreprocessStats()
    encoder = ChunkEncoder(tokenizer, config.append_eod, dtype)
    writers: list[_DatasetWriter] = []
    start = time.perf_counter()
    try:
        for key in keys:
            writers.append(_DatasetWriter(output_prefix_for(config.output_prefix, key), dtype))
        documents = iter_documents(paths, keys, config.input_format, bad_lines)
        chunks = _chunks(documents, len(keys), config.chunk_bytes)
        with _Progress(config, stats, writers, start) as progress:
            for n_docs, nbytes, encoded in _encode_ordered(chunks, config, encoder):
                for writer, (flat, lengths) in zip(writers, encoded, strict=True):
                    writer.write(flat, lengths)
                progress.advance(n_docs, nbytes)
        for writer in writers:
            writer.finalize()
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    stats.elapsed = time.perf_counter() - start
    for key, writer in zip(keys, writers, strict=True):
        stats.documents[key] = writer.documents
        stats.tokens[key] = writer.tokens
        stats.empty_documents[key] = writer.empty
    stats.skipped_lines = bad_lines.count
    stats.skipped_examples = list(bad_lines.examples)
    stats.outputs = [writer.prefix for writer in writers]
    return stats


class _Progress:
    """tqdm bar (documents/s, MB/s, tokens) on a terminal; periodic log lines otherwise."""

    def __init__(
        self, config: PreprocessConfig, stats: PreprocessStats, writers: list[_DatasetWriter], start: float
    ) -> None:
        self.stats = stats
        self.writers = writers
        self.start = start
        self.interval = max(1, config.log_interval)
        self.next_report = self.interval
        disable = None if config.progress is None else not config.progress
        self.bar = tqdm(unit=" docs", unit_scale=True, desc="preprocess", disable=disable, dynamic_ncols=True)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.bar.disable:
            self._report()
        self.bar.close()

    def advance(self, n_docs: int, nbytes: int) -> None:
        """Account for one written chunk; report every ``log_interval`` documents."""
        self.stats.documents_read += n_docs
        self.stats.bytes_read += nbytes
        self.bar.update(n_docs)
        if self.stats.documents_read >= self.next_report:
            self.next_report = self.stats.documents_read + self.interval
            self._report()

    def _report(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens = sum(w.tokens for w in self.writers)
        mb_s = self.stats.bytes_read / 1e6 / elapsed
        if self.bar.disable:
            logger.info(
                "processed %d documents (%.1f docs/s, %.2f MB/s, %d tokens)",
                self.stats.documents_read,
                self.stats.documents_read / elapsed,
                mb_s,
                tokens,
            )
        else:
            self.bar.set_postfix_str(f"{mb_s:.2f} MB/s, {tokens:,} tokens", refresh=False)

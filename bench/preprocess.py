#!/usr/bin/env python
"""Benchmark tools/preprocess_data.py against the SentencePiece encode-only ceiling.

Takes the first ``--max-mb`` MB (whole documents) of the WikiExtractor enwiki
file in ../shared/data, trains a SentencePiece model on it (unless
``--tokenizer-model`` is given), then measures

* the ceiling: SentencePiece batch encoding of the same documents, already in
  memory, in one process, one thread, same chunking, no I/O;
* the full pipeline (read, parse, tokenize, write .bin/.idx) with 1 and 2 workers,
  in process, after megatron-core has been imported (a one-off ~5 s start-up cost
  of the command-line tool that is not throughput).

Each measurement is the best of ``--repeats`` runs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import lzma
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import megatron.core.datasets.indexed_dataset  # noqa: E402,F401  (import once, outside the timings)
from megatron_ext.data.corpus import expand_inputs, iter_documents  # noqa: E402
from megatron_ext.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megatron_ext.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ext.data.train_tokenizer import TokenizerTrainingConfig, train_tokenizer  # noqa: E402

DEFAULT_INPUT = REPO / ".." / "shared" / "data" / "enwiki-2015-wikiextractor" / "text_AA_wiki_00-99.txt.xz"


def write_slice(source: Path, max_bytes: int, target: Path) -> int:
    """Copy the first ``max_bytes`` of decompressed text, cut after the last complete document."""
    with lzma.open(source, "rb") as stream:
        head = stream.read(max_bytes)
    end = head.rindex(b"</doc>\n") + len(b"</doc>\n")
    target.write_bytes(head[:end])
    return end


def encode_ceiling(path: Path, model: str, chunk_bytes: int) -> tuple[float, int, int]:
    """Best-case encode time: (seconds, documents, tokens) for in-memory texts."""
    tokenizer = build_tokenizer("SentencePieceTokenizer", model)
    chunks, current, size = [], [], 0
    for doc in iter_documents(expand_inputs([path])):
        current.append(doc.texts[0])
        size += doc.nbytes
        if size >= chunk_bytes:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    start = time.perf_counter()
    tokens = sum(len(ids) for chunk in chunks for ids in tokenizer.tokenize_batch(chunk))
    return time.perf_counter() - start, sum(map(len, chunks)), tokens


def run_pipeline(path: Path, model: str, workers: int, out_dir: Path) -> tuple[float, int, int]:
    """End-to-end preprocess time: (seconds, documents, tokens)."""
    config = PreprocessConfig(
        inputs=[str(path)],
        output_prefix=str(out_dir / f"bench_w{workers}"),
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=model,
        append_eod=True,
        workers=workers,
        progress=False,
    )
    start = time.perf_counter()
    stats = preprocess(config)
    return time.perf_counter() - start, stats.documents["text"], stats.tokens["text"] - stats.documents["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--max-mb", type=float, default=30.0)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = work / "enwiki_slice.txt"
        nbytes = write_slice(args.input, int(args.max_mb * 1e6), text)
        model = args.tokenizer_model
        if model is None:
            train_tokenizer(
                TokenizerTrainingConfig(
                    inputs=[str(text)], model_prefix=str(work / "sp"), vocab_size=args.vocab_size, max_sentences=200_000
                )
            )
            model = str(work / "sp.model")
        chunk_bytes = PreprocessConfig(inputs=[], output_prefix="", tokenizer_type="").chunk_bytes
        rows = [
            (
                "SentencePiece encode only (ceiling, 1 process)",
                min((encode_ceiling(text, model, chunk_bytes) for _ in range(args.repeats)), key=lambda r: r[0]),
            )
        ]
        for workers in (1, 2):
            rows.append(
                (
                    f"preprocess_data.py --workers {workers}",
                    min((run_pipeline(text, model, workers, work) for _ in range(args.repeats)), key=lambda r: r[0]),
                )
            )

    ceiling = rows[0][1][0]
    print(
        f"input: {args.input.name}, first {nbytes / 1e6:.1f} MB ({rows[0][1][1]} documents); "
        f"SentencePiece vocab {args.vocab_size if args.tokenizer_model is None else 'given'}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n"
    )
    print("| run | seconds | documents/s | tokens/s | MB/s | vs ceiling |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (seconds, docs, tokens) in rows:
        print(
            f"| {name} | {seconds:.2f} | {docs / seconds:,.0f} | {tokens / seconds:,.0f} | "
            f"{nbytes / 1e6 / seconds:.2f} | {ceiling / seconds:.0%} |"
        )


if __name__ == "__main__":
    main()

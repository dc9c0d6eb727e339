#!/usr/bin/env python
"""Tokenize raw corpora into Megatron ``<prefix>_<key>_document.bin/.idx`` datasets.

Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2

See docs/PREPARING_DATA.md for the input formats and the bad-input policy.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron_ext.data.cli import run_tool
from megatron_ext.data.corpus import INPUT_FORMATS
from megatron_ext.data.preprocess import PreprocessConfig, preprocess
from megatron_ext.data.tokenizers import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", nargs="+", required=True, help="files, glob patterns or directories; plain, .gz, .xz or .zst"
    )
    group.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="auto: jsonl for *.json/*.jsonl/*.ndjson, wikiextractor if the file starts with <doc, else text (one document per line)",
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON object (default: text)"
    )
    group.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count malformed lines and unreadable files instead of stopping",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or HuggingFace tokenizer.json")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: no pool)")
    group.add_argument("--log-interval", type=int, default=10000, help="documents between progress reports")
    group.add_argument("--chunk-bytes", type=int, default=1 << 20, help="input bytes per unit of work")
    group.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=args.json_keys,
        input_format=args.input_format,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
        skip_bad_lines=args.skip_bad_lines,
        chunk_bytes=args.chunk_bytes,
        progress=False if args.no_progress else None,
    )
    return run_tool(lambda: print(preprocess(config).summary()))


if __name__ == "__main__":
    sys.exit(main())

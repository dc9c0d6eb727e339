#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram) on jsonl or plain-text corpora.

Example::

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok --vocab-size 8000

Writes <prefix>.model and <prefix>.vocab. See docs/PREPARING_DATA.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron_ext.data.cli import run_tool
from megatron_ext.data.corpus import INPUT_FORMATS
from megatron_ext.data.train_tokenizer import MODEL_TYPES, NORMALIZATIONS, TokenizerTrainingConfig, train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    defaults = TokenizerTrainingConfig(inputs=[], model_prefix="")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", nargs="+", required=True, help="files, glob patterns or directories; plain, .gz, .xz or .zst"
    )
    group.add_argument("--input-format", choices=INPUT_FORMATS, default="auto", help="as for preprocess_data.py")
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to read from each JSON object (default: text)"
    )
    group.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines instead of stopping")
    group.add_argument(
        "--max-sentences",
        type=int,
        default=defaults.max_sentences,
        help="train on a uniform sample of at most this many lines (bounds memory)",
    )
    group.add_argument("--seed", type=int, default=defaults.seed, help="seed for the sample and the trainer")
    group = parser.add_argument_group("model")
    group.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    group.add_argument("--model-type", choices=MODEL_TYPES, default=defaults.model_type)
    group.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    group.add_argument("--character-coverage", type=float, default=defaults.character_coverage)
    group.add_argument(
        "--byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=defaults.byte_fallback,
        help="encode characters outside the vocabulary as UTF-8 bytes (default: on)",
    )
    group.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default=defaults.normalization,
        help="SentencePiece normalisation rule (default: identity, lossless)",
    )
    group.add_argument(
        "--remove-extra-whitespaces",
        action=argparse.BooleanOptionalAction,
        default=defaults.remove_extra_whitespaces,
        help="collapse runs of whitespace (default: off)",
    )
    group.add_argument(
        "--user-defined-symbols", nargs="*", default=[], help="special tokens always kept whole, e.g. '<|im_start|>'"
    )
    group.add_argument(
        "--max-sentence-length",
        type=int,
        default=defaults.max_sentence_length,
        help="longer lines (bytes) are ignored by the trainer",
    )
    group.add_argument("--num-threads", type=int, default=defaults.num_threads)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = TokenizerTrainingConfig(
        inputs=args.input,
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
        normalization=args.normalization,
        remove_extra_whitespaces=args.remove_extra_whitespaces,
        user_defined_symbols=args.user_defined_symbols,
        max_sentences=args.max_sentences,
        max_sentence_length=args.max_sentence_length,
        seed=args.seed,
        num_threads=args.num_threads,
        json_keys=args.json_keys,
        input_format=args.input_format,
        skip_bad_lines=args.skip_bad_lines,
    )

    def body() -> None:
        stats = train_tokenizer(config)
        print(
            f"trained on {stats.sentences_sampled} of {stats.sentences_seen} lines from {stats.documents} documents "
            f"(skipped lines: {stats.skipped_lines}); wrote {stats.model_path} and {stats.vocab_path}"
        )

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())

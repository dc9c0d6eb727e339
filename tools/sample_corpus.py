#!/usr/bin/env python
"""Write a small real-English jsonl corpus from Python's bundled ``pydoc_data.topics``.

Each help topic becomes one document ``{"id": <topic>, "text": <help text>}``,
in sorted topic order. No download needed; useful for quick starts and tests.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron_ext.data.cli import run_tool
from megatron_ext.data.samples import write_sample_corpus


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="jsonl file to write (.gz/.xz suffix compresses)")
    parser.add_argument("--repeat", type=int, default=1, help="write the topics this many times (bigger corpus)")
    args = parser.parse_args(argv)
    return run_tool(lambda: print(f"wrote {write_sample_corpus(args.output, args.repeat)} documents to {args.output}"))


if __name__ == "__main__":
    sys.exit(main())

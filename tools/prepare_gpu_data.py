#!/usr/bin/env python
"""Build the tokenized Wikipedia subset that a GPU session carries (docs/GPU_EVIDENCE_PLAN.md).

    python tools/prepare_gpu_data.py --data-dir ../shared/data/enwiki-2015-wikiextractor --output data/gpu

Takes the first whole articles of shards AA and AB (``--train-mb`` MB of text each, for
training) and of AC (``--valid-mb`` MB, for validation), trains a SentencePiece BPE
tokenizer on the training text (megatron_ext.data.train_tokenizer, as
tools/train_tokenizer.py), tokenizes both (megatron_ext.data.preprocess, as
tools/preprocess_data.py) and joins them into one dataset, training documents first.
``pretrain_gpt.py --split NTRAIN,NVALID,0`` then makes the validation split exactly the
AC articles: megatron-core splits by document index at ``round(w_i / sum(w) * N)``.

Writes ``OUTPUT/tok.model``, ``OUTPUT/wiki_text_document.bin/.idx`` and
``OUTPUT/manifest.json`` (document and token counts, the ``--split`` value, the sources).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from megatron_ext.data.preprocess import PreprocessConfig, output_prefix_for, preprocess
from megatron_ext.data.train_tokenizer import TokenizerTrainingConfig, train_tokenizer

SHARDS = {"AA": "train", "AB": "train", "AC": "valid"}
DOC_END = b"</doc>"


def slice_articles(source: Path, target: Path, max_bytes: int) -> int:
    """Copy whole WikiExtractor articles from the start of ``source`` (xz) until ``max_bytes``."""
    written = 0
    with lzma.open(source, "rb") as src, target.open("wb") as dst:
        article: list[bytes] = []
        for line in src:
            article.append(line)
            if line.startswith(DOC_END):
                dst.write(b"".join(article))
                written += sum(map(len, article))
                article = []
                if written >= max_bytes:
                    break
    if written == 0:
        raise ValueError(f"{source}: no complete <doc>...</doc> article found")
    return written


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def join_datasets(prefixes: Sequence[str], output: str) -> list[int]:
    """Concatenate indexed datasets in order into ``output``; returns each one's document count."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    parts = [IndexedDataset(p) for p in prefixes]
    builder = IndexedDatasetBuilder(f"{output}.bin", dtype=parts[0].index.dtype)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(f"{output}.idx")
    return [len(part.document_indices) - 1 for part in parts]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/enwiki-2015-wikiextractor"))
    parser.add_argument("--output", type=Path, default=Path("data/gpu"))
    parser.add_argument("--train-mb", type=float, default=34.0, help="MB of text taken from each of AA and AB")
    parser.add_argument("--valid-mb", type=float, default=3.0, help="MB of text taken from AC")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    sources = {shard: args.data_dir / f"text_{shard}_wiki_00-99.txt.xz" for shard in SHARDS}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"--data-dir: missing {', '.join(missing)}")
    args.output.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"sources": {}, "vocab_size": args.vocab_size}
    with tempfile.TemporaryDirectory() as tmp:
        texts: dict[str, list[str]] = {"train": [], "valid": []}
        for shard, role in SHARDS.items():
            target = Path(tmp) / f"{shard}.txt"
            limit = (args.train_mb if role == "train" else args.valid_mb) * 1e6
            size = slice_articles(sources[shard], target, int(limit))
            texts[role].append(str(target))
            manifest["sources"][shard] = {"file": sources[shard].name, "xz_sha256": sha256(sources[shard]),
                                          "role": role, "text_bytes": size}
        model_prefix = str(args.output / "tok")
        train_tokenizer(TokenizerTrainingConfig(inputs=texts["train"], model_prefix=model_prefix,
                                                vocab_size=args.vocab_size))
        prefixes, tokens = [], {}
        for role, inputs in texts.items():
            stats = preprocess(PreprocessConfig(
                inputs=inputs, output_prefix=str(Path(tmp) / role), tokenizer_type="SentencePieceTokenizer",
                tokenizer_model=f"{model_prefix}.model", append_eod=True, workers=args.workers, progress=False))
            prefixes.append(output_prefix_for(str(Path(tmp) / role), "text"))
            tokens[role] = stats.tokens["text"]
        output = output_prefix_for(str(args.output / "wiki"), "text")
        train_docs, valid_docs = join_datasets(prefixes, output)
    manifest.update(
        data_path=output, tokenizer_model=f"{model_prefix}.model", split=f"{train_docs},{valid_docs},0",
        documents={"train": train_docs, "valid": valid_docs}, tokens=tokens,
        bytes=sum(p.stat().st_size for p in args.output.iterdir() if p.is_file()),
    )
    (args.output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small real-English corpus that ships with Python: ``pydoc_data.topics``."""

from __future__ import annotations

import gzip
import json
import lzma
import os
from typing import IO


def sample_documents() -> list[dict[str, str]]:
    """The help topics as ``{"id", "text"}`` records, sorted by topic."""
    from pydoc_data.topics import topics

    return [{"id": name, "text": topics[name]} for name in sorted(topics)]


def _open_for_writing(path: str, compression: str) -> IO[str]:
    if compression == ".gz":
        return gzip.open(path, "wt", encoding="utf-8")
    if compression == ".xz":
        return lzma.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def write_sample_corpus(path: str | os.PathLike, repeat: int = 1) -> int:
    """Write the topics ``repeat`` times as jsonl, atomically; return the document count.

    A ``.gz`` or ``.xz`` suffix compresses the output.
    """
    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    path = os.fspath(path)
    records = sample_documents()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with _open_for_writing(tmp, os.path.splitext(path)[1]) as out:
            for _ in range(repeat):
                for record in records:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(records) * repeat

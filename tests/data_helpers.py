"""Helpers for the data-tool tests: loading tools, shared corpora, datasets."""

from __future__ import annotations

import importlib.util
import lzma
import os
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
ENWIKI_AA = "enwiki-2015-wikiextractor/text_AA_wiki_00-99.txt.xz"
WIKITEXT_VALID = "wikitext-2/valid.txt.xz"


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_file(relative: str) -> Path:
    """A file of ../shared/data: skip when absent outside CI, fail when absent in CI."""
    path = SHARED_DATA / relative
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"shared test data missing in CI: {path}")
        pytest.skip(f"shared test data not found: {path} (set up ../shared/data; CI requires it)")
    return path


def wiki_prefix(n_docs: int) -> str:
    """The first ``n_docs`` WikiExtractor documents of enwiki AA, read as a bounded xz prefix."""
    closing = "</doc>\n"
    parts: list[str] = []
    found = 0
    with lzma.open(shared_file(ENWIKI_AA), "rt", encoding="utf-8") as stream:
        while found < n_docs:
            block = stream.read(1 << 16)
            assert block, "enwiki AA has fewer documents than requested"
            parts.append(block)
            found += block.count(closing)
    text = "".join(parts)
    end = -1
    for _ in range(n_docs):
        end = text.index(closing, end + 1)
    return text[: end + len(closing)]


def output_files(directory: Path) -> list[str]:
    """Names of all files in ``directory`` (hidden temporaries included)."""
    return sorted(p.name for p in directory.iterdir())

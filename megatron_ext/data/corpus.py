"""Reading raw text corpora: input expansion, decompression, document parsing.

Inputs are files, glob patterns or directories. Each file may be plain or
compressed with gzip, xz or zstd (``zstandard`` package); the compression is
recognised from the file's magic bytes, not its name. A file holds documents in
one of three formats:

``jsonl``
    One JSON object per line; the document text is the value of each of the
    requested keys. Blank lines are ignored.
``text``
    One document per line (the line terminator is removed).
``wikiextractor``
    WikiExtractor's document format: ``<doc id=.. url=.. title=..>``, the
    article lines, ``</doc>``. The document is the text between the tags
    (title line included) with leading and trailing newlines removed.

``auto`` picks ``jsonl`` for names ending in ``.json``, ``.jsonl`` or
``.ndjson`` (before any compression suffix), ``wikiextractor`` when the first
non-blank line starts with ``<doc``, and ``text`` otherwise.

Every problem in the input is raised as :class:`CorpusError`, which carries the
file and line. A :class:`BadLines` policy either re-raises it or counts it.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import lzma
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "jsonl", "text", "wikiextractor")
JSONL_SUFFIXES = (".json", ".jsonl", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".xz", ".zst", ".zstd")

_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

try:
    import zstandard
except ImportError:  # optional dependency
    zstandard = None

_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error)
if zstandard is not None:
    _READ_ERRORS += (zstandard.ZstdError,)


class CorpusError(Exception):
    """A problem with the input, located at ``path`` and (1-based) ``line``."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(str(self))

    @property
    def location(self) -> str:
        """``path:line`` (or ``path`` when no line applies)."""
        return self.path if self.line is None else f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass
class BadLines:
    """Policy for bad input: raise (default) or skip, counting and remembering locations."""

    skip: bool = False
    max_examples: int = 5
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def handle(self, error: CorpusError) -> None:
        """Raise ``error`` unless skipping; otherwise count it and keep the first few."""
        if not self.skip:
            raise error
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))
            logger.warning("skipping bad input: %s", error)


class Document(NamedTuple):
    """One document: one text per requested key, where it starts, and its size in bytes."""

    texts: tuple[str, ...]
    path: str
    line: int
    nbytes: int


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, glob patterns and directories (recursively, hidden entries excluded).

    Order: as given; glob matches and directory contents sorted by path.
    Raises CorpusError for a missing file or a pattern/directory without files.
    """
    paths: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        if os.path.isdir(text):
            found = sorted(_walk_files(Path(text)))
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        elif os.path.exists(text):
            found = [Path(text)]
        else:
            raise CorpusError(text, None, "no such file or directory")
        if not found:
            raise CorpusError(text, None, "matches no input files")
        paths.extend(found)
    return paths


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing gzip, xz or zstd transparently."""
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller
    try:
        magic = raw.peek(6)[:6]
        if magic.startswith(_GZIP_MAGIC):
            return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
        if magic.startswith(_XZ_MAGIC):
            return lzma.LZMAFile(raw)  # type: ignore[return-value]
        if magic.startswith(_ZSTD_MAGIC):
            if zstandard is None:
                raise OSError("zstd-compressed input needs the 'zstandard' package (pip install zstandard)")
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
            return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[return-value]
        return raw
    except BaseException:
        raw.close()
        raise


def strip_compression_suffix(name: str) -> str:
    """``wiki.jsonl.gz`` -> ``wiki.jsonl``."""
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def detect_format(path: str | os.PathLike) -> str:
    """Resolve the ``auto`` format for one file (see the module docstring)."""
    if strip_compression_suffix(os.fspath(path)).lower().endswith(JSONL_SUFFIXES):
        return "jsonl"
    try:
        with open_binary(path) as stream:
            for raw in stream:
                if raw.strip():
                    return "wikiextractor" if raw.lstrip().startswith(b"<doc") else "text"
    except _READ_ERRORS:
        pass  # reported with its location when the file is read
    return "text"


def iter_documents(
    paths: Sequence[str | os.PathLike],
    json_keys: Sequence[str] = ("text",),
    input_format: str = "auto",
    bad_lines: BadLines | None = None,
) -> Iterator[Document]:
    """Yield the documents of ``paths`` in order.

    Bad lines (malformed JSON, missing key, non-string value, invalid UTF-8)
    and unreadable files go through ``bad_lines`` (default: raise). ``text``
    and ``wikiextractor`` inputs need exactly one key, used for naming only.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; expected one of {INPUT_FORMATS}")
    if not json_keys:
        raise ValueError("at least one JSON key is needed")
    bad_lines = bad_lines if bad_lines is not None else BadLines()
    for path in paths:
        fmt = detect_format(path) if input_format == "auto" else input_format
        if fmt != "jsonl" and len(json_keys) != 1:
            raise CorpusError(path, None, f"several --json-keys need jsonl input, but this file is {fmt}")
        yield from _read_file(str(path), fmt, tuple(json_keys), bad_lines)


def _read_file(path: str, fmt: str, keys: tuple[str, ...], bad_lines: BadLines) -> Iterator[Document]:
    parse = {"jsonl": _parse_jsonl, "text": _parse_text, "wikiextractor": _parse_wikiextractor}[fmt]
    lines = _NumberedLines(path)
    try:
        yield from parse(lines, keys, bad_lines)
    except _READ_ERRORS as exc:
        bad_lines.handle(CorpusError(path, lines.number + 1, f"cannot read file: {exc}"))
    finally:
        lines.close()


class _NumberedLines:
    """Iterate the raw lines of a file, remembering the current line number."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.number = 0
        self._stream: BinaryIO | None = None

    def __iter__(self) -> Iterator[bytes]:
        self._stream = open_binary(self.path)
        for raw in self._stream:
            self.number += 1
            yield raw

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def decode(self, raw: bytes) -> str:
        """Decode one line as UTF-8 or raise a located CorpusError."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(
                self.path, self.number, f"invalid UTF-8 at byte {exc.start} of the line; expected UTF-8 text"
            ) from None


def _parse_text(lines: _NumberedLines, keys: tuple[str, ...], bad_lines: BadLines) -> Iterator[Document]:
    for raw in lines:
        try:
            text = lines.decode(raw)
        except CorpusError as err:
            bad_lines.handle(err)
            continue
        if text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
        yield Document((text,), lines.path, lines.number, len(raw))


def _parse_jsonl(lines: _NumberedLines, keys: tuple[str, ...], bad_lines: BadLines) -> Iterator[Document]:
    for raw in lines:
        if raw.isspace():
            continue
        try:
            texts = _json_texts(lines, raw, keys)
        except CorpusError as err:
            bad_lines.handle(err)
            continue
        yield Document(texts, lines.path, lines.number, len(raw))


def _json_texts(lines: _NumberedLines, raw: bytes, keys: tuple[str, ...]) -> tuple[str, ...]:
    where = (lines.path, lines.number)
    line = lines.decode(raw)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(
            *where, f"malformed JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line"
        ) from None
    if not isinstance(record, dict):
        raise CorpusError(*where, f"expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            present = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise CorpusError(*where, f"missing key {key!r} (keys present: {present})")
        value = record[key]
        if not isinstance(value, str):
            raise CorpusError(*where, f"value of {key!r} is {type(value).__name__}, expected a string")
        texts.append(value)
    if b"\\ud" in raw or b"\\uD" in raw:  # escaped lone surrogates cannot be encoded to UTF-8
        for key, text in zip(keys, texts, strict=True):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise CorpusError(
                    *where, f"value of {key!r} has an unpaired surrogate escape; expected valid Unicode"
                ) from None
    return tuple(texts)


def _parse_wikiextractor(lines: _NumberedLines, keys: tuple[str, ...], bad_lines: BadLines) -> Iterator[Document]:
    start = 0  # line of the open <doc>, 0 when outside a document
    body: list[str] = []
    nbytes = 0
    broken: CorpusError | None = None  # first problem inside the open document
    for raw in lines:
        stripped = raw.strip()
        if stripped.startswith(b"<doc") and stripped.endswith(b">"):
            if start:
                bad_lines.handle(
                    CorpusError(lines.path, start, f"<doc> not closed before the next <doc> at line {lines.number}")
                )
            start, body, nbytes, broken = lines.number, [], len(raw), None
            continue
        if not start:
            if stripped:
                bad_lines.handle(
                    CorpusError(
                        lines.path,
                        lines.number,
                        "text outside <doc ...>...</doc>; expected WikiExtractor document format",
                    )
                )
            continue
        nbytes += len(raw)
        if stripped == b"</doc>":
            if broken is not None:
                bad_lines.handle(broken)
            else:
                yield Document(("".join(body).strip("\n"),), lines.path, start, nbytes)
            start, body = 0, []
            continue
        try:
            body.append(lines.decode(raw))
        except CorpusError as err:
            broken = broken or err
    if start:
        bad_lines.handle(CorpusError(lines.path, start, "<doc> not closed by </doc> before the end of the file"))

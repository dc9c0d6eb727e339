"""megatron_ext.data.corpus: input expansion, formats, locations, the bad-line policy."""

from __future__ import annotations

import gzip
import lzma

import pytest

from megatron_ext.data.corpus import BadLines, CorpusError, detect_format, expand_inputs, iter_documents


def docs(path, **kwargs):
    return [(d.texts, d.line) for d in iter_documents([path], **kwargs)]


def test_format_detection(tmp_path):
    cases = {
        "a.jsonl.gz": (gzip.compress(b'{"text": "x"}\n'), "jsonl"),
        "b.json": (b'{"text": "x"}\n', "jsonl"),
        "c.txt.xz": (lzma.compress(b'\n<doc id="1">\nT\n</doc>\n'), "wikiextractor"),
        "d.txt": (b"plain line\n", "text"),
        "e.data": (gzip.compress(b"gzip without a .gz name\n"), "text"),
    }
    for name, (payload, expected) in cases.items():
        (tmp_path / name).write_bytes(payload)
        assert detect_format(tmp_path / name) == expected, name
    assert docs(tmp_path / "e.data") == [(("gzip without a .gz name",), 1)]


def test_text_lines_and_locations(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\r\ntwo\n\nlast without newline")
    assert docs(path) == [(("one",), 1), (("two",), 2), (("",), 3), (("last without newline",), 4)]


def test_jsonl_blank_lines_are_not_documents(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "x": 1}\n\n  \n{"text": "b"}\n')
    assert docs(path) == [(("a",), 1), (("b",), 4)]


def test_wikiextractor_document_starts_at_its_tag(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text('<doc id="1" title="T">\nT\n\nline one\nline two\n\n</doc>\n\n<doc id="2">\nU\n</doc>\n')
    assert docs(path) == [(("T\n\nline one\nline two",), 1), (("U",), 9)]


def test_invalid_utf8_inside_wikiextractor_document(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b'<doc id="1">\nok\n</doc>\n<doc id="2">\nbad \xff\n</doc>\n<doc id="3">\nfine\n</doc>\n')
    with pytest.raises(CorpusError) as info:
        docs(path)
    assert (info.value.path, info.value.line) == (str(path), 5)
    policy = BadLines(skip=True)
    assert [d[0] for d in docs(path, bad_lines=policy)] == [("ok",), ("fine",)]
    assert policy.count == 1


def test_bad_lines_keeps_only_first_examples(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("not json\n" * 8 + '{"text": "ok"}\n')
    policy = BadLines(skip=True, max_examples=3)
    assert docs(path, bad_lines=policy) == [(("ok",), 9)]
    assert policy.count == 8
    assert policy.examples == [
        f"{path}:{i}: malformed JSON (Expecting value at column 1); expected one JSON object per line"
        for i in (1, 2, 3)
    ]


def test_expand_inputs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.txt", "d/a.txt", "d/sub/c.txt", "d/.hidden", "x.txt"):
        (tmp_path / name).write_text("x\n")
    names = [p.relative_to(tmp_path).as_posix() for p in expand_inputs([tmp_path / "x.txt", tmp_path / "d"])]
    assert names == ["x.txt", "d/a.txt", "d/b.txt", "d/sub/c.txt"]
    assert [p.name for p in expand_inputs([str(tmp_path / "d" / "**" / "*.txt")])] == ["a.txt", "b.txt", "c.txt"]
    with pytest.raises(CorpusError, match="matches no input files"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    with pytest.raises(CorpusError, match="no such file"):
        expand_inputs([tmp_path / "nope.txt"])


def test_zstd_input(tmp_path):
    import zstandard  # a test dependency (pyproject's test extra)
    path = tmp_path / "z.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst"}\n' * 3))
    assert [d[0] for d in docs(path)] == [("zst",)] * 3


def test_error_message_format():
    assert str(CorpusError("f.jsonl", 7, "missing key 'text'")) == "f.jsonl:7: missing key 'text'"
    assert str(CorpusError("f.jsonl", None, "no such file or directory")) == "f.jsonl: no such file or directory"

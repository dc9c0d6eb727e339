"""tools/train_tokenizer.py: determinism, options, bounded sample, atomic output."""

from __future__ import annotations

import gzip
import json

import pytest
import sentencepiece
from data_helpers import ENWIKI_AA, load_tool, output_files, shared_file

from megatron_ext.data.corpus import Document
from megatron_ext.data.samples import sample_documents, write_sample_corpus
from megatron_ext.data.train_tokenizer import sample_sentences

train_tokenizer = load_tool("train_tokenizer")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    write_sample_corpus(path)
    return path


def train(prefix, *argv):
    return train_tokenizer.main(["--model-prefix", str(prefix), *argv])


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_deterministic_lossless_model(tmp_path, corpus, model_type):
    for name in ("a", "b"):
        assert (
            train(
                tmp_path / name,
                "--input",
                str(corpus),
                "--vocab-size",
                "600",
                "--model-type",
                model_type,
                "--max-sentences",
                "3000",
                "--seed",
                "7",
            )
            == 0
        )
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (tmp_path / "a.vocab").read_text() == (tmp_path / "b.vocab").read_text()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert sp.vocab_size() == 600 and sp.eos_id() == 2
    assert len((tmp_path / "a.vocab").read_text().splitlines()) == 600
    text = "  Ünïcode ✓ 中文\n\ttabs   and  spaces "
    assert sp.decode(sp.encode(text)) == text  # identity normalisation + byte fallback


def test_seed_changes_the_sample():
    documents = [Document((f"line {i}\nother {i}",), "f", i, 10) for i in range(500)]
    first, n_docs, seen = sample_sentences(iter(documents), 50, seed=1)
    assert (len(first), n_docs, seen) == (50, 500, 1000)
    assert sample_sentences(iter(documents), 50, seed=1)[0] == first
    assert sample_sentences(iter(documents), 50, seed=2)[0] != first


def test_options_reach_the_model(tmp_path, corpus):
    assert (
        train(
            tmp_path / "m",
            "--input",
            str(corpus),
            "--vocab-size",
            "500",
            "--no-byte-fallback",
            "--user-defined-symbols",
            "<|user|>",
            "<|assistant|>",
            "--character-coverage",
            "1.0",
        )
        == 0
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    pieces = sp.encode("<|user|>hi<|assistant|>", out_type=str)
    assert "<|user|>" in pieces and "<|assistant|>" in pieces
    assert sp.encode("中", out_type=int)[-1] == sp.unk_id()  # no byte fallback: unknown


def test_max_sentences_bounds_the_sample(tmp_path, corpus, capsys):
    assert train(tmp_path / "s", "--input", str(corpus), "--vocab-size", "400", "--max-sentences", "1000") == 0
    out = capsys.readouterr().out
    assert "trained on 1000 of " in out and "from 79 documents" in out


def test_compressed_text_and_multiple_inputs(tmp_path):
    texts = [r["text"] for r in sample_documents()]
    half = len(texts) // 2
    (tmp_path / "a.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"body": t}) + "\n" for t in texts[:half]).encode())
    )
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[half:]))
    assert (
        train(tmp_path / "g", "--input", str(tmp_path / "*.jsonl*"), "--json-keys", "body", "--vocab-size", "400") == 0
    )
    assert (tmp_path / "g.model").stat().st_size > 0


def test_wikipedia_input(tmp_path, capsys):
    source = shared_file(ENWIKI_AA)
    # Read only a bounded prefix: the first 1 MB of decompressed text.
    import lzma

    with lzma.open(source, "rb") as stream:
        head = stream.read(1_000_000)
    (tmp_path / "aa.txt").write_bytes(head[: head.rindex(b"</doc>\n") + 7])
    assert train(tmp_path / "w", "--input", str(tmp_path / "aa.txt"), "--vocab-size", "2000") == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "w.model"))
    assert len(sp.encode("Anarchism is a political philosophy")) < 12  # learnt real English words


def test_errors_leave_no_files(tmp_path, capsys, corpus):
    bad = tmp_path / "in" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    out = tmp_path / "out"
    assert train(out / "t", "--input", str(bad), "--vocab-size", "300") == 1
    assert f"error: {bad}:2: missing key 'text'" in capsys.readouterr().err
    assert not out.exists() or output_files(out) == []
    assert train(out / "t", "--input", str(corpus), "--vocab-size", "900000") == 1
    assert "SentencePiece training failed" in capsys.readouterr().err
    assert not out.exists() or output_files(out) == []

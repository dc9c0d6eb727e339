"""tools/preprocess_data.py: round trips, worker determinism, bad input, clean-up."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import REPO, WIKITEXT_VALID, load_tool, output_files, shared_file, wiki_prefix

from megatron_ext.data.samples import sample_documents, write_sample_corpus
from megatron_ext.data.tokenizers import build_tokenizer

preprocess_data = load_tool("preprocess_data")
train_tokenizer = load_tool("train_tokenizer")

SUMMARY_RE = re.compile(r"\[(\w+)\] documents: (\d+)  tokens: (\d+)  empty documents skipped: (\d+)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The bundled pydoc topics as jsonl."""
    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    write_sample_corpus(path)
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus) -> str:
    """A tiny lossless SentencePiece model trained on the bundled corpus."""
    prefix = tmp_path_factory.mktemp("tok") / "sp"
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(prefix), "--vocab-size", "800"]) == 0
    return f"{prefix}.model"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run preprocess_data in-process; return (exit code, stdout, stderr)."""
    code = preprocess_data.main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def read_dataset(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    assert list(dataset.index.document_indices) == list(range(len(dataset) + 1)), "one sequence per document"
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the mmap closes with the dataset


def summary_counts(out: str) -> dict[str, tuple[int, int, int]]:
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in SUMMARY_RE.finditer(out)}


def assert_round_trip(
    capsys, inputs: list[str], prefix: Path, model: str, expected: list[str], *extra: str
) -> list[np.ndarray]:
    """Preprocess with --append-eod; decoded documents equal ``expected``; counts match the summary."""
    code, out, err = run(
        capsys,
        "--input",
        *inputs,
        "--output-prefix",
        str(prefix),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        model,
        "--append-eod",
        *extra,
    )
    assert code == 0, err
    tokenizer = build_tokenizer("SentencePieceTokenizer", model)
    docs = read_dataset(f"{prefix}_text_document")
    assert len(docs) == len(expected)
    for doc, text in zip(docs, expected, strict=True):
        assert doc[-1] == tokenizer.eod
        assert tokenizer.detokenize(doc[:-1]) == text
    n_docs, n_tokens, _ = summary_counts(out)["text"]
    assert (n_docs, n_tokens) == (len(docs), sum(len(d) for d in docs))
    return docs


def test_round_trip_bundled_corpus(tmp_path, capsys, corpus, sp_model):
    expected = [record["text"] for record in sample_documents()]
    docs = assert_round_trip(capsys, [str(corpus)], tmp_path / "out", sp_model, expected)
    assert docs[0].dtype == np.uint16  # vocabulary of 800 fits 16 bits


def test_round_trip_wikipedia_prefix(tmp_path, capsys, sp_model):
    text = wiki_prefix(120)
    source = tmp_path / "wiki_AA.txt"
    source.write_text(text, encoding="utf-8")
    expected = [m.group(1).strip("\n") for m in re.finditer(r"<doc [^>]*>\n(.*?)</doc>\n", text, re.S)]
    assert len(expected) == 120
    assert_round_trip(capsys, [str(source)], tmp_path / "wiki", sp_model, expected)


def test_round_trip_wikitext_lines(tmp_path, capsys, sp_model):
    source = shared_file(WIKITEXT_VALID)
    lines = lzma.decompress(source.read_bytes()).decode("utf-8").split("\n")[:-1]
    expected = [line for line in lines if line.strip()]
    assert_round_trip(capsys, [str(source)], tmp_path / "wt", sp_model, expected)
    code, out, _ = run(
        capsys,
        "--input",
        str(source),
        "--output-prefix",
        str(tmp_path / "wt2"),
        "--tokenizer-type",
        "ByteLevelTokenizer",
    )
    assert code == 0
    assert summary_counts(out)["text"][2] == len(lines) - len(expected)  # blank lines counted as empty


def test_byte_level_round_trip_without_model(tmp_path, capsys, corpus):
    code, out, _ = run(
        capsys, "--input", str(corpus), "--output-prefix", str(tmp_path / "b"), "--tokenizer-type", "ByteLevelTokenizer"
    )
    assert code == 0
    docs = read_dataset(f"{tmp_path}/b_text_document")
    expected = [record["text"] for record in sample_documents()]
    assert [bytes(d.astype(np.uint8)).decode("utf-8") for d in docs] == expected
    assert summary_counts(out)["text"][:2] == (len(expected), sum(len(t.encode()) for t in expected))


@pytest.mark.parametrize("workers", [2])
def test_worker_count_gives_identical_output(tmp_path, capsys, corpus, sp_model, workers):
    big = tmp_path / "big.jsonl"
    big.write_bytes(corpus.read_bytes() * 3)
    outputs = {}
    for n in (1, workers):
        prefix = tmp_path / f"w{n}"
        code, _, err = run(
            capsys,
            "--input",
            str(big),
            "--output-prefix",
            str(prefix),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            sp_model,
            "--append-eod",
            "--workers",
            str(n),
            "--chunk-bytes",
            "20000",
        )
        assert code == 0, err
        outputs[n] = [Path(f"{prefix}_text_document.{ext}").read_bytes() for ext in ("bin", "idx")]
    assert outputs[1] == outputs[workers]
    assert len(read_dataset(f"{tmp_path}/w1_text_document")) == 3 * len(sample_documents())


def test_compressed_inputs_match_plain(tmp_path, capsys, corpus, sp_model):
    data = corpus.read_bytes()
    import zstandard  # a test dependency (pyproject's test extra)

    variants = {
        "plain.jsonl": data, "c.jsonl.gz": gzip.compress(data), "c.jsonl.xz": lzma.compress(data),
        "c.jsonl.zst": zstandard.ZstdCompressor().compress(data),
    }
    results = set()
    for name, payload in variants.items():
        (tmp_path / name).write_bytes(payload)
        prefix = tmp_path / f"out_{name.replace('.', '_')}"
        code, _, err = run(
            capsys,
            "--input",
            str(tmp_path / name),
            "--output-prefix",
            str(prefix),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            sp_model,
        )
        assert code == 0, err
        results.add(tuple(Path(f"{prefix}_text_document.{ext}").read_bytes() for ext in ("bin", "idx")))
    assert len(results) == 1


def test_directory_and_glob_inputs_keep_order(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_text("beta\n")
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "c.txt").write_text("gamma\n")
    (data / ".hidden.txt").write_text("hidden\n")
    for inputs in ([str(data)], [str(data / "*.txt"), str(data / "sub")]):
        code, _, err = run(
            capsys, "--input", *inputs, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "ByteLevelTokenizer"
        )
        assert code == 0, err
        docs = [bytes(d.astype(np.uint8)).decode() for d in read_dataset(f"{tmp_path}/o_text_document")]
        assert docs == ["alpha", "beta", "gamma"]


def test_several_json_keys_write_one_dataset_each(tmp_path, capsys):
    source = tmp_path / "qa.jsonl"
    source.write_text(
        "\n".join(json.dumps({"q": f"question {i}", "a": "" if i == 1 else f"answer {i}"}) for i in range(3)) + "\n"
    )
    code, out, err = run(
        capsys,
        "--input",
        str(source),
        "--json-keys",
        "q",
        "a",
        "--output-prefix",
        str(tmp_path / "qa"),
        "--tokenizer-type",
        "ByteLevelTokenizer",
        "--append-eod",
    )
    assert code == 0, err
    decode = build_tokenizer("ByteLevelTokenizer").detokenize
    assert [decode(d) for d in read_dataset(f"{tmp_path}/qa_q_document")] == ["question 0", "question 1", "question 2"]
    assert [decode(d) for d in read_dataset(f"{tmp_path}/qa_a_document")] == ["answer 0", "answer 2"]
    assert summary_counts(out) == {"q": (3, 33, 0), "a": (2, 18, 1)}


def test_empty_documents_are_skipped_and_counted(tmp_path, capsys):
    source = tmp_path / "lines.txt"
    source.write_text("first\n\n   \nsecond\n\t\n")
    code, out, _ = run(
        capsys,
        "--input",
        str(source),
        "--output-prefix",
        str(tmp_path / "e"),
        "--tokenizer-type",
        "ByteLevelTokenizer",
        "--append-eod",
    )
    assert code == 0
    decode = build_tokenizer("ByteLevelTokenizer").detokenize
    assert [decode(d) for d in read_dataset(f"{tmp_path}/e_text_document")] == ["first", "second"]
    assert summary_counts(out)["text"] == (2, 13, 3)
    assert "documents read: 5" in out


# ---------------------------------------------------------------- bad input

BAD_LINES = {
    "malformed JSON": (b'{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n', 2, "malformed JSON"),
    "missing key": (b'{"text": "ok"}\n{"body": "no text key"}\n{"text": "fine"}\n', 2, "missing key 'text'"),
    "non-string value": (b'{"text": "ok"}\n{"text": "fine"}\n{"text": 42}\n', 3, "value of 'text' is int"),
    "null value": (b'{"text": "ok"}\n{"text": null}\n{"text": "fine"}\n', 2, "value of 'text' is NoneType"),
    "not an object": (b'["text"]\n{"text": "ok"}\n{"text": "fine"}\n', 1, "expected a JSON object"),
    "invalid UTF-8": (b'{"text": "ok"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n', 3, "invalid UTF-8"),
    "lone surrogate": (b'{"text": "ok"}\n{"text": "\\ud800 x"}\n{"text": "fine"}\n', 2, "unpaired surrogate"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_stops_with_location_and_leaves_nothing(tmp_path, capsys, case):
    payload, line, message = BAD_LINES[case]
    source = tmp_path / "in" / "bad.jsonl"
    source.parent.mkdir()
    source.write_bytes(payload)
    out_dir = tmp_path / "out"
    code, _, err = run(
        capsys, "--input", str(source), "--output-prefix", str(out_dir / "x"), "--tokenizer-type", "ByteLevelTokenizer"
    )
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"error: {source}:{line}: ")
    assert message in err
    assert "Traceback" not in err
    assert output_files(out_dir) == []


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_skip_bad_lines_counts_and_reports(tmp_path, capsys, case):
    payload, line, _ = BAD_LINES[case]
    source = tmp_path / "bad.jsonl"
    source.write_bytes(payload * 2)  # two bad lines, four good ones
    code, out, err = run(
        capsys,
        "--input",
        str(source),
        "--output-prefix",
        str(tmp_path / "x"),
        "--tokenizer-type",
        "ByteLevelTokenizer",
        "--skip-bad-lines",
    )
    assert code == 0, err
    assert "skipped lines: 2" in out
    assert f"{source}:{line}: " in out and f"{source}:{line + 3}: " in out
    assert len(read_dataset(f"{tmp_path}/x_text_document")) == 4


def test_truncated_compressed_file_is_reported(tmp_path, capsys, corpus):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "kept"}\n')
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(corpus.read_bytes())[:5000])
    args = [
        "--input",
        str(good),
        str(broken),
        "--output-prefix",
        str(tmp_path / "out" / "t"),
        "--tokenizer-type",
        "ByteLevelTokenizer",
    ]
    code, _, err = run(capsys, *args)
    assert code == 1
    assert re.search(rf"error: {re.escape(str(broken))}:\d+: cannot read file", err)
    assert output_files(tmp_path / "out") == []
    code, out, _ = run(capsys, *args, "--skip-bad-lines")
    assert code == 0 and "skipped lines: 1" in out
    assert 1 <= len(read_dataset(f"{tmp_path}/out/t_text_document")) < len(sample_documents()) + 1


def test_wikiextractor_structure_errors(tmp_path, capsys):
    source = tmp_path / "wiki.txt"
    source.write_text(
        '<doc id="1" title="A">\nA\n\nBody a.\n</doc>\nstray text\n<doc id="2" title="B">\nB\n'
        '<doc id="3" title="C">\nC\n</doc>\n<doc id="4" title="D">\nD\n'
    )
    args = ["--input", str(source), "--output-prefix", str(tmp_path / "w"), "--tokenizer-type", "ByteLevelTokenizer"]
    code, _, err = run(capsys, *args)
    assert code == 1 and f"error: {source}:6: text outside <doc" in err
    code, out, _ = run(capsys, *args, "--skip-bad-lines")
    assert code == 0 and "skipped lines: 3" in out
    for location in (f"{source}:6:", f"{source}:7: <doc> not closed", f"{source}:12: <doc> not closed"):
        assert location in out
    decode = build_tokenizer("ByteLevelTokenizer").detokenize
    assert [decode(d) for d in read_dataset(f"{tmp_path}/w_text_document")] == ["A\n\nBody a.", "C"]


def test_option_errors(tmp_path, capsys):
    prefix = str(tmp_path / "o" / "x")
    code, _, err = run(
        capsys,
        "--input",
        str(tmp_path / "missing.jsonl"),
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "ByteLevelTokenizer",
    )
    assert code == 1 and f"error: {tmp_path / 'missing.jsonl'}: no such file" in err
    code, _, err = run(
        capsys, "--input", str(tmp_path), "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer"
    )
    assert code == 1 and "needs --tokenizer-model" in err
    (tmp_path / "t.txt").write_text("x\n")
    code, _, err = run(
        capsys,
        "--input",
        str(tmp_path / "t.txt"),
        "--json-keys",
        "a",
        "b",
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "ByteLevelTokenizer",
    )
    assert code == 1 and "several --json-keys need jsonl input" in err
    assert not (tmp_path / "o").exists() or output_files(tmp_path / "o") == []


def test_huggingface_tokenizer_round_trip(tmp_path, capsys, corpus):
    import tokenizers  # a test dependency (pyproject's test extra)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([r["text"] for r in sample_documents()], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    code, _, err = run(
        capsys,
        "--input",
        str(corpus),
        "--output-prefix",
        str(tmp_path / "hf"),
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tmp_path),
        "--append-eod",
    )
    assert code == 0, err
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    docs = read_dataset(f"{tmp_path}/hf_text_document")
    assert tokenizer.eod == 0 and all(d[-1] == 0 for d in docs)
    assert [tokenizer.detokenize(d) for d in docs] == [r["text"] for r in sample_documents()]


# ---------------------------------------------------------------- subprocess: exit codes and interrupts


def _tool_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _preprocess_command(source: Path, output_prefix: Path, *options: str) -> list[str]:
    """tools/preprocess_data.py as a subprocess command line."""
    return [
        sys.executable, str(REPO / "tools" / "preprocess_data.py"),
        "--input", str(source), "--output-prefix", str(output_prefix), *options,
    ]


def test_cli_exit_code_and_message(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"text": "ok"}\n{"text": \n')
    proc = subprocess.run(
        _preprocess_command(source, tmp_path / "out" / "x", "--tokenizer-type", "ByteLevelTokenizer"),
        capture_output=True,
        text=True,
        env=_tool_env(),
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"error: {source}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert output_files(tmp_path / "out") == []


def test_missing_input_is_reported_before_megatron_core_is_imported(tmp_path):
    """The seconds of importing torch and megatron-core come after the inputs are found."""
    missing = tmp_path / "missing.jsonl"
    command = _preprocess_command(missing, tmp_path / "x", "--tokenizer-type", "ByteLevelTokenizer")
    proc = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True,
                          env=_tool_env(), timeout=120)
    assert proc.returncode == 1 and f"error: {missing}: no such file" in proc.stderr
    imported = re.findall(r"^import time:.*\|\s+([\w.]+)$", proc.stderr, re.MULTILINE)
    assert "numpy" in imported and "megatron.core" not in imported and "torch" not in imported


@pytest.mark.parametrize(("workers", "signum"), [(1, signal.SIGINT), (2, signal.SIGINT), (1, signal.SIGTERM)])
def test_interrupt_leaves_no_output(tmp_path, sp_model, workers, signum):
    source = tmp_path / "big.jsonl"
    write_sample_corpus(source, repeat=60)  # ~28 MB: far longer to tokenize than the test waits
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        _preprocess_command(
            source, out_dir / "x", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--workers", str(workers),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_tool_env(),
        # As from a terminal: a pytest started in the background (`&`) ignores SIGINT, and so would the tool.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (out_dir.exists() and any(p.stat().st_size > 0 for p in out_dir.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no output started"
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert output_files(out_dir) == []

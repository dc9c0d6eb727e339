"""Train a SentencePiece tokenizer from a bounded, seeded sample of a corpus.

The corpus is streamed once; every non-blank line of every document is a
candidate sentence and a reservoir sample of at most ``max_sentences`` lines is
kept, so memory is bounded by the sample, not the corpus. The defaults give a
lossless GPT-style model: identity normalisation, whitespace kept, byte
fallback for characters outside the vocabulary. ``<prefix>.model`` and
``<prefix>.vocab`` (``piece<TAB>score`` lines) are written under temporary
names beside the prefix and renamed into place when training has finished.
"""

from __future__ import annotations

import io
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from megatron_ext.data.corpus import BadLines, Document, expand_inputs, iter_documents
from megatron_ext.files import write_atomically

logger = logging.getLogger(__name__)

MODEL_TYPES = ("bpe", "unigram")
NORMALIZATIONS = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")


@dataclass
class TokenizerTrainingConfig:
    """Options of :func:`train_tokenizer` (mirrors ``tools/train_tokenizer.py``)."""

    inputs: Sequence[str]
    model_prefix: str
    vocab_size: int = 32000
    model_type: str = "bpe"
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    normalization: str = "identity"
    remove_extra_whitespaces: bool = False
    user_defined_symbols: Sequence[str] = ()
    max_sentences: int = 1_000_000
    max_sentence_length: int = 16384
    seed: int = 1234
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    json_keys: Sequence[str] = ("text",)
    input_format: str = "auto"
    skip_bad_lines: bool = False


@dataclass
class TrainingStats:
    """What :func:`train_tokenizer` did."""

    documents: int
    sentences_seen: int
    sentences_sampled: int
    skipped_lines: int
    model_path: str
    vocab_path: str


def sample_sentences(documents: Iterable[Document], max_sentences: int, seed: int) -> tuple[list[str], int, int]:
    """Reservoir-sample non-blank lines of all documents' texts.

    Returns (sample, documents seen, lines seen). Deterministic for a seed.
    """
    if max_sentences < 1:
        raise ValueError("--max-sentences must be at least 1")
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    n_docs = 0
    for doc in documents:
        n_docs += 1
        for text in doc.texts:
            for line in text.split("\n"):
                if not line or line.isspace():
                    continue
                seen += 1
                if len(sample) < max_sentences:
                    sample.append(line)
                else:
                    slot = rng.randrange(seen)
                    if slot < max_sentences:
                        sample[slot] = line
    return sample, n_docs, seen


def _trainer_options(config: TokenizerTrainingConfig) -> dict:
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {config.model_type!r}; expected one of {MODEL_TYPES}")
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {config.normalization!r}; expected one of {NORMALIZATIONS}")
    return dict(
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        character_coverage=config.character_coverage,
        byte_fallback=config.byte_fallback,
        normalization_rule_name=config.normalization,
        remove_extra_whitespaces=config.remove_extra_whitespaces,
        user_defined_symbols=list(config.user_defined_symbols),
        max_sentence_length=config.max_sentence_length,
        num_threads=config.num_threads,
        input_sentence_size=config.max_sentences,
        shuffle_input_sentence=False,  # the sample is already uniform; keep it deterministic
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )


def train_tokenizer(config: TokenizerTrainingConfig) -> TrainingStats:
    """Sample the corpus, train SentencePiece, write ``<prefix>.model``/``.vocab`` atomically."""
    import sentencepiece

    options = _trainer_options(config)
    bad_lines = BadLines(skip=config.skip_bad_lines)
    documents = iter_documents(expand_inputs(config.inputs), config.json_keys, config.input_format, bad_lines)
    sample, n_docs, seen = sample_sentences(documents, config.max_sentences, config.seed)
    if not sample:
        raise ValueError("the input has no non-blank lines to train on")
    logger.info(
        "training %s tokenizer (vocab %d) on %d of %d lines from %d documents",
        config.model_type,
        config.vocab_size,
        len(sample),
        seen,
        n_docs,
    )

    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(config.seed)
    try:
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=model, **options)
    except RuntimeError as exc:
        raise ValueError(f"SentencePiece training failed: {exc}") from None
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.vocab_size()))
    final = {ext: f"{config.model_prefix}.{ext}" for ext in ("vocab", "model")}
    write_atomically(final["vocab"], vocab.encode("utf-8"))
    write_atomically(final["model"], model.getvalue())  # last: its presence means a complete pair
    return TrainingStats(n_docs, seen, len(sample), bad_lines.count, final["model"], final["vocab"])

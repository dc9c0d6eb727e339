"""Tokenizers shared by the data tools and the training driver.

``build_tokenizer(tokenizer_type, tokenizer_model)`` returns a :class:`Tokenizer`:

``SentencePieceTokenizer`` (alias ``GPTSentencePieceTokenizer``)
    A SentencePiece ``.model`` file; EOD is the model's ``</s>`` (eos) id.
    ``detokenize(tokenize(text))`` returns ``text`` up to the model's
    normalisation (none for models trained by ``tools/train_tokenizer.py``
    with its defaults: identity normalisation, whitespace kept, byte fallback).
``ByteLevelTokenizer``
    Needs no model: ids 0-255 are the bytes of the UTF-8 encoding, id 256 is
    EOD; ``vocab_size`` is 257. Lossless for any text.
``HuggingFaceTokenizer``
    A ``tokenizer.json`` file (or a directory holding one) loaded with the
    ``tokenizers`` package, which must be installed. EOD is the first of
    ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>`` found in the vocabulary.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Sequence

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "ByteLevelTokenizer", "HuggingFaceTokenizer")
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class Tokenizer(ABC):
    """Text <-> token ids, with a vocabulary size and an end-of-document id."""

    vocab_size: int
    eod: int

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOD appended)."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; subclasses override with faster batch calls."""
        return [self.tokenize(text) for text in texts]

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; EOD and other control ids produce no text."""


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece model; EOD is the model's eos id."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece

        self.model_path = os.fspath(model_path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.model_path}: cannot load SentencePiece model: {exc}") from None
        self.vocab_size = self._sp.vocab_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"{self.model_path}: SentencePiece model has no eos (</s>) id to use as EOD")

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One C++ call per batch; one thread because parallelism comes from worker processes.
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class ByteLevelTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255 and EOD as 256; needs no model file."""

    vocab_size = 257
    eod = 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    """A ``tokenizers`` ``tokenizer.json`` (file or directory holding it)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        try:
            import tokenizers
        except ImportError:
            raise ImportError("HuggingFaceTokenizer needs the 'tokenizers' package (pip install tokenizers)") from None
        path = os.fspath(model_path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for candidate in HF_EOD_CANDIDATES:
            eod = self._tok.token_to_id(candidate)
            if eod is not None:
                self.eod = eod
                break
        else:
            raise ValueError(f"{path}: no end-of-document token; expected one of {HF_EOD_CANDIDATES}")

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | os.PathLike | None = None) -> Tokenizer:
    """Build a tokenizer by Megatron-style type name (see the module docstring)."""
    if tokenizer_type == "ByteLevelTokenizer":
        if tokenizer_model is not None:  # silently ignoring it would tokenize with the wrong vocabulary
            raise ValueError(f"ByteLevelTokenizer takes no --tokenizer-model (got {tokenizer_model}); "
                             "give that model's --tokenizer-type")
        return ByteLevelTokenizer()
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_model is None:
        raise ValueError(f"{tokenizer_type} needs --tokenizer-model")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model}")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    return SentencePieceTokenizer(tokenizer_model)

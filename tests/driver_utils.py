"""Shared pieces of the driver tests: a tiny dataset, tiny run flags, metrics reading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHOD_FLAGS = ["--prores", "--prores-warmup", "3", "--wesar", "--normformer"]


def tiny_flags(data_prefix: str, **overrides) -> list[str]:
    """A 2-layer GPT on the byte-level test corpus; dropout off so runs are deterministic."""
    flags = {
        "num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 32,
        "micro-batch-size": 4, "train-iters": 12, "lr": 3e-3, "lr-warmup-iters": 2,
        "data-path": data_prefix, "tokenizer-type": "ByteLevelTokenizer", "split": "90,10,0",
        "log-interval": 1, "eval-interval": 1000, "eval-iters": 2, "hidden-dropout": 0, "attention-dropout": 0,
        "make-vocab-size-divisible-by": 64,
    }
    flags.update({k.replace("_", "-"): v for k, v in overrides.items()})
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv


def launch_env() -> dict[str, str]:
    """Environment for launching pretrain_gpt.py (or torchrun) from a test: no inherited rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def read_metrics(directory) -> list[dict]:
    with open(Path(directory) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(directory) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(directory) if "lm_loss" in r and "event" not in r}


def val_losses(directory) -> list[float]:
    return [r["val_loss"] for r in read_metrics(directory) if "val_loss" in r]


@pytest.fixture(scope="session")
def byte_dataset(tmp_path_factory) -> str:
    """The bundled topics corpus as a byte-level .bin/.idx dataset."""
    from data_helpers import load_tool

    from megatron_ext.data.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("driver_data")
    corpus = root / "topics.jsonl"
    assert load_tool("sample_corpus").main(["--output", str(corpus)]) == 0
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_prefix=str(root / "topics"),
                                tokenizer_type="ByteLevelTokenizer", append_eod=True, progress=False))
    return str(root / "topics_text_document")

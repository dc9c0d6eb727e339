"""Shared fixtures: a one-process gloo world for in-process model tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def parallel1():
    """megatron-core parallel state for a single CPU rank (TP=PP=1)."""
    from mp_utils import _free_port

    from megatron_ext.parallel import initialize_cpu_parallel

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    initialize_cpu_parallel(1, 1)
    yield

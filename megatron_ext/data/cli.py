"""Shared command-line plumbing for the data tools: logging, exit codes, signals."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import warnings
from typing import Callable

from megatron_ext.data.corpus import CorpusError

USER_ERRORS = (CorpusError, ValueError, OSError, ImportError)
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_tool(body: Callable[[], None]) -> int:
    """Run a tool body: user errors -> ``error: ...`` on stderr and 1; Ctrl-C/SIGTERM -> 130.

    SIGTERM is turned into KeyboardInterrupt so that the same clean-up runs.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("megatron_ext").setLevel(logging.INFO)
    # megatron.core warns about optional GPU packages on import; irrelevant to data tools.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
        body()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; partial output removed", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0

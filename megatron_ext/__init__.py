"""megatron-ext: GPT pretraining on megatron-core with ProRes, WeSaR and NormFormer.

The heavy submodules (torch, megatron-core) load on first use, so light tools such as
the data preprocessors can import ``megatron_ext.data`` cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ExtensionConfig": "megatron_ext.extensions",
    "ExtTransformerConfig": "megatron_ext.config",
    "ProResConfig": "megatron_ext.prores",
    "WeSaRConfig": "megatron_ext.wesar",
    "NormFormerConfig": "megatron_ext.normformer",
    "gpt_model": "megatron_ext.model",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_ext' has no attribute {name!r}")

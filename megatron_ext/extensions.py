"""The per-method switches of a megatron-ext model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_ext.normformer import NormFormerConfig
from megatron_ext.prores import ProResConfig
from megatron_ext.wesar import WeSaRConfig


@dataclass(frozen=True)
class ExtensionConfig:
    """Which stability methods a model uses; ``None`` switches a method off."""

    prores: Optional[ProResConfig] = None
    wesar: Optional[WeSaRConfig] = None
    normformer: Optional[NormFormerConfig] = None

    def __post_init__(self) -> None:
        for name, kind in (("prores", ProResConfig), ("wesar", WeSaRConfig), ("normformer", NormFormerConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"ExtensionConfig.{name} must be a {kind.__name__} or None, got {type(value).__name__}")

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the methods switched on."""
        return tuple(n for n in ("prores", "wesar", "normformer") if getattr(self, n) is not None)

"""WeSaR: weight scaling as reparameterization (Nishida et al., EMNLP 2024, arXiv 2410.05052).

Every weight matrix W is replaced by ``a_W * W~``: one trainable scalar gate ``a_W``
per matrix, all base weights ``W~`` drawn from one common ``N(0, std^2)`` and each
gate initialised to ``target_std / std`` so the model equals its backbone at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONES: tuple[str, ...] = ("he", "megatron")


@dataclass(frozen=True)
class WeSaRConfig:
    """WeSaR options (METHODS.md section 2; items marked "decision" there are flags)."""

    std: float = 0.006325
    backbone: str = "he"
    gate_weight_decay: float = 0.0
    gate_lr_mult: float = 1.0
    exclude_gates_from_clip: bool = False
    embedding: bool = True
    output_layer: bool = True

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"WeSaR std must be > 0 (common base-weight std), got {self.std}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown WeSaR backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if self.gate_weight_decay < 0:
            raise ValueError(f"WeSaR gate_weight_decay must be >= 0, got {self.gate_weight_decay}")
        if not self.gate_lr_mult > 0:
            raise ValueError(f"WeSaR gate_lr_mult must be > 0, got {self.gate_lr_mult}")

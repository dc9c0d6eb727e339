"""ProRes: progressive residual warmup (Chen et al., arXiv 2603.05369, section 3).

A Pre-LN block computes ``x_{l+1} = x_l + a(l, t) * F(Norm(x_l))``: a predefined,
non-learned scalar ``a(l, t)`` multiplies the output of BOTH the attention and the
MLP branch (bias included) of global layer ``l`` (1-based) after ``t`` completed
optimizer updates. Deeper layers switch on later; the skip path is never scaled.

``T`` (``warmup``) is the warmup of the first layer; with the default ``linear``
schedule every layer is fully on at ``T * L``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Union

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

logger = logging.getLogger(__name__)


def _ramp(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def _linear(layer: int, step: int, num_layers: int, warmup: int) -> float:
    return _ramp(step / (warmup * layer))


def _stagewise_with_floor(floor: Callable[[int, int], float]):
    def schedule(layer: int, step: int, num_layers: int, warmup: int) -> float:
        m = floor(layer, num_layers)
        return m + (1.0 - m) * _ramp((step - warmup * (layer - 1)) / warmup)

    return schedule


def _constant(value: Callable[[int, int], float]):
    return lambda layer, step, num_layers, warmup: value(layer, num_layers)


# name -> a(l, t; L, T); the table of METHODS.md section 1.
_SCHEDULES: dict[str, Callable[[int, int, int, int], float]] = {
    "linear": _linear,
    "linear-sqrt": lambda l, t, L, T: math.sqrt(_linear(l, t, L, T)),
    "linear-square": lambda l, t, L, T: _linear(l, t, L, T) ** 2,
    "equal": lambda l, t, L, T: _ramp(t / T),
    "reverse": lambda l, t, L, T: _ramp(t / (T * (L - l + 1))),
    "stagewise": _stagewise_with_floor(lambda l, L: 0.0),
    "stagewise-inv-L": _stagewise_with_floor(lambda l, L: 1.0 / L),
    "stagewise-inv-sqrt-l": _stagewise_with_floor(lambda l, L: 1.0 / math.sqrt(l)),
    "fixed-inv-L": _constant(lambda l, L: 1.0 / L),
    "fixed-inv-sqrt-L": _constant(lambda l, L: 1.0 / math.sqrt(L)),
    "fixed-inv-sqrt-l": _constant(lambda l, L: 1.0 / math.sqrt(l)),
}

SCHEDULES: tuple[str, ...] = tuple(_SCHEDULES)


def check_schedule(schedule: str, warmup: int) -> None:
    """Raise ValueError unless ``schedule`` is a known name and ``warmup`` a positive int."""
    if schedule not in _SCHEDULES:
        raise ValueError(
            f"unknown ProRes schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}"
        )
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup <= 0:
        raise ValueError(f"ProRes warmup T must be an integer >= 1 (steps), got {warmup!r}")


def prores_alpha(schedule: str, layer: int, step: int, num_layers: int, warmup: int) -> float:
    """Residual-branch scalar a(l, t) of METHODS.md section 1.

    Args:
        schedule: one of :data:`SCHEDULES`.
        layer: global 1-based layer index l in 1..num_layers.
        step: number of completed optimizer updates t >= 0.
        num_layers: L, the total number of decoder layers of the model.
        warmup: T, the warmup of the first layer in steps (>= 1).
    """
    check_schedule(schedule, warmup)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be in 1..{num_layers} (global, 1-based), got {layer}")
    if step < 0:
        raise ValueError(f"step must be >= 0 (completed optimizer updates), got {step}")
    return float(_SCHEDULES[schedule](layer, step, num_layers, warmup))


def full_warmup_steps(schedule: str, num_layers: int, warmup: int) -> Optional[int]:
    """Step at which every layer's scalar reaches 1 (None for the fixed schedules)."""
    check_schedule(schedule, warmup)
    if schedule.startswith("fixed"):
        return None
    return warmup if schedule == "equal" else warmup * num_layers


def describe_schedule(config: "ProResConfig", num_layers: int) -> str:
    """One log line: the schedule, T and the step at which every layer is fully on."""
    full = full_warmup_steps(config.schedule, num_layers, config.warmup)
    if full is None:
        return f"ProRes: {config.schedule} schedule (fixed scalars, no warmup)"
    return (f"ProRes: {config.schedule} schedule, T = {config.warmup} steps per layer; "
            f"all {num_layers} layers at a = 1 from step {full}")


@dataclass(frozen=True)
class ProResConfig:
    """ProRes options: ``schedule`` name and ``warmup`` T (first layer's warmup, steps)."""

    schedule: str = "linear"
    warmup: int = 1000

    def __post_init__(self) -> None:
        check_schedule(self.schedule, self.warmup)


class ProResCheckpointMismatch(ValueError):
    """A checkpoint was trained with another ProRes schedule or warmup."""


class ProResScale(torch.nn.Module):
    """Holds a(l, t) for one decoder layer, the scale of both its residual branches.

    The scalar lives in a 0-d fp32 buffer updated in place by :meth:`set_step`, so a
    step update is one device-side fill: no host-device synchronisation and no
    recompilation under ``torch.compile``. The schedule name and T travel with the
    checkpoint as extra state; loading a checkpoint with other values raises
    :class:`ProResCheckpointMismatch` unless :func:`allow_checkpoint_mismatch` was called.
    """

    def __init__(
        self, config: TransformerConfig, layer_number: int, schedule: str, warmup: int
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.warmup = warmup
        self.num_layers = config.num_layers
        self.layer_number = layer_number
        self.allow_mismatch = False
        prores_alpha(schedule, layer_number, 0, self.num_layers, warmup)  # validates
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32), persistent=False)
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Set the scalar to a(layer_number, step)."""
        self.alpha.fill_(prores_alpha(self.schedule, self.layer_number, step, self.num_layers, self.warmup))

    def scale_factor(self) -> torch.Tensor:
        """a(l, t) as a 0-d fp32 tensor; the layer multiplies both branch outputs (bias
        included) by it inside its bias-dropout-add (:mod:`megatron_ext.layer`)."""
        return self.alpha

    def _apply(self, fn, recurse=True):
        # Keep the scalar in fp32 when the model is cast to bf16/fp16 (Float16Module).
        super()._apply(fn, recurse)
        if self.alpha.dtype != torch.float32:
            self.alpha = self.alpha.float()
        return self

    def get_extra_state(self) -> dict:
        return {"schedule": self.schedule, "warmup": self.warmup, "num_layers": self.num_layers}

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor) or state is None:
            return  # TE-style empty extra state
        saved = {k: state.get(k) for k in ("schedule", "warmup", "num_layers")}
        if saved != self.get_extra_state() and not self.allow_mismatch:
            raise ProResCheckpointMismatch(
                f"checkpoint layer {self.layer_number} was trained with ProRes {saved}, this "
                f"model uses {self.get_extra_state()}; pass --prores-override-checkpoint "
                "(megatron_ext.prores.allow_checkpoint_mismatch) to load it anyway"
            )

    def extra_repr(self) -> str:
        return f"layer={self.layer_number}, schedule={self.schedule}, warmup={self.warmup}"


ModelChunks = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def _prores_modules(model_chunks: ModelChunks) -> Iterable[ProResScale]:
    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else model_chunks
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, ProResScale):
                yield module


def set_prores_step(model_chunks: ModelChunks, step: int) -> None:
    """Set every ProRes scalar of ``model_chunks`` (a module or virtual-stage chunks) for ``step``."""
    for module in _prores_modules(model_chunks):
        module.set_step(step)


def prores_alphas(model_chunks: ModelChunks) -> dict[int, float]:
    """Global layer number -> current scalar, for the layers this rank holds."""
    return {m.layer_number: float(m.alpha) for m in _prores_modules(model_chunks)}


def allow_checkpoint_mismatch(model_chunks: ModelChunks, allow: bool = True) -> None:
    """Let checkpoints trained with another ProRes schedule or warmup load into this model."""
    for module in _prores_modules(model_chunks):
        module.allow_mismatch = allow


def apply_to_layer_spec(spec: ModuleSpec, config: ProResConfig) -> ModuleSpec:
    """Scale both residual branches of every layer built from ``spec`` by a(l, t)."""
    scale = ModuleSpec(module=ProResScale, params={"schedule": config.schedule, "warmup": config.warmup})
    return replace(spec, submodules=replace(spec.submodules, branch_scale=scale))

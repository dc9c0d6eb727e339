"""What a run must share with the checkpoint it resumes: the model shape, the methods
and the learning-rate/weight-decay schedule. Each check raises CheckpointError naming
the flags that differ, before any state is loaded.

- Model shape: always an error.
- Methods: which methods (and NormFormer parts, WeSaR's embedding/output gates) exist
  decides the parameters, so a difference is always an error; a difference in their
  settings (ProRes' schedule and warmup, WeSaR's gate LR, decay, clipping, init) is one
  unless ``--override-checkpoint-methods``. ``--wesar-placement`` computes the same
  function and may change freely.
- Schedule: as Megatron-LM, a difference is an error unless
  ``--override-opt_param-scheduler`` (this run's flags win) or
  ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's values win).
"""

from __future__ import annotations

import argparse
from typing import Optional

ARCHITECTURE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "position_embedding_type", "normalization", "swiglu", "disable_bias_linear",
                     "untie_embeddings_and_output_weights", "tokenizer_type", "make_vocab_size_divisible_by",
                     "padded_vocab_size")
# What an architecture argument that is not a flag is called in errors.
ARCHITECTURE_LABELS = {"padded_vocab_size": "padded vocabulary (from --tokenizer-model)"}

METHOD_FLAGS = {"prores": "--prores/--prores-schedule/--prores-warmup",
                "wesar": "--wesar and its --wesar-* options",
                "normformer": "--normformer and its --normformer-* options"}
# Method settings that decide which parameters (or state entries) the model has.
METHOD_STRUCTURE = {"prores": (), "wesar": ("embedding", "output_layer"),
                    "normformer": ("head_scale", "post_attention_norm", "ffn_norm", "residual_scale")}
# Method settings that change how, not what, the model computes.
METHOD_LAYOUT = {"wesar": ("placement",)}

# megatron-core's OptimizerParamScheduler state -> the flag that sets it.
SCHEDULER_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                   "lr_decay_steps": "--lr-decay-iters (default: --train-iters)", "lr_decay_style": "--lr-decay-style",
                   "start_wd": "--weight-decay", "end_wd": "--weight-decay"}
SCHEDULER_OPTIONS = ("pass --override-opt_param-scheduler to use this run's values or "
                     "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded into this run."""


def check_architecture(saved_args: Optional[dict], args: argparse.Namespace) -> None:
    """Raise CheckpointError naming the flags whose model shape differs from the checkpoint's."""
    if saved_args is None:
        return
    names = list(ARCHITECTURE_ARGS)
    if args.position_embedding_type == "learned_absolute":
        names.append("max_position_embeddings")
    diffs = [n for n in names if n in saved_args and saved_args[n] != getattr(args, n)]
    if diffs:
        details = ", ".join(f"{ARCHITECTURE_LABELS.get(n, '--' + n.replace('_', '-'))}: checkpoint {saved_args[n]}, "
                            f"this run {getattr(args, n)}" for n in diffs)
        raise CheckpointError(f"the checkpoint holds another model ({details})")


def _structure(name: str, settings: Optional[dict]) -> Optional[tuple]:
    """What of method ``name`` exists in the model: None when it is off."""
    return None if settings is None else tuple(settings.get(key) for key in METHOD_STRUCTURE[name])


def _without_layout(name: str, settings: Optional[dict]) -> Optional[dict]:
    if settings is None:
        return None
    return {k: v for k, v in settings.items() if k not in METHOD_LAYOUT.get(name, ())}


def check_methods(saved: Optional[dict], current: dict, override: bool) -> list[str]:
    """Raise CheckpointError naming the flags whose method settings differ; with
    ``override``, only for a difference in which parameters exist. Returns the methods
    whose settings differ (and are overridden)."""
    if saved is None:
        return []
    describe = lambda names: "; ".join(  # noqa: E731
        f"{METHOD_FLAGS[n]}: checkpoint {saved.get(n)}, this run {current.get(n)}" for n in names)
    structural = [n for n in METHOD_FLAGS if _structure(n, saved.get(n)) != _structure(n, current.get(n))]
    if structural:
        raise CheckpointError(f"the checkpoint's model has other method parameters ({describe(structural)}); "
                              "--override-checkpoint-methods changes method settings, not which methods or "
                              "NormFormer parts exist")
    diffs = [n for n in METHOD_FLAGS if _without_layout(n, saved.get(n)) != _without_layout(n, current.get(n))]
    if diffs and not override:
        raise CheckpointError(f"method settings differ from the checkpoint ({describe(diffs)}); "
                              "pass --override-checkpoint-methods to load it anyway")
    return diffs


def check_scheduler(saved: dict, current: dict, args: argparse.Namespace) -> None:
    """Raise CheckpointError naming the schedule flags that differ from the checkpoint's
    ``opt_param_scheduler`` state, unless one of the two scheduler options says which wins.
    (The weight-decay ramp's length is not compared: the decay is constant.)"""
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    diffs = {}
    for key, flag in SCHEDULER_FLAGS.items():
        if key in saved and saved[key] != current[key]:
            diffs.setdefault(flag, f"{flag}: checkpoint {saved[key]}, this run {current[key]}")
    if diffs:
        raise CheckpointError(f"the learning-rate schedule differs from the checkpoint's ({'; '.join(diffs.values())}); "
                              f"{SCHEDULER_OPTIONS}")

"""Command line of ``pretrain_gpt.py``: Megatron-LM flag names, a YAML ``--config`` and
validation of every cross-flag constraint before anything is built.

A YAML file's keys are flag names (``num-layers`` or ``num_layers``); the command line
overrides it. :func:`validate_args` raises :class:`ConfigError` naming the flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any, Optional, Sequence

import yaml

from megatron_ext.data.tokenizers import TOKENIZER_TYPES
from megatron_ext.prores import SCHEDULES
from megatron_ext.wesar import BACKBONES, PLACEMENTS

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
# megatron-core's selective-recompute modules that a dense GPT has.
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
DEVICES = ("auto", "cpu", "cuda")
TOKENIZERS_WITHOUT_MODEL = ("ByteLevelTokenizer",)

# Method sub-flags default to None so that giving one without its method is detectable;
# their real defaults are filled in by validate_args.
METHOD_SUBFLAG_DEFAULTS = {
    "prores": {"prores_schedule": "linear", "prores_warmup": 1000},
    "wesar": {
        "wesar_std": 0.006325, "wesar_backbone": "he", "wesar_gate_weight_decay": 0.0,
        "wesar_gate_lr_mult": 1.0, "wesar_exclude_gates_from_clip": False, "wesar_placement": "auto",
    },
    "normformer": {
        "normformer_no_head_scale": False, "normformer_no_post_attention_norm": False,
        "normformer_no_ffn_norm": False, "normformer_residual_scale": False,
    },
}


class ConfigError(ValueError):
    """An inconsistent or incomplete training configuration."""


def _flag(dest: str) -> str:
    """``num_layers`` -> ``--num-layers``."""
    return "--" + dest.replace("_", "-")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a flag's default unless it is None (required, or filled in by :func:`validate_args`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """All flags, grouped as in ``--help``; defaults are shown there."""
    p = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="Pretrain a GPT on megatron-core with optional ProRes, WeSaR and NormFormer.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="YAML file whose keys are flag names; repeat it to layer files, each overriding the ones "
                        "before it; the command line overrides them all")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None, help="decoder layers L (required)")
    g.add_argument("--hidden-size", type=int, default=None, help="model width d (required)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="FFN width (default 4 * hidden size)")
    g.add_argument("--num-attention-heads", type=int, default=None, help="attention heads (required)")
    g.add_argument("--num-query-groups", type=int, default=None, help="key/value groups for GQA (default: heads)")
    g.add_argument("--seq-length", type=int, default=None, help="tokens per sample (required)")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=False, help="SwiGLU FFN (gated SiLU)")
    g.add_argument("--disable-bias-linear", action=argparse.BooleanOptionalAction, default=False, help="no biases in linear layers")
    g.add_argument("--untie-embeddings-and-output-weights", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local")
    g.add_argument("--use-cpu-initialization", action=argparse.BooleanOptionalAction, default=None,
                   help="draw full weights on the CPU and keep this rank's shard (TP-invariant); default on the CPU path")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=False, help="GPU only")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=False, help="GPU only")
    g.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=False, help="GPU only; needs the two above")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="with --overlap-grad-reduce: parameters per gradient bucket (default: megatron-core's, "
                        "max(40M, 1M x data-parallel size))")
    g.add_argument("--overlap-p2p-communication", action=argparse.BooleanOptionalAction, default=True,
                   help="interleaved schedule: overlap the pipeline sends/receives with compute (Megatron-LM's "
                        "default); off, they are batched (megatron-core's batch_p2p_comm)")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else the CPU path")

    g = p.add_argument_group("activation recomputation (GPU path; megatron-core's, as in Megatron-LM)")
    g.add_argument("--recompute-activations", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute the attention core (scores, softmax, dropout) in the backward instead of "
                        "storing it: --recompute-granularity selective")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="full: store only the input of each group of --recompute-num-layers layers and recompute "
                        "the group in the backward (needs --recompute-method); selective: recompute "
                        "--recompute-modules")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="full recomputation: uniform checkpoints every group of --recompute-num-layers layers; "
                        "block only the first --recompute-num-layers layers of each (virtual) pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full recomputation: layers per group (uniform) or per stage (block)")
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="selective recomputation: the parts to recompute (default: core_attn)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer iterations (required)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (required)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="WSD: iterations of the final decay")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip; 0 disables")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="GPU only")
    g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False, help="GPU only")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a static loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="fp16: the dynamic loss scale's start")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: the dynamic loss scale's floor")
    g.add_argument("--loss-scale-window", type=float, default=1000,
                   help="fp16: iterations without overflow before the dynamic scale doubles")
    g.add_argument("--hysteresis", type=int, default=2, help="fp16: overflows tolerated before the scale halves")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-consecutive-skips", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or grad norm")
    g.add_argument("--spike-std", type=float, default=4.0,
                   help="log a loss-spike event when the loss exceeds the running mean by this many std")
    g.add_argument("--spike-window", type=int, default=100, help="iterations in the running loss statistics")

    g = p.add_argument_group("kernel fusion (Megatron-LM's defaults with CUDA; off on the CPU path)")
    g.add_argument("--bias-dropout-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="bias add, dropout and residual add as one compiled kernel, ProRes' and NormFormer's "
                        "scales included (default: on with CUDA)")
    g.add_argument("--bias-gelu-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="megatron's fused bias + tanh-approximated GeLU (default: on with CUDA when the linear "
                        "layers have biases and --swiglu is off)")
    g.add_argument("--bias-swiglu-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="megatron's fused bias + SwiGLU (default: on with CUDA and --swiglu)")
    g.add_argument("--weight-scale-fusion", action=argparse.BooleanOptionalAction, default=False,
                   help="WeSaR's gates and NormFormer's head scale multiplied into the weights by one compiled "
                        "kernel forward and one backward: fewer passes over the weights, more host time per "
                        "call (default: off)")
    g.add_argument("--weight-scale-once-per-step", action=argparse.BooleanOptionalAction, default=True,
                   help="with several micro batches per step, multiply WeSaR's gates and NormFormer's head "
                        "scale into the weights once per step and turn the accumulated weight gradient into "
                        "theirs after the last micro batch, instead of once per micro batch (the same "
                        "gradients; a WeSaR placement of 'output' is kept per micro batch; default: on)")
    g.add_argument("--gradient-accumulation-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="accumulate weight gradients into the fp32 main grads inside the GEMM (APEX's "
                        "fused_weight_gradient_mlp_cuda; default: on with CUDA where it is installed)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="dataset prefix(es) of .bin/.idx, optionally weighted: W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None, help="(required)")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model / HuggingFace tokenizer.json")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this (not multiplied by the TP size, so the "
                        "model does not change with it); must be divisible by --tensor-model-parallel-size")
    g.add_argument("--data-cache-path", default=None, help="where the dataset index caches go (default: beside the data)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from the latest checkpoint here")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true",
                   help="load the model, the iteration and the learning-rate schedule, not the optimizer's state")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action=argparse.BooleanOptionalAction, default=False,
                   help="distributed optimizer: save its state per parameter (gathered on each data-parallel "
                        "rank 0) so that it loads under other TP/PP/DP sizes; by default it is saved as its "
                        "DP-sharded buckets, loadable under another DP size only")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=False,
                   help="load the model only; iteration, data and schedule restart at 0")
    g.add_argument("--override-checkpoint-methods", action=argparse.BooleanOptionalAction, default=False,
                   help="load a checkpoint trained with other method settings (ProRes/WeSaR/NormFormer)")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action=argparse.BooleanOptionalAction, default=False,
                   help="on resume, take the learning-rate schedule (--lr, --min-lr, --lr-warmup-iters, "
                        "--lr-decay-iters, --lr-decay-style, --weight-decay) from this run's flags; without it "
                        "or --use-checkpoint-opt_param-scheduler a difference is an error")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action=argparse.BooleanOptionalAction, default=False,
                   help="on resume, keep the checkpoint's learning-rate schedule whatever this run's flags say")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="validation batches per evaluation; 0 disables")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--gpu-peak-tflops", type=float, default=989.0,
                   help="dense peak of one GPU for MFU (H100 SXM bf16: 989)")

    g = p.add_argument_group("ProRes (progressive residual warmup)")
    g.add_argument("--prores", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--prores-schedule", choices=SCHEDULES, default=None, help="default: linear")
    g.add_argument("--prores-warmup", type=int, default=None, help="T, first layer's warmup in steps (default 1000)")

    g = p.add_argument_group("WeSaR (weight scaling as reparameterization)")
    g.add_argument("--wesar", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--wesar-std", type=float, default=None, help="common base-weight std (default 0.006325)")
    g.add_argument("--wesar-backbone", choices=BACKBONES, default=None, help="gate targets (default he)")
    g.add_argument("--wesar-gate-weight-decay", type=float, default=None, help="default 0")
    g.add_argument("--wesar-gate-lr-mult", type=float, default=None, help="default 1")
    g.add_argument("--wesar-exclude-gates-from-clip", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--wesar-placement", choices=PLACEMENTS, default=None,
                   help="multiply gates into the weights, onto the matmul outputs, or (auto, default) "
                        "whichever is smaller per call")

    g = p.add_argument_group("NormFormer")
    g.add_argument("--normformer", action=argparse.BooleanOptionalAction, default=False, help="head scale, post-attention norm and FFN norm")
    g.add_argument("--normformer-no-head-scale", action="store_true", default=None)
    g.add_argument("--normformer-no-post-attention-norm", action="store_true", default=None)
    g.add_argument("--normformer-no-ffn-norm", action="store_true", default=None)
    g.add_argument("--normformer-residual-scale", action=argparse.BooleanOptionalAction, default=None)
    for action in p._actions:
        if action.help is None and action.default is not None:
            action.help = "(default: %(default)s)"
    return p


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A YAML value as argparse would have parsed it for ``action``; ConfigError if it cannot be."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return not value if isinstance(action, argparse._StoreFalseAction) else value
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else str(value).split()
        values = [action.type(v) if action.type else str(v) for v in values]
        if action.choices is not None and not set(values) <= set(action.choices):
            raise ConfigError(f"{source}: {key} must be one or more of {', '.join(map(str, action.choices))}, "
                              f"got {value!r}")
        return values
    if value is not None and action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key} expects {action.type.__name__}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Flag values (by argparse dest) from a YAML file of flag names."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"--config {path}: unknown flag {key!r}")
        values[dest] = _coerce(actions[dest], key, value, f"--config {path}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` over its ``--config`` YAML files, each overriding the ones before it.

    A file's option for something the command line switches off is dropped with it:
    ``--no-prores`` drops a file's ``prores-*`` keys, and ``--tokenizer-type
    ByteLevelTokenizer`` (which takes no model) a file's ``tokenizer-model``.
    """
    parser = build_parser()
    command_line, _ = parser.parse_known_args(argv)
    for path in command_line.config or ():
        parser.set_defaults(**load_config_file(path, parser))
    args = parser.parse_args(argv)
    for method, options in METHOD_SUBFLAG_DEFAULTS.items():
        if not getattr(args, method):
            for dest in options:
                setattr(args, dest, getattr(command_line, dest))  # None unless on the command line
    if command_line.tokenizer_type in TOKENIZERS_WITHOUT_MODEL:
        args.tokenizer_model = command_line.tokenizer_model
    return args


def parse_data_path(data_path: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` -> (prefixes, weights or None)."""
    if len(data_path) == 1:
        return [data_path[0]], None
    if len(data_path) % 2:
        raise ConfigError(f"--data-path: expected one prefix or weight/prefix pairs, got {len(data_path)} values")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ConfigError(f"--data-path: with several datasets every prefix needs a weight before it: {' '.join(data_path)}") from None
    if any(w <= 0 for w in weights):
        raise ConfigError(f"--data-path: weights must be > 0, got {weights}")
    return list(data_path[1::2]), weights


def _require(args: argparse.Namespace, *dests: str) -> None:
    """ConfigError naming every flag of ``dests`` that was not given."""
    missing = [_flag(d) for d in dests if getattr(args, d) is None]
    if missing:
        raise ConfigError(f"missing required flag(s): {', '.join(missing)}")


def _fill_method_defaults(args: argparse.Namespace) -> None:
    """Reject a method sub-flag given without its method, then fill the sub-flags' defaults."""
    for method, defaults in METHOD_SUBFLAG_DEFAULTS.items():
        given = [d for d in defaults if getattr(args, d) is not None]
        if given and not getattr(args, method):
            raise ConfigError(f"{', '.join(map(_flag, given))} given without --{method}")
        for dest, default in defaults.items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)


def grad_accumulation_fusion_available() -> bool:
    """Whether APEX's ``fused_weight_gradient_mlp_cuda`` extension (megatron-core's wgrad GEMM) is installed."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def _resolve_fusions(args: argparse.Namespace) -> None:
    """Fill the fusion flags' defaults (on with CUDA where possible) and reject impossible ones."""
    if args.bias_gelu_fusion and (args.swiglu or args.disable_bias_linear):
        raise ConfigError("--bias-gelu-fusion needs biases and GeLU (no --disable-bias-linear, no --swiglu; "
                          "with --swiglu use --bias-swiglu-fusion)")
    if args.bias_swiglu_fusion and not args.swiglu:
        raise ConfigError("--bias-swiglu-fusion needs --swiglu (for GeLU use --bias-gelu-fusion)")
    if args.gradient_accumulation_fusion and args.use_cuda and not grad_accumulation_fusion_available():
        raise ConfigError("--gradient-accumulation-fusion needs APEX's fused_weight_gradient_mlp_cuda extension, "
                          "which is not installed here (NVIDIA's PyTorch containers have it); "
                          "use --no-gradient-accumulation-fusion")
    defaults = {
        "bias_dropout_fusion": args.use_cuda,
        "bias_gelu_fusion": args.use_cuda and not (args.swiglu or args.disable_bias_linear),
        "bias_swiglu_fusion": args.use_cuda and args.swiglu,
        "gradient_accumulation_fusion": args.use_cuda and grad_accumulation_fusion_available(),
    }
    for dest, default in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)


def _check_pipeline_layers(args: argparse.Namespace) -> set[int]:
    """The layer split over pipeline stages (first/last stage sizes, virtual stages) is exact;
    returns the layer counts of the model chunks (pipeline stages, or virtual stages)."""
    L, pp = args.num_layers, args.pipeline_model_parallel_size
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    if (first is not None or last is not None) and pp == 1:
        raise ConfigError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    middle_layers, middle_stages = L, pp
    for name, value in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        if value is not None:
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
            middle_layers -= value
            middle_stages -= 1
    if middle_layers < 0 or (middle_stages == 0 and middle_layers != 0):
        raise ConfigError(
            f"--num-layers {L} does not match --decoder-first/last-pipeline-num-layers ({first}, {last}) "
            f"over --pipeline-model-parallel-size {pp}")
    if middle_stages and middle_layers % middle_stages:
        raise ConfigError(
            f"--num-layers {L} minus --decoder-first/last-pipeline-num-layers ({first}, {last}) leaves "
            f"{middle_layers} layers, not divisible by the {middle_stages} remaining stages of "
            f"--pipeline-model-parallel-size {pp}")
    vp = args.num_layers_per_virtual_pipeline_stage
    if vp is not None:
        if pp < 2:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        if first is not None or last is not None:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage cannot be combined with "
                              "--decoder-first/last-pipeline-num-layers in this driver")
        if vp < 1 or (L // pp) % vp:
            raise ConfigError(
                f"--num-layers {L} / --pipeline-model-parallel-size {pp} = {L // pp} layers per stage is not "
                f"divisible by --num-layers-per-virtual-pipeline-stage {vp}")
        return {vp}
    uneven = {n for n in (first, last) if n is not None}
    return uneven | ({middle_layers // middle_stages} if middle_stages else set())


def _check_recompute(args: argparse.Namespace, chunks: set[int]) -> None:
    """Activation recomputation is one consistent request for model chunks of ``chunks`` layers;
    fills ``recompute_granularity``."""
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            raise ConfigError("--recompute-activations (selective recomputation) and --recompute-granularity full "
                              "exclude each other: give one")
        args.recompute_granularity = "selective"
    granularity, method, layers = args.recompute_granularity, args.recompute_method, args.recompute_num_layers
    if args.recompute_modules is not None:
        if granularity != "selective":
            raise ConfigError("--recompute-modules needs --recompute-granularity selective (or --recompute-activations)")
        if not args.recompute_modules:  # argparse and the YAML reader check the names; a YAML [] gets here
            raise ConfigError(f"--recompute-modules must be one or more of {', '.join(RECOMPUTE_MODULES)}, got none")
        if "mlp" in args.recompute_modules and not args.disable_bias_linear:
            raise ConfigError("--recompute-modules mlp needs --disable-bias-linear: megatron-core 0.16.1 hands the "
                              "MLP's output bias, a parameter, out of its checkpoint, which makes the backward "
                              "recompute without end")
        if "layernorm" in args.recompute_modules and importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("--recompute-modules layernorm needs Transformer Engine (megatron-core 0.16.1's "
                              "output-discarding checkpoint reads its FP8 state), which is not installed here")
    if granularity != "full":
        given = [flag for flag, value in (("--recompute-method", method), ("--recompute-num-layers", layers)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} "
                              "--recompute-granularity full")
        return
    if method is None or layers is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method {uniform,block} and "
                          "--recompute-num-layers")
    if method == "uniform" and (layers < 1 or any(n % layers for n in chunks)):
        raise ConfigError(f"--recompute-method uniform: --recompute-num-layers {layers} must divide the layers of "
                          f"every (virtual) pipeline stage ({', '.join(map(str, sorted(chunks)))})")
    if method == "block" and not 1 <= layers <= max(chunks):
        raise ConfigError(f"--recompute-method block: --recompute-num-layers {layers} must be between 1 and the "
                          f"layers of a (virtual) pipeline stage ({max(chunks)})")


def _check_data_files(args: argparse.Namespace) -> None:
    """The .bin/.idx files and the tokenizer model exist, and ``--split`` suits ``--eval-iters``."""
    prefixes, _ = parse_data_path(args.data_path)
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                hint = "write it with tools/preprocess_data.py"
                if os.path.isfile(f"{prefix}_text_document{ext}"):  # the tool's suffix for the "text" key
                    hint = f"did you mean {prefix}_text_document?"
                raise ConfigError(f"--data-path: {prefix}{ext} not found ({hint})")
    if args.tokenizer_type not in TOKENIZERS_WITHOUT_MODEL:
        if args.tokenizer_model is None:
            raise ConfigError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
        if not os.path.exists(args.tokenizer_model):
            raise ConfigError(f"--tokenizer-model {args.tokenizer_model} not found")
    try:
        split = [float(s) for s in args.split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--split must be comma-separated weights like 969,30,1, got {args.split!r}") from None
    if len(split) > 3 or any(s < 0 for s in split) or not sum(split) > 0:
        raise ConfigError(f"--split must be up to three non-negative weights with a positive sum, got {args.split!r}")
    if args.eval_iters > 0 and (len(split) < 2 or split[1] == 0):
        raise ConfigError(f"--eval-iters {args.eval_iters} needs a validation share in --split (got {args.split!r}); "
                          "use --eval-iters 0 to train without validation")


def _check_directories(args: argparse.Namespace) -> None:
    """The directory flags do not name existing files."""
    for dest in ("save", "load", "tensorboard_dir", "data_cache_path"):
        path = getattr(args, dest)
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{_flag(dest)} {path} is a file; expected a directory")


def validate_args(args: argparse.Namespace, world_size: int, use_cuda: bool) -> None:
    """Check every cross-flag constraint and fill derived defaults, in place.

    Sets ``data_parallel_size``, ``num_microbatches``, ``virtual_pipeline_model_parallel_size``,
    ``use_cuda`` and the derived defaults (FFN width, query groups, global batch, decay iterations, method sub-flags).
    """
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters", "lr",
             "data_path", "tokenizer_type")
    _fill_method_defaults(args)
    args.use_cuda = use_cuda
    _resolve_fusions(args)
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "train_iters",
                 "micro_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "log_interval", "eval_interval"):
        if getattr(args, dest) < 1:
            raise ConfigError(f"{_flag(dest)} must be >= 1, got {getattr(args, dest)}")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size

    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}")
    if args.num_attention_heads % args.num_query_groups:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by --num-query-groups {args.num_query_groups}")
    if args.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    if args.num_query_groups % tp:
        raise ConfigError(f"--num-query-groups {args.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    if args.make_vocab_size_divisible_by < 1 or args.make_vocab_size_divisible_by % tp:
        raise ConfigError(f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if args.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if args.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.sequence_parallel and args.seq_length % tp:
        raise ConfigError(f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by --tensor-model-parallel-size {tp}")
    if args.position_embedding_type == "learned_absolute" and args.seq_length > args.max_position_embeddings:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}")
    _check_recompute(args, _check_pipeline_layers(args))
    vp_layers = args.num_layers_per_virtual_pipeline_stage
    args.virtual_pipeline_model_parallel_size = None if vp_layers is None else args.num_layers // pp // vp_layers

    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                          f"--pipeline-model-parallel-size {pp}")
    args.data_parallel_size = world_size // (tp * pp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                          f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // per_step
    if args.num_layers_per_virtual_pipeline_stage is not None and args.num_microbatches % pp:
        raise ConfigError(f"interleaved pipeline: {args.num_microbatches} micro-batches per step (global batch / "
                          f"(micro batch x data-parallel size)) must be a multiple of --pipeline-model-parallel-size {pp}")

    if args.virtual_pipeline_model_parallel_size is not None and pp == 2 and not args.overlap_p2p_communication:
        raise ConfigError("--no-overlap-p2p-communication with the interleaved schedule and "
                          "--pipeline-model-parallel-size 2: megatron-core's batched send/receive to the one "
                          "neighbour mixes up activations and gradients (wrong losses); drop the flag")

    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each "
                          "other: give the one whose schedule should win")
    if args.use_checkpoint_opt_param_scheduler and args.override_checkpoint_methods:
        raise ConfigError("--use-checkpoint-opt_param-scheduler keeps the checkpoint's learning rates per "
                          "parameter group, which --override-checkpoint-methods would change (WeSaR's gate LR); "
                          "give --override-opt_param-scheduler with the checkpoint's schedule flags instead")
    decay_defaulted = args.lr_decay_iters is None
    if decay_defaulted:
        args.lr_decay_iters = args.train_iters
    if not 0 <= args.min_lr <= args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    if not 0 <= args.lr_warmup_iters < args.lr_decay_iters:
        raise ConfigError(f"--lr-warmup-iters {args.lr_warmup_iters} must be >= 0 and below --lr-decay-iters "
                          f"{args.lr_decay_iters}{' (its default, --train-iters)' if decay_defaulted else ''}")
    if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None:
        raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
    if args.weight_decay < 0 or args.clip_grad < 0:
        raise ConfigError("--weight-decay and --clip-grad must be >= 0")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1):
        raise ConfigError("--adam-beta1 and --adam-beta2 must be in [0, 1)")
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if args.loss_scale is not None and not args.loss_scale > 0:
        raise ConfigError(f"--loss-scale must be > 0, got {args.loss_scale}")
    if not (0 < args.min_loss_scale <= args.initial_loss_scale) or args.loss_scale_window < 1 or args.hysteresis < 1:
        raise ConfigError("--min-loss-scale must be in (0, --initial-loss-scale], --loss-scale-window and "
                          "--hysteresis >= 1")
    if args.max_consecutive_skips < 1 or args.spike_window < 2 or not args.spike_std > 0:
        raise ConfigError("--max-consecutive-skips must be >= 1, --spike-window >= 2 and --spike-std > 0")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    if args.ddp_bucket_size is not None and not (args.overlap_grad_reduce and args.ddp_bucket_size >= 1):
        raise ConfigError(f"--ddp-bucket-size needs --overlap-grad-reduce (without it the gradients are reduced in "
                          f"one bucket) and a value >= 1, got {args.ddp_bucket_size}")
    if args.dist_ckpt_optim_fully_reshardable:
        _check_fully_reshardable(args)
    if args.save_interval is not None and (args.save is None or args.save_interval < 1):
        raise ConfigError("--save-interval needs --save and a value >= 1")
    if args.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {args.eval_iters}")

    if args.prores:
        if args.prores_warmup < 1:
            raise ConfigError(f"--prores-warmup must be an integer >= 1 (steps), got {args.prores_warmup}")
    if args.wesar:
        if args.wesar_exclude_gates_from_clip and args.use_distributed_optimizer:
            raise ConfigError("--wesar-exclude-gates-from-clip is not supported with --use-distributed-optimizer "
                              "(the engine clips the DDP gradients itself, which the distributed optimizer shards)")
        for dest, ok, expected in (("wesar_std", args.wesar_std > 0, "> 0"),
                                   ("wesar_gate_lr_mult", args.wesar_gate_lr_mult > 0, "> 0"),
                                   ("wesar_gate_weight_decay", args.wesar_gate_weight_decay >= 0, ">= 0")):
            if not ok:
                raise ConfigError(f"{_flag(dest)} must be {expected}, got {getattr(args, dest)}")
        if use_cuda and args.wesar_gate_weight_decay == 1.0 and args.wesar_gate_lr_mult == 1.0:
            raise ConfigError("--wesar-gate-weight-decay 1.0 with --wesar-gate-lr-mult 1.0 on the GPU path: megatron-core "
                              "keys optimizer groups by (wd_mult, lr_mult), and these would equal the weight matrices' "
                              "group, so a resume could not restore the gates' optimizer state; use e.g. 0.999")

    parts = ("normformer_no_head_scale", "normformer_no_post_attention_norm", "normformer_no_ffn_norm")
    if args.normformer and all(getattr(args, d) for d in parts) and not args.normformer_residual_scale:
        raise ConfigError(f"--normformer with {', '.join(map(_flag, parts))} switches every NormFormer part off; "
                          "drop --normformer instead")

    if not use_cuda:
        _check_cpu_path(args)
    elif args.use_cpu_initialization is None:
        args.use_cpu_initialization = False
    _check_data_files(args)
    _check_directories(args)


def _check_fully_reshardable(args: argparse.Namespace) -> None:
    """--dist-ckpt-optim-fully-reshardable needs the distributed optimizer over a fused Adam."""
    if not args.use_distributed_optimizer:
        raise ConfigError("--dist-ckpt-optim-fully-reshardable needs --use-distributed-optimizer")
    if args.use_cuda:
        from megatron.core.optimizer import distrib_optimizer

        if not distrib_optimizer.HAVE_APEX_OR_TE:
            raise ConfigError("--dist-ckpt-optim-fully-reshardable needs Transformer Engine or Apex: megatron-core "
                              "0.16.1's fallback to torch's AdamW cannot load that format (it expects a 'step' "
                              "per parameter the format does not store); the default format resumes under "
                              "other data-parallel sizes")


def _check_cpu_path(args: argparse.Namespace) -> None:
    """Reject GPU-only flags on the CPU path; CPU initialisation defaults on there."""
    gpu_only = [flag for flag, on in (
        ("--pipeline-model-parallel-size > 1", args.pipeline_model_parallel_size > 1),
        ("--use-distributed-optimizer", args.use_distributed_optimizer),
        ("--overlap-grad-reduce", args.overlap_grad_reduce),
        ("--overlap-param-gather", args.overlap_param_gather),
        ("--bf16", args.bf16), ("--fp16", args.fp16),
        # megatron-core's sequence-parallel linear all-gathers into a CUDA buffer.
        ("--sequence-parallel", args.sequence_parallel),
        ("--gradient-accumulation-fusion", args.gradient_accumulation_fusion),
        ("--transformer-impl transformer_engine", args.transformer_impl == "transformer_engine"),
        # megatron-core's checkpointed forward saves and restores the CUDA generator's state.
        (f"--recompute-granularity {args.recompute_granularity}", args.recompute_granularity is not None),
    ) if on]
    if gpu_only:
        raise ConfigError(f"{', '.join(gpu_only)}: GPU path only (no CUDA here; the CPU path runs tensor and "
                          "data parallelism over gloo in fp32 with the local transformer implementation)")
    if args.use_cpu_initialization is None:
        args.use_cpu_initialization = True


def dataset_sizes(args: argparse.Namespace) -> list[int]:
    """Samples the train, valid and test datasets must provide.

    Every evaluation reads the same first ``eval_iters`` global batches of the
    validation split, so validation losses are comparable across a run and a resume.
    """
    return [
        args.train_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]


def serializable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments with plain values (None, bool, number, string, list), as stored in
    checkpoints and sent to wandb."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str, list))}


__all__ = ["ConfigError", "build_parser", "parse_args", "validate_args", "parse_data_path", "dataset_sizes",
           "load_config_file", "serializable_args"]

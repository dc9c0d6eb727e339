"""Validated arguments -> megatron-core and megatron-ext config objects."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from megatron_ext.config import ExtTransformerConfig
from megatron_ext.extensions import ExtensionConfig
from megatron_ext.normformer import NormFormerConfig
from megatron_ext.prores import ProResConfig
from megatron_ext.wesar import WeSaRConfig


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    """bf16, fp16 or fp32 from ``--bf16`` / ``--fp16``."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args: argparse.Namespace) -> ExtTransformerConfig:
    """The model shape, parallel layout, precision and kernel fusions as a megatron-core config."""
    dtype = params_dtype(args)
    overlap_p2p = args.virtual_pipeline_model_parallel_size is not None and args.overlap_p2p_communication
    return ExtTransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        init_method_std=args.init_method_std,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        bias_dropout_fusion=args.bias_dropout_fusion,
        bias_activation_fusion=args.bias_swiglu_fusion if args.swiglu else args.bias_gelu_fusion,
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        weight_scale_fusion=args.weight_scale_fusion,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        sequence_parallel=args.sequence_parallel,
        use_cpu_initialization=bool(args.use_cpu_initialization),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
        deallocate_pipeline_outputs=args.use_cuda,
        cuda_graph_scope=[],  # the whole layer: megatron-core's default "full", which it warns is deprecated
        # As Megatron-LM: overlapped (unbatched) p2p for the interleaved schedule. Batched,
        # with two stages both neighbours are one rank and megatron-core's batch mixes up
        # the activation and the gradient it receives from it.
        overlap_p2p_comm=overlap_p2p,
        batch_p2p_comm=not overlap_p2p,
    )


def extension_config(args: argparse.Namespace) -> ExtensionConfig:
    """Which methods are on, with their options."""
    prores = wesar = normformer = None
    if args.prores:
        prores = ProResConfig(schedule=args.prores_schedule, warmup=args.prores_warmup)
    if args.wesar:
        wesar = WeSaRConfig(
            std=args.wesar_std, backbone=args.wesar_backbone, gate_weight_decay=args.wesar_gate_weight_decay,
            gate_lr_mult=args.wesar_gate_lr_mult, exclude_gates_from_clip=bool(args.wesar_exclude_gates_from_clip),
            placement=args.wesar_placement,
        )
    if args.normformer:
        normformer = NormFormerConfig(
            head_scale=not args.normformer_no_head_scale,
            post_attention_norm=not args.normformer_no_post_attention_norm,
            ffn_norm=not args.normformer_no_ffn_norm,
            residual_scale=bool(args.normformer_residual_scale),
        )
    return ExtensionConfig(prores=prores, wesar=wesar, normformer=normformer)


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    """megatron-core's Adam(W) configuration (decoupled weight decay, as Megatron-LM)."""
    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype(args),
        loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )


def ddp_config(args: argparse.Namespace) -> DistributedDataParallelConfig:
    """megatron-core DDP: fp32 grad reduction for half precision, as Megatron-LM does by default."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=args.ddp_bucket_size,
    )


def method_settings(extensions: ExtensionConfig) -> dict[str, Optional[dict]]:
    """The method configs as plain dicts, stored with each checkpoint."""
    return {name: None if getattr(extensions, name) is None else asdict(getattr(extensions, name))
            for name in ("prores", "wesar", "normformer")}

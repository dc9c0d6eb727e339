"""A CPU stand-in for APEX's ``fused_weight_gradient_mlp_cuda``, megatron-core's weight-gradient
GEMM that accumulates into ``main_grad`` (``--gradient-accumulation-fusion``), for the
emulated-CUDA tests: the same arithmetic with ``torch.matmul``. On ``PYTHONPATH`` it makes
megatron-core and the driver take the fused path; it prints how often it ran when the
process exits."""

from __future__ import annotations

import atexit
import sys

import torch

calls = 0


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T total_input`` (2-D tensors, as megatron-core passes them)."""
    global calls
    calls += 1
    main_grad.add_(grad_output.t().matmul(total_input).to(main_grad.dtype))


wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32
atexit.register(lambda: print(f"fake fused_weight_gradient_mlp_cuda calls: {calls}", file=sys.stderr, flush=True))

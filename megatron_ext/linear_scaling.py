"""Where a per-feature scale of a linear layer costs least: on its weight or on an activation.

A scale ``s`` of a linear's output features (a WeSaR gate) or input features
(NormFormer's head scale on W^O) can be applied to the activation, ``s * (x W^T)`` or
``(s * x) W^T``, or folded into the weight, ``x (s * W)^T``: the same function, but the
elementwise work (forward multiply, backward multiply and reduction, and the tensor
saved for the backward) is activation-sized in the first case and weight-sized in the
second. The weight side is the cheaper one when a micro-batch has more token rows than
the activation the scale would multiply has features (every linear of the 125M to
1.3B examples; not q/k/v and fc1 of the 13B example, whose 5120 inputs exceed its
4096 token rows per micro-batch). :func:`scale_weight` does the weight side: eagerly with
the scale's gradient as dot products, or fused (``torch.compile``, one kernel each way).
"""

from __future__ import annotations

import torch
from megatron.core.jit import jit_fuser


def token_rows(input_: torch.Tensor, gathered: int = 1) -> int:
    """Rows of the matmul ``input_`` feeds: its tokens, times ``gathered`` when the linear
    all-gathers it over the sequence (sequence parallelism)."""
    return input_.numel() // input_.shape[-1] * gathered


def scale_on_weight(input_: torch.Tensor, weight: torch.Tensor, activation_width: int, gathered: int = 1) -> bool:
    """Whether ``s * weight`` touches fewer elements than ``s`` on the activation.

    ``activation_width`` is the width of the activation the scale would otherwise
    multiply: the weight's output features (``weight.shape[0]``) for an output scale,
    its input features (``weight.shape[1]``) for an input scale.
    """
    return weight.numel() < token_rows(input_, gathered) * activation_width


def _times(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``tensor * scale[:, None]``. One value goes to ``torch._foreach_mul`` as a 0-d tensor:
    its CUDA kernel reads the scalar from device memory and keeps vectorised loads, where
    the broadcast multiply of a device scalar takes PyTorch's non-vectorised elementwise
    kernel (docs/RESULTS.md); the values are the same."""
    if scale.numel() == 1:
        return torch._foreach_mul([tensor], scale.view(()))[0]
    return tensor * scale.view(-1, 1)


class _ScaleRows(torch.autograd.Function):
    """``weight * scale[:, None]`` for a 2-D ``weight`` and a ``scale`` of its rows (or one value).

    One value multiplies through torch's multi-tensor kernel with a device scalar
    (:func:`_times`). The backward computes the scale's gradient as one dot product per row,
    ``d scale_i = <d W_eff_i, W_i>``: ``torch.dot`` for one value (no weight-sized
    temporary), else the product summed along each row in at least fp32, which on an H200 took
    0.03 ms for a 6144 x 2048 QKV weight and 0.02 ms for a transposed 2048 x 2048 one,
    where ``einsum``'s batched matrix-vector product took 0.05 and 0.07 ms (docs/RESULTS.md).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        return _times(weight, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        grad_weight = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_weight = _times(grad, scale)
        if ctx.needs_input_grad[1]:
            if scale.numel() == 1:
                grad_scale = torch.dot(grad.reshape(-1), weight.reshape(-1)).view(1)
            else:
                accumulate = torch.promote_types(grad.dtype, torch.float32)
                grad_scale = (grad * weight).sum(1, dtype=accumulate).to(scale.dtype)
        return grad_weight, grad_scale


def scaled_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight * scale[:, None]`` as autograd differentiates it, for ``torch.compile``.

    Compiled (:data:`fused_scaled_rows`), the forward is one generated kernel, vectorised
    whether the scale is one value or one per row, and the backward's two results,
    ``grad * scale`` and the per-row sums of ``grad * weight`` (accumulated in fp32), come
    from one loop over ``grad`` and ``weight`` (so inductor schedules them, in its CPU code
    at least), where :class:`_ScaleRows` makes two passes.
    """
    return weight * scale.view(-1, 1)


fused_scaled_rows = jit_fuser(scaled_rows)


def scale_weight(weight: torch.Tensor, scale: torch.Tensor, dim: int = 0, fused: bool = False) -> torch.Tensor:
    """``weight`` times ``scale`` along ``dim`` (one value, or one per row / column of a 2-D
    ``weight``): eagerly with the scale's gradient as dot products (:class:`_ScaleRows`), or
    with ``fused`` as compiled kernels (:func:`scaled_rows`)."""
    rows = weight.transpose(0, dim)
    scaled = fused_scaled_rows(rows, scale) if fused else _ScaleRows.apply(rows, scale)
    return scaled.transpose(0, dim)

"""Where a per-feature scale of a linear layer costs least: on its weight or on an activation.

A scale ``s`` of a linear's output features (a WeSaR gate) or input features
(NormFormer's head scale on W^O) can be applied to the activation, ``s * (x W^T)`` or
``(s * x) W^T``, or folded into the weight, ``x (s * W)^T``: the same function, but the
elementwise work (forward multiply, backward multiply and reduction, and the tensor
saved for the backward) is activation-sized in the first case and weight-sized in the
second. The weight side is the cheaper one when a micro-batch has more token rows than
the activation the scale would multiply has features (every linear of the 125M to
1.3B examples; not q/k/v and fc1 of the 13B example, whose 5120 inputs exceed its
4096 token rows per micro-batch).
"""

from __future__ import annotations

import torch


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

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

With gradient accumulation the weight side can be paid once per optimizer step instead of
once per micro batch (:class:`StepScale`, :func:`once_per_step`): ``s * W`` is computed at
the step's first forward and reused, the weight accumulates the unscaled gradient
``T = sum_m G_m``, and the last micro batch's backward turns it into the gradients of the
scaled form, ``d W = s * T`` and ``d s_i = <T_i, W_i>``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.jit import jit_fuser
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region


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
            grad_scale = _row_dots(grad, weight, scale.numel()).to(scale.dtype)
        return grad_weight, grad_scale


def _row_dots(grad: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``<grad_i, weight_i>`` for each row (``rows == 1``: over the whole tensor), shape ``[rows]``.

    One value of two same-typed tensors is ``torch.dot``; otherwise the products are
    summed along each row in at least fp32 (the faster form on an H200, docs/RESULTS.md).
    """
    if rows == 1 and grad.dtype == weight.dtype and grad.is_contiguous() and weight.is_contiguous():
        return torch.dot(grad.reshape(-1), weight.reshape(-1)).view(1)
    return _row_sums(grad * weight, rows)


def _row_sums(products: torch.Tensor, rows: int) -> torch.Tensor:
    """The sum of each row of ``products`` (``rows == 1``: of all of it) in at least fp32, shape ``[rows]``."""
    accumulate = torch.promote_types(products.dtype, torch.float32)
    return products.sum(dtype=accumulate).view(1) if rows == 1 else products.sum(1, dtype=accumulate)


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


def _accumulated_gradient(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient ``param`` has accumulated so far this step: megatron-core DDP's fp32
    ``main_grad`` where the parameter has one, else autograd's ``grad`` (None before any)."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


class StepScale:
    """Where one per-feature scale of a linear meets its weight, per micro batch or once per step.

    Outside :func:`once_per_step` it is :func:`scale_weight`. Inside, for a step of ``M``
    micro batches (paper formulas unchanged; this is only the order of the arithmetic):

    - forward: ``W_s = s * W`` is computed at the step's first forward and every micro
      batch's matmul uses it (one copy for the step, however many micro batches are in flight);
    - backward of micro batches 1..M-1: ``W_s``'s gradient ``G_m`` goes to ``W`` unchanged,
      so the weight's gradient accumulator holds ``A = sum_m G_m`` (megatron-core's DDP
      adds each into the fp32 ``main_grad``), and ``s`` gets zeros;
    - backward of micro batch ``M``: with ``T = A + G_M``, ``d s_i = <T_i, W_i>`` (in fp32),
      ``A`` is multiplied by ``s`` in place and ``s * G_M`` is returned, so the weight's
      gradient ends as ``s * T``: what ``M`` per-micro-batch backwards give.

    The cost per weight element, bf16 weight and gradients with an fp32 ``A``: 4 bytes for
    the step's scaled weight, and the last backward's finish, eagerly about 30 bytes (two
    dot products, one of them through an fp32 temporary, the in-place scaling of ``A`` and
    ``s * G_M``), with ``fused`` one compiled kernel (:func:`finish_rows`, about 18), against
    12 bytes in every micro batch when scaled per micro batch (docs/RESULTS.md). It needs
    every gradient of ``W`` this step to come through this scale; ``owner`` is the
    parameter whose accumulator ``A`` is (``W`` itself, or the parameter under another
    ``StepScale`` of the same weight: two scales of one weight compose, each finishing in turn).

    With ``accumulate_in_main_grad`` (megatron's gradient-accumulation fusion on the
    linear) the scaled weight carries ``owner.main_grad``: megatron's wgrad GEMM adds each
    ``G_m`` into ``A`` itself and hands back a placeholder, which goes on to ``W`` with
    ``owner.grad_added_to_main_grad`` set (megatron-core DDP's signal to add nothing), and
    the finish reads ``T = A``: the scaled linears then accumulate as the baseline's do.
    """

    def __init__(self, dim: int = 0) -> None:
        self.dim = dim
        self.micro_batches = 0
        self.scaled: Optional[torch.Tensor] = None
        self.backward_calls = 0

    @property
    def active(self) -> bool:
        """Whether :func:`once_per_step` is on for this scale's current step."""
        return self.micro_batches > 0

    def defers(self, owner: torch.Tensor) -> bool:
        """Whether ``owner``'s scale is applied once this step (not for a frozen ``owner``)."""
        return self.active and owner.requires_grad

    def __call__(self, weight: torch.Tensor, scale: torch.Tensor, owner: torch.Tensor, fused: bool = False,
                 accumulate_in_main_grad: bool = False) -> torch.Tensor:
        """``weight`` times ``scale`` along :attr:`dim`: once per step where :meth:`defers`, else per call."""
        if not self.defers(owner):
            return scale_weight(weight, scale, self.dim, fused)
        return _ScaleOncePerStep.apply(weight, scale, self, (owner, fused, accumulate_in_main_grad))

    def sum_at_finish(self, scale: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        """``scale`` (replicated over ``group``, each rank's gradient a partial sum), its gradient
        summed over ``group`` at this step's last backward only.

        For a scale that :meth:`defers`, in place of megatron's ``copy_to_tensor_model_parallel_region``
        (an all-reduce in every backward): the gradients of micro batches 1..M-1 are zeros on
        every rank, so one all-reduce per step, at the finish, gives the same sum.
        """
        return _SumAtStepFinish.apply(scale, self, group)

    def begin(self, micro_batches: int) -> None:
        self.micro_batches, self.scaled, self.backward_calls = micro_batches, None, 0

    def end(self) -> Optional[str]:
        """Leave the step; what went wrong if the step used this scale but did not run all its backwards."""
        used, calls, micro_batches = self.scaled is not None, self.backward_calls, self.micro_batches
        self.micro_batches, self.scaled, self.backward_calls = 0, None, 0
        if used and calls != micro_batches:
            return f"{calls} backward passes in a step of {micro_batches} micro batches"
        return None


class _ScaleOncePerStep(torch.autograd.Function):
    """The autograd side of :class:`StepScale` inside :func:`once_per_step`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor, step: StepScale, options: tuple) -> torch.Tensor:
        ctx.step, (ctx.owner, ctx.fused, ctx.in_main_grad) = step, options
        ctx.save_for_backward(weight, scale)
        if step.scaled is None:
            step.scaled = _times(weight.transpose(0, step.dim), scale).transpose(0, step.dim)
        scaled = step.scaled.view_as(step.scaled)  # a new view each micro batch: its own autograd node
        if ctx.in_main_grad:  # megatron's fused wgrad GEMM accumulates into the owner's main_grad
            scaled.main_grad, scaled.grad_added_to_main_grad = ctx.owner.main_grad, False
        return scaled

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        step = ctx.step
        step.backward_calls += 1
        weight, scale = ctx.saved_tensors
        if ctx.in_main_grad:  # G_m is in main_grad already; ``grad`` is megatron's placeholder
            ctx.owner.grad_added_to_main_grad = True
        if step.backward_calls < step.micro_batches:
            # Zeros, not None: megatron-core's DDP expects a gradient in every backward that
            # reaches a parameter (it asserts so under --overlap-grad-reduce).
            return grad, torch.zeros_like(scale), None, None
        accumulated = _accumulated_gradient(ctx.owner)
        if accumulated is None:
            raise RuntimeError(f"a weight scaled once per step has no accumulated gradient after "
                               f"{step.backward_calls - 1} micro batches")
        rows, accumulated_rows = weight.transpose(0, step.dim), accumulated.transpose(0, step.dim)
        if ctx.in_main_grad:
            finish_accumulated = fused_finish_accumulated_rows if ctx.fused else finish_accumulated_rows
            return grad, finish_accumulated(accumulated_rows, rows, scale).to(scale.dtype), None, None
        finish = fused_finish_rows if ctx.fused else _finish_rows_eagerly
        grad_scale, grad_weight = finish(accumulated_rows, rows, grad.transpose(0, step.dim), scale)
        return grad_weight.transpose(0, step.dim), grad_scale.to(scale.dtype), None, None


class _SumAtStepFinish(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient over ``group`` only in the
    step's last backward (:meth:`StepScale.sum_at_finish`)."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, step: StepScale, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.step, ctx.group = step, group
        return scale.view_as(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The scale's own backward (this micro batch's) has run and counted itself already.
        if ctx.step.backward_calls == ctx.step.micro_batches:
            grad = reduce_from_tensor_model_parallel_region(grad.contiguous(), group=ctx.group)
        return grad, None, None


def finish_rows(accumulated: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last micro batch of a step scaled once: ``d s_i = <A_i + G_i, W_i>`` (fp32), ``A *= s``
    in place, and ``s * G`` (rows of 2-D tensors; ``s`` one value or one per row).

    Written for ``torch.compile`` (:data:`fused_finish_rows`): one reduction over ``A``, ``G``
    and ``W`` and the two scalings, without the temporaries of the eager form.
    """
    grad_scale = _row_sums((accumulated + grad) * weight, scale.numel())
    accumulated.mul_(scale.view(-1, 1))
    return grad_scale, grad * scale.view(-1, 1)


fused_finish_rows = jit_fuser(finish_rows)


def finish_accumulated_rows(accumulated: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The last micro batch's finish when ``A`` already holds its gradient (megatron's
    gradient-accumulation fusion): ``d s_i = <A_i, W_i>`` (fp32), then ``A *= s`` in place.

    Eagerly, with an fp32 ``A`` and a bf16 ``W``, that goes through an fp32 product and reads
    ``A`` twice (about 22 bytes per element); compiled (:data:`fused_finish_accumulated_rows`)
    it is one kernel over ``A`` and ``W`` (in inductor's CPU code at least), about 10.
    """
    grad_scale = _row_dots(accumulated, weight, scale.numel())
    accumulated.mul_(scale.to(accumulated.dtype).view(-1, 1))
    return grad_scale


fused_finish_accumulated_rows = jit_fuser(finish_accumulated_rows)


def _finish_rows_eagerly(accumulated: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                         scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`finish_rows` with torch's kernels: a dot product for ``G``, then
    :func:`finish_accumulated_rows` for ``A`` and ``s * G``."""
    grad_scale = _row_dots(grad, weight, scale.numel()) + finish_accumulated_rows(accumulated, weight, scale)
    return grad_scale, _times(grad, scale)


def step_scales(modules: Iterable[torch.nn.Module]) -> list[StepScale]:
    """Every :class:`StepScale` held as an attribute by ``modules`` or their submodules."""
    return [value for module in modules for sub in module.modules()
            for value in vars(sub).values() if isinstance(value, StepScale)]


@contextlib.contextmanager
def once_per_step(scales: Iterable[StepScale], micro_batches: int) -> Iterator[None]:
    """Inside: ``scales`` scale their weights once for a step of ``micro_batches`` micro batches.

    Wrap exactly one step's forward and backward passes (megatron-core's schedule call),
    each micro batch through every scaled linear once; leaving checks that every scale
    used saw ``micro_batches`` backwards. ``micro_batches < 2`` changes nothing (one
    micro batch already pays the weight side once, and more cheaply).
    """
    scales = list(scales) if micro_batches > 1 else []
    for scale in scales:
        scale.begin(micro_batches)
    completed = False
    try:
        yield
        completed = True
    finally:
        problems = [problem for problem in (scale.end() for scale in scales) if problem]
    if completed and problems:
        raise RuntimeError(
            f"{len(problems)} weights scaled once per step did not get their step's gradients ({problems[0]}); "
            f"once_per_step must wrap whole steps, every micro batch's forward and backward"
        )

"""--weight-scale-once-per-step: with gradient accumulation the weight-side scales (WeSaR's
gates, NormFormer's head scale) are multiplied into the weights once per step and their
gradients taken from the accumulated weight gradient (megatron_ext.linear_scaling.StepScale);
the gradients must be those of scaling every micro batch."""

from __future__ import annotations

import contextlib
from typing import Optional

import pytest
import torch
from model_utils import LLAMA_LIKE, assert_grads_close_to_scale, batch, build, build_fp64, forward_loss, tiny_config

from megatron_ext import ExtensionConfig, NormFormerConfig, ProResConfig, WeSaRConfig, linear_scaling
from megatron_ext.linear_scaling import StepScale, once_per_step, scale_weight, step_scales
from megatron_ext.prores import set_prores_step

# (scale length, dim): one gate; a gate per row (QKV, SwiGLU fc1); a factor per column (head scale).
CASES = {"one-gate": (1, 0), "per-row": (12, 0), "per-column": (10, 1)}


def _main_grad_accumulation(param: torch.nn.Parameter, dtype: Optional[torch.dtype] = None) -> None:
    """What megatron-core's DDP does: each gradient added into ``main_grad`` (fp32 there; by
    default the parameter's dtype here, for exact comparisons), ``grad`` cleared; nothing
    added where the linear's wgrad GEMM accumulated into ``main_grad`` itself
    (``grad_added_to_main_grad``, gradient-accumulation fusion)."""
    param.main_grad = torch.zeros_like(param, dtype=dtype)
    param.grad_added_to_main_grad = False

    def hook(p):
        if not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
        p.grad, p.grad_added_to_main_grad = None, False

    param.register_post_accumulate_grad_hook(hook)


class _WgradIntoMainGrad(torch.autograd.Function):
    """``x W^T`` as megatron-core's linear computes it under --gradient-accumulation-fusion: its
    backward adds the weight's gradient into ``W.main_grad`` (APEX's wgrad GEMM) and returns a
    placeholder, with ``W.grad_added_to_main_grad`` set."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.x, ctx.weight = x, weight
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.weight.main_grad.add_(grad.t() @ ctx.x)
        ctx.weight.grad_added_to_main_grad = True
        return grad @ ctx.weight, torch.zeros_like(ctx.weight)


def _gradients(weight, scales, once: bool, micro_batches: int, seed: int = 5, fused: bool = False,
               wgrad_fusion: bool = False):
    """Gradients of weight and scales after ``micro_batches`` backwards of ``sum(x (s_1 s_2 W)^T * y)``.

    ``wgrad_fusion``: once per step, the matmul accumulates into ``main_grad`` itself
    (:class:`_WgradIntoMainGrad`); per micro batch megatron turns that off for a scaled weight.
    """
    steps = [StepScale(dim) for _, dim in scales]
    g = torch.Generator().manual_seed(seed)
    context = once_per_step(steps, micro_batches) if once else contextlib.nullcontext()
    in_main_grad = wgrad_fusion and once
    with context:
        for _ in range(micro_batches):
            effective = weight
            for step, (scale, _) in zip(steps, scales):
                effective = step(effective, scale, weight, fused, in_main_grad)
            x = torch.randn(7, weight.shape[1], dtype=torch.float64, generator=g).to(weight.dtype)
            y = torch.randn(7, weight.shape[0], dtype=torch.float64, generator=g).to(weight.dtype)
            output = _WgradIntoMainGrad.apply(x, effective) if in_main_grad else x @ effective.t()
            (output * y).sum().backward()
    return [weight.main_grad if hasattr(weight, "main_grad") else weight.grad] + [s.grad for s, _ in scales]


def _leaves(case_names, accumulation: str, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(12, 10, dtype=torch.float64, generator=g))
    if accumulation in ("main_grad", "wgrad-fusion"):
        _main_grad_accumulation(weight)
    scales = [(torch.nn.Parameter(torch.rand(CASES[c][0], dtype=torch.float64, generator=g) + 0.5), CASES[c][1])
              for c in case_names]
    return weight, scales


@pytest.mark.parametrize("accumulation", ["grad", "main_grad", "wgrad-fusion"])
@pytest.mark.parametrize("cases", [["one-gate"], ["per-row"], ["per-column"], ["per-row", "per-column"],
                                   ["per-column", "one-gate"]], ids="+".join)
@pytest.mark.parametrize("micro_batches", [2, 4])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
def test_once_per_step_gives_the_per_micro_batch_gradients(cases, accumulation, micro_batches, fused):
    """One scale or two of the same weight (WeSaR's gate and NormFormer's head scale on W^O),
    the weight's gradient accumulated by autograd, in a DDP-like main_grad, or there by the
    matmul's own wgrad GEMM (megatron's gradient-accumulation fusion), the last micro batch
    finished eagerly or by the compiled kernels."""
    results = []
    for once in (False, True):
        weight, scales = _leaves(cases, accumulation)
        results.append(_gradients(weight, scales, once, micro_batches, fused=fused,
                                  wgrad_fusion=accumulation == "wgrad-fusion"))
    for per_micro_batch, per_step in zip(*results):
        torch.testing.assert_close(per_step, per_micro_batch, rtol=1e-12, atol=1e-12)


def test_a_frozen_weight_keeps_its_scale_per_micro_batch():
    """Only the gradient of a trainable weight can be accumulated and scaled once per step."""
    weight, scales = _leaves(["per-row"], "grad")
    weight.requires_grad_(False)
    frozen = _gradients(weight, scales, once=True, micro_batches=3)[1]
    weight, scales = _leaves(["per-row"], "grad")
    weight.requires_grad_(False)
    torch.testing.assert_close(frozen, _gradients(weight, scales, once=False, micro_batches=3)[1])


def test_the_scaled_weight_is_computed_once_per_step_and_reused(monkeypatch):
    calls = []
    times = linear_scaling._times
    monkeypatch.setattr(linear_scaling, "_times", lambda *a: calls.append(1) or times(*a))
    weight, scales = _leaves(["per-row"], "grad")
    _gradients(weight, scales, once=True, micro_batches=4)
    assert len(calls) == 2  # forward of the first micro batch; the last backward's s * G
    calls.clear()
    weight, scales = _leaves(["per-row"], "grad")
    _gradients(weight, scales, once=False, micro_batches=4)
    assert len(calls) == 8  # forward and backward of every micro batch


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
def test_the_finish_under_gradient_accumulation_fusion_takes_the_kernel_the_fusion_flag_names(fused, monkeypatch):
    calls = []
    for name, kind in (("finish_accumulated_rows", "eager"), ("fused_finish_accumulated_rows", "compiled")):
        original = getattr(linear_scaling, name)
        monkeypatch.setattr(linear_scaling, name, lambda *a, kind=kind, original=original: calls.append(kind) or original(*a))
    weight, scales = _leaves(["per-row", "per-column"], "wgrad-fusion")
    _gradients(weight, scales, once=True, micro_batches=3, fused=fused, wgrad_fusion=True)
    assert calls == ["compiled" if fused else "eager"] * 2  # each scale, in the last backward


def test_a_step_without_all_its_backwards_is_an_error():
    weight, ((scale, dim),) = _leaves(["one-gate"], "grad")
    step = StepScale(dim)
    with pytest.raises(RuntimeError, match="1 backward passes in a step of 3 micro batches"):
        with once_per_step([step], 3):
            step(weight, scale, weight).sum().backward()
    assert not step.active and step.scaled is None  # left for the next step
    with once_per_step([step], 1):  # one micro batch: the per-micro-batch form
        assert not step.active


ALL = ExtensionConfig(prores=ProResConfig(warmup=2), wesar=WeSaRConfig(), normformer=NormFormerConfig())


@pytest.mark.usefixtures("parallel1")
@pytest.mark.parametrize("placement", ["auto", "output"])
@pytest.mark.parametrize("shape,tied", [({}, True), (LLAMA_LIKE, False)], ids=["gpt", "llama-like"])
def test_a_model_with_all_methods_gets_the_same_gradients_once_per_step(shape, tied, placement):
    """Every weight-side scale of a model, the tied output layer's gate excepted (its matrix
    also gets the embedding's gradient) and the gates a placement of 'output' keeps on the
    activations."""
    config = tiny_config(**shape)
    extensions = ExtensionConfig(prores=ALL.prores, wesar=WeSaRConfig(placement=placement), normformer=ALL.normformer)
    micro_batches, results = 3, []
    for once in (False, True):
        model = build_fp64(config, extensions, share_embeddings_and_output_weights=tied)
        set_prores_step(model, 3)  # every layer's branch on (step 0 would scale them all by 0)
        with torch.no_grad():  # head scales away from their initial 1, the same in both models
            g = torch.Generator().manual_seed(11)
            for name, param in model.named_parameters():
                if name.endswith("head_scale"):
                    param.copy_(torch.rand(param.shape, generator=g) + 0.5)
        scales = step_scales([model])
        with once_per_step(scales if once else [], micro_batches):
            for m in range(micro_batches):
                (forward_loss(model, batch(seed=m)) / micro_batches).backward()
            used = [s for s in scales if s.scaled is not None]
        results.append({name: p.grad for name, p in model.named_parameters()})
        if once:
            wesar_linears = 4 * 4 + (0 if tied else 1)  # qkv, proj, fc1, fc2; an untied output layer
            assert len(scales) == wesar_linears + 4  # and the head scale on each W^O
            assert len(used) == (len(scales) if placement == "auto" else 4)
    per_micro_batch, per_step = results
    assert all(grad.abs().max() > 0 for grad in per_micro_batch.values())
    assert_grads_close_to_scale(per_step, per_micro_batch, 1e-9)  # double precision: only the sums' order differs


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("cases", [["one-gate"], ["per-row", "per-column"]], ids="+".join)
def test_bf16_weights_with_fp32_main_grads_stay_at_bf16_accuracy(cases, fused):
    """The mixed-precision case: bf16 weight and scales, the weight's gradient accumulated in an
    fp32 main_grad (megatron-core's DDP). Once per step is as close to the exact (fp64)
    gradients as per micro batch is."""
    exact_weight, exact_scales = _leaves(cases, "grad")
    exact = _gradients(exact_weight, exact_scales, once=False, micro_batches=4)
    errors = {}
    for once in (False, True):
        weight, scales = _leaves(cases, "grad")
        weight = torch.nn.Parameter(weight.detach().bfloat16())
        _main_grad_accumulation(weight, torch.float32)
        scales = [(torch.nn.Parameter(s.detach().bfloat16()), dim) for s, dim in scales]
        got = _gradients(weight, scales, once, micro_batches=4, fused=fused)
        assert got[0].dtype == torch.float32
        errors[once] = [float((g.double() - e).norm() / e.norm()) for g, e in zip(got, exact)]
    assert max(errors[True]) < 0.01
    for once_error, per_micro_batch_error in zip(errors[True], errors[False]):
        assert once_error < 1.5 * per_micro_batch_error

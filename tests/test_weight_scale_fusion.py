"""--weight-scale-fusion: WeSaR's gates and NormFormer's head scale multiplied into the weights
by torch.compile'd kernels (megatron_ext.linear_scaling.fused_scaled_rows), against the eager form."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from model_utils import LLAMA_LIKE, batch, build, forward_loss, tiny_config

from megatron_ext import ExtensionConfig, NormFormerConfig, ProResConfig, WeSaRConfig, linear_scaling
from megatron_ext.config import weight_scale_fusion
from megatron_ext.linear_scaling import scale_weight
from megatron_ext.prores import set_prores_step

# (scale length, dim): one gate; a gate per row (QKV, SwiGLU fc1); a factor per column (head scale).
CASES = {"one-gate": (1, 0), "per-row": (12, 0), "per-column": (10, 1)}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_scale_equals_the_eager_one_with_its_gradients(case):
    length, dim = CASES[case]
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 10, dtype=torch.float64, generator=g).requires_grad_()
    scale = torch.randn(length, dtype=torch.float64, generator=g).requires_grad_()
    grad = torch.randn(12, 10, dtype=torch.float64, generator=g)
    results = []
    for fused in (False, True):
        out = scale_weight(weight, scale, dim, fused)
        results.append((out.detach(), *torch.autograd.grad(out, (weight, scale), grad)))
    expected = weight * (scale.view(-1, 1) if dim == 0 else scale)
    torch.testing.assert_close(results[0][0], expected.detach(), rtol=0, atol=0)
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("parallel1")
def test_the_switch_is_off_unless_an_ext_transformer_config_sets_it():
    config = tiny_config()
    assert weight_scale_fusion(dataclasses.replace(config, weight_scale_fusion=True))
    assert not weight_scale_fusion(config)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig) if f.init}
    assert not weight_scale_fusion(TransformerConfig(**fields))  # megatron-core's own config: off


ALL = ExtensionConfig(prores=ProResConfig(warmup=2), wesar=WeSaRConfig(), normformer=NormFormerConfig())


@pytest.mark.usefixtures("parallel1")
@pytest.mark.parametrize("shape", [{}, LLAMA_LIKE], ids=["gpt", "llama-like"])
def test_every_weight_side_scale_of_a_model_takes_the_fused_kernel_and_computes_the_same(shape, monkeypatch):
    """With the switch on, each scale the eager model multiplies into a weight (WeSaR's gates
    on every weight-side linear, the head scale on W^O) goes through the compiled kernel
    instead, and loss and gradients are the eager model's."""
    calls = {"eager": 0, "fused": 0}
    eager_apply, fused_rows = linear_scaling._ScaleRows.apply, linear_scaling.fused_scaled_rows

    def counted(kind, fn):
        def call(*args):
            calls[kind] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(linear_scaling._ScaleRows, "apply", counted("eager", eager_apply))
    monkeypatch.setattr(linear_scaling, "fused_scaled_rows", counted("fused", fused_rows))
    config = tiny_config(**shape)
    data, results, counts = batch(batch_size=16), [], []  # 256 tokens: more rows than any weight has columns
    for fusion in (False, True):
        model = build(dataclasses.replace(config, weight_scale_fusion=fusion), ALL)
        set_prores_step(model, 3)  # every layer's branch on (step 0 would scale them all by 0)
        loss = forward_loss(model, data)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
        counts.append(dict(calls))
        calls.update(eager=0, fused=0)
    eager_calls = counts[0]["eager"]
    # 4 layers x (qkv, proj, fc1, fc2 gated; the head scale on proj) and the gated output layer
    assert eager_calls == 4 * 5 + 1 and counts[0]["fused"] == 0
    assert counts[1] == {"eager": 0, "fused": eager_calls}
    (eager_loss, eager_grads), (fused_loss, fused_grads) = results
    assert all(grad.abs().max() > 0 for grad in eager_grads.values())
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-6, atol=0)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)

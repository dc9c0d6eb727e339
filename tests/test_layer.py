"""ExtTransformerLayer's residual-branch hooks inside megatron's bias-dropout-add, fused and eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from model_utils import batch, build, forward_loss, tiny_config
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from megatron_ext import ExtensionConfig, NormFormerConfig, ProResConfig, WeSaRConfig
from megatron_ext.layer import ExtTransformerLayer, scaled_bias_dropout_add
from megatron_ext.model import build_layer_spec
from megatron_ext.param_gather import register_after
from megatron_ext.prores import ProResScale, prores_alpha, set_prores_step

pytestmark = pytest.mark.usefixtures("parallel1")

ALL = ExtensionConfig(
    prores=ProResConfig(warmup=2), wesar=WeSaRConfig(),
    normformer=NormFormerConfig(residual_scale=True),
)


def test_branch_and_skip_scales_compile_into_one_graph_that_survives_step_updates():
    """Both scales sit inside the one bias-dropout-add graph; a new a(l, t) recompiles nothing."""
    scale = ProResScale(tiny_config(), layer_number=2, schedule="linear", warmup=4)
    skip = torch.linspace(0.5, 1.5, 8)
    counter = CompileCounter()
    compiled = torch.compile(scaled_bias_dropout_add, backend=counter, fullgraph=True)
    x, bias, residual = torch.randn(3, 2, 8), torch.randn(8), torch.randn(3, 2, 8)
    for step in range(10):
        scale.set_step(step)
        out = compiled(x, bias, residual, scale.scale_factor(), skip, 0.0, True)
        alpha = prores_alpha("linear", 2, step, 4, 4)
        torch.testing.assert_close(out, skip * residual + alpha * (x + bias))
    assert counter.frame_count == 1


@pytest.mark.parametrize("rms", [False, True], ids=["LayerNorm", "RMSNorm"])
def test_post_attention_norm_compiles_into_the_same_graph(rms):
    from megatron_ext.layer import normed_scaled_bias_dropout_add

    counter = CompileCounter()
    compiled = torch.compile(normed_scaled_bias_dropout_add, backend=counter, fullgraph=True)
    x, bias, residual = torch.randn(3, 2, 8), torch.randn(8), torch.randn(3, 2, 8)
    weight, norm_bias = torch.rand(8) + 0.5, None if rms else torch.randn(8)
    out = compiled(x, bias, residual, weight, norm_bias, 1e-5, rms, torch.tensor(0.5), None, 0.0, True)
    norm = F.rms_norm(x + bias, (8,), weight, 1e-5) if rms else F.layer_norm(x + bias, (8,), weight, norm_bias, 1e-5)
    torch.testing.assert_close(out, residual + 0.5 * norm)
    assert counter.frame_count == 1


def test_half_precision_branch_is_not_promoted_by_the_fp32_scale():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    out = scaled_bias_dropout_add(x, None, x.float(), torch.tensor(0.5), None, 0.0, False)
    assert out.dtype == torch.bfloat16


def test_dropout_acts_on_the_scaled_branch_only():
    x, residual = torch.ones(2000, 8), torch.full((2000, 8), 3.0)
    torch.manual_seed(0)
    out = scaled_bias_dropout_add(x, None, residual, torch.tensor(0.25), torch.tensor(2.0), 0.5, True)
    # kept elements: 2 * 3 + 0.25 / (1 - 0.5); dropped: 2 * 3
    assert set(out.unique().tolist()) == {6.0, 6.5}
    assert 0.45 < (out == 6.5).float().mean() < 0.55


@pytest.mark.parametrize("extensions", [ExtensionConfig(prores=ProResConfig(warmup=2)), ALL], ids=["prores", "all"])
def test_fused_bias_dropout_add_equals_eager(extensions):
    """--bias-dropout-fusion (megatron's jit_fuser: torch.compile) computes the eager model's loss and grads."""
    eager_config = tiny_config()
    eager = build(eager_config, extensions)
    fused = build(dataclasses.replace(eager_config, bias_dropout_fusion=True), extensions)
    fused.load_state_dict(eager.state_dict())
    data = batch()
    graphs_before = counters["stats"]["unique_graphs"]
    for model in (eager, fused):
        for step in range(3):
            model.zero_grad()
            set_prores_step(model, step)
            forward_loss(model, data).backward()
    # One graph per branch kind (attention; MLP with its skip scale), not one per layer or step.
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2
    torch.testing.assert_close(forward_loss(fused, data), forward_loss(eager, data), rtol=1e-5, atol=1e-6)
    for (name, p_eager), p_fused in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hooks_refuse_a_bias_dropout_add_they_would_replace():
    config = tiny_config()
    spec = build_layer_spec(config, ExtensionConfig(prores=ProResConfig()))
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp_bda=lambda t, f: None))
    with pytest.raises(NotImplementedError, match="mlp_bda"):
        ExtTransformerLayer(config, spec.submodules, layer_number=1)


def _owners(model: torch.nn.Module) -> list[str]:
    """Modules owning parameters, in registration order (that of ``model.parameters()``)."""
    return [name for name, module in model.named_modules() if list(module.parameters(recurse=False))]


def _reached(model: torch.nn.Module) -> list[str]:
    """Modules owning parameters, in the order a forward and backward first call them."""
    reached: list[str] = []
    owners = set(_owners(model))
    for name, module in model.named_modules():
        if name in owners:
            module.register_forward_pre_hook(
                lambda module, args, name=name: None if name in reached else reached.append(name))
    forward_loss(model, batch()).backward()
    return reached


def _inverted(model: torch.nn.Module) -> set[tuple[str, str]]:
    """Pairs of parameter owners the forward reaches in the other order than they are registered."""
    registered, position = _owners(model), {name: i for i, name in enumerate(_reached(model))}
    return {(a, b) for i, a in enumerate(registered) for b in registered[i + 1:] if position[a] > position[b]}


FUSED_OR_EAGER = pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
TIED_OR_UNTIED = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


def _build_all(fused: bool, tied: bool, extensions: ExtensionConfig = ALL) -> torch.nn.Module:
    fusions = dict(bias_dropout_fusion=True, bias_activation_fusion=True) if fused else {}
    return build(tiny_config(**fusions), extensions, share_embeddings_and_output_weights=tied)


@FUSED_OR_EAGER
@TIED_OR_UNTIED
def test_every_module_owning_parameters_runs_its_forward_pre_hooks(fused, tied):
    """megatron-core's DDP waits for a module's all-gathered parameters (--overlap-param-gather)
    in that module's forward pre-hook. A parameter read without it (WeSaR's gates held by a
    child module, a norm's weight handed to a fused kernel) would be read before its
    all-gather lands, and a bucket of only such parameters would never be waited for."""
    model = _build_all(fused, tied)
    owners = _owners(model)
    assert any(".wesar" in name for name in owners) and any("post_attention_norm" in name for name in owners)
    assert any("ffn_norm" in name for name in owners) and any("mlp_skip_scale" in name for name in owners)
    assert sorted(set(owners) - set(_reached(model))) == []


@FUSED_OR_EAGER
@TIED_OR_UNTIED
def test_methods_register_their_parameters_in_forward_order(fused, tied):
    """megatron-core's DDP fills its buckets in the reverse order of ``model.parameters()`` and,
    under --overlap-param-gather, starts the next bucket's all-gather when the forward reaches
    one: a parameter registered out of forward order loses that overlap. The methods add no
    such parameter: each pair reached out of order is one of megatron-core's own layer
    (its attention registers linear_proj before linear_qkv), a gate counted as its linear."""
    megatrons = _inverted(_build_all(fused, tied, ExtensionConfig()))
    ours = _inverted(_build_all(fused, tied))
    assert megatrons, "megatron-core's own order changed: this test compares against it"
    as_linear = {(a.removesuffix(".wesar"), b.removesuffix(".wesar")) for a, b in ours}
    assert sorted(as_linear - megatrons) == []


def test_register_after_changes_the_order_only():
    parent = torch.nn.Sequential()
    for name in "abc":
        parent.add_module(name, torch.nn.Linear(2, 2))
    keys = set(parent.state_dict())
    register_after(parent, "c", "a")
    assert [name for name, _ in parent.named_children()] == ["a", "c", "b"]
    assert set(parent.state_dict()) == keys
    parent.unset = None
    register_after(parent, "unset", "a")  # an absent hook: nothing to move
    assert [name for name, _ in parent.named_children()] == ["a", "c", "b"]
    with pytest.raises(KeyError, match="no submodule 'd' to register 'b' after"):
        register_after(parent, "b", "d")

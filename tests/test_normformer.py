"""NormFormer on one rank: the full-width FFN norm, the end points and each part's effect."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.extensions.transformer_engine import TENorm
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from model_utils import LLAMA_LIKE, batch, build, forward_loss, logits, tiny_config

from megatron_ext import ExtensionConfig, NormFormerConfig
from megatron_ext.model import build_layer_spec
from megatron_ext.normformer import (
    FFNNorm,
    FFNNormMixin,
    FoldedHeadScaleMixin,
    apply_to_layer_spec,
    normformer_parameters,
    parameter_overhead,
    sharded_width_norm,
)
from megatron_ext.norms import TorchNorm
from megatron_ext.op_census import census_of

pytestmark = pytest.mark.usefixtures("parallel1")

SMALL = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4)
SHAPES = {"gpt": SMALL, "llama-like": {**SMALL, **LLAMA_LIKE}}
OFF = NormFormerConfig(head_scale=False, post_attention_norm=False, ffn_norm=False)


def _inputs(width: int, bias: bool):
    g = torch.Generator().manual_seed(0)
    x = (2.0 + 3.0 * torch.randn(3, 2, width, generator=g, dtype=torch.float64)).requires_grad_()
    weight = (1.0 + 0.3 * torch.randn(width, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(width, generator=g, dtype=torch.float64)).requires_grad_() if bias else None
    return x, weight, b


@pytest.mark.parametrize("rms", [False, True], ids=["LayerNorm", "RMSNorm"])
def test_ffn_norm_on_one_rank_equals_torch_norm(rms):
    width, eps = 12, 1e-5
    x, weight, bias = _inputs(width, bias=not rms)
    ours = sharded_width_norm(x, weight, bias, width=width, eps=eps, rms=rms, group=None)
    ref = F.rms_norm(x, (width,), weight, eps) if rms else F.layer_norm(x, (width,), weight, bias, eps)
    torch.testing.assert_close(ours, ref)
    upstream = torch.randn_like(ref)
    params = [t for t in (x, weight, bias) if t is not None]
    ours_grads, ref_grads = (torch.autograd.grad(out, params, upstream) for out in (ours, ref))
    for got, expected in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, expected)
    # The hand-written backward against finite differences.
    assert torch.autograd.gradcheck(
        lambda *t: sharded_width_norm(*t, width=width, eps=eps, rms=rms, group=None), (x, weight, bias)
    )


@pytest.mark.parametrize("rms", [False, True], ids=["LayerNorm", "RMSNorm"])
def test_compiled_ffn_norm_kernels_compute_the_eager_ones(rms):
    """``fused``: each side of the all-reduce torch.compile'd, forward and backward."""
    width = 12
    x, weight, bias = _inputs(width, bias=not rms)
    params = [t for t in (x, weight, bias) if t is not None]
    upstream = torch.randn(3, 2, width, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = []
    for fused in (False, True):
        out = sharded_width_norm(x, weight, bias, width=width, eps=1e-5, rms=rms, group=None, fused=fused)
        results.append((out, *torch.autograd.grad(out, params, upstream)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def test_ffn_norm_keeps_bf16_activations_with_fp32_statistics():
    x, weight, bias = (t.detach() for t in _inputs(64, bias=True))
    x, weight, bias = (t.bfloat16() for t in (x, weight, bias))
    out = sharded_width_norm(x, weight, bias, width=64, eps=1e-5, rms=False, group=None)
    assert out.dtype == torch.bfloat16
    ref = F.layer_norm(x.double(), (64,), weight.double(), bias.double(), 1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_ffn_norm_without_tensor_parallelism_costs_what_torch_norm_costs(normalization):
    """TP=1: the FFN norm runs exactly torch's norm ops (on a GPU one fused kernel each way), same numbers."""
    config = tiny_config(normalization=normalization)
    width = config.ffn_hidden_size
    ours = FFNNorm(config, width, tp_group=None)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    norm_class = torch.nn.RMSNorm if normalization == "RMSNorm" else torch.nn.LayerNorm
    ref = norm_class(width, eps=config.layernorm_epsilon)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(32, 2, width, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)

    def fresh() -> torch.Tensor:  # a new leaf each time: no gradient accumulation into x
        return x.detach().requires_grad_()

    census = {name: census_of(lambda: norm(fresh()).sum()).written for name, norm in (("ours", ours), ("ref", ref))}
    assert census["ours"] == census["ref"]


def _ffn_norm_reference(model, normformer_model) -> None:
    """Apply ``normformer_model``'s FFN norms, as torch norms, to fc2's input in ``model`` (hooks)."""
    for layer, source in zip(model.decoder.layers, normformer_model.decoder.layers):
        ffn_norm = source.mlp.ffn_norm
        norm_class = torch.nn.RMSNorm if ffn_norm.rms else torch.nn.LayerNorm
        norm = norm_class(ffn_norm.width, eps=ffn_norm.eps)
        norm.load_state_dict(ffn_norm.state_dict())
        layer.mlp.linear_fc2.register_forward_pre_hook(lambda module, args, norm=norm: (norm(args[0]), *args[1:]))


@pytest.mark.parametrize("fusion", [False, True], ids=["eager", "bias-activation-fusion"])
@pytest.mark.parametrize("shape", SHAPES)
def test_ffn_norm_sits_between_megatrons_activation_and_fc2(shape, fusion):
    """Against megatron's own MLP with a torch norm hooked onto fc2's input; with the fusion on,
    megatron's fused bias-GeLU / bias-SwiGLU and our one compiled activation-and-norm kernel."""
    config = replace(tiny_config(**SHAPES[shape]), bias_activation_fusion=fusion)
    only_ffn_norm = ExtensionConfig(normformer=NormFormerConfig(head_scale=False, post_attention_norm=False))
    reference = build(config)
    ours = _with_weights_of(build(config, only_ffn_norm), reference)
    with torch.no_grad():
        for layer in ours.decoder.layers:
            layer.mlp.ffn_norm.weight.uniform_(0.5, 1.5)
            if layer.mlp.ffn_norm.bias is not None:
                layer.mlp.ffn_norm.bias.uniform_(-0.5, 0.5)
    _ffn_norm_reference(reference, ours)
    data = batch()
    torch.testing.assert_close(logits(ours, data), logits(reference, data), rtol=1e-5, atol=1e-5)
    forward_loss(ours, data).backward()
    forward_loss(reference, data).backward()
    ours_params = dict(ours.named_parameters())
    for name, p_ref in reference.named_parameters():
        torch.testing.assert_close(ours_params[name].grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("weight", "bias"):
        assert all(getattr(layer.mlp.ffn_norm, name) is None or getattr(layer.mlp.ffn_norm, name).grad.abs().sum() > 0
                   for layer in ours.decoder.layers)


def test_activation_and_norm_compile_into_one_graph():
    from torch._dynamo.testing import CompileCounter

    from megatron_ext.normformer import ffn_activation_norm

    counter = CompileCounter()
    compiled = torch.compile(ffn_activation_norm, backend=counter, fullgraph=True)
    x, bias, weight = torch.randn(4, 2, 16), torch.randn(16), torch.rand(8) + 0.5
    for rms in (False, True):
        out = compiled(x, bias, weight, None if rms else torch.zeros(8), 1e-5, rms, True, True, "none")
        gate, up = torch.chunk(x + bias, 2, dim=-1)
        act = F.silu(gate) * up
        ref = F.rms_norm(act, (8,), weight, 1e-5) if rms else F.layer_norm(act, (8,), weight, torch.zeros(8), 1e-5)
        torch.testing.assert_close(out, ref)
    assert counter.frame_count == 2  # one graph per norm kind, no breaks


def _with_weights_of(model, source):
    """Load ``source``'s weights into ``model``; only NormFormer's own parameters may be missing."""
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    added = {id(p) for p in normformer_parameters(model)}
    named = dict(model.named_parameters())
    assert not unexpected and all(id(named[key]) in added for key in missing if key in named)
    return model


@pytest.mark.parametrize("shape", SHAPES)
def test_unit_scales_and_norms_off_give_the_baseline_and_each_part_changes_it(shape):
    config, data = tiny_config(**SHAPES[shape]), batch()
    baseline = build(config)
    expected = logits(baseline, data)

    scales_only = NormFormerConfig(post_attention_norm=False, ffn_norm=False, residual_scale=True)
    model = _with_weights_of(build(config, ExtensionConfig(normformer=scales_only)), baseline)
    torch.testing.assert_close(logits(model, data), expected, rtol=0, atol=0)

    for name in ("head_scale", "mlp_skip_scale"):
        changed = _with_weights_of(build(config, ExtensionConfig(normformer=scales_only)), baseline)
        with torch.no_grad():
            for param_name, param in changed.named_parameters():
                if name in param_name:
                    param.mul_(torch.linspace(0.5, 1.5, param.numel()))
        assert not torch.allclose(logits(changed, data), expected, atol=1e-4), name
    for part in ("post_attention_norm", "ffn_norm"):
        one_norm = replace(OFF, **{part: True})
        changed = _with_weights_of(build(config, ExtensionConfig(normformer=one_norm)), baseline)
        assert not torch.allclose(logits(changed, data), expected, atol=1e-4), part


def _head_scale_reference(model, scales: torch.Tensor) -> None:
    """Multiply each head's core-attention output by its scale (the paper's form), with a hook."""
    for layer in model.decoder.layers:
        core = layer.self_attention.core_attention
        core.register_forward_hook(
            lambda module, args, out: (out.view(*out.shape[:-1], len(scales), -1) * scales[:, None]).view(out.shape)
        )


@pytest.mark.parametrize("batch_size", [1, 4], ids=["scale-on-input", "scale-folded-into-weight"])
def test_head_scale_multiplies_each_head_before_the_output_projection(batch_size):
    """Tokens 16 < hidden 32: the scale multiplies W^O's input; 64 > 32: W^O's columns. Same function."""
    config, data = tiny_config(**SMALL), batch(batch_size=batch_size)
    only_heads = NormFormerConfig(post_attention_norm=False, ffn_norm=False)
    reference = build(config)
    scaled = _with_weights_of(build(config, ExtensionConfig(normformer=only_heads)), reference)
    scales = torch.tensor([0.5, 2.0, 0.0, 1.5])
    with torch.no_grad():
        for layer in scaled.decoder.layers:
            layer.self_attention.linear_proj.head_scale.copy_(scales)
    _head_scale_reference(reference, scales)
    torch.testing.assert_close(logits(scaled, data), logits(reference, data), rtol=1e-5, atol=1e-5)
    # d loss / d s_h = sum over tokens of <d loss / d head_h output, head_h output>, with a hook's help.
    outputs = []
    for layer in reference.decoder.layers:
        layer.self_attention.core_attention.register_forward_hook(lambda m, a, out: outputs.append(out))
    loss_scaled, loss_reference = (forward_loss(m, data) for m in (scaled, reference))
    loss_scaled.backward()
    grads = torch.autograd.grad(loss_reference, outputs)
    for layer, out, grad in zip(scaled.decoder.layers, outputs, grads):
        per_head = (out * grad).view(*out.shape[:-1], 4, -1).sum(dim=(0, 1, 3)) / scales.clamp_min(1e-30)
        expected = torch.where(scales == 0, layer.self_attention.linear_proj.head_scale.grad, per_head)
        torch.testing.assert_close(layer.self_attention.linear_proj.head_scale.grad, expected, rtol=1e-4, atol=1e-6)


def test_folded_head_scale_does_no_activation_sized_work():
    """With more tokens than W^O has output features, the scale's multiplies are weight-sized."""
    config = tiny_config(**SMALL)
    only_heads = ExtensionConfig(normformer=NormFormerConfig(post_attention_norm=False, ffn_norm=False))
    proj = build(config, only_heads).decoder.layers[0].self_attention.linear_proj
    x = torch.randn(64, 2, config.hidden_size)  # 128 token rows > 32 output features
    census = census_of(lambda: proj(x.detach().requires_grad_())[0].sum())
    weight = proj.weight.numel()
    # forward s * W; backward s * dW and W * dW (reduced to d s): no multiply writes an activation
    assert 0 < census.written["mul"] <= 3 * weight < x.numel()


def test_ffn_norm_mlp_builds_without_megatrons_unknown_mlp_warning(caplog):
    """megatron warns for every MLP class but its own; the subclass takes the same TP group."""
    megatron_layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    with caplog.at_level(logging.WARNING, logger=megatron_layer_logger.name):
        model = build(tiny_config(**SMALL), ExtensionConfig(normformer=NormFormerConfig()))
    assert "Unknown MLP type" not in caplog.text
    assert not megatron_layer_logger.filters  # only while the layers are built
    assert all(layer.mlp.tp_group is parallel_state.get_tensor_model_parallel_group() for layer in model.decoder.layers)


def test_parameter_overhead_is_counted_and_logged(caplog):
    config = tiny_config(**SMALL)
    layers, heads, hidden, ffn = 2, 4, 32, 64
    baseline = sum(p.numel() for p in build(config).parameters())
    with caplog.at_level(logging.INFO, logger="megatron_ext.normformer"):
        model = build(config, ExtensionConfig(normformer=NormFormerConfig(residual_scale=True)))
    # Per layer: head scales, post-attention LayerNorm (gain, bias), FFN LayerNorm, residual scale.
    added = layers * (heads + 2 * hidden + 2 * ffn + hidden)
    assert parameter_overhead(model) == (added, baseline)
    assert f"adds {added} parameters to the {baseline}" in caplog.text
    assert f"+{100 * added / baseline:.3f}%" in caplog.text


class GatedRowParallelLinear(RowParallelLinear):
    """Stands in for another method's row-parallel subclass (as WeSaR's gated linears)."""


def test_spec_wraps_whatever_classes_it_holds():
    config = tiny_config(**SMALL)
    spec = build_layer_spec(config, ExtensionConfig())
    mlp = spec.submodules.mlp
    proj = ModuleSpec(module=GatedRowParallelLinear, params={"marker": 1})
    spec.submodules.self_attention.submodules.linear_proj = proj
    wrapped = apply_to_layer_spec(spec, config, NormFormerConfig())
    new_proj = wrapped.submodules.self_attention.submodules.linear_proj
    assert issubclass(new_proj.module, FoldedHeadScaleMixin) and issubclass(new_proj.module, GatedRowParallelLinear)
    assert new_proj.params == {"marker": 1}
    new_mlp = wrapped.submodules.mlp
    assert issubclass(new_mlp.module, FFNNormMixin) and issubclass(new_mlp.module, mlp.module)
    assert new_mlp.submodules is mlp.submodules  # fc1 and fc2 (WeSaR's, when on) are kept
    assert wrapped.submodules.post_attention_norm is TorchNorm
    # One class per base, and no second layer of wrapping.
    again = apply_to_layer_spec(wrapped, config, NormFormerConfig())
    assert again.submodules.self_attention.submodules.linear_proj.module is new_proj.module
    assert again.submodules.mlp.module is new_mlp.module
    fresh = apply_to_layer_spec(spec, config, NormFormerConfig())
    assert fresh.submodules.self_attention.submodules.linear_proj.module is new_proj.module


def test_transformer_engine_layers_get_the_transformer_engine_norm():
    config = tiny_config(**SMALL)
    spec = build_layer_spec(config, ExtensionConfig())
    te_module = "megatron.core.extensions.transformer_engine"
    te_attention = type("TEDotProductAttention", (), {"__module__": te_module})
    spec.submodules.self_attention.submodules.core_attention = type("Gated", (te_attention,), {})
    wrapped = apply_to_layer_spec(spec, config, NormFormerConfig(head_scale=False))
    assert wrapped.submodules.post_attention_norm is TENorm


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="NormFormerConfig.ffn_norm must be a bool"):
        NormFormerConfig(ffn_norm="yes")
    spec = build_layer_spec(tiny_config(**SMALL), ExtensionConfig())
    with pytest.raises(ValueError, match="normalization in .*'L2Norm'"):
        apply_to_layer_spec(spec, tiny_config(**SMALL, normalization="L2Norm"), NormFormerConfig())
    with pytest.raises(ValueError, match="--normformer-no-ffn-norm"):
        apply_to_layer_spec(spec, tiny_config(**SMALL, num_moe_experts=2), NormFormerConfig())

"""gpt_model with methods off equals megatron-core's GPTModel; ProRes end points and state."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from model_utils import LLAMA_LIKE, SEQ, VOCAB, batch, build, logits, tiny_config

from megatron_ext import ExtensionConfig, ProResConfig
from megatron_ext.model import gpt_model, have_transformer_engine, local_layer_spec
from megatron_ext.parallel import cpu_manual_seed
from megatron_ext.prores import ProResCheckpointMismatch, allow_checkpoint_mismatch, prores_alphas, set_prores_step

pytestmark = pytest.mark.usefixtures("parallel1")

SHAPES = {"gpt": {}, "llama-like": LLAMA_LIKE}


def megatron_reference(config, untie: bool) -> GPTModel:
    """megatron-core's own GPTModel over get_gpt_layer_local_spec() (SDPA core attention)."""
    cpu_manual_seed(7)
    return GPTModel(
        config, local_layer_spec(config), vocab_size=VOCAB, max_sequence_length=SEQ,
        share_embeddings_and_output_weights=not untie,
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_methods_off_equals_megatron_gpt(shape):
    config = tiny_config(**SHAPES[shape])
    untie = shape == "llama-like"
    ours = build(config, share_embeddings_and_output_weights=not untie)
    ref = megatron_reference(config, untie)
    assert type(ours.decoder.layers[0]).__name__ == "ExtTransformerLayer"
    # Same seed gives the same weights; load anyway so the test is about the function.
    ref.load_state_dict(ours.state_dict())
    data = batch()
    assert torch.equal(logits(ours, data), logits(ref, data))


def test_prores_step_zero_is_identity_decoder():
    model = build(tiny_config(), ExtensionConfig(prores=ProResConfig(warmup=5)))
    set_prores_step(model, 0)
    data = batch()
    layers, model.decoder.layers = model.decoder.layers, torch.nn.ModuleList()
    with torch.no_grad():
        expected = logits(model, data)  # embedding -> final norm -> output layer
        model.decoder.layers = layers
        torch.testing.assert_close(logits(model, data), expected, rtol=0, atol=0)
        # The layers do change the stream once they are switched on.
        set_prores_step(model, 1)
        assert not torch.allclose(logits(model, data), expected)
        set_prores_step(model, 0)
        torch.testing.assert_close(logits(model, data), expected, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "stagewise", "reverse"])
def test_prores_fully_warm_equals_model_without_prores(schedule):
    config = tiny_config(**LLAMA_LIKE)
    plain = build(config)
    warm = build(config, ExtensionConfig(prores=ProResConfig(schedule=schedule, warmup=3)))
    warm.load_state_dict(plain.state_dict(), strict=False)
    data = batch()
    set_prores_step(warm, 3 * config.num_layers)
    assert set(prores_alphas(warm).values()) == {1.0}
    torch.testing.assert_close(logits(warm, data), logits(plain, data), rtol=0, atol=0)
    set_prores_step(warm, 3 * config.num_layers - 1)
    assert not torch.allclose(logits(warm, data), logits(plain, data))


def test_prores_scalar_stays_fp32_under_bf16_cast():
    model = build(tiny_config(), ExtensionConfig(prores=ProResConfig(warmup=3))).bfloat16()
    set_prores_step(model, 1)
    alpha = model.decoder.layers[2].branch_scale.alpha
    assert alpha.dtype == torch.float32 and float(alpha) == pytest.approx(1 / 9, rel=1e-7)


def test_prores_config_travels_with_checkpoint():
    config = tiny_config()
    saved = build(config, ExtensionConfig(prores=ProResConfig("linear", 100))).state_dict()
    same = build(config, ExtensionConfig(prores=ProResConfig("linear", 100)))
    same.load_state_dict(saved)
    other = build(config, ExtensionConfig(prores=ProResConfig("stagewise", 100)))
    with pytest.raises(ProResCheckpointMismatch, match="'schedule': 'linear'.*'schedule': 'stagewise'"):
        other.load_state_dict(saved)
    allow_checkpoint_mismatch(other)
    other.load_state_dict(saved)
    plain = build(config)
    with pytest.raises(RuntimeError, match="branch_scale._extra_state"):
        plain.load_state_dict(saved)


@pytest.mark.skipif(have_transformer_engine(), reason="checks the error raised when TE is missing")
def test_te_backend_without_transformer_engine_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs NVIDIA Transformer Engine.*backend='local'"):
        gpt_model(tiny_config(), ExtensionConfig(), vocab_size=VOCAB, max_sequence_length=SEQ, backend="te")
    with pytest.raises(ValueError, match="backend must be one of"):
        gpt_model(tiny_config(), ExtensionConfig(), vocab_size=VOCAB, max_sequence_length=SEQ, backend="cuda")

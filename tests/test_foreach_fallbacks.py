"""The sync-free stand-ins for megatron-core's multi-tensor fallbacks (megatron_ext.training.foreach_fallbacks)."""

from __future__ import annotations

import types

import megatron.core.optimizer.clip_grads as clip_grads
import pytest
import torch
from megatron.core import utils as core_utils

from megatron_ext.training import foreach_fallbacks
from megatron_ext.training.foreach_fallbacks import foreach_l2_norm, foreach_scale


def _tensors(dtype=torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(7, 5, dtype=dtype), torch.randn((), dtype=dtype), torch.randn(33, dtype=dtype)]


def test_l2_norm_is_the_norm_of_all_elements():
    tensors = _tensors()
    norm, per_tensor = foreach_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int), [tensors], False)
    expected = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors]))
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert norm[0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_norm_and_scale_never_read_a_value_back_to_the_host():
    """On the meta device any host read (.item(), a host tensor built from device values, as
    megatron-core's fallback does once per tensor) raises: a synchronisation on a GPU."""
    meta = [torch.empty(7, 5, device="meta"), torch.empty((), device="meta")]
    with pytest.raises(RuntimeError, match="meta"):
        torch.tensor([torch.linalg.vector_norm(t) for t in meta])
    norm, _ = foreach_l2_norm(0, None, [meta], False)
    assert norm.device.type == "meta" and norm.shape == (1,)
    foreach_scale(0, None, [meta, meta], 0.5)
    foreach_scale(0, None, [meta, [torch.empty_like(t, dtype=torch.bfloat16) for t in meta]], 2.0)


def test_l2_norm_of_bf16_and_mixed_tensors_is_fp32():
    mixed = _tensors(torch.bfloat16) + _tensors()
    norm, _ = foreach_l2_norm(0, None, [mixed], False)
    assert norm.dtype == torch.float32
    assert norm[0].item() == pytest.approx(
        torch.linalg.vector_norm(torch.cat([t.float().reshape(-1) for t in mixed])).item(), rel=1e-3)


def test_scale_in_place_and_copy_with_a_cast():
    grads = _tensors()
    expected = [g * 0.25 for g in grads]
    foreach_scale(0, None, [grads, grads], 0.25)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    unchanged = [g.clone() for g in grads]
    foreach_scale(0, None, [grads, grads], 1.0)
    assert all(torch.equal(g, u) for g, u in zip(grads, unchanged))

    main = _tensors()
    model = [torch.zeros_like(t, dtype=torch.bfloat16) for t in main]
    foreach_scale(0, None, [main, model], 1.0)  # megatron's main -> model parameter copy
    assert all(torch.equal(m, t.to(torch.bfloat16)) for m, t in zip(model, main))
    foreach_scale(0, None, [main, model], 2.0)
    assert all(torch.equal(m, (2.0 * t).to(torch.bfloat16)) for m, t in zip(model, main))


def test_install_rebinds_only_megatron_cores_own_fallbacks():
    fused = object()  # what APEX or Transformer Engine would have bound
    local = types.SimpleNamespace(__name__="local", l2_norm_impl=core_utils.local_multi_tensor_l2_norm)
    apex = types.SimpleNamespace(__name__="apex", l2_norm_impl=fused)
    replacements = [(m, "l2_norm_impl", core_utils.local_multi_tensor_l2_norm, foreach_l2_norm) for m in (local, apex)]
    assert foreach_fallbacks.install(replacements) == ["local.l2_norm_impl"]
    assert local.l2_norm_impl is foreach_l2_norm and apex.l2_norm_impl is fused
    assert foreach_fallbacks.install(replacements) == []


def test_install_binds_megatron_cores_clip_and_copy_without_apex():
    foreach_fallbacks.install()  # this machine has neither APEX nor Transformer Engine
    assert clip_grads.l2_norm_impl is foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is foreach_scale

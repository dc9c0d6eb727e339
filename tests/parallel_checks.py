"""Rank functions for the gloo-world tests: pipeline layouts, stage splits, TP equivalence.

Each function runs on every rank of a world started by ``mp_utils.run_distributed``
and is parametrised by an ExtensionConfig and TransformerConfig overrides, so every
method's tests reuse the same checks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from model_utils import batch, build, forward_loss, logits, tiny_config

from megatron_ext import ExtensionConfig
from megatron_ext.model import gpt_model_chunks
from megatron_ext.parallel import allreduce_sequence_parallel_grads, cpu_manual_seed, grad_norm, initialize_cpu_parallel
from megatron_ext.prores import prores_alphas, set_prores_step

# megatron-core moves the last stage's copy of a tied embedding to CUDA when it builds a
# pipeline stage, so CPU pipeline stages are built with an untied output layer.
UNTIED = {"share_embeddings_and_output_weights": False}


def pipeline_alphas(rank, world, layouts: list[dict], extensions: ExtensionConfig, step: int) -> list:
    """For each layout: (pp_rank, tp_rank, dp_rank, {global layer: alpha}) of this rank."""
    results = []
    for layout in layouts:
        layout = dict(layout)
        tp, pp, vpp = layout.pop("tp", 1), layout.pop("pp", 1), layout.pop("vpp", None)
        initialize_cpu_parallel(tp, pp, vpp)
        config = tiny_config(virtual_pipeline_model_parallel_size=vpp, hidden_size=32, ffn_hidden_size=64, **layout)
        cpu_manual_seed(1)
        from model_utils import SEQ, VOCAB

        chunks = gpt_model_chunks(config, extensions, vocab_size=VOCAB, max_sequence_length=SEQ, **UNTIED)
        set_prores_step(chunks, step)
        results.append((
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
            prores_alphas(chunks),
        ))
    return results


def _stage_state(full_state: dict, chunk, offset: int) -> dict:
    """The entries of an unsplit model's state dict that belong to one pipeline stage."""
    state = {}
    for key in chunk.state_dict():
        source = key
        if key.startswith("decoder.layers."):
            local, rest = key[len("decoder.layers."):].split(".", 1)
            source = f"decoder.layers.{int(local) + offset}.{rest}"
        state[key] = full_state[source]
    return state


def pipeline_split_logits(rank, world, extensions: ExtensionConfig, overrides: dict, step: int):
    """Max |logits(split) - logits(unsplit)| for a two-stage split fed stage to stage."""
    initialize_cpu_parallel(1, 1)
    config = tiny_config(**overrides)
    full = build(config, extensions, **UNTIED)
    set_prores_step(full, step)
    data = batch()
    with torch.no_grad():
        expected = logits(full, data)
    full_state = full.state_dict()

    initialize_cpu_parallel(1, 2)
    stage = gpt_model_chunks(tiny_config(**overrides), extensions, vocab_size=full.vocab_size,
                             max_sequence_length=full.max_sequence_length, **UNTIED)[0]
    offset = min(layer.layer_number for layer in stage.decoder.layers) - 1
    stage.load_state_dict(_stage_state(full_state, stage, offset))
    set_prores_step(stage, step)
    hidden_shape = (data["input_ids"].shape[1], data["input_ids"].shape[0], config.hidden_size)
    with torch.no_grad():
        if rank == 0:
            dist.send(stage(data["input_ids"], data["position_ids"], None).contiguous(), dst=1)
            return None
        received = torch.empty(hidden_shape)
        dist.recv(received, src=0)
        stage.set_input_tensor(received)
        out = stage(None, data["position_ids"], None)
    return float((out - expected).abs().max()), float(expected.abs().max())


def tp_loss_and_grads(rank, world, extensions: ExtensionConfig, overrides: dict, step: int, tp_sizes=(2, 1)):
    """Per TP size: (loss, global grad norm, gathered grads by name) after one backward."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    results = {}
    for tp in tp_sizes:
        initialize_cpu_parallel(tp, 1)
        model = build(tiny_config(**overrides), extensions)
        set_prores_step(model, step)
        loss = forward_loss(model, batch())
        loss.backward()
        allreduce_sequence_parallel_grads([model])
        grads = {}
        for name, param in model.named_parameters():
            grad = param.grad
            if getattr(param, "tensor_model_parallel", False):
                dim = param.partition_dim
                parts = [torch.empty_like(grad) for _ in range(tp)]
                dist.all_gather(parts, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                grad = torch.cat(parts, dim=dim)
            grads[name] = grad
        results[tp] = (float(loss), grad_norm(model.parameters()), grads)
    return results

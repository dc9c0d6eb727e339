"""Rank functions for the gloo-world tests: pipeline layouts, stage splits, TP equivalence.

Each function runs on every rank of a world started by ``mp_utils.run_distributed``
and is parametrised by an ExtensionConfig and TransformerConfig overrides, so every
method's tests reuse the same checks.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from model_utils import batch, build, build_fp64, forward_loss, logits, tiny_config

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
    results = {}
    for tp in tp_sizes:
        initialize_cpu_parallel(tp, 1)
        model = build(tiny_config(**overrides), extensions)
        set_prores_step(model, step)
        loss = forward_loss(model, batch())
        loss.backward()
        allreduce_sequence_parallel_grads([model])
        results[tp] = (float(loss), grad_norm(model.parameters()), gathered_grads(model))
    return results


def gather_tp_partitions(param: torch.nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
    """The full tensor of a TP-partitioned ``param`` from every rank's ``shard`` (e.g. its grad).

    With ``partition_stride`` s (2 for a SwiGLU fc1: [gate; up]) each rank holds s chunks
    along ``partition_dim``; the full tensor is chunk 0 of every rank, then chunk 1, ...
    """
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(shard) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    chunks = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([rank_chunks[s] for s in range(stride) for rank_chunks in chunks], dim=dim)


def gathered_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name, TP-partitioned ones gathered to their full tensor."""
    return {name: gather_tp_partitions(p, p.grad) if getattr(p, "tensor_model_parallel", False) else p.grad
            for name, p in model.named_parameters()}


def set_tp_invariant(param: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Set ``param`` to this rank's shard of the full tensor ``full`` (stride-1 partitions)."""
    if getattr(param, "tensor_model_parallel", False):
        assert getattr(param, "partition_stride", 1) == 1, "only stride-1 partitions"
        tp = parallel_state.get_tensor_model_parallel_world_size()
        full = full.chunk(tp, dim=param.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]
    param.data.copy_(full)


@contextlib.contextmanager
def cpu_sequence_parallel():
    """Let megatron-core's sequence-parallel communication run over gloo on the CPU.

    Its sequence all-gathers and reduce-scatters allocate their outputs with
    ``device=torch.cuda.current_device()``; inside this context that names the CPU.
    The collectives themselves are torch.distributed's, unchanged.
    """
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = original


def perturb_normformer(model, seed: int) -> None:
    """Set every NormFormer parameter to 1 + 0.2 N(0, 1), the same full values at every TP size."""
    from megatron_ext.normformer import normformer_parameters

    for index, param in enumerate(normformer_parameters(model)):
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
        g = torch.Generator().manual_seed(seed + index)
        set_tp_invariant(param, 1.0 + 0.2 * torch.randn(shape, generator=g))


def tp_cases_loss_and_grads(rank, world, cases: list, step: int = 0, perturb_seed=None) -> list:
    """For each ``(extensions, overrides, tp2_overrides)``: {tp: (loss, gathered grads)} on rank 0.

    ``tp2_overrides`` (e.g. sequence parallelism) apply at TP=2 only. With ``perturb_seed``
    the NormFormer parameters get TP-invariant values away from their init first.
    """
    results = [{} for _ in cases]
    for tp in (2, 1):  # one set of groups per TP size, not per case
        initialize_cpu_parallel(tp, 1)
        for per_tp, (extensions, overrides, tp2_overrides) in zip(results, cases):
            model = build(tiny_config(**overrides, **(tp2_overrides if tp > 1 else {})), extensions)
            set_prores_step(model, step)
            if perturb_seed is not None:
                perturb_normformer(model, perturb_seed)
            with cpu_sequence_parallel():
                loss = forward_loss(model, batch())
                loss.backward()
            allreduce_sequence_parallel_grads([model])
            per_tp[tp] = (float(loss), gathered_grads(model))
    return [per_tp if rank == 0 else None for per_tp in results]


def _gather_last_dim(shard: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def ffn_norm_tp_vs_full(rank, world, normalizations: list[str], width: int = 24) -> dict:
    """TP=2 FFNNorm on a sharded input vs the full-width torch norm, eager and compiled (with
    megatron's fused activation): {(norm, fused): (ours, reference)}.

    Each side is (output, input grad, gain grad, bias grad or None), ours gathered over TP.
    """
    import torch.nn.functional as F

    from megatron_ext.normformer import FFNNorm

    initialize_cpu_parallel(2, 1)
    group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(3)
    results = {}
    for normalization, fused in itertools.product(normalizations, (False, True)):
        config = tiny_config(normalization=normalization, layernorm_epsilon=1e-5, bias_activation_fusion=fused)
        norm = FFNNorm(config, width, group)
        x = 3.0 + 2.0 * torch.randn(5, 2, width, generator=g)  # offset mean: LayerNorm must centre
        upstream = torch.randn(5, 2, width, generator=g)
        gain = 1.0 + 0.3 * torch.randn(width, generator=g)
        bias = 0.3 * torch.randn(width, generator=g)
        set_tp_invariant(norm.weight, gain)
        if norm.bias is not None:
            set_tp_invariant(norm.bias, bias)
        shard = x.chunk(2, dim=-1)[parallel_state.get_tensor_model_parallel_rank()].clone().requires_grad_()
        out = norm(shard)
        (out * upstream.chunk(2, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]).sum().backward()
        ours = tuple(  # every tensor here is sharded along its last dim
            None if t is None else _gather_last_dim(t)
            for t in (out.detach(), shard.grad, norm.weight.grad, None if norm.bias is None else norm.bias.grad)
        )
        x_full = x.clone().requires_grad_()
        gain_full, bias_full = gain.clone().requires_grad_(), bias.clone().requires_grad_()
        if normalization == "LayerNorm":
            ref = F.layer_norm(x_full, (width,), gain_full, bias_full, eps=1e-5)
        else:
            ref = F.rms_norm(x_full, (width,), gain_full, eps=1e-5)
        (ref * upstream).sum().backward()
        bias_grad = bias_full.grad if normalization == "LayerNorm" else None
        reference = (ref.detach(), x_full.grad, gain_full.grad, bias_grad)
        results[normalization, fused] = (ours, reference)
    return results if rank == 0 else None


def normformer_sharded_keys(rank, world, extensions: ExtensionConfig, overrides: dict) -> dict:
    """TP=2: {key: (local shape, global shape, global offset)} of the NormFormer checkpoint tensors."""
    initialize_cpu_parallel(2, 1)
    model = build(tiny_config(**overrides), extensions)
    return {
        key: (tuple(t.local_shape), tuple(t.global_shape), tuple(t.global_offset))
        for key, t in model.sharded_state_dict().items()
        if any(part in key for part in ("head_scale", "ffn_norm", "post_attention_norm", "mlp_skip_scale"))
    }


def run_checks(rank, world, calls: list) -> list:
    """Run several rank functions ``(fn, args)`` in one world (one spawn for many checks)."""
    return [fn(rank, world, *args) for fn, args in calls]


def wesar_tp_step(rank, world, cases: list[tuple[ExtensionConfig, dict, dict]], lr: float = 1e-3):
    """WeSaR under tensor parallelism, then a two-stage pipeline split; one gloo world.

    For each case ``(extensions, config overrides, gpt_model kwargs)`` and TP size 2 and 1:
    loss, gate gradients and, after one AdamW step over ``wesar.param_groups``, gate values
    and the loss again; plus (TP=2) the gates' checkpoint tensors as
    ``{name: (global_shape, local_shape, replica_id)}``. Sequence parallelism in the
    overrides applies at TP=2 only. Last: ``pipeline_split_logits`` of the first case.
    """
    from megatron_ext.wesar import gate_parameters, param_groups

    results = []
    for extensions, overrides, kwargs in cases:
        per_tp = {}
        for tp in (2, 1):
            initialize_cpu_parallel(tp, 1)
            # megatron refuses sequence parallelism at TP=1; it computes the same model there
            serial = {k: v for k, v in overrides.items() if k != "sequence_parallel"}
            model = build(tiny_config(**(overrides if tp > 1 else serial)), extensions, **kwargs)
            data = batch()
            with cpu_sequence_parallel():
                loss = forward_loss(model, data)
                loss.backward()
            allreduce_sequence_parallel_grads([model])
            gates = gate_parameters(model)
            grads = {name: float(gate.grad) for name, gate in gates.items()}
            groups = param_groups(model, 0.1, extensions.wesar)
            torch.optim.AdamW([{**g, "lr": lr * g["lr_mult"]} for g in groups]).step()
            with torch.no_grad(), cpu_sequence_parallel():
                loss_after = float(forward_loss(model, data))
            sharded = {}
            if tp == 2:
                state = model.sharded_state_dict()
                sharded = {n: (state[n].global_shape, state[n].local_shape, state[n].replica_id) for n in gates}
            per_tp[tp] = dict(loss=loss.item(), grads=grads, gates={n: g.item() for n, g in gates.items()},
                              loss_after=loss_after, sharded=sharded)
        results.append(per_tp)
    extensions, overrides, _ = cases[0]
    return results, pipeline_split_logits(rank, world, extensions, overrides, 0)


@contextlib.contextmanager
def counting_scale_all_reduces(counter: list):
    """Append to ``counter`` every all-reduce of at most 3 elements (a linear's WeSaR gates;
    every activation of the tiny models is larger)."""
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        if tensor.numel() <= 3:
            counter.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield
    finally:
        dist.all_reduce = original


def once_per_step_tp(rank, world, extensions: ExtensionConfig, cases: list, micro_batches: int = 3,
                     prores_step: int = 3) -> list:
    """For each ``(overrides, gpt_model kwargs, tp2_overrides)``, per TP size (2, 1) and per
    mode (``once`` under ``once_per_step``, else per micro batch): one step of ``micro_batches``
    backwards in double precision at ProRes step ``prores_step``, NormFormer parameters away from
    their init. Returns
    {(tp, once): (losses, gathered grads, all-reduces of gate gradients in the backwards,
    WeSaR linears whose gates were applied once per step)}.
    """
    from megatron_ext.linear_scaling import once_per_step, step_scales

    results = [{} for _ in cases]
    for tp in (2, 1):
        initialize_cpu_parallel(tp, 1)
        for per_case, (overrides, kwargs, tp2_overrides) in zip(results, cases):
            for once in (False, True):
                model = build_fp64(tiny_config(**overrides, **(tp2_overrides if tp > 1 else {})), extensions, **kwargs)
                set_prores_step(model, prores_step)
                perturb_normformer(model, 5)
                scales, losses, reduces = step_scales([model]), [], []
                with cpu_sequence_parallel(), once_per_step(scales if once else [], micro_batches):
                    for m in range(micro_batches):
                        loss = forward_loss(model, batch(seed=m)) / micro_batches
                        with counting_scale_all_reduces(reduces):
                            loss.backward()
                        losses.append(float(loss))
                    deferred = sum(1 for module in model.modules()
                                   if getattr(module, "wesar_step", None) is not None and module.wesar_step.scaled is not None)
                allreduce_sequence_parallel_grads([model])
                per_case[(tp, once)] = (losses, gathered_grads(model), len(reduces), deferred)
    return results

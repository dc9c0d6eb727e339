"""WeSaR on one CPU rank: init table, equivalence to an ordinary GPT, Adam invariance, optimizer hooks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, _get_param_groups
from megatron.core.optimizer.optimizer import MegatronOptimizer, param_group_identifier_keys
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from model_utils import LLAMA_LIKE, SEQ, VOCAB, batch, build, forward_loss, logits, tiny_config

from megatron_ext import ExtensionConfig, ProResConfig
from megatron_ext.model import local_layer_spec
from megatron_ext.op_census import census_of
from megatron_ext.parallel import cpu_manual_seed
from megatron_ext.prores import set_prores_step
from megatron_ext.wesar import (
    WeSaRConfig,
    WeSaRGates,
    clip_parameters,
    fold_gates,
    gate_parameters,
    is_gate,
    optimizer_overrides,
    param_groups,
    without_gates,
)

pytestmark = pytest.mark.usefixtures("parallel1")

# shape -> (TransformerConfig overrides, tied embeddings)
SHAPES = {"gpt": ({}, True), "llama-like": (LLAMA_LIKE, False)}


def wesar_model(shape: str, cfg: WeSaRConfig = WeSaRConfig(), **extensions):
    overrides, tied = SHAPES[shape]
    config = tiny_config(**overrides)
    model = build(config, ExtensionConfig(wesar=cfg, **extensions), share_embeddings_and_output_weights=tied)
    return config, model


def expected_target(kind: str, config, backbone: str) -> float:
    """METHODS.md section 2, written out independently of megatron_ext.wesar."""
    d, L, f, s = config.hidden_size, config.num_layers, config.ffn_hidden_size, config.init_method_std
    if kind == "embedding":
        return s
    if backbone == "megatron":
        return s / math.sqrt(2 * L) if kind in ("attention_output", "ffn_out") else s
    return {"attention_output": math.sqrt(1 / (2 * L * d)), "ffn_out": math.sqrt(2 / (2 * L * f))}.get(kind, math.sqrt(1 / d))


def gated_blocks(model):
    """(kind, gate, base-weight block) for every gated matrix (fused linears split by gate)."""
    for module in model.modules():
        gates = getattr(module, "wesar", None)
        if not isinstance(gates, WeSaRGates) or module.weight is None:
            continue
        for index, (kind, gate) in enumerate(gates.named_parameters()):
            rows = slice(None) if gates.column_onehot is None else gates.column_onehot[:, index] == 1
            yield kind, gate, module.weight[rows]


@pytest.mark.parametrize("bad, message", [
    (dict(std=0.0), "std must be > 0"),
    (dict(placement="input"), "unknown WeSaR placement 'input'"),
    (dict(backbone="xavier"), "unknown WeSaR backbone 'xavier'"),
    (dict(gate_weight_decay=-0.1), "gate_weight_decay must be >= 0"),
    (dict(gate_lr_mult=0.0), "gate_lr_mult must be > 0"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        WeSaRConfig(**bad)


@pytest.mark.parametrize("backbone", ["he", "megatron"])
@pytest.mark.parametrize("shape", SHAPES)
def test_init_follows_target_table(shape, backbone):
    """Base std is the common std, gate * std(base) is the backbone's target, per matrix.

    Statistical tolerance: the sample std of n normal draws has relative error about
    1/sqrt(2n); we allow 5 of those.
    """
    cfg = WeSaRConfig(backbone=backbone)
    config, model = wesar_model(shape, cfg)
    kinds = set()
    for kind, gate, block in gated_blocks(model):
        kinds.add(kind)
        target = expected_target(kind, config, backbone)
        tolerance = 5 / math.sqrt(2 * block.numel())
        assert is_gate(gate) and gate.dtype == torch.float32 and gate.dim() == 0
        assert float(gate) == pytest.approx(target / cfg.std, rel=1e-6), kind
        assert float(block.std()) == pytest.approx(cfg.std, rel=tolerance), kind
        assert float(gate * block.std()) == pytest.approx(target, rel=tolerance), kind
    fc1 = {"ffn_gate", "ffn_up"} if shape == "llama-like" else {"ffn_in"}
    head = {"lm_head"} if shape == "llama-like" else set()  # tied: the embedding's gate
    assert kinds == {"embedding", "query", "key", "value", "attention_output", "ffn_out"} | fc1 | head


@pytest.mark.parametrize("placement", ["weight", "output"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_model_is_megatron_gpt_with_folded_weights(shape, placement):
    """At init the gated model equals megatron's own GPT holding gate * base weights.

    fold_gates leaves the function unchanged, sets every gate to 1 and its state dict,
    gates dropped, loads strictly into GPTModel over megatron's local layer spec.
    """
    config, gated = wesar_model(shape, WeSaRConfig(placement=placement))
    _, folded = wesar_model(shape, WeSaRConfig(placement=placement))
    data = batch()
    with torch.no_grad():
        expected = logits(gated, data)
        fold_gates(folded)
        assert {float(g) for g in gate_parameters(folded).values()} == {1.0}
        torch.testing.assert_close(logits(folded, data), expected, rtol=1e-5, atol=1e-5)
        cpu_manual_seed(3)
        plain = GPTModel(config, local_layer_spec(config), vocab_size=VOCAB, max_sequence_length=SEQ,
                         share_embeddings_and_output_weights=SHAPES[shape][1])
        assert not torch.allclose(logits(plain, data), expected, atol=1e-3)
        plain.load_state_dict(without_gates(folded.state_dict()))
        torch.testing.assert_close(logits(plain, data), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gates_on_weights_and_on_outputs_give_the_same_loss_and_gradients(shape):
    """Same math, different order of operations: compared in float64 (gates stay fp32)."""
    models = {p: wesar_model(shape, WeSaRConfig(placement=p))[1].double() for p in ("weight", "output")}
    data = batch(seed=5)
    losses = {p: forward_loss(m, data) for p, m in models.items()}
    assert float(losses["weight"]) == pytest.approx(float(losses["output"]), rel=1e-12)
    for loss in losses.values():
        loss.backward()
    params = {p: dict(m.named_parameters()) for p, m in models.items()}
    assert len(gate_parameters(models["weight"])) >= 4 * 6 + 1
    for name, param in params["output"].items():
        assert float(param.grad.abs().max()) > 0, name
        torch.testing.assert_close(params["weight"][name].grad, param.grad, rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.parametrize("placement, activation_sized", [("auto", False), ("weight", False), ("output", True)])
def test_auto_placement_adds_no_activation_sized_work_when_tokens_outnumber_features(placement, activation_sized):
    """A pretraining-like shape (more token rows than input features): the elements
    WeSaR's multiplies write for fc1 (forward and backward) are weight-sized under
    ``auto``, output-sized with the gates on the output (a*y, a*grad, grad*y)."""
    config, model = wesar_model("gpt", WeSaRConfig(placement=placement))
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    x = torch.randn(8 * config.hidden_size, 2, config.hidden_size, requires_grad=True)
    output_elements = x.shape[0] * x.shape[1] * config.ffn_hidden_size
    assert fc1.weight.numel() * 8 < output_elements
    census = census_of(lambda: fc1(x)[0].sum())
    multiplied = census.written["mul"] + census.written["_foreach_mul"]  # one gate: torch's multi-tensor kernel
    if activation_sized:
        assert multiplied >= 3 * output_elements
    else:
        # a * W~ forward, a * dW backward; the gate's gradient is a dot product with no weight-sized product
        assert 0 < multiplied <= 2 * fc1.weight.numel()
        assert census.read["dot"] == 2 * fc1.weight.numel() and census.written["sum"] < fc1.weight.numel()


@pytest.mark.parametrize("rows", [1, 5], ids=["one-gate", "gate-per-row"])
def test_weight_side_gate_backward_matches_finite_differences(rows):
    from megatron_ext.linear_scaling import _ScaleRows

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, dtype=torch.float64, generator=g).requires_grad_()
    scale = torch.randn(rows, dtype=torch.float64, generator=g).requires_grad_()
    torch.testing.assert_close(_ScaleRows.apply(weight, scale), weight * scale.view(-1, 1), rtol=0, atol=0)
    assert torch.autograd.gradcheck(_ScaleRows.apply, (weight, scale))


def test_column_scale_of_a_weight_matches_finite_differences():
    """The head scale's form: one factor per input column of W^O."""
    from megatron_ext.linear_scaling import scale_weight

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 7, dtype=torch.float64, generator=g).requires_grad_()
    columns = torch.randn(7, dtype=torch.float64, generator=g).requires_grad_()
    torch.testing.assert_close(scale_weight(weight, columns, dim=1), weight * columns, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda w, c: scale_weight(w, c, dim=1), (weight, columns))


def train(model, optimizer, steps: int) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        forward_loss(model, batch(seed=step)).backward()
        optimizer.step()


def lr_groups(model, lr: float, ratio: float) -> list[dict]:
    """Gated base matrices at lr * ratio, gates at lr / ratio, the rest at lr."""
    based = {id(m.weight) for m in model.modules() if isinstance(getattr(m, "wesar", None), WeSaRGates)}
    gates = list(gate_parameters(model).values())
    bases = [p for p in model.parameters() if id(p) in based]
    rest = [p for p in model.parameters() if id(p) not in based and not is_gate(p)]
    return [{"params": bases, "lr": lr * ratio}, {"params": gates, "lr": lr / ratio}, {"params": rest, "lr": lr}]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_adam_update_does_not_depend_on_how_scale_splits_between_gate_and_base(optimizer):
    """Two copies: base std s and 4s, gates 4x smaller in the second (same function).

    Adam normalises each parameter's gradient, so with the matrices' LR proportional to
    the base std (the relative update lr/s WeSaR fixes) and the gates' LR in inverse
    proportion, both copies follow the same function trajectory. SGD does not: its
    effective-weight update scales with gate^2, so the copies drift apart.
    """
    ratio = 4.0
    cfg_small, cfg_large = WeSaRConfig(std=0.006325), WeSaRConfig(std=0.006325 * ratio)
    _, small = wesar_model("llama-like", cfg_small)
    _, large = wesar_model("llama-like", cfg_large)
    data = batch(seed=99)
    with torch.no_grad():
        start = logits(small, data)
        torch.testing.assert_close(logits(large, data), start, rtol=1e-5, atol=1e-5)
    make = (
        (lambda groups: torch.optim.Adam(groups, eps=1e-16)) if optimizer == "adam"
        else (lambda groups: torch.optim.SGD(groups))
    )
    lr = 3e-5 if optimizer == "adam" else 2e-3
    train(small, make(lr_groups(small, lr, 1.0)), 3)
    train(large, make(lr_groups(large, lr, ratio)), 3)
    with torch.no_grad():
        after_small, after_large = logits(small, data), logits(large, data)
    moved = float((after_small - start).abs().max())
    assert moved > 0.05  # training changed the function noticeably
    difference = float((after_large - after_small).abs().max())
    if optimizer == "adam":
        assert difference < 1e-4 * max(1.0, float(after_small.abs().max())), difference
    else:
        assert difference > 0.1 * moved, (difference, moved)


def test_composes_with_prores():
    """Both on: a fully warm ProRes model is the WeSaR model; at step 0 only the embedding gate learns."""
    cfg = WeSaRConfig()
    config, both = wesar_model("llama-like", cfg, prores=ProResConfig(warmup=2))
    _, wesar_only = wesar_model("llama-like", cfg)
    both.load_state_dict(wesar_only.state_dict(), strict=False)
    data = batch()
    set_prores_step(both, 2 * config.num_layers)
    with torch.no_grad():
        torch.testing.assert_close(logits(both, data), logits(wesar_only, data), rtol=0, atol=0)
    set_prores_step(both, 0)
    forward_loss(both, data).backward()
    grads = {name: float(g.grad) for name, g in gate_parameters(both).items()}
    assert grads["embedding.word_embeddings.wesar.embedding"] != 0.0
    assert grads["output_layer.wesar.lm_head"] != 0.0
    assert all(grad == 0.0 for name, grad in grads.items() if name.startswith("decoder."))


def test_param_groups_split_matrices_vectors_and_gates():
    cfg = WeSaRConfig(gate_weight_decay=0.05, gate_lr_mult=0.5)
    _, model = wesar_model("gpt", cfg)
    groups = {g["name"]: g for g in param_groups([model], 0.1, cfg)}
    assert {n: (g["weight_decay"], g["lr_mult"]) for n, g in groups.items()} == {
        "decay": (0.1, 1.0), "no_decay": (0.0, 1.0), "wesar_gates": (0.05, 0.5)}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once
    assert {id(p) for p in groups["wesar_gates"]["params"]} == {id(p) for p in gate_parameters(model).values()}
    assert all(p.dim() == 2 for p in groups["decay"]["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.dim() == 1 for p in groups["no_decay"]["params"])
    with pytest.raises(ValueError, match="has WeSaR gates but param_groups got cfg=None"):
        param_groups(model, 0.1, None)
    plain = build(tiny_config())
    assert [g["name"] for g in param_groups(plain, 0.1, None)] == ["decay", "no_decay"]


def test_megatron_optimizer_overrides_give_gates_their_own_wd_and_lr():
    """Through megatron's own param grouping and LR/WD scheduler, with model weight decay 0."""
    cfg = WeSaRConfig(gate_weight_decay=0.05, gate_lr_mult=0.25)
    _, model = wesar_model("gpt", cfg)
    lr, min_lr = 1e-3, 1e-4
    overrides = optimizer_overrides(cfg, 0.0, lr=lr, min_lr=min_lr)
    groups = _get_param_groups([model], OptimizerConfig(lr=lr, min_lr=min_lr, weight_decay=0.0), overrides)
    scheduler = OptimizerParamScheduler(
        SimpleNamespace(param_groups=groups), init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=4,
        lr_decay_steps=20, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=20,
        wd_incr_style="constant",
    )
    gate_ids = {id(p) for p in gate_parameters(model).values()}
    bias_ids = {id(p) for n, p in model.named_parameters() if n.endswith(".bias") or p.dim() == 1}
    for step in (2, 10):
        scheduler.step(step - scheduler.num_steps)
        by_kind = {}
        for group in groups:
            ids = {id(p) for p in group["params"]}
            kind = "gates" if ids <= gate_ids else "vectors" if ids <= bias_ids else "matrices"
            assert ids.isdisjoint(gate_ids) or kind == "gates"
            by_kind[kind] = (group["lr"], group["weight_decay"])
        base_lr = by_kind["matrices"][0]
        assert by_kind["gates"] == (pytest.approx(0.25 * base_lr, rel=1e-12), 0.05)
        assert by_kind["vectors"] == (base_lr, 0.0) and by_kind["matrices"][1] == 0.0
    with pytest.raises(ValueError, match="needs optimizer_overrides\\(lr="):
        optimizer_overrides(cfg, 0.1)


@pytest.mark.parametrize("gate_wd, gate_lr_mult", [(0.0, 1.0), (0.05, 1.0), (0.0, 0.25), (0.05, 0.25), (1.0, 2.0)])
def test_checkpoint_loading_maps_every_megatron_param_group_to_itself(gate_wd, gate_lr_mult):
    """megatron-core restores optimizer groups by their (wd_mult, lr_mult, ...) key alone:
    the gates' group must have its own key, or a resume hands it another group's state."""
    cfg = WeSaRConfig(gate_weight_decay=gate_wd, gate_lr_mult=gate_lr_mult)
    _, model = wesar_model("gpt", cfg)
    overrides = optimizer_overrides(cfg, 0.1, lr=1e-3, min_lr=1e-4)
    groups = _get_param_groups([model], OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1), overrides)
    keys = [tuple(g[k] for k in param_group_identifier_keys) for g in groups]
    assert len(set(keys)) == len(keys)
    saved = [dict(g, params=list(range(len(g["params"])))) for g in groups]
    restored = MegatronOptimizer._filter_and_reorder_param_groups(groups, list(reversed(saved)))
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert [{k: v for k, v in g.items() if k != "params"} for g in restored] == settings
    gate_ids = {id(p) for p in gate_parameters(model).values()}
    gate_groups = [g for g in groups if {id(p) for p in g["params"]} & gate_ids]
    if gate_wd == 0.0 and gate_lr_mult == 1.0:  # the gates join the vectors' group
        assert len(gate_groups) == 1 and gate_groups[0]["wd_mult"] == 0.0
    else:
        assert [{id(p) for p in g["params"]} for g in gate_groups] == [gate_ids]


def test_gate_weight_decay_one_at_base_lr_is_rejected():
    with pytest.raises(ValueError, match="--wesar-gate-weight-decay"):
        optimizer_overrides(WeSaRConfig(gate_weight_decay=1.0), 0.1, lr=1e-3, min_lr=1e-4)


def test_gates_left_out_of_clip_are_neither_counted_nor_scaled():
    _, model = wesar_model("gpt", WeSaRConfig(exclude_gates_from_clip=True))
    forward_loss(model, batch()).backward()
    params = list(model.parameters())
    clipped = clip_parameters(params, WeSaRConfig(exclude_gates_from_clip=True))
    assert len(clip_parameters(params, WeSaRConfig())) == len(params) == len(clipped) + len(gate_parameters(model))
    gate_grads = {n: g.grad.clone() for n, g in gate_parameters(model).items()}
    others = [p for p in params if not is_gate(p)]
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in others]))
    norm = torch.nn.utils.clip_grad_norm_(clipped, max_norm=1e-6)
    torch.testing.assert_close(norm, expected_norm)
    assert all(torch.equal(gate_parameters(model)[n].grad, g) for n, g in gate_grads.items())
    assert float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in others]))) == pytest.approx(1e-6, rel=1e-3)


def test_gates_are_cast_with_the_model_and_checkpoint_as_replicated_tensors():
    """One dtype per model: megatron's mixed-precision optimizers hold the fp32 masters."""
    _, model = wesar_model("llama-like")
    assert {g.dtype for g in gate_parameters(model).values()} == {torch.float32}
    model.bfloat16()
    gates = gate_parameters(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    sharded = model.sharded_state_dict()
    for name in gates:
        tensor = sharded[name]
        assert isinstance(tensor, ShardedTensor) and tensor.local_shape == ()


def test_tied_output_gate_is_checkpointed_once_as_the_embedding_gate():
    """One stage: the output layer's gate is the embedding's parameter; it must not get a
    checkpoint entry of its own (its optimizer state would be filed under that key, which
    a pipeline-split run, whose first stage has no output layer, cannot find)."""
    _, model = wesar_model("gpt")
    sharded = model.sharded_state_dict()
    gate = sharded["embedding.word_embeddings.wesar.embedding"]
    assert isinstance(gate, ShardedTensor) and gate.key == "embedding.word_embeddings.wesar.embedding"
    assert isinstance(sharded["output_layer.wesar.embedding"], LocalNonpersistentObject)
    assert sharded["output_layer.wesar.embedding"].unwrap() is gate.data

"""megatron_ext.memory (tools/estimate_memory.py): exact parameter counts against built models, the memory laws, the example layouts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from model_utils import LLAMA_LIKE, SEQ, VOCAB, batch, build, forward_loss, tiny_config
from mp_utils import run_distributed

from megatron_ext import ExtensionConfig, ProResConfig
from megatron_ext import memory as em
from megatron_ext.normformer import NormFormerConfig
from megatron_ext.wesar import WeSaRConfig
from megatron_ext.parallel import initialize_cpu_parallel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples" / "configs").glob("*/*.yaml"))


GIB = 1024**3

# name: (TransformerConfig overrides, untied output layer, position embedding, extensions)
CASES = {
    "gpt": ({}, False, "learned_absolute", ExtensionConfig()),
    "llama-like": (LLAMA_LIKE, True, "rope", ExtensionConfig()),
    "gpt+normformer": ({}, False, "learned_absolute", ExtensionConfig(normformer=NormFormerConfig(residual_scale=True))),
    "gpt+wesar": ({}, False, "learned_absolute", ExtensionConfig(wesar=WeSaRConfig())),
    "llama-like+all": (LLAMA_LIKE, True, "rope", ExtensionConfig(
        prores=ProResConfig(warmup=5), wesar=WeSaRConfig(), normformer=NormFormerConfig())),
}
UNTIED = [name for name, case in CASES.items() if case[1]]  # CPU pipeline stages need untied embeddings


def shape_of(case: str) -> "em.ModelShape":
    """The ModelShape describing what ``build_case(case)`` builds."""
    overrides, untie, position, extensions = CASES[case]
    config = tiny_config(**overrides)
    normformer = extensions.normformer
    return em.ModelShape(
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=1, ffn_hidden_size=config.ffn_hidden_size,
        num_query_groups=config.num_query_groups, swiglu=config.gated_linear_unit,
        normalization=config.normalization, add_bias_linear=config.add_bias_linear,
        position_embedding_type=position, untie_embeddings_and_output_weights=untie,
        wesar=extensions.wesar is not None,
        normformer_head_scale=bool(normformer and normformer.head_scale),
        normformer_post_attention_norm=bool(normformer and normformer.post_attention_norm),
        normformer_ffn_norm=bool(normformer and normformer.ffn_norm),
        normformer_residual_scale=bool(normformer and normformer.residual_scale),
    )


def build_case(case: str, **kwargs) -> torch.nn.Module:
    overrides, untie, position, extensions = CASES[case]
    return build(
        tiny_config(**overrides), extensions,
        share_embeddings_and_output_weights=not untie, position_embedding_type=position, **kwargs,
    )


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.usefixtures("parallel1")
@pytest.mark.parametrize("case", CASES)
def test_parameter_count_equals_built_model(case):
    model = build_case(case)
    shape = shape_of(case)
    assert em.total_parameters(shape) == count(model)
    assert em.stage_parameters(shape, em.Layout()) == [count(model)]


def _count_per_rank(rank: int, world: int) -> dict:
    """Per-rank parameter counts at TP=2 (every case) and PP=2 (untied cases)."""
    counts = {}
    initialize_cpu_parallel(2, 1)
    for case in CASES:
        counts[("tp", case)] = count(build_case(case))
    initialize_cpu_parallel(1, 2)
    for case in UNTIED:
        counts[("pp", case)] = count(build_case(case, pre_process=rank == 0, post_process=rank == 1))
    return counts


def test_parameter_count_per_gpu_under_tensor_and_pipeline_parallelism():
    ranks = run_distributed(_count_per_rank, 2)
    for case in CASES:
        (tp_count,) = em.stage_parameters(shape_of(case), em.Layout(tensor_model_parallel_size=2, num_gpus=2))
        assert ranks[0][("tp", case)] == ranks[1][("tp", case)] == tp_count, case
    for case in UNTIED:
        stages = em.stage_parameters(shape_of(case), em.Layout(pipeline_model_parallel_size=2, num_gpus=2))
        assert [ranks[0][("pp", case)], ranks[1][("pp", case)]] == stages, case


GPT_13B = em.ModelShape(num_layers=40, hidden_size=5120, num_attention_heads=40, seq_length=2048, vocab_size=50257)


def test_tensor_parallelism_halves_the_matrices_and_keeps_replicated_parameters():
    one, two = (em.stage_parameters(GPT_13B, em.Layout(tensor_model_parallel_size=t, num_gpus=t))[0] for t in (1, 2))
    replicated = GPT_13B.num_layers * (4 * 5120 + 2 * 5120) + 2048 * 5120 + 2 * 5120  # norms, row biases, positions
    assert two == (one - replicated) // 2 + replicated
    assert 0.5 < two / one < 0.51


def test_distributed_optimizer_divides_only_optimizer_state_by_data_parallel_size():
    plain = em.estimate(GPT_13B, em.Layout(tensor_model_parallel_size=8, num_gpus=64))
    sharded = em.estimate(GPT_13B, em.Layout(tensor_model_parallel_size=8, num_gpus=64, use_distributed_optimizer=True))
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8)
    assert (sharded.weights, sharded.gradients) == (plain.weights, plain.gradients)
    assert plain.optimizer == 12 * plain.parameters_per_gpu and plain.weights == 2 * plain.parameters_per_gpu


def test_activations_follow_korthikanti_closed_forms():
    s, b, h, a = 2048, 2, 5120, 40
    for t in (1, 2, 8):
        base = dict(tensor_model_parallel_size=t, num_gpus=t, micro_batch_size=b, flash_attention=False)
        tp_only = em.layer_activation_bytes(GPT_13B, em.Layout(**base))
        assert tp_only == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
        if t > 1:
            sp = em.layer_activation_bytes(GPT_13B, em.Layout(**base, sequence_parallel=True))
            assert sp == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
    fused = em.layer_activation_bytes(GPT_13B, em.Layout(micro_batch_size=b))
    assert fused == pytest.approx(34 * s * b * h)


def test_pipeline_first_stage_holds_p_microbatches_and_interleaving_adds_korthikanti_factor():
    p, v = 4, 2
    layout = em.Layout(pipeline_model_parallel_size=p, num_gpus=p, global_batch_size=64)
    assert em.inflight_layer_microbatches(GPT_13B, layout) == GPT_13B.num_layers  # p stages' worth of L/p layers
    interleaved = dataclasses.replace(layout, num_layers_per_virtual_pipeline_stage=GPT_13B.num_layers // (p * v))
    assert em.inflight_layer_microbatches(GPT_13B, interleaved) == pytest.approx(
        GPT_13B.num_layers * (1 + (p - 1) / (p * v))
    )
    few = dataclasses.replace(layout, global_batch_size=2)  # only 2 micro-batches exist
    assert em.inflight_layer_microbatches(GPT_13B, few) == 2 * GPT_13B.num_layers // p


def test_example_configs_cover_every_size_and_method():
    names = {(path.parent.name, path.stem) for path in CONFIGS}
    sizes = ("gpt-125m", "gpt-350m", "gpt-1.3b", "gpt-13b")
    variants = ("baseline", "prores", "wesar", "normformer", "all")
    assert names == {(size, variant) for size in sizes for variant in variants}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_example_layout_fits_an_80gb_gpu_on_one_node(config):
    args = em.parse_args(["--config", str(config), "--num-gpus", "8"])
    model, layout = em.from_args(args)
    result = em.estimate(model, layout)
    assert result.peak < 0.85 * 80e9, f"{config}: {result.peak / GIB:.1f} GiB"
    size = config.parent.name.removeprefix("gpt-")
    expected = {"125m": 125e6, "350m": 350e6, "1.3b": 1.3e9, "13b": 13e9}[size]
    assert 0.85 < result.total_parameters / expected < 1.15


def test_cli_reads_a_config_and_flags_override_it(tmp_path, capsys):
    config = tmp_path / "model.yaml"
    config.write_text("num-layers: 12\nhidden-size: 768\nnum-attention-heads: 12\nseq-length: 2048\nlr: 6.0e-4\n")
    assert em.main(["--config", str(config), "--bf16"]) == 0  # lr: a driver key the estimator does not use
    out = capsys.readouterr().out
    assert "125,262,336" in out and "2 B/param" in out
    deeper = em.ModelShape(num_layers=24, hidden_size=768, num_attention_heads=12, seq_length=2048, vocab_size=50257)
    assert em.main(["--config", str(config), "--num-layers", "24"]) == 0
    assert f"{em.total_parameters(deeper):,d}" in capsys.readouterr().out
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--config", str(config),
         "--tensor-model-parallel-size", "3", "--num-gpus", "8"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: --num-gpus 8 must be a multiple of --tensor-model-parallel-size x " \
                         "--pipeline-model-parallel-size = 3\n"


@pytest.mark.parametrize("text, key", [("num-layer: 8\n", "num-layer"), ("num-gpus: 8\n", "num-gpus"),
                                       ("vocab-size: 32000\n", "vocab-size")],
                         ids=["misspelt", "estimator-flag", "vocab-size"])
def test_config_key_pretrain_gpt_does_not_know_is_the_drivers_error(tmp_path, capsys, text, key):
    """A key the driver rejects is an error here too, with its wording, also in a later layered file."""
    from megatron_ext.training.arguments import ConfigError, parse_args as driver_parse_args

    base = REPO / "examples" / "tiny_cpu.yaml"  # driver keys the estimator does not use (lr, data-path, ...)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert em.main(["--config", str(base), "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: --config {bad}: unknown flag '{key}'\n"
    with pytest.raises(ConfigError) as driver:
        driver_parse_args(["--config", str(bad)])
    assert captured.err == f"error: {driver.value}\n"


BASE_FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]


@pytest.mark.parametrize("yaml_text, flags, message", [
    ("num-layers: [4\n", [], "--config {config}: cannot read YAML: "),
    ("- num-layers\n", [], "--config {config}: expected a mapping of flag names to values"),
    ("num-layers: four\n", [], "--config {config}: num-layers expects int, got 'four'"),
    ("bf16: 1\n", [], "--config {config}: bf16 must be true or false, got 1"),
    (None, ["--config", "{missing}"], "--config {missing}: No such file or directory"),
    (None, BASE_FLAGS + ["--tensor-model-parallel-size", "2", "--num-gpus", "3"], "--num-gpus 3 must be a multiple"),
    (None, BASE_FLAGS + ["--num-attention-heads", "0"], "--num-attention-heads must be >= 1, got 0"),
    (None, BASE_FLAGS + ["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be >= 1"),
    (None, BASE_FLAGS + ["--num-gpus", "0"], "--num-gpus must be >= 1, got 0"),
    (None, BASE_FLAGS + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "4"],
     "--num-layers 4 is not --pipeline-model-parallel-size 2 x a multiple of "
     "--num-layers-per-virtual-pipeline-stage 4"),
    (None, BASE_FLAGS + ["--pipeline-model-parallel-size", "3"], "--num-layers 4 cannot be split over 3 pipeline"),
], ids=["bad-yaml", "not-a-mapping", "bad-value", "bad-boolean", "missing-file", "layout", "zero-heads",
        "zero-vocab-multiple", "zero-gpus", "virtual-stages", "pipeline-split"])
def test_user_input_errors_say_error_and_exit_2(tmp_path, capsys, yaml_text, flags, message):
    config, missing = tmp_path / "c.yaml", tmp_path / "missing.yaml"
    if yaml_text is not None:
        config.write_text(yaml_text)
        flags = ["--config", str(config)]
    flags = [flag.format(missing=missing) for flag in flags]
    assert em.main(flags) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {message.format(config=config, missing=missing)}")


def test_report_states_the_vocabulary_and_where_it_came_from(capsys):
    tiny = str(REPO / "examples" / "tiny_cpu.yaml")  # a SentencePiece tokenizer: no vocabulary in the file
    assert em.main(["--config", tiny]) == 0
    assert ("vocabulary:                 50,257, padded to 50,304  "
            "(default --vocab-size: GPT-2's; give --vocab-size for your tokenizer)\n") in capsys.readouterr().out
    assert em.main(["--config", tiny, "--vocab-size", "32000"]) == 0
    assert "vocabulary:                 32,000, padded to 32,000  (--vocab-size)\n" in capsys.readouterr().out


def test_repeated_configs_layer_in_order(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("tensor-model-parallel-size: 2\nnum-layers: 20\n")
    base = REPO / "examples" / "configs" / "gpt-13b" / "baseline.yaml"
    args = em.parse_args(["--config", str(base), "--config", str(site), "--num-gpus", "8", "--num-layers", "16"])
    assert (args.hidden_size, args.tensor_model_parallel_size, args.num_layers) == (5120, 2, 16)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_example_config_passes_the_driver_validation_on_its_gpu_layout(config, tmp_path):
    from megatron_ext.training.arguments import parse_args, validate_args

    prefix = tmp_path / "corpus"
    for ext in (".bin", ".idx"):
        prefix.with_suffix(ext).touch()  # validate_args checks that the files exist, nothing more
    args = parse_args(["--config", str(config), "--data-path", str(prefix), "--tokenizer-type", "ByteLevelTokenizer",
                      "--save", str(tmp_path / "checkpoints")])
    validate_args(args, world_size=8, use_cuda=True)
    assert args.data_parallel_size == 8 // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)


def saved_layer_bytes(model: torch.nn.Module, data: dict, module: torch.nn.Module | None = None,
                      micro_batches: int = 1) -> int:
    """Bytes ``module`` (default: the first decoder layer) saves for the backward of
    ``micro_batches`` forwards of ``data`` (all kept alive), parameters and buffers excluded,
    each storage counted once."""
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    layer = model.decoder.layers[0] if module is None else module
    layer.register_forward_pre_hook(lambda *args: hooks.__enter__())
    layer.register_forward_hook(lambda *args: hooks.__exit__(None, None, None))
    losses = [forward_loss(model, data) for _ in range(micro_batches)]  # noqa: F841 (their graphs hold the storages)
    return sum(storages.values())


LAYER_VARIANTS = {
    "baseline": ExtensionConfig(),
    "wesar": ExtensionConfig(wesar=WeSaRConfig()),
    "normformer": ExtensionConfig(normformer=NormFormerConfig()),
    "all": ExtensionConfig(prores=ProResConfig(warmup=2), wesar=WeSaRConfig(), normformer=NormFormerConfig()),
}


@pytest.mark.usefixtures("parallel1")
@pytest.mark.parametrize("fusion", [False, True], ids=["eager", "activation-fusion"])
@pytest.mark.parametrize("variant", LAYER_VARIANTS)
def test_layer_activations_match_what_a_built_bf16_layer_saves(variant, fusion):
    """Korthikanti's per-layer bytes plus the methods' terms against the tensors a bf16 layer
    saves for the backward (CPU, fused attention, dropout off so no masks are saved); with
    megatron's fused activation, NormFormer's FFN norm in the same compiled kernel."""
    extensions = LAYER_VARIANTS[variant]
    config = tiny_config(params_dtype=torch.bfloat16, bf16=True, bias_activation_fusion=fusion)
    model = build(config, extensions).bfloat16()
    micro_batch = 4
    measured = saved_layer_bytes(model, batch(batch_size=micro_batch))
    normformer = extensions.normformer is not None
    shape = dataclasses.replace(
        shape_of("gpt"), wesar=extensions.wesar is not None, normformer_head_scale=normformer,
        normformer_post_attention_norm=normformer, normformer_ffn_norm=normformer,
    )
    estimate = em.layer_activation_bytes(shape, em.Layout(micro_batch_size=micro_batch, activation_fusion=fusion))
    masks = 2 * SEQ * micro_batch * config.hidden_size  # two 1-byte dropout masks, not saved at p = 0
    # The rest (~1.5%) is small per-row state: the attention's log-sum-exp, the norms' statistics.
    assert 1.0 <= measured / (estimate - masks) <= 1.03


@pytest.mark.usefixtures("parallel1")
@pytest.mark.parametrize("micro_batch", [1, 6, 16], ids=["on-activations", "mixed", "folded-into-weights"])
@pytest.mark.parametrize("case", ["gpt+wesar", "gpt+head-scale"])
def test_saved_elements_of_scaled_linears_match_a_built_layer(case, micro_batch):
    """16 x micro-batch token rows against 64 / 128 input features: the estimator's choice between
    saving the effective weight and the scaled activation is the one the layer makes."""
    extensions = {
        "gpt+wesar": ExtensionConfig(wesar=WeSaRConfig()),
        "gpt+head-scale": ExtensionConfig(normformer=NormFormerConfig(post_attention_norm=False, ffn_norm=False)),
    }[case]
    data = batch(batch_size=micro_batch)
    baseline = saved_layer_bytes(build(tiny_config()), data)
    measured = (saved_layer_bytes(build(tiny_config(), extensions), data) - baseline) // 4  # fp32 elements
    shape = dataclasses.replace(shape_of("gpt"), wesar=case == "gpt+wesar", normformer_head_scale=case != "gpt+wesar")
    expected = em.scaled_linear_saved_elements(shape, em.Layout(micro_batch_size=micro_batch))
    config = tiny_config()
    per_feature_scales = 3 * config.hidden_size + 2 * config.ffn_hidden_size  # the gate vectors themselves
    assert expected <= measured <= expected + per_feature_scales


@pytest.mark.usefixtures("parallel1")
@pytest.mark.parametrize("case", ["gpt+wesar", "gpt+head-scale", "gpt+both"])
def test_scales_applied_once_per_step_hold_one_scaled_weight_for_all_micro_batches(case):
    """Two micro batches of 1 x 16 token rows (fewer than any linear's 64 / 128 input features:
    per micro batch every scale would go on the activation) inside once_per_step: the layer
    holds the estimator's scaled weights once and saves no scaled product per micro batch."""
    from megatron_ext.linear_scaling import once_per_step, step_scales

    wesar, head_scale = case != "gpt+head-scale", case != "gpt+wesar"
    normformer = NormFormerConfig(post_attention_norm=False, ffn_norm=False) if head_scale else None
    extensions = ExtensionConfig(wesar=WeSaRConfig() if wesar else None, normformer=normformer)
    data = batch(batch_size=1)
    baseline = saved_layer_bytes(build(tiny_config()), data, micro_batches=2)
    model = build(tiny_config(), extensions)
    with once_per_step(step_scales([model]), 2):
        measured = (saved_layer_bytes(model, data, micro_batches=2) - baseline) // 4  # fp32 elements
        for scale in step_scales([model]):
            scale.scaled = None  # no backward follows: leave the step without its check
    shape = dataclasses.replace(shape_of("gpt"), wesar=wesar, normformer_head_scale=head_scale)
    layout = em.Layout(micro_batch_size=1, global_batch_size=2)
    assert layout.scales_once_per_step and em.scaled_linear_saved_elements(shape, layout) == 0
    expected = em.scaled_weight_elements(shape, layout)
    config = tiny_config()
    weights = 4 * config.hidden_size ** 2 + 2 * config.hidden_size * config.ffn_hidden_size
    assert expected == (weights if wesar else 0) + (config.hidden_size ** 2 if head_scale else 0)
    per_feature_scales = 2 * (3 * config.hidden_size + config.ffn_hidden_size)  # per micro batch, saved for d s
    assert expected <= measured <= expected + per_feature_scales


@pytest.mark.usefixtures("parallel1")
@pytest.mark.parametrize("micro_batch", [2, 8], ids=["on-logits", "folded-into-weight"])
def test_wesar_output_layer_saves_what_the_estimator_adds_to_the_logits(micro_batch):
    """16 x micro-batch token rows against 64 hidden features: the output layer's gate saves
    the ungated logits or the effective weight, and the estimator's last stage adds that."""
    data = batch(batch_size=micro_batch)
    saved = {}
    for case in ("gpt", "gpt+wesar"):
        model = build_case(case)
        saved[case] = saved_layer_bytes(model, data, model.output_layer)
    measured = (saved["gpt+wesar"] - saved["gpt"]) // 4  # fp32 elements
    layout = em.Layout(micro_batch_size=micro_batch, precision="fp32")
    expected = (em.logits_bytes(shape_of("gpt+wesar"), layout) - em.logits_bytes(shape_of("gpt"), layout)) / 2
    assert expected == VOCAB * min(tiny_config().hidden_size, SEQ * micro_batch)
    assert expected <= measured <= expected + 1  # + the gate


class AllocatedBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops allocate while the mode is on (outputs sharing no
    input's storage), each released when its tensor is."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for tensor in pytree.tree_leaves(out):
            if torch.is_tensor(tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                nbytes = tensor.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._release, nbytes)
        return out


@pytest.mark.parametrize("kernel", em.ADAM_KERNELS)
def test_optimizer_step_temporaries_are_what_torch_adamw_allocates(kernel):
    """The estimator's bytes per parameter against the peak of what one AdamW step allocates
    over fp32 parameters (the second step: the first creates the state)."""
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((300, 200), (200,), (1000, 50), ())]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **{kernel: True})
    for _ in range(2):
        for param in params:
            param.grad = torch.full_like(param, 1e-3)
        mode = AllocatedBytes()
        with mode:
            optimizer.step()
    per_parameter = em.optimizer_step_bytes_per_parameter(em.Layout(adam_kernel=kernel))
    assert mode.peak == per_parameter * sum(p.numel() for p in params)


def test_peak_is_model_state_plus_the_larger_phase():
    """The 13B layer shape at 18 layers (bench/memory_13b.py's largest run on an H200): the
    foreach optimizer step's temporaries outgrow the activations; a fused Adam has none;
    the distributed optimizer divides them by the data-parallel size."""
    model = dataclasses.replace(GPT_13B, num_layers=18, ffn_hidden_size=20480)
    fused = em.estimate(model, em.Layout(micro_batch_size=2))
    foreach = em.estimate(model, em.Layout(micro_batch_size=2, adam_kernel="foreach"))
    assert fused.optimizer_step_temporaries == 0 and fused.peak_phase == "forward-backward"
    assert fused.peak == fused.model_state + fused.activations
    assert foreach.optimizer_step_temporaries == 4 * foreach.parameters_per_gpu > foreach.activations
    assert foreach.peak_phase == "optimizer step"
    assert foreach.peak == foreach.model_state + foreach.optimizer_step_temporaries
    sharded = em.estimate(model, em.Layout(micro_batch_size=2, adam_kernel="foreach", num_gpus=8,
                                           use_distributed_optimizer=True))
    assert sharded.optimizer_step_temporaries == pytest.approx(foreach.optimizer_step_temporaries / 8)
    with pytest.raises(ValueError, match="--adam-kernel"):
        em.Layout(adam_kernel="apex")


@pytest.mark.parametrize("flags, fused", [
    ([], True), (["--no-bias-gelu-fusion"], False), (["--disable-bias-linear"], False),
    (["--swiglu", "--no-bias-gelu-fusion"], True), (["--swiglu", "--no-bias-swiglu-fusion"], False),
])
def test_activation_fusion_follows_the_drivers_flags(flags, fused):
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--normformer"]
    model, layout = em.from_args(em.parse_args(base + flags))
    assert layout.activation_fusion is fused
    fused_bytes = em.layer_activation_bytes(model, dataclasses.replace(layout, activation_fusion=True))
    eager_bytes = em.layer_activation_bytes(model, dataclasses.replace(layout, activation_fusion=False))
    assert eager_bytes - fused_bytes == 2 * 32 * model.ffn_size  # the FFN norm's input, one micro-batch

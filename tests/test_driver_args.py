"""pretrain_gpt.py's command line: rejected configurations, YAML merge, launcher environments."""

from __future__ import annotations

import pytest
from driver_utils import byte_dataset, tiny_flags  # noqa: F401

import pretrain_gpt
from megatron_ext.training.arguments import ConfigError, parse_args, validate_args
from megatron_ext.training.configs import extension_config
from megatron_ext.training.distributed import detect_environment, expand_nodelist

REJECTED = [
    # (overrides, world size, cuda, words the message must contain)
    (dict(num_layers=3, pipeline_model_parallel_size=2), 2, True, ["--num-layers 3", "--pipeline-model-parallel-size 2"]),
    (dict(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3), 2, True,
     ["--num-layers-per-virtual-pipeline-stage 3"]),
    (dict(num_layers=5, pipeline_model_parallel_size=3, decoder_first_pipeline_num_layers=2), 3, True,
     ["--decoder-first/last-pipeline-num-layers"]),
    (dict(num_attention_heads=6, hidden_size=48, tensor_model_parallel_size=4), 4, True,
     ["--num-attention-heads 6", "--tensor-model-parallel-size 4"]),
    (dict(num_query_groups=2, tensor_model_parallel_size=4), 4, True, ["--num-query-groups 2", "--tensor-model-parallel-size 4"]),
    (dict(global_batch_size=6, micro_batch_size=4), 1, False, ["--global-batch-size 6", "--micro-batch-size 4"]),
    (dict(global_batch_size=12, micro_batch_size=4), 2, False, ["data-parallel size 2"]),
    (dict(seq_length=64, max_position_embeddings=32), 1, False, ["--seq-length 64", "--max-position-embeddings 32"]),
    (dict(tokenizer_type="SentencePieceTokenizer"), 1, False, ["--tokenizer-model"]),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nonexistent/tok.model"), 1, False, ["/nonexistent/tok.model"]),
    (dict(data_path="/nonexistent/prefix"), 1, False, ["--data-path", "/nonexistent/prefix.bin"]),
    (dict(pipeline_model_parallel_size=2), 2, False, ["--pipeline-model-parallel-size > 1", "GPU path only"]),
    (dict(bf16=True), 1, False, ["--bf16", "GPU path only"]),
    (dict(prores_warmup=0, prores=True), 1, False, ["--prores-warmup"]),
    (dict(prores_schedule="equal"), 1, False, ["--prores-schedule", "without --prores"]),
    (dict(normformer_no_ffn_norm=True), 1, False, ["--normformer-no-ffn-norm", "without --normformer"]),
    (dict(wesar_placement="weight"), 1, False, ["--wesar-placement", "without --wesar"]),
    (dict(sequence_parallel=True), 1, True, ["--sequence-parallel", "--tensor-model-parallel-size"]),
    (dict(sequence_parallel=True, tensor_model_parallel_size=2), 2, False, ["--sequence-parallel", "GPU path only"]),
    (dict(world=3), 3, False, ["world size 3"]),
    (dict(lr_warmup_iters=20, train_iters=12), 1, False,
     ["--lr-warmup-iters 20", "--lr-decay-iters 12 (its default, --train-iters)"]),
    (dict(overlap_param_gather=True), 1, True, ["--overlap-param-gather", "--use-distributed-optimizer"]),
    (dict(ddp_bucket_size=1000), 1, True, ["--ddp-bucket-size needs --overlap-grad-reduce"]),
    (dict(ddp_bucket_size=0, overlap_grad_reduce=True), 1, True, ["--ddp-bucket-size", "got 0"]),
    (dict(num_layers=None), 1, False, ["--num-layers"]),
    (dict(num_layers=4, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
          global_batch_size=16, no_overlap_p2p_communication=True), 2, True, ["--no-overlap-p2p-communication"]),
    (dict(fp16=True, min_loss_scale=0), 1, True, ["--min-loss-scale"]),
    (dict(fp16=True, loss_scale=-1), 1, True, ["--loss-scale must be > 0"]),
    (dict(dist_ckpt_optim_fully_reshardable=True), 1, True, ["--dist-ckpt-optim-fully-reshardable needs --use-distributed"]),
    (dict(wesar=True, wesar_gate_weight_decay=1.0), 1, True, ["--wesar-gate-weight-decay 1.0", "--wesar-gate-lr-mult 1.0"]),
    (dict(gradient_accumulation_fusion=True), 1, False, ["--gradient-accumulation-fusion", "GPU path only"]),
    (dict(gradient_accumulation_fusion=True), 1, True, ["--gradient-accumulation-fusion", "fused_weight_gradient_mlp_cuda"]),
    (dict(bias_gelu_fusion=True, swiglu=True), 1, True, ["--bias-gelu-fusion", "--bias-swiglu-fusion"]),
    (dict(bias_gelu_fusion=True, disable_bias_linear=True), 1, False, ["--bias-gelu-fusion", "--disable-bias-linear"]),
    (dict(bias_swiglu_fusion=True), 1, True, ["--bias-swiglu-fusion needs --swiglu"]),
    (dict(normformer=True, normformer_no_head_scale=True, normformer_no_post_attention_norm=True,
          normformer_no_ffn_norm=True), 1, False, ["switches every NormFormer part off"]),
    (dict(wesar=True, wesar_gate_lr_mult=0), 1, False, ["--wesar-gate-lr-mult must be > 0, got 0"]),
    (dict(wesar=True, wesar_gate_weight_decay=-1), 1, False, ["--wesar-gate-weight-decay must be >= 0, got -1"]),
    (dict(save=__file__), 1, False, [f"--save {__file__} is a file; expected a directory"]),
    (dict(tensorboard_dir=__file__), 1, False, ["--tensorboard-dir", "is a file"]),
    (dict(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=True), 1, False,
     ["--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other"]),
    (dict(use_checkpoint_opt_param_scheduler=True, override_checkpoint_methods=True), 1, False,
     ["--use-checkpoint-opt_param-scheduler", "--override-checkpoint-methods would change"]),
    (dict(recompute_activations=True, recompute_granularity="full"), 1, True,
     ["--recompute-activations", "--recompute-granularity full exclude each other"]),
    (dict(recompute_granularity="full"), 1, True, ["--recompute-granularity full needs --recompute-method"]),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3, num_layers=4), 1, True,
     ["--recompute-num-layers 3 must divide the layers of every (virtual) pipeline stage (4)"]),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2, num_layers=6,
          pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1, global_batch_size=4), 2, True,
     ["--recompute-num-layers 2", "(1, 5)"]),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3), 1, True,
     ["--recompute-num-layers 3 must be between 1 and the layers of a (virtual) pipeline stage (2)"]),
    (dict(recompute_method="uniform"), 1, True, ["--recompute-method needs --recompute-granularity full"]),
    (dict(recompute_granularity="selective", recompute_num_layers=1), 1, True,
     ["--recompute-num-layers needs --recompute-granularity full"]),
    (dict(recompute_modules="core_attn"), 1, True, ["--recompute-modules needs --recompute-granularity selective"]),
    (dict(recompute_activations=True, recompute_modules="mlp"), 1, True,
     ["--recompute-modules mlp needs --disable-bias-linear"]),
    (dict(recompute_activations=True, recompute_modules="layernorm"), 1, True,
     ["--recompute-modules layernorm needs Transformer Engine"]),
    (dict(recompute_activations=True), 1, False, ["--recompute-granularity selective", "GPU path only"]),
]


@pytest.mark.parametrize("overrides,world,cuda,words", REJECTED)
def test_rejected_configuration_names_the_flags(byte_dataset, overrides, world, cuda, words):
    overrides = dict(overrides)
    if overrides.pop("world", None) == 3:
        overrides.update(tensor_model_parallel_size=2)
    args = parse_args(tiny_flags(byte_dataset, **overrides))
    with pytest.raises(ConfigError) as info:
        validate_args(args, world, cuda)
    for word in words:
        assert word in str(info.value)


def test_a_data_prefix_without_the_tools_suffix_is_pointed_to_it(byte_dataset):
    args = parse_args(tiny_flags(byte_dataset, data_path=byte_dataset.removesuffix("_text_document")))
    with pytest.raises(ConfigError) as info:
        validate_args(args, 1, False)
    assert str(info.value).endswith(f".bin not found (did you mean {byte_dataset}?)")


@pytest.mark.parametrize("fused_adam", [False, True])
def test_fully_reshardable_optimizer_checkpoints_need_a_fused_adam(byte_dataset, monkeypatch, fused_adam):
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", fused_adam)
    args = parse_args(tiny_flags(byte_dataset, use_distributed_optimizer=True, dist_ckpt_optim_fully_reshardable=True))
    if fused_adam:
        validate_args(args, 1, True)
    else:
        with pytest.raises(ConfigError, match="--dist-ckpt-optim-fully-reshardable needs Transformer Engine or Apex"):
            validate_args(args, 1, True)


def test_main_reports_a_config_error_before_any_compute(byte_dataset, capsys, monkeypatch):
    import megatron_ext.training.distributed as distributed

    def no_world(*a, **k):
        raise AssertionError("process group created before validation")

    monkeypatch.setattr(distributed, "init_process_group", no_world)
    code = pretrain_gpt.main(tiny_flags(byte_dataset, global_batch_size=6))
    assert code == pretrain_gpt.EXIT_CONFIG_ERROR
    assert "--global-batch-size 6" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["config", "tokenizer", "model-for-byte-level"])
def test_main_reports_a_bad_config_file_or_tokenizer_before_any_compute(tmp_path, byte_dataset, capsys, monkeypatch,
                                                                       problem):
    import megatron_ext.training.distributed as distributed

    monkeypatch.setattr(distributed, "init_process_group", lambda *a, **k: pytest.fail("process group created"))
    if problem == "config":
        config = tmp_path / "typo.yaml"
        config.write_text("num-layer: 2\n")
        argv, words = ["--config", str(config)], [f"--config {config}: unknown flag 'num-layer'"]
    else:
        model = tmp_path / "tok.model"
        model.write_bytes(b"not a sentencepiece model")
        if problem == "tokenizer":
            argv = tiny_flags(byte_dataset, tokenizer_type="SentencePieceTokenizer", tokenizer_model=model)
            words = [f"{model}: cannot load SentencePiece model"]
        else:
            argv = tiny_flags(byte_dataset, tokenizer_model=model)
            words = [f"ByteLevelTokenizer takes no --tokenizer-model (got {model})"]
    assert pretrain_gpt.main(argv) == pretrain_gpt.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("swiglu", [False, True], ids=["gelu", "swiglu"])
def test_fusions_default_to_megatron_lm_on_cuda_and_off_on_the_cpu_path(byte_dataset, monkeypatch, cuda, swiglu):
    import megatron_ext.training.arguments as arguments
    from megatron_ext.training.configs import transformer_config

    monkeypatch.setattr(arguments, "grad_accumulation_fusion_available", lambda: True)
    args = parse_args(tiny_flags(byte_dataset, swiglu=swiglu or None))
    validate_args(args, 1, cuda)
    config = transformer_config(args)
    assert config.bias_dropout_fusion is cuda and config.bias_activation_fusion is cuda
    assert (args.bias_swiglu_fusion, args.bias_gelu_fusion) == ((cuda, False) if swiglu else (False, cuda))
    assert config.gradient_accumulation_fusion is cuda
    assert not config.weight_scale_fusion  # megatron-ext's own, off unless asked for
    off = parse_args(tiny_flags(byte_dataset, swiglu=swiglu or None) + ["--no-bias-dropout-fusion", "--no-bias-gelu-fusion",
                                                                 "--no-bias-swiglu-fusion"])
    validate_args(off, 1, cuda)
    config = transformer_config(off)
    assert not config.bias_dropout_fusion and not config.bias_activation_fusion
    on = parse_args(tiny_flags(byte_dataset) + ["--bias-dropout-fusion", "--weight-scale-fusion"])  # compiled on the CPU too
    validate_args(on, 1, False)
    assert transformer_config(on).bias_dropout_fusion and transformer_config(on).weight_scale_fusion


def test_yaml_config_is_merged_and_the_command_line_wins(tmp_path, byte_dataset):
    config = tmp_path / "run.yaml"
    config.write_text(f"num-layers: 4\nhidden_size: 64\nprores: true\nprores-schedule: equal\ndata-path: {byte_dataset}\n")
    args = parse_args(["--config", str(config), "--num-layers", "2"])
    assert (args.num_layers, args.hidden_size, args.prores, args.prores_schedule) == (2, 64, True, "equal")
    assert args.data_path == [byte_dataset]


def test_several_yaml_configs_layer_in_order(tmp_path, byte_dataset):
    model = tmp_path / "model.yaml"
    model.write_text(f"num-layers: 4\nhidden-size: 64\nlr: 1.0e-3\nprores: true\nprores-warmup: 20\n"
                     f"data-path: {byte_dataset}\n")
    site = tmp_path / "site.yaml"
    site.write_text("lr: 2.0e-3\nnum-layers: 6\nprores: false\n")
    args = parse_args(["--config", str(model), "--config", str(site), "--num-layers", "2"])
    assert (args.num_layers, args.hidden_size, args.lr) == (2, 64, 2.0e-3)  # command line > site > model
    assert (args.prores, args.prores_warmup) == (False, None)  # the later file switched ProRes off
    reverse = parse_args(["--config", str(site), "--config", str(model)])
    assert (reverse.num_layers, reverse.lr, reverse.prores, reverse.prores_warmup) == (4, 1.0e-3, True, 20)


def test_a_model_free_tokenizer_on_the_command_line_drops_the_files_tokenizer_model(tmp_path, byte_dataset):
    config = tmp_path / "run.yaml"
    config.write_text("tokenizer-type: SentencePieceTokenizer\ntokenizer-model: tok.model\n")
    byte_level = parse_args(["--config", str(config), "--tokenizer-type", "ByteLevelTokenizer"])
    assert (byte_level.tokenizer_type, byte_level.tokenizer_model) == ("ByteLevelTokenizer", None)
    kept = parse_args(["--config", str(config), "--tokenizer-type", "HuggingFaceTokenizer"])
    assert kept.tokenizer_model == "tok.model"
    typed = parse_args(["--config", str(config), "--tokenizer-type", "ByteLevelTokenizer", "--tokenizer-model", "x"])
    assert typed.tokenizer_model == "x"  # given together on the command line: build_tokenizer rejects it


def test_method_options_reach_the_extension_config(byte_dataset):
    args = parse_args(tiny_flags(byte_dataset) + ["--wesar", "--wesar-placement", "output", "--prores"])
    validate_args(args, 1, False)
    extensions = extension_config(args)
    assert extensions.wesar.placement == "output" and extensions.prores.warmup == 1000
    args = parse_args(tiny_flags(byte_dataset) + ["--wesar"])
    validate_args(args, 1, False)
    assert extension_config(args).wesar.placement == "auto"


def test_command_line_switches_off_what_the_yaml_switches_on(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("bf16: true\nprores: true\nwesar: true\nswiglu: true\n")
    on = parse_args(["--config", str(config)])
    assert (on.bf16, on.prores, on.wesar, on.swiglu) == (True, True, True, True)
    off = parse_args(["--config", str(config), "--no-bf16", "--no-prores", "--no-swiglu"])
    assert (off.bf16, off.prores, off.wesar, off.swiglu) == (False, False, True, False)


def test_switching_a_method_off_drops_its_options_from_the_yaml_only(tmp_path, byte_dataset):
    config = tmp_path / "run.yaml"
    config.write_text("prores: true\nprores-warmup: 20\nwesar: true\nwesar-std: 0.01\nnormformer: true\n"
                      "normformer-no-ffn-norm: true\n")
    off = parse_args(tiny_flags(byte_dataset) + ["--config", str(config), "--no-prores", "--no-wesar"])
    validate_args(off, 1, False)
    assert (off.prores, off.prores_warmup, off.wesar, off.wesar_std) == (False, 1000, False, 0.006325)
    assert off.normformer and off.normformer_no_ffn_norm  # still on, with the file's option
    on = parse_args(tiny_flags(byte_dataset) + ["--config", str(config)])
    validate_args(on, 1, False)
    assert (on.prores_warmup, on.wesar_std) == (20, 0.01)
    typed = parse_args(tiny_flags(byte_dataset) + ["--config", str(config), "--no-prores", "--prores-warmup", "5"])
    with pytest.raises(ConfigError, match="--prores-warmup given without --prores"):
        validate_args(typed, 1, False)


@pytest.mark.parametrize("text,message", [("nonsense-flag: 3\n", "unknown flag"), ("prores: 3\n", "true or false"),
                                          ("prores-schedule: cosine\n", "must be one of"),
                                          ("recompute-modules: [core_attn, attention]\n",
                                           "recompute-modules must be one or more of core_attn, mlp, layernorm")])
def test_yaml_config_errors(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(config)])


def test_help_groups_flags_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for heading in ("model:", "parallelism:", "training:", "data:", "checkpoints:", "logging:", "NormFormer:"):
        assert heading in out
    assert "(default: 1234)" in out and "(default: 10000)" in out  # --seed, --rotary-base (no help text)
    assert "(default: None)" not in out  # required flags and those validate_args fills in


def test_slurm_environment_without_torchrun_variables():
    env = detect_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                              "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 8, 1, "gpu07", "slurm")
    assert env.master_port == 20000 + 123456 % 20000
    torchrun = detect_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                                   "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (torchrun.rank, torchrun.world_size, torchrun.master_port, torchrun.launcher) == (1, 2, 1234, "torchrun")
    assert detect_environment({}).world_size == 1


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07],login1,a[9-10]") == ["node01", "node02", "node03", "node07", "login1", "a9", "a10"]
    assert expand_nodelist("single") == ["single"]

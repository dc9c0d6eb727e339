"""The GPU path of pretrain_gpt.py (megatron-core's DDP, optimizers, pipeline schedules and
distributed checkpoints) run on the CPU under emulated CUDA (tests/emulated_cuda.py).

Each run is compared with a reference it must equal: the CPU engine, one rank, or the
uninterrupted run a checkpoint was taken from. CUDA kernels, NCCL and speed are not covered.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from driver_utils import METHOD_FLAGS, REPO, byte_dataset, launch_env, read_metrics, tiny_flags  # noqa: F401
from mp_utils import _free_port

import pretrain_gpt
from megatron_ext.training.checkpointing import TRACKER, checkpoint_dir

# Weights drawn on the CPU, as on the CPU path. The fused kernels (torch.compile'd on a
# GPU by default) are switched off, for exact comparisons, except in the bf16 test.
EAGER = ["--no-bias-dropout-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion"]
RUN = dict(train_iters=6, save_interval=3, eval_iters=0, lr_decay_iters=6)

COUNTING = REPO / "tests" / "counting_forwards.py"
RECOMPUTE = {
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
    "selective": ["--recompute-activations"],
}


def emulated(nproc: int, flags: list[str], expect: int = 0, fused: bool = False, script: Optional[Path] = None,
             env: Optional[dict[str, str]] = None) -> str:
    """Run pretrain_gpt.py (or ``script``, which runs it) on the GPU path with ``nproc`` ranks
    (eager unless ``fused``; ``env`` added to the environment); its output, stderr and
    stdout interleaved as printed."""
    runner = [str(REPO / "tests" / "emulated_cuda.py"), *([str(script)] if script else [])]
    if nproc > 1:
        runner = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_port", str(_free_port()), *runner]
    run = subprocess.run([sys.executable, *runner, *flags, "--use-cpu-initialization", *([] if fused else EAGER)],
                         env={**launch_env(), **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    output = run.stdout
    assert run.returncode == expect, output[-4000:]
    assert "GPU (NCCL) path" in output or expect != 0
    return output


def history(directory: Path) -> dict[int, tuple[float, float]]:
    """Iteration -> (lm loss, grad norm) of the updated iterations in a run's metrics.jsonl."""
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in read_metrics(directory)
            if r.get("lm_loss") is not None and "event" not in r}


def validation(directory: Path) -> dict[int, float]:
    """Iteration -> validation loss in a run's metrics.jsonl."""
    return {r["iteration"]: r["val_loss"] for r in read_metrics(directory) if "val_loss" in r}


def assert_same(run: dict, reference: dict, iterations, rel: float) -> None:
    for it in iterations:
        assert run[it] == pytest.approx(reference[it], rel=rel), it


def layer_norms(directory: Path) -> list[dict[str, float]]:
    """The per-layer grad norms of each logged iteration of a run."""
    return [{k: v for k, v in r.items() if k.startswith("grad_norm/layer_")} for r in read_metrics(directory)
            if "event" not in r]


def resume_from(source: Path, iteration: int, target: Path) -> Path:
    """A directory holding only ``source``'s checkpoint at ``iteration``, as the latest."""
    target.mkdir()
    shutil.copytree(checkpoint_dir(str(source), iteration), checkpoint_dir(str(target), iteration))
    (target / TRACKER).write_text(f"{iteration}\n")
    return target


WESAR_OPTIONS = ["--wesar-gate-lr-mult", "2", "--wesar-gate-weight-decay", "0.05"]


def test_gpu_engine_equals_the_cpu_engine_with_all_methods(tmp_path, byte_dataset):
    """megatron-core's DDP, Float32 optimizer (WeSaR's own gate group) and schedule against
    the CPU engine's torch AdamW: the same losses and grad norms (megatron-core's grad norm
    and clip through the foreach stand-ins for its multi-tensor fallbacks, its torch AdamW
    with the fused kernel)."""
    flags = METHOD_FLAGS + WESAR_OPTIONS
    output = emulated(1, tiny_flags(byte_dataset, save=tmp_path / "gpu", **RUN) + flags)
    assert "clip_grads.l2_norm_impl, megatron.core.optimizer.clip_grads.multi_tensor_scale_impl" in output
    assert "it runs torch's fused kernel" in output
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path / "cpu", **RUN) + flags) == 0
    gpu, cpu = history(tmp_path / "gpu"), history(tmp_path / "cpu")
    assert sorted(gpu) == list(range(1, 7))
    assert_same(gpu, cpu, range(1, 7), rel=1e-5)
    layers, cpu_layers = layer_norms(tmp_path / "gpu"), layer_norms(tmp_path / "cpu")
    assert len(layers[-1]) == 2 and all(v > 0 for v in layers[-1].values())  # read from DDP's main_grad
    for gpu_record, cpu_record in zip(layers, cpu_layers):
        assert gpu_record == pytest.approx(cpu_record, rel=1e-5)


# fp16: overflows must not count as failed steps, so one failed step would stop the run.
HALF = {"bf16": ["--bf16"], "fp16": ["--fp16", "--initial-loss-scale", "65536", "--max-consecutive-skips", "1"]}


@pytest.mark.parametrize("precision", list(HALF))
def test_half_precision_with_all_methods_saves_and_resumes_exactly(tmp_path, byte_dataset, precision):
    """Float16Module and the mixed-precision optimizer, the WeSaR gates cast with the
    model (their fp32 copies in the optimizer); bf16 with the driver's CUDA defaults (the
    torch.compile'd fused kernels) and --weight-scale-fusion: a resume repeats the
    uninterrupted run. bf16 stays near the fp32 CPU run; fp16 starts above the gradients' range, skips the overflowing
    steps while the loss scale comes down, and goes on (not a failure). The fused kernels
    are compiled in the first iteration and never again (a recompile per layer or per
    step would soon exceed dynamo's cache and fall back to eager code)."""
    fused = precision == "bf16"
    flags = METHOD_FLAGS + WESAR_OPTIONS + HALF[precision] + (["--weight-scale-fusion"] if fused else [])
    whole = tmp_path / "whole"
    output = emulated(1, tiny_flags(byte_dataset, save=whole, **RUN) + flags, fused=fused,
                      env={"TORCH_LOGS": "recompiles"})
    first_iteration = output.index(" iteration        1/")
    assert "Recompiling function" not in output[first_iteration:]
    resumed = tmp_path / "resumed"
    emulated(1, tiny_flags(byte_dataset, load=resume_from(whole, 3, resumed), save=resumed, **RUN) + flags, fused=fused)
    half = history(whole)
    assert_same(history(resumed), half, [it for it in range(4, 7) if it in half], rel=1e-6)
    if precision == "fp16":
        skipped = [r["iteration"] for r in read_metrics(whole) if r.get("skipped_iterations")]
        assert skipped and max(skipped) == 6 and len(half) >= 3
        return
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path / "fp32", **RUN) + METHOD_FLAGS + WESAR_OPTIONS) == 0
    fp32 = history(tmp_path / "fp32")
    for it in range(1, 7):
        assert half[it][0] == pytest.approx(fp32[it][0], rel=2e-3), it


def test_fp16_grad_norms_are_of_the_unscaled_gradients(tmp_path, byte_dataset):
    """fp16 with a static loss scale of 1024, WeSaR gates left out of the clip (the
    driver's own clip over DDP's main_grad, not megatron's): the logged grad norm and
    the per-layer grad norms are the fp32 run's within fp16 rounding, not 1024 times them."""
    flags = METHOD_FLAGS + ["--wesar-exclude-gates-from-clip", "--clip-grad", "0.5"]
    run = dict(RUN, save_interval=None)
    half, fp32 = tmp_path / "fp16", tmp_path / "fp32"
    emulated(1, tiny_flags(byte_dataset, tensorboard_dir=half, **run) + flags + ["--fp16", "--loss-scale", "1024"])
    assert pretrain_gpt.main(tiny_flags(byte_dataset, tensorboard_dir=fp32, **run) + flags) == 0
    assert_same(history(half), history(fp32), range(1, 7), rel=1e-2)
    assert all(norm > 0.5 for _, norm in history(fp32).values())  # every step clipped
    half_layers, fp32_layers = layer_norms(half), layer_norms(fp32)
    assert len(half_layers) == 6 and all(len(record) == 2 for record in half_layers)
    for half_record, fp32_record in zip(half_layers, fp32_layers):
        assert half_record == pytest.approx(fp32_record, rel=1e-2)


def test_distributed_optimizer_with_overlap_equals_one_rank_and_resumes_on_another_dp_size(tmp_path, byte_dataset):
    """DP=2 with the distributed optimizer and overlapped grad reduce / param gather
    equals one CPU rank accumulating the same two micro batches; its checkpoint resumes
    on one rank (the DP-sharded optimizer state re-sharded) to the same losses."""
    run = dict(RUN, global_batch_size=8)
    dopt = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    dp2 = tmp_path / "dp2"
    emulated(2, tiny_flags(byte_dataset, save=dp2, **run) + METHOD_FLAGS + dopt)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path / "cpu", **run) + METHOD_FLAGS) == 0
    assert_same(history(dp2), history(tmp_path / "cpu"), range(1, 7), rel=1e-5)

    dp1 = resume_from(dp2, 3, tmp_path / "dp1")
    emulated(1, tiny_flags(byte_dataset, load=dp1, save=dp1, **run) + METHOD_FLAGS + ["--use-distributed-optimizer"])
    assert_same(history(dp1), history(dp2), range(4, 7), rel=1e-5)
    output = emulated(1, tiny_flags(byte_dataset, load=dp1, **dict(run, save_interval=None)) + METHOD_FLAGS,
                      expect=pretrain_gpt.EXIT_CONFIG_ERROR)
    assert "saved with --use-distributed-optimizer and this run does not use it" in output


OLDER = REPO / "tests" / "older_megatron_ext.py"


def test_distributed_optimizer_state_is_not_loaded_into_parameters_registered_in_another_order(tmp_path, byte_dataset):
    """'dp_reshardable' state is laid out in each bucket's parameter order, which megatron-core
    does not store: a checkpoint loaded by code that registers the same parameters in another
    order (here megatron-ext before NormFormer's norms were registered in forward order) would
    load other parameters' main weights and moments into each: the first resumed loss moved
    from 5.667 to 5.725 without the check. The order is saved and checked; a checkpoint of
    that older code, which did not save it, is refused too. --no-load-optim loads the model."""
    run = dict(RUN, train_iters=2, save_interval=2)
    resume = dict(run, train_iters=4, save_interval=None)
    flags = METHOD_FLAGS + ["--use-distributed-optimizer"]
    ours, older = tmp_path / "ours", tmp_path / "older"
    emulated(1, tiny_flags(byte_dataset, save=ours, **run) + flags)
    output = emulated(1, ["reordered", *tiny_flags(byte_dataset, load=ours, **resume), *flags],
                      expect=pretrain_gpt.EXIT_CONFIG_ERROR, script=OLDER)
    assert "in the order of the bucket's parameters" in output and "post_attention_norm" in output
    resumed = emulated(1, ["reordered", *tiny_flags(byte_dataset, load=ours, **resume), *flags, "--no-load-optim"],
                       script=OLDER)
    assert "iteration        4/" in resumed

    emulated(1, ["unrecorded", *tiny_flags(byte_dataset, save=older, **run), *flags], script=OLDER)
    output = emulated(1, tiny_flags(byte_dataset, load=older, **resume) + flags, expect=pretrain_gpt.EXIT_CONFIG_ERROR)
    assert "does not record the order" in output


def test_the_schedule_continues_on_the_distributed_optimizer(tmp_path, byte_dataset):
    """As on the CPU path (tests/test_driver_resume.py): --no-load-optim continues the
    learning rate, and --override-opt_param-scheduler puts this run's --lr into megatron-core's
    optimizer groups, whose saved LR bounds its load_state_dict restores."""
    flags = METHOD_FLAGS + ["--use-distributed-optimizer"]
    whole = tmp_path / "whole"
    emulated(1, tiny_flags(byte_dataset, save=whole, **RUN) + flags)
    reference = {r["iteration"]: r["lr"] for r in read_metrics(whole) if "lr" in r}
    for name, extra, ratio in (("no-optim", ["--no-load-optim"], 1.0),
                               ("override", ["--override-opt_param-scheduler", "--lr", "1e-3"], 1 / 3)):
        resumed = resume_from(whole, 3, tmp_path / name)
        emulated(1, tiny_flags(byte_dataset, load=resumed, save=resumed, **RUN) + flags + extra)
        lrs = {r["iteration"]: r["lr"] for r in read_metrics(resumed) if "lr" in r}
        assert [lrs[it] for it in range(4, 7)] == pytest.approx([ratio * reference[it] for it in range(4, 7)]), name


@pytest.mark.parametrize("optimizer", [["--bf16"], ["--use-distributed-optimizer"]], ids=["float16", "distributed"])
def test_state_of_the_former_unfused_adamw_resumes_under_the_fused_kernel(tmp_path, byte_dataset, optimizer):
    """A checkpoint of megatron-ext before torch's AdamW was fused (its groups saved with
    ``fused`` off, the steps on the host) resumes: iterations 4-6 are the fused run's,
    within the two kernels' rounding, through megatron-core's Float16 optimizer (``common_step``)
    and its distributed optimizer (the steps kept in the param groups)."""
    flags = METHOD_FLAGS + optimizer
    whole, older = tmp_path / "whole", tmp_path / "older"
    emulated(1, tiny_flags(byte_dataset, save=whole, **RUN) + flags)
    emulated(1, ["unfused", *tiny_flags(byte_dataset, save=older, **dict(RUN, train_iters=3)), *flags], script=OLDER)
    resumed = tmp_path / "resumed"
    output = emulated(1, tiny_flags(byte_dataset, load=resume_from(older, 3, resumed), save=resumed, **RUN) + flags)
    assert "it runs torch's fused kernel" in output
    assert_same(history(resumed), history(whole), range(4, 7), rel=1e-5)


def test_tensor_parallel_2_with_sequence_parallelism_equals_1_and_resumes_on_1(tmp_path, byte_dataset):
    flags = METHOD_FLAGS + ["--swiglu", "--num-query-groups", "2"]
    tp2 = tmp_path / "tp2"
    emulated(2, tiny_flags(byte_dataset, save=tp2, tensor_model_parallel_size=2, sequence_parallel=True, **RUN) + flags)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path / "cpu", **RUN) + flags) == 0
    assert_same(history(tp2), history(tmp_path / "cpu"), range(1, 7), rel=1e-4)
    tp1 = resume_from(tp2, 3, tmp_path / "tp1")
    emulated(1, tiny_flags(byte_dataset, load=tp1, save=tp1, **RUN) + flags)
    assert_same(history(tp1), history(tp2), range(4, 7), rel=1e-4)


def test_interleaved_distributed_optimizer_resumes_on_another_dp_size_and_checks_its_buckets(tmp_path, byte_dataset):
    """PP=2 x DP=2 interleaved (2 virtual stages per rank) with the distributed optimizer,
    overlapped reduce/gather and several gradient buckets: its checkpoint resumes on
    PP=2 x DP=1 to the same losses. The optimizer state is stored bucket by bucket, so
    loading it where the buckets differ (another virtual pipeline size, or no
    --overlap-grad-reduce) is a clear error naming the flags."""
    run = dict(RUN, num_layers=4, global_batch_size=16, untie_embeddings_and_output_weights=True,
               pipeline_model_parallel_size=2)
    vpp, buckets = {"num_layers_per_virtual_pipeline_stage": 1}, {"overlap_grad_reduce": True, "ddp_bucket_size": 3000}
    flags = METHOD_FLAGS + ["--use-distributed-optimizer"]
    dp2 = tmp_path / "dp2"
    emulated(4, tiny_flags(byte_dataset, save=dp2, **run, **vpp, **buckets, overlap_param_gather=True) + flags)
    dp1 = resume_from(dp2, 3, tmp_path / "dp1")
    emulated(2, tiny_flags(byte_dataset, load=dp1, save=dp1, **run, **vpp, **buckets) + flags)
    assert_same(history(dp1), history(dp2), range(4, 7), rel=1e-5)

    for changed in (dict(buckets), dict(vpp)):  # without the virtual stages; without bucketing
        output = emulated(2, tiny_flags(byte_dataset, load=dp1, **dict(run, save_interval=None), **changed) + flags,
                          expect=1)  # torch.distributed.run's exit status for its workers' 2
        assert "exitcode  : 2" in output
        assert "stored per gradient bucket" in output and "--num-layers-per-virtual-pipeline-stage" in output


def test_overlapped_param_gather_with_a_tied_pipeline_equals_the_synchronous_one(tmp_path, byte_dataset):
    """The example configs' combination: PP=2, tied embeddings (WeSaR's tied gate in a
    bucket of its own), all methods with the fused kernels (NormFormer's norm weights
    handed to them), distributed optimizer, several buckets. With the gradient reduce and
    the parameter all-gather overlapped, and every layer recomputed in the backward
    (full activation recomputation), it trains as with both synchronous and the
    activations stored (it stopped on megatron-core's assertion at iteration 2: the gate's
    bucket was never waited for), and no bucket's all-gather is left out of the overlap."""
    run = dict(RUN, num_layers=4, global_batch_size=16, pipeline_model_parallel_size=2, eval_interval=3, eval_iters=2,
               save_interval=None)
    flags = METHOD_FLAGS + ["--use-distributed-optimizer"]
    overlapped, synchronous = tmp_path / "overlapped", tmp_path / "synchronous"
    output = emulated(2, tiny_flags(byte_dataset, tensorboard_dir=overlapped, overlap_grad_reduce=True,
                                    overlap_param_gather=True, ddp_bucket_size=2000, **run) + flags
                      + RECOMPUTE["full-uniform"], fused=True)
    # megatron-core's warning for a bucket whose all-gather the forward did not overlap (the
    # methods' norms were registered after the modules they follow)
    assert "already been dispatched" not in output
    emulated(2, tiny_flags(byte_dataset, tensorboard_dir=synchronous, **run) + flags, fused=True)
    assert_same(history(overlapped), history(synchronous), range(1, 7), rel=1e-6)
    assert validation(overlapped) == pytest.approx(validation(synchronous), rel=1e-6)


def test_tied_pipeline_with_a_sharded_distributed_optimizer_equals_one_rank(tmp_path, byte_dataset):
    """PP=2 x DP=2 (the 13B examples' layout without their TP=4), tied embeddings, all
    methods, the distributed optimizer with overlapped reduce/gather trains an unsplit
    run's weights as one rank does: the same losses and grad norms.

    The tied WeSaR gate's two copies are summed over the embedding group after the DP
    reduce-scatter, which is right only if both end stages shard the gate's bucket alike:
    ``shared_embedding`` gives it a bucket of its own (with megatron's default bucket size
    the first stage's gate would otherwise end the one large bucket, in the last DP shard,
    and the last stage's start its own, in the first). Its parameter group (gate LR
    multiplier, weight decay) lives in the sharded optimizer. Both runs start from the
    same weights with a new optimizer: a run started on PP=2 draws other weights, as in
    megatron-core (seeded by pipeline rank)."""
    run = dict(RUN, num_layers=4, global_batch_size=16)
    flags = METHOD_FLAGS + WESAR_OPTIONS
    whole = tmp_path / "whole"
    emulated(1, tiny_flags(byte_dataset, save=whole, **dict(run, train_iters=3)) + flags)
    resume = dict(run, save_interval=None, no_load_optim=True)
    one_rank, sharded = resume_from(whole, 3, tmp_path / "one_rank"), resume_from(whole, 3, tmp_path / "sharded")
    emulated(1, tiny_flags(byte_dataset, load=one_rank, tensorboard_dir=one_rank, **resume) + flags)
    dopt = dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
    emulated(4, tiny_flags(byte_dataset, load=sharded, tensorboard_dir=sharded, pipeline_model_parallel_size=2,
                           **dopt, **resume) + flags)
    assert sorted(history(sharded)) == [4, 5, 6]
    assert_same(history(sharded), history(one_rank), range(4, 7), rel=1e-5)


# layout -> (tied embeddings, how PP=2 splits the 4 layers)
PIPELINE_LAYOUTS = {
    "tied-1f1b": (True, {}),
    "untied-interleaved": (False, {"num_layers_per_virtual_pipeline_stage": 1}),
    "untied-uneven-1f1b": (False, {"decoder_first_pipeline_num_layers": 1}),  # 1 + 3 layers
}


@pytest.mark.parametrize("layout", list(PIPELINE_LAYOUTS))
def test_pipeline_split_continues_an_unsplit_run(tmp_path, byte_dataset, layout):
    """An unsplit 4-layer run's checkpoint continues on PP=2 (1F1B; interleaved with 2
    virtual stages per rank; 1F1B with 1 + 3 layers) to the same training and validation
    losses: ProRes' global layer index, the tied embedding and its WeSaR gate on both end
    stages, NormFormer's parameters, and the interleaved schedule's overlapped p2p
    (batched, it swapped activations and gradients between two stages). With tied
    embeddings the PP=2 checkpoint then continues unsplit."""
    tied, split = PIPELINE_LAYOUTS[layout]
    # 4 micro batches: the schedules' steady state, where a stage sends and receives at once.
    # Validation at iteration 4: the forward-only schedule, its loss from the last stage.
    run = dict(RUN, num_layers=4, global_batch_size=16, save_interval=2, eval_interval=4, eval_iters=2,
               untie_embeddings_and_output_weights=None if tied else True)
    whole = tmp_path / "whole"
    emulated(1, tiny_flags(byte_dataset, save=whole, **run) + METHOD_FLAGS)
    pp2 = resume_from(whole, 2, tmp_path / "pp2")
    emulated(2, tiny_flags(byte_dataset, load=pp2, save=pp2, pipeline_model_parallel_size=2, **split,
                           **dict(run, train_iters=4)) + METHOD_FLAGS)
    reference = history(whole)
    assert_same(history(pp2), reference, range(3, 5), rel=1e-5)
    assert validation(pp2)[4] == pytest.approx(validation(whole)[4], rel=1e-5)
    if tied:
        back = resume_from(pp2, 4, tmp_path / "back")
        emulated(1, tiny_flags(byte_dataset, load=back, save=back, **run) + METHOD_FLAGS)
        assert_same(history(back), reference, range(5, 7), rel=1e-5)


def test_weights_scaled_once_per_step_train_as_per_micro_batch_in_an_interleaved_overlapped_pipeline(
        tmp_path, byte_dataset):
    """--weight-scale-once-per-step (the default) against --no-weight-scale-once-per-step:
    PP=2 x DP=2 interleaved, 4 micro batches per rank, untied output layer (its gate
    once per step too), distributed optimizer, gradient reduce overlapped in several
    buckets (each launched in the last micro batch's backward, after the weights in it
    have their scaled gradients) and parameter gather overlapped. The same losses and
    grad norms, up to fp32 rounding (the scale times a sum against a sum of scaled terms:
    4e-5 relative in the grad norm of step 6 with torch 2.11, less with 2.9)."""
    run = dict(RUN, num_layers=4, global_batch_size=32, untie_embeddings_and_output_weights=True,
               pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1, overlap_grad_reduce=True,
               ddp_bucket_size=3000, overlap_param_gather=True, save_interval=None)
    flags = METHOD_FLAGS + WESAR_OPTIONS + ["--use-distributed-optimizer"]
    once, per_micro_batch = tmp_path / "once", tmp_path / "per-micro-batch"
    output = emulated(4, tiny_flags(byte_dataset, tensorboard_dir=once, **run) + flags)
    # rank 0: the first pipeline stage's two one-layer chunks, 4 gates and a head scale each
    assert "10 weight-side scales (WeSaR gates, NormFormer head scales) applied once per step of 4" in output
    output = emulated(4, tiny_flags(byte_dataset, tensorboard_dir=per_micro_batch, **run) + flags
                      + ["--no-weight-scale-once-per-step"])
    assert "applied once per step" not in output
    assert_same(history(once), history(per_micro_batch), range(1, 7), rel=2e-4)


def test_gradient_accumulation_fusion_accumulates_the_scaled_linears_once_per_step(tmp_path, byte_dataset):
    """--gradient-accumulation-fusion (megatron-core's wgrad GEMM into main_grad; a CPU
    stand-in for APEX's kernel here) with all methods and 4 micro batches: once per step
    (its finish eager, or compiled with --weight-scale-fusion) every gated decoder linear
    accumulates through the fused GEMM (per micro batch only those whose gate is on the
    output can: elsewhere the matmul sees the scaled weight), and all train as the
    unfused run."""
    run = dict(RUN, global_batch_size=16, save_interval=None)
    env = {"PYTHONPATH": f"{REPO / 'tests' / 'fake_apex'}:{REPO}"}
    histories, calls = {}, {}
    for name, extra in (("once", ["--gradient-accumulation-fusion"]),
                        ("once-compiled-finish", ["--gradient-accumulation-fusion", "--weight-scale-fusion"]),
                        ("per-micro-batch", ["--gradient-accumulation-fusion", "--no-weight-scale-once-per-step"]),
                        ("unfused", ["--no-gradient-accumulation-fusion"])):
        output = emulated(1, tiny_flags(byte_dataset, tensorboard_dir=tmp_path / name, **run) + METHOD_FLAGS + extra,
                          env=env)
        calls[name] = int(re.search(r"fake fused_weight_gradient_mlp_cuda calls: (\d+)", output).group(1))
        histories[name] = history(tmp_path / name)
    # 2 layers x 4 gated linears x 4 micro batches x 6 steps (the tied output layer's gate is per
    # micro batch); per micro batch only fc2, whose 128 inputs are not fewer than the 128 token
    # rows, keeps its gate on the output and its fused GEMM
    assert calls == {"once": 2 * 4 * 4 * 6, "once-compiled-finish": 2 * 4 * 4 * 6,
                     "per-micro-batch": 2 * 1 * 4 * 6, "unfused": 0}
    for name in ("once", "once-compiled-finish", "per-micro-batch"):
        assert_same(histories[name], histories["unfused"], range(1, 7), rel=1e-5)



def test_activation_recomputation_trains_as_storing_the_activations(tmp_path, byte_dataset):
    """megatron-core's activation recomputation with all methods and 4 micro batches per
    step (the weight-side scales applied once per step, which a recomputed forward must
    find again): full (every layer, or the first layer of the two by 'block') and selective
    (the attention core; with --disable-bias-linear also the MLP) give the losses and grad
    norms of the run that stores its activations, while the recomputed modules run a
    second forward in every backward."""
    run = dict(RUN, global_batch_size=16, save_interval=None, train_iters=3, lr_decay_iters=3)
    cases = {"stored": [], **RECOMPUTE, "stored-unbiased": ["--disable-bias-linear"],
             "selective-unbiased": ["--disable-bias-linear", "--recompute-activations", "--recompute-modules",
                                    "core_attn", "mlp"]}
    calls, histories = {}, {}
    for name, extra in cases.items():
        output = emulated(1, tiny_flags(byte_dataset, tensorboard_dir=tmp_path / name, **run) + METHOD_FLAGS + extra,
                          script=COUNTING)
        calls[name] = eval(re.search(r"forward calls: (\{.*\})", output).group(1))
        histories[name] = history(tmp_path / name)
    forwards = 2 * 3 * 4  # layers x steps x micro batches; no validation
    stored = calls["stored"]
    assert stored["ExtTransformerLayer"] == forwards and stored["SDPACoreAttention"] == forwards
    assert calls["full-uniform"]["ExtTransformerLayer"] == 2 * forwards
    assert calls["full-block"]["ExtTransformerLayer"] == forwards * 3 // 2
    assert calls["selective"]["ExtTransformerLayer"] == forwards
    assert calls["selective"]["SDPACoreAttention"] == 2 * forwards
    unbiased = calls["selective-unbiased"]
    assert unbiased["SDPACoreAttention"] == unbiased["FFNNormMLP"] == 2 * forwards
    assert calls["stored-unbiased"]["FFNNormMLP"] == forwards
    for name in RECOMPUTE:
        assert_same(histories[name], histories["stored"], range(1, 4), rel=1e-6)
    assert_same(histories["selective-unbiased"], histories["stored-unbiased"], range(1, 4), rel=1e-6)

"""End-to-end tiny CPU runs of pretrain_gpt.main (world size 1, in process)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from driver_utils import METHOD_FLAGS, byte_dataset, read_metrics, tiny_flags, train_losses, val_losses  # noqa: F401
from older_megatron_ext import former_registration_order

import pretrain_gpt
from megatron_ext.training import checkpointing, forward
from megatron_ext.training.checkpointing import TRACKER, CheckpointError, read_tracker
from megatron_ext.training.loop import EXIT_NONFINITE, SpikeDetector
from megatron_ext.training.optimization import clip_grads_by_total_norm


@pytest.mark.parametrize("methods", [[], ["--prores", "--prores-warmup", "3"], ["--wesar"], ["--normformer"], METHOD_FLAGS],
                         ids=["baseline", "prores", "wesar", "normformer", "all"])
def test_loss_falls(tmp_path, byte_dataset, methods):
    argv = tiny_flags(byte_dataset, save=tmp_path, eval_interval=6) + methods
    assert pretrain_gpt.main(argv) == 0
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[i] for i in (10, 11, 12)) / 3 < losses[1] - 0.3
    val = val_losses(tmp_path)
    assert len(val) == 3 and val[2] < val[1] < val[0]  # iterations 0, 6, 12
    assert read_tracker(tmp_path) == 12
    assert os.path.isfile(tmp_path / "iter_0000012" / "mp_rank_00_000" / "model_optim_rng.pt")


def test_bias_dropout_fusion_trains_the_same_model(tmp_path, byte_dataset, monkeypatch):
    """--bias-dropout-fusion (the CUDA default; compiled by torch's CPU backend here) gives the
    eager run's losses with all three methods, ProRes' scalar changing every step inside it."""
    from megatron_ext import layer

    calls = {"eager": 0, "fused": 0}

    def counted(compiled):
        def call(*args):
            calls[run] += 1
            return compiled(*args)
        return call

    for name in ("fused_scaled_bias_dropout_add", "fused_normed_scaled_bias_dropout_add"):
        monkeypatch.setattr(layer, name, counted(getattr(layer, name)))
    runs = {}
    for run, extra in (("eager", []), ("fused", ["--bias-dropout-fusion"])):
        argv = tiny_flags(byte_dataset, save=tmp_path / run, eval_iters=0, train_iters=8) + METHOD_FLAGS + extra
        assert pretrain_gpt.main(argv) == 0
        runs[run] = train_losses(tmp_path / run)
    assert calls == {"eager": 0, "fused": 8 * 2 * 2}  # iterations x layers x branches
    assert sorted(runs["fused"]) == list(range(1, 9))
    for it, loss in runs["eager"].items():
        assert runs["fused"][it] == pytest.approx(loss, rel=1e-5), it


def test_logged_lr_is_the_lr_each_update_used(tmp_path, byte_dataset):
    """Iteration i's update is the scheduler's step i - 1: warmup from 0, then linear decay.

    The base schedule is logged, not the WeSaR gates' (``--wesar-gate-lr-mult``).
    """
    peak, warmup, iters = 3e-3, 2, 6
    argv = tiny_flags(byte_dataset, save=tmp_path, train_iters=iters, lr=peak, lr_warmup_iters=warmup, eval_iters=0)
    assert pretrain_gpt.main(argv + ["--wesar", "--wesar-gate-lr-mult", "0.5"]) == 0

    def scheduled(steps: int) -> float:
        if steps <= warmup:
            return peak * steps / warmup
        return peak * (1 - (steps - warmup) / (iters - warmup))

    logged = {r["iteration"]: r["lr"] for r in read_metrics(tmp_path) if "lr" in r}
    assert sorted(logged) == list(range(1, iters + 1))
    for it, lr in logged.items():
        assert lr == pytest.approx(scheduled(it - 1), rel=1e-12, abs=1e-15), it


def test_resume_continues_exactly(tmp_path, byte_dataset):
    common = dict(lr_decay_iters=12, eval_iters=0)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=whole, **common) + METHOD_FLAGS) == 0
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=split, train_iters=6, **common) + METHOD_FLAGS) == 0
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=split, load=split, **common) + METHOD_FLAGS) == 0
    a, b = train_losses(whole), train_losses(split)
    assert sorted(b) == list(range(1, 13))
    for it in range(1, 13):
        assert b[it] == pytest.approx(a[it], rel=1e-6, abs=0), it
    alphas = [r["prores_alpha/layer_002"] for r in read_metrics(split) if "prores_alpha/layer_002" in r]
    assert alphas == [r["prores_alpha/layer_002"] for r in read_metrics(whole) if "prores_alpha/layer_002" in r]


def test_resume_with_another_model_or_other_methods_is_an_error(tmp_path, byte_dataset, capsys):
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path, train_iters=2, lr_decay_iters=12, eval_iters=0) + METHOD_FLAGS) == 0
    deeper = tiny_flags(byte_dataset, load=tmp_path, train_iters=3, lr_decay_iters=12, eval_iters=0, num_layers=4,
                        swiglu=True) + METHOD_FLAGS
    assert pretrain_gpt.main(deeper) == pretrain_gpt.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "--num-layers: checkpoint 2, this run 4" in err and "--swiglu: checkpoint False, this run True" in err
    other = ["--prores", "--prores-warmup", "5", "--wesar", "--normformer"]
    argv = tiny_flags(byte_dataset, load=tmp_path, train_iters=3, lr_decay_iters=12, eval_iters=0) + other
    assert pretrain_gpt.main(argv) == pretrain_gpt.EXIT_CONFIG_ERROR
    assert "--prores/--prores-schedule/--prores-warmup" in capsys.readouterr().err
    assert pretrain_gpt.main(argv + ["--override-checkpoint-methods"]) == 0


def test_rerunning_a_finished_run_evaluates_it_as_it_ended_and_keeps_its_checkpoint(tmp_path, byte_dataset, capsys):
    """Resumed at --train-iters, no step runs before the final evaluation: it must still
    use ProRes' scalars of the updates done (mid-warmup here), not those of step 0."""
    argv = tiny_flags(byte_dataset, save=tmp_path, load=tmp_path, train_iters=6, eval_interval=6) + [
        "--prores", "--prores-warmup", "4"]  # layer 2 of 2 warms over 8 steps: alpha 0.75 at 6
    assert pretrain_gpt.main(argv) == 0
    assert "ProRes: linear schedule, T = 4 steps per layer; all 2 layers at a = 1 from step 8" in capsys.readouterr().out
    checkpoint = tmp_path / "iter_0000006" / "mp_rank_00_000" / "model_optim_rng.pt"
    written = checkpoint.stat().st_mtime_ns
    assert pretrain_gpt.main(argv) == 0
    first, again = [r for r in read_metrics(tmp_path) if "val_loss" in r][-2:]
    assert first["iteration"] == again["iteration"] == 6
    assert again["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    assert checkpoint.stat().st_mtime_ns == written  # not written again
    assert read_tracker(tmp_path) == 6


def test_resume_with_another_vocabulary_is_an_error(tmp_path, byte_dataset, capsys, monkeypatch):
    from megatron_ext.data.tokenizers import ByteLevelTokenizer

    run = dict(train_iters=2, lr_decay_iters=12, eval_iters=0)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path, **run)) == 0
    monkeypatch.setattr(ByteLevelTokenizer, "vocab_size", 400)  # another tokenizer: 448 padded, not 320
    assert pretrain_gpt.main(tiny_flags(byte_dataset, load=tmp_path, **dict(run, train_iters=3))) == \
        pretrain_gpt.EXIT_CONFIG_ERROR
    assert "padded vocabulary (from --tokenizer-model): checkpoint 320, this run 448" in capsys.readouterr().err


def test_data_of_another_tokenizer_is_an_error_naming_the_flags(tmp_path, byte_dataset, capsys, monkeypatch):
    """Byte ids (letters are 97-122) with a 50-piece tokenizer: ids past the padded
    64-row embedding would be an IndexError deep in the model."""
    from megatron_ext.data.tokenizers import ByteLevelTokenizer

    monkeypatch.setattr(ByteLevelTokenizer, "vocab_size", 50)
    monkeypatch.setattr(ByteLevelTokenizer, "eod", 49)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path)) == pretrain_gpt.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "error: --data-path: the micro batch from sample 0 holds token id" in err
    assert "outside the tokenizer's 50 ids (--tokenizer-type/--tokenizer-model)" in err


def test_optimizer_state_loads_only_in_the_parameter_order_it_was_saved_in(tmp_path, byte_dataset, capsys):
    """torch's optimizer state is keyed by parameter position: code that registers the same
    parameters in another order (here megatron-ext before NormFormer's norms were registered
    in forward order) would give parameters other parameters' Adam moments. The order is
    saved and checked, a checkpoint without it is refused, and --no-load-optim loads the model."""
    run = dict(train_iters=2, lr_decay_iters=12, eval_iters=0)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tmp_path, **run) + METHOD_FLAGS) == 0
    resume = tiny_flags(byte_dataset, load=tmp_path, **dict(run, train_iters=3)) + METHOD_FLAGS
    with former_registration_order():
        assert pretrain_gpt.main(resume) == pretrain_gpt.EXIT_CONFIG_ERROR
        err = capsys.readouterr().err
        assert "stored by parameter position" in err and "post_attention_norm" in err
        assert pretrain_gpt.main(resume + ["--no-load-optim"]) == 0
    assert pretrain_gpt.main(resume) == 0

    path = tmp_path / "iter_0000002" / "mp_rank_00_000" / "model_optim_rng.pt"
    payload = torch.load(path, weights_only=False)
    del payload["parameter_order"]  # as megatron-ext saved it before
    torch.save(payload, path)
    assert pretrain_gpt.main(resume) == pretrain_gpt.EXIT_CONFIG_ERROR
    assert "does not record the order" in capsys.readouterr().err


def test_crash_during_save_never_moves_the_tracker(tmp_path, byte_dataset, monkeypatch):
    real_save = checkpointing._save_cpu_rank
    calls = []

    def crash_on_second_save(path, *args):
        calls.append(path)
        if len(calls) == 2:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(b"partial")
            raise OSError("disk full (simulated)")
        real_save(path, *args)

    monkeypatch.setattr(checkpointing, "_save_cpu_rank", crash_on_second_save)
    argv = tiny_flags(byte_dataset, save=tmp_path, train_iters=8, save_interval=4, eval_iters=0)
    with pytest.raises(CheckpointError, match="tracker still names the previous checkpoint"):
        pretrain_gpt.main(argv)
    assert read_tracker(tmp_path) == 4
    assert not any(name.startswith(f".{TRACKER}") and name != TRACKER for name in os.listdir(tmp_path))
    monkeypatch.setattr(checkpointing, "_save_cpu_rank", real_save)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, load=tmp_path, save=tmp_path, train_iters=6, lr_decay_iters=8,
                                        eval_iters=0)) == 0
    assert read_tracker(tmp_path) == 6
    assert read_metrics(tmp_path)[-1]["iteration"] == 6


def test_nonfinite_steps_are_skipped_and_the_run_stops(tmp_path, byte_dataset, monkeypatch):
    real_loss = forward.masked_mean_loss
    calls = []

    def poisoned(loss_mask, output):  # one micro batch per step: call n is iteration n
        calls.append(1)
        loss, reported = real_loss(loss_mask, output)
        if len(calls) == 3 or len(calls) >= 6:
            return loss * float("nan"), {"lm loss": reported["lm loss"] * float("nan")}
        return loss, reported

    monkeypatch.setattr(forward, "masked_mean_loss", poisoned)
    argv = tiny_flags(byte_dataset, save=tmp_path, eval_iters=0, max_consecutive_skips=3)
    assert pretrain_gpt.main(argv) == EXIT_NONFINITE
    records = read_metrics(tmp_path)
    skipped = [r["iteration"] for r in records if r.get("event") == "skipped_step"]
    assert skipped == [3, 6, 7, 8]
    logged = {r["iteration"]: r for r in records if "event" not in r and "lm_loss" in r}
    assert logged[5]["skipped_iterations"] == 1 and math.isfinite(logged[5]["lm_loss"])
    assert read_tracker(tmp_path) is None  # a diverged run saves nothing


@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_ranks_meet_before_the_groups_go_only_after_a_finished_run(tmp_path, byte_dataset, monkeypatch, outcome):
    """Shutdown waits at a barrier before destroying the groups (torch < 2.8's gloo destructor
    deadlock) when training returned on every rank, and never after a rank failed alone."""
    import megatron_ext.training.distributed as distributed
    from megatron_ext.training import loop

    events = []

    def recorded(event, real):
        def call(*args, **kwargs):
            events.append(event)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(distributed.dist, "barrier", recorded("barrier", distributed.dist.barrier))
    monkeypatch.setattr(distributed.parallel_state, "destroy_model_parallel",
                        recorded("destroy", distributed.parallel_state.destroy_model_parallel))
    real_train = loop.Trainer.train

    def train(self):
        events.clear()  # building the groups destroyed megatron's former ones
        if outcome == "failed":
            raise RuntimeError("this rank failed alone")
        return real_train(self)

    monkeypatch.setattr(loop.Trainer, "train", train)
    argv = tiny_flags(byte_dataset, eval_iters=0, train_iters=3)
    if outcome == "finished":
        assert pretrain_gpt.main(argv) == 0
        assert events == ["barrier", "destroy"]
        return
    with pytest.raises(RuntimeError, match="failed alone"):
        pretrain_gpt.main(argv)
    assert events == ["destroy"]


def test_spike_detector_flags_only_outliers():
    detector = SpikeDetector(window=20, num_std=5.0)
    g = torch.Generator().manual_seed(0)
    normal = (5.0 + 0.01 * torch.randn(30, generator=g)).tolist()
    assert all(detector.update(x) is None for x in normal)
    spike = detector.update(6.0)
    assert spike is not None and spike[0] == pytest.approx(5.0, abs=0.02)
    assert detector.update(5.0) is None


def test_clip_scales_to_max_norm_unless_disabled_or_not_needed():
    grads = [torch.full((3,), 3.0), torch.full((4,), 4.0)]
    clip_grads_by_total_norm(grads, 2.0, float(torch.cat(grads).norm()))
    assert float(torch.cat(grads).norm()) == pytest.approx(2.0, rel=1e-5)
    for max_norm, total_norm in ((0.0, 5.0), (10.0, 5.0), (1.0, float("inf")), (1.0, float("nan"))):
        kept = [torch.full((3,), 3.0)]
        clip_grads_by_total_norm(kept, max_norm, total_norm)
        assert kept[0].tolist() == [3.0, 3.0, 3.0], (max_norm, total_norm)


def test_weights_scaled_once_per_step_train_as_per_micro_batch(tmp_path, byte_dataset, monkeypatch):
    """The CPU engine with 4 micro batches per step: the default --weight-scale-once-per-step
    scales each weight once per step (WeSaR's gates on every layer linear and the untied
    output layer, NormFormer's head scale) and trains as --no-weight-scale-once-per-step."""
    from megatron_ext import linear_scaling

    deferred = []
    apply = linear_scaling._ScaleOncePerStep.apply
    monkeypatch.setattr(linear_scaling._ScaleOncePerStep, "apply", lambda *a: deferred.append(1) or apply(*a))
    runs = {}
    for name, extra in (("once", []), ("per-micro-batch", ["--no-weight-scale-once-per-step"])):
        argv = tiny_flags(byte_dataset, save=tmp_path / name, eval_iters=0, train_iters=4, global_batch_size=16,
                          untie_embeddings_and_output_weights=True) + METHOD_FLAGS + extra
        assert pretrain_gpt.main(argv) == 0
        runs[name] = {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)
                      if r.get("lm_loss") is not None and "event" not in r}
        if name == "once":
            assert len(deferred) == 4 * 4 * (2 * 5 + 1)  # steps x micro batches x (layers x 5 scales + output)
    assert sorted(runs["once"]) == list(range(1, 5))
    for it, values in runs["per-micro-batch"].items():
        assert runs["once"][it] == pytest.approx(values, rel=1e-5), it

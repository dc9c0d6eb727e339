"""Resuming pretrain_gpt.py runs: what continues, what must match the checkpoint, and the
options that settle a difference (CPU path, in process)."""

from __future__ import annotations

import shutil

import pytest
import torch
from driver_utils import METHOD_FLAGS, byte_dataset, read_metrics, tiny_flags  # noqa: F401

import pretrain_gpt
from megatron_ext.training.checkpointing import TRACKER

RUN = dict(train_iters=8, lr_decay_iters=8, eval_iters=0)


def by_iteration(directory, key: str) -> dict[int, float]:
    return {r["iteration"]: r[key] for r in read_metrics(directory) if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_dataset) -> dict[str, object]:
    """``whole``: 8 iterations with all methods; ``half``: the same run stopped at 4."""
    root = tmp_path_factory.mktemp("resume")
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=root / "whole", **RUN) + METHOD_FLAGS) == 0
    half = dict(RUN, train_iters=4)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=root / "half", **half) + METHOD_FLAGS) == 0
    return {"whole": root / "whole", "half": root / "half"}


def resume(runs, tmp_path, byte_dataset, *extra: str, methods=METHOD_FLAGS, **overrides) -> int:
    """Resume a copy of ``half`` into ``tmp_path`` to iteration 8 (or as ``overrides`` say)."""
    if not tmp_path.exists() or not any(tmp_path.iterdir()):
        shutil.copytree(runs["half"], tmp_path, dirs_exist_ok=True)
    argv = tiny_flags(byte_dataset, load=tmp_path, save=tmp_path, **dict(RUN, **overrides))
    return pretrain_gpt.main(argv + list(methods) + list(extra))


def test_no_load_optim_continues_the_learning_rate_and_prores(runs, tmp_path, byte_dataset):
    """Only Adam's moments restart: the schedule and ProRes' step follow the iteration."""
    assert resume(runs, tmp_path, byte_dataset, "--no-load-optim") == 0
    for key in ("lr", "prores_alpha/layer_001", "prores_alpha/layer_002"):
        whole, resumed = by_iteration(runs["whole"], key), by_iteration(tmp_path, key)
        assert {it: resumed[it] for it in range(5, 9)} == pytest.approx({it: whole[it] for it in range(5, 9)}), key
    assert by_iteration(tmp_path, "prores_alpha/layer_002")[5] > 0.5  # mid-warmup, not back at step 1


def test_a_schedule_change_on_resume_is_an_error_naming_the_flags(runs, tmp_path, byte_dataset, capsys):
    assert resume(runs, tmp_path, byte_dataset, lr=1e-3, lr_decay_style="cosine") == pretrain_gpt.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "--lr: checkpoint 0.003, this run 0.001" in err and "--lr-decay-style: checkpoint linear, this run cosine" in err
    assert "--override-opt_param-scheduler" in err and "--use-checkpoint-opt_param-scheduler" in err
    assert resume(runs, tmp_path, byte_dataset, train_iters=10, lr_decay_iters=None) == pretrain_gpt.EXIT_CONFIG_ERROR
    assert "--lr-decay-iters (default: --train-iters): checkpoint 8, this run 10" in capsys.readouterr().err
    assert read_metrics(tmp_path)[-1]["iteration"] == 4  # nothing trained


@pytest.mark.parametrize("option", ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"])
def test_the_scheduler_options_choose_whose_schedule_continues(runs, tmp_path, byte_dataset, option):
    """Linear decay to 0 from --lr: this run's --lr scales the remaining LRs by 1/3,
    the checkpoint's keeps them; WeSaR's gate group (its own LR bounds) follows too."""
    assert resume(runs, tmp_path, byte_dataset, option, lr=1e-3) == 0
    whole, resumed = by_iteration(runs["whole"], "lr"), by_iteration(tmp_path, "lr")
    ratio = 1 / 3 if option.startswith("--override") else 1.0
    assert {it: resumed[it] for it in range(5, 9)} == pytest.approx({it: ratio * whole[it] for it in range(5, 9)})
    saved = torch.load(tmp_path / "iter_0000008" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    assert [g["max_lr"] for g in groups] == pytest.approx([ratio * 3e-3] * len(groups))


def test_overridden_method_settings_reach_the_optimizer_groups(runs, tmp_path, byte_dataset, capsys):
    """torch's load_state_dict restores each group's saved LR bounds; a changed WeSaR gate
    LR multiplier must still apply after --override-checkpoint-methods."""
    methods = METHOD_FLAGS + ["--wesar-gate-lr-mult", "2"]
    assert resume(runs, tmp_path, byte_dataset, methods=methods) == pretrain_gpt.EXIT_CONFIG_ERROR
    assert "pass --override-checkpoint-methods" in capsys.readouterr().err
    assert resume(runs, tmp_path, byte_dataset, "--override-checkpoint-methods", methods=methods) == 0
    saved = torch.load(tmp_path / "iter_0000008" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    assert sorted(g["max_lr"] for g in saved["optimizer"]["param_groups"]) == pytest.approx([3e-3, 3e-3, 6e-3])


@pytest.mark.parametrize("methods", [["--prores", "--prores-warmup", "3", "--wesar"],
                                     METHOD_FLAGS + ["--normformer-no-ffn-norm"]], ids=["no-normformer", "no-ffn-norm"])
def test_other_method_parameters_are_an_error_even_with_the_override(runs, tmp_path, byte_dataset, capsys, methods):
    assert resume(runs, tmp_path, byte_dataset, "--override-checkpoint-methods",
                  methods=methods) == pretrain_gpt.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: the checkpoint's model has other method parameters") and "Traceback" not in err
    assert "not which methods or NormFormer parts exist" in err


def test_wesar_placement_may_change_on_resume(runs, tmp_path, byte_dataset):
    """Gates on the weights or on the outputs: the same function and parameters."""
    assert resume(runs, tmp_path, byte_dataset, "--wesar-placement", "output") == 0
    assert read_metrics(tmp_path)[-1]["iteration"] == 8


def test_unreadable_or_missing_checkpoint_files_are_errors(runs, tmp_path, byte_dataset, capsys):
    shutil.copytree(runs["half"], tmp_path, dirs_exist_ok=True)
    rank_file = tmp_path / "iter_0000004" / "mp_rank_00_000" / "model_optim_rng.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    assert resume(runs, tmp_path, byte_dataset) == pretrain_gpt.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert f"error: {rank_file}: cannot read the checkpoint" in err and "Traceback" not in err
    (tmp_path / TRACKER).write_text("6")
    assert resume(runs, tmp_path, byte_dataset) == pretrain_gpt.EXIT_CONFIG_ERROR
    assert f"{tmp_path / 'iter_0000006'} not found, though {TRACKER} names it" in capsys.readouterr().err

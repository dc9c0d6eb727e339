"""pretrain_gpt.py as a launched program: torchrun TP=2 against TP=1, and SIGUSR1 preemption."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from driver_utils import METHOD_FLAGS, REPO, byte_dataset, launch_env, tiny_flags, train_losses  # noqa: F401
from mp_utils import _free_port

import pretrain_gpt
from megatron_ext.training.checkpointing import read_tracker
from megatron_ext.training.loop import EXIT_SIGNAL_SAVED


def test_tensor_parallel_2_matches_1_with_all_methods(tmp_path, byte_dataset):
    # two micro batches per step: the weight-side scales once per step (TP=2: gates summed once)
    flags = dict(train_iters=5, eval_iters=0, lr_warmup_iters=0, lr=1e-2, swiglu=True, num_query_groups=2,
                 global_batch_size=8)
    tp2 = tmp_path / "tp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "pretrain_gpt.py"), *tiny_flags(byte_dataset, save=tp2, tensor_model_parallel_size=2, **flags), *METHOD_FLAGS]
    run = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "world size: 2 (tensor 2" in run.stdout
    assert "10 weight-side scales (WeSaR gates, NormFormer head scales) applied once per step of 2" in run.stdout
    tp1 = tmp_path / "tp1"
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=tp1, **flags) + METHOD_FLAGS) == 0
    one, two = train_losses(tp1), train_losses(tp2)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4), it
    assert one[5] < one[1]


def test_sigusr1_saves_a_complete_checkpoint_and_exits_42(tmp_path, byte_dataset):
    save = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "pretrain_gpt.py"),
           *tiny_flags(byte_dataset, save=save, train_iters=100000, lr_decay_iters=100000, eval_iters=0), *METHOD_FLAGS]
    proc = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(" iteration        3/"):
                proc.send_signal(signal.SIGUSR1)
                break
        lines.extend(proc.stdout)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert code == EXIT_SIGNAL_SAVED, output[-3000:]
    saved = read_tracker(save)
    assert saved is not None and saved >= 3
    assert f"saved checkpoint at iteration {saved}" in output
    assert pretrain_gpt.main(tiny_flags(byte_dataset, load=save, save=save, train_iters=saved + 2,
                                        lr_decay_iters=100000, eval_iters=0) + METHOD_FLAGS) == 0
    assert max(train_losses(save)) == saved + 2
    assert read_tracker(save) == saved + 2

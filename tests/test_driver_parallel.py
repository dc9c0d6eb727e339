"""pretrain_gpt.py as a launched program: torchrun TP=2 against TP=1, checkpoints across TP sizes,
SIGUSR1 preemption and the single-node launcher."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest
from driver_utils import METHOD_FLAGS, REPO, byte_dataset, launch_env, tiny_flags, train_losses  # noqa: F401
from mp_utils import _free_port

import pretrain_gpt
from megatron_ext.training.checkpointing import read_tracker
from megatron_ext.training.loop import EXIT_SIGNAL_SAVED


# two micro batches per step: the weight-side scales once per step (TP=2: gates summed once)
TP_FLAGS = dict(train_iters=5, eval_iters=0, lr_warmup_iters=0, lr=1e-2, swiglu=True, num_query_groups=2,
                global_batch_size=8)


def torchrun_tp2(*flags: str) -> subprocess.CompletedProcess:
    """pretrain_gpt.py on two CPU ranks with --tensor-model-parallel-size 2."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "pretrain_gpt.py"), *flags, "--tensor-model-parallel-size", "2"]
    return subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, byte_dataset) -> dict[int, object]:
    """Checkpoint directories of the same run at TP=2 (torchrun) and TP=1 (in process)."""
    root = tmp_path_factory.mktemp("tp_runs")
    run = torchrun_tp2(*tiny_flags(byte_dataset, save=root / "tp2", **TP_FLAGS), *METHOD_FLAGS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "world size: 2 (tensor 2" in run.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in run.stderr  # megatron-core's GPU advice, silenced on the CPU
    assert "10 weight-side scales (WeSaR gates, NormFormer head scales) applied once per step of 2" in run.stdout
    assert pretrain_gpt.main(tiny_flags(byte_dataset, save=root / "tp1", **TP_FLAGS) + METHOD_FLAGS) == 0
    return {1: root / "tp1", 2: root / "tp2"}


def test_tensor_parallel_2_matches_1_with_all_methods(tp_runs):
    one, two = train_losses(tp_runs[1]), train_losses(tp_runs[2])
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4), it
    assert one[5] < one[1]


def test_cpu_checkpoints_load_only_at_their_tensor_parallel_size(tp_runs, byte_dataset, capsys):
    """Every rank stops with the error (exit 2), none with a size-mismatch traceback."""
    resume = dict(TP_FLAGS, train_iters=6, lr_decay_iters=5)
    assert pretrain_gpt.main(tiny_flags(byte_dataset, load=tp_runs[2], **resume) + METHOD_FLAGS) == \
        pretrain_gpt.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "model_optim_rng.pt was saved with --tensor-model-parallel-size 2: the CPU path loads checkpoints of the " \
           "same tensor-parallel size (this run: --tensor-model-parallel-size 1)" in err
    run = torchrun_tp2(*tiny_flags(byte_dataset, load=tp_runs[1], **resume), *METHOD_FLAGS)
    assert run.returncode != 0
    assert "mp_rank_00_000/model_optim_rng.pt was saved with --tensor-model-parallel-size 1" in run.stderr  # rank 0
    assert "mp_rank_01_000/model_optim_rng.pt not found" in run.stderr  # rank 1
    assert "size mismatch" not in run.stderr and "exitcode  : 2" in run.stderr, run.stderr[-3000:]


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


@pytest.mark.parametrize("nvidia_smi", ["missing", "failing"])
def test_single_node_launcher_without_gpus_says_to_set_nproc(tmp_path, nvidia_smi):
    """examples/run_single_node.sh with no NPROC: no nvidia-smi, or one that fails (no driver)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "wc"):  # all the script runs before it counts the GPUs
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia_smi == "failing":
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    run = subprocess.run([shutil.which("bash"), str(REPO / "examples" / "run_single_node.sh")],
                         env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "no GPU found: set NPROC" in run.stderr

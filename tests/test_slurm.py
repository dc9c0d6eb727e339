"""The Slurm launcher against a real one-node Slurm: a 2-rank CPU run, then preemption and requeue.

The fixture runs munged, slurmctld and slurmd (Debian's ``munge`` and ``slurm-wlm``,
installed with apt-get when missing) as root on localhost, each configured in a temporary
directory, and stops them by PID. Outside CI the tests skip when that is impossible (not
root, no apt-get); in CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from driver_utils import read_metrics

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "examples" / "slurm" / "pretrain_gpt.sh"
SMOKE = REPO / "examples" / "smoke_cpu_slurm.sh"
CONFIG = REPO / "examples" / "tiny_cpu.yaml"
TRAIN_ITERS = 400
SLURM_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
# Tiny model on top of examples/tiny_cpu.yaml: a few seconds of training on 2 cores,
# long enough to signal mid-run.
RUN_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-warmup-iters", "4",
             "--log-interval", "1", "--eval-iters", "0", "--save-interval", "1000",
             "--hidden-dropout", "0", "--attention-dropout", "0"]


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"Slurm test cannot run in CI: {reason}")
    pytest.skip(reason)


def ensure_slurm_installed() -> None:
    if all(shutil.which(c) for c in SLURM_COMMANDS):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable("slurm-wlm/munge missing and cannot be installed (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            unavailable(f"{' '.join(command)} failed: {result.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str) -> str:
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CryptoType=crypto/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb // 2}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    env: dict

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
        return result.stdout

    def job_state(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "--oneliner", job)
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").glob("*")))

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm on localhost; its daemons are stopped by PID afterwards."""
    if os.geteuid() != 0:
        unavailable("the one-node Slurm runs its daemons as root")
    ensure_slurm_installed()
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)
    for sub in ("state", "spool", "munge", "log"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, socket.gethostname()))
    # Jobs inherit this environment: drop the rank variables other tests' gloo worlds set.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root, env)

    daemons: list[subprocess.Popen] = []

    def start(name: str, *command: str) -> None:
        with open(root / "log" / f"{name}.out", "w") as out:
            daemons.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env))

    try:
        start("munged", "munged", "--foreground", "--force", f"--socket={root}/munge/munge.socket",
              f"--key-file={key}", f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/seed",
              f"--log-file={root}/log/munged.log")
        cluster.wait_for(lambda: (root / "munge" / "munge.socket").exists(), 20, "munged's socket")
        start("slurmctld", "slurmctld", "-D", "-f", str(conf))
        start("slurmd", "slurmd", "-D", "-f", str(conf))
        cluster.wait_for(lambda: cluster.run("sinfo", "--noheader", "--format=%t", check=False).strip() == "idle",
                         60, "the node to be idle")
        yield cluster
    finally:
        if any(p.poll() is None for p in daemons[1:]):
            cluster.run("scancel", "--full", "--user=root", check=False)
            try:
                cluster.wait_for(lambda: not cluster.run("squeue", "--noheader", check=False).strip(), 60,
                                 "jobs to end")
            except AssertionError:
                pass
        for process in reversed(daemons):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """The bundled topics corpus as a byte-level dataset (what the smoke script builds)."""
    root = tmp_path_factory.mktemp("slurm_data")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, REPO / "tools" / "sample_corpus.py", "--output", root / "topics.jsonl"],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, REPO / "tools" / "preprocess_data.py", "--input", root / "topics.jsonl",
                    "--output-prefix", root / "topics", "--tokenizer-type", "ByteLevelTokenizer", "--append-eod",
                    "--workers", "1"], check=True, env=env, capture_output=True)
    return str(root / "topics_text_document")


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, dataset) -> Path:
    """examples/smoke_cpu_slurm.sh run to the end; returns its run directory."""
    run_dir = tmp_path_factory.mktemp("smoke")
    data_dir = run_dir / "data"
    data_dir.mkdir()
    for suffix in (".bin", ".idx"):  # reuse the dataset instead of building it again
        (data_dir / f"topics_text_document{suffix}").symlink_to(dataset + suffix)
    env = dict(slurm.env, RUN_DIR=str(run_dir), PYTHON=sys.executable, TRAIN_ITERS=str(TRAIN_ITERS), CONFIG=str(CONFIG))
    result = subprocess.run(["bash", str(SMOKE), *RUN_FLAGS], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr + slurm.logs()
    return run_dir


def job_log(run_dir: Path) -> str:
    (log,) = run_dir.glob("*.out")
    return log.read_text()


def tracker(checkpoints: Path) -> int:
    return int((checkpoints / "latest_checkpointed_iteration.txt").read_text())


def losses(checkpoints: Path) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(checkpoints) if "lm_loss" in r and "event" not in r}


def test_launcher_trains_two_ranks_and_writes_a_checkpoint(uninterrupted):
    log = job_log(uninterrupted)
    assert "world size: 2 " in log
    assert f"saved checkpoint at iteration {TRAIN_ITERS}" in log
    assert re.search(r"training step exited with code 0\b", log)
    checkpoints = uninterrupted / "checkpoints"
    assert tracker(checkpoints) == TRAIN_ITERS
    assert (checkpoints / f"iter_{TRAIN_ITERS:07d}").is_dir()
    assert sorted(losses(checkpoints)) == list(range(1, TRAIN_ITERS + 1))


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_preempted_job_saves_requeues_and_resumes_to_the_same_run(slurm, uninterrupted, dataset, tmp_path, launcher):
    """SIGUSR1 to the batch shell: save, exit 42, requeue, resume; then the uninterrupted run's losses.

    srun: one task per rank, srun forwards the signal. torchrun: one task per node; the
    workers get the signal, torchrun ignores it and reports their exit as a failure.
    """
    checkpoints = tmp_path / "checkpoints"
    env = dict(slurm.env, MEGATRON_EXT_DIR=str(REPO), CHECKPOINT_DIR=str(checkpoints), PYTHON=sys.executable,
               DATA_PATH=dataset, TOKENIZER_TYPE="ByteLevelTokenizer", LAUNCHER=launcher, GPUS_PER_NODE="2")
    job = subprocess.run(
        ["sbatch", "--parsable", "--job-name=preempt", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
         "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00", f"--output={tmp_path}/%x-%j.out",
         str(LAUNCHER), "--config", str(CONFIG), "--device", "cpu",
         "--train-iters", str(TRAIN_ITERS), *RUN_FLAGS],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip().split(";")[0]
    log_file = tmp_path / f"preempt-{job}.out"
    read_log = lambda: log_file.read_text() if log_file.exists() else ""  # noqa: E731

    # Signal once training is under way, as Slurm does --signal=B:USR1@600 before the time limit.
    slurm.wait_for(lambda: re.search(r"iteration\s+3/", read_log()), 300, "iteration 3 in the job log")
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    slurm.wait_for(lambda: "requeueing job" in read_log(), 120, "the job to requeue itself")
    # A requeued job waits out a begin-time delay (2 minutes) before it may start again; cut it
    # short, but not within the second of the requeue: slurmd refuses a job credential issued
    # in the same second as the old one was revoked.
    slurm.wait_for(lambda: slurm.job_state(job)["JobState"] == "PENDING", 60, "the requeued job to be pending")
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm.wait_for(lambda: (s := slurm.job_state(job))["JobState"] in ("COMPLETED", "FAILED", "CANCELLED")
                           and s, 300, "the resumed job to finish")
    log = read_log()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log

    saved = sorted({int(i) for i in re.findall(r"signal received: saved checkpoint at iteration (\d+)", log)})
    assert len(saved) == 1 and 3 <= saved[0] < TRAIN_ITERS, log  # every rank reports the same iteration
    assert f"training step exited with code {42 if launcher == 'srun' else 1}" in log
    assert re.search(rf"resumed from checkpoint \S+iter_{saved[0]:07d} at iteration {saved[0]}\b", log), log
    assert log.count("world size: 2 ") == 2
    # Same final iteration, and the same loss at every iteration, as the uninterrupted run.
    assert tracker(checkpoints) == tracker(uninterrupted / "checkpoints") == TRAIN_ITERS
    resumed, reference = losses(checkpoints), losses(uninterrupted / "checkpoints")
    assert sorted(resumed) == sorted(reference) == list(range(1, TRAIN_ITERS + 1))
    for iteration, loss in reference.items():
        assert resumed[iteration] == pytest.approx(loss, rel=1e-6, abs=0), iteration

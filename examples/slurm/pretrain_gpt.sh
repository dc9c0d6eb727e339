#!/bin/bash
# Multi-node megatron-ext pretraining under Slurm, preemption-safe (docs/CLUSTER.md).
#
#   mkdir -p logs
#   DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/data/tok.model \
#     sbatch --nodes=2 examples/slurm/pretrain_gpt.sh --config examples/configs/gpt-13b/baseline.yaml
#
# Arguments are passed to pretrain_gpt.py. Environment (all optional):
#   LAUNCHER          srun (default): one task per GPU, the driver reads SLURM_PROCID/NTASKS/LOCALID;
#                     torchrun: one task per node running torchrun over GPUS_PER_NODE workers.
#   GPUS_PER_NODE     torchrun workers per node (default: SLURM_GPUS_ON_NODE, else 8).
#   CHECKPOINT_DIR    --save and --load (default: $MEGATRON_EXT_DIR/runs/$SLURM_JOB_NAME/checkpoints).
#   DATA_PATH         --data-path (several weighted prefixes: "0.7 /data/a 0.3 /data/b").
#   TOKENIZER_TYPE    --tokenizer-type (default SentencePieceTokenizer when TOKENIZER_MODEL is set).
#   TOKENIZER_MODEL   --tokenizer-model.
#   MEGATRON_EXT_DIR  the checkout (default: the submission directory).
#   PYTHON            interpreter (default: python).
#   CONTAINER_IMAGE   run the tasks in this image with pyxis (srun --container-image);
#   CONTAINER_MOUNTS  its --container-mounts (default: the checkout, the checkpoint directory).
#   APPTAINER_IMAGE   run the tasks with apptainer exec --nv instead; APPTAINER_BIND its --bind.
#
# Preemption and time limits: Slurm sends SIGUSR1 to this batch shell 10 minutes before
# the time limit (--signal=B:USR1@600; `scancel --signal=USR1 --batch JOBID` does the same
# at any time). The trap forwards it to the training step, every rank saves a checkpoint
# and exits with code 42, and the job requeues itself (--requeue); the next start loads
# the checkpoint from CHECKPOINT_DIR and the log continues in the same file.
#
#SBATCH --job-name=megatron-ext
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue

# No `set -e`: a failed step must still reach the requeue decision below.
set -uo pipefail

readonly EXIT_SIGNAL_SAVED=42  # pretrain_gpt.py: checkpoint saved on SIGTERM/SIGUSR1

repo=${MEGATRON_EXT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
launcher=${LAUNCHER:-srun}
python=${PYTHON:-python}
checkpoints=${CHECKPOINT_DIR:-$repo/runs/${SLURM_JOB_NAME:-megatron-ext}/checkpoints}

# --- communication and CUDA settings ------------------------------------------------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP/SP overlap needs in-order kernels
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

# Rank variables left in the submitting shell would override the ones srun/torchrun give.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

# --- the training command (flags given to this script come last and win) ----------------
driver_args=(--save "$checkpoints" --load "$checkpoints")
if [[ -n ${DATA_PATH:-} ]]; then
    read -r -a data_path <<<"$DATA_PATH"
    driver_args+=(--data-path "${data_path[@]}")
fi
if [[ -n ${TOKENIZER_MODEL:-} ]]; then
    driver_args+=(--tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}" --tokenizer-model "$TOKENIZER_MODEL")
elif [[ -n ${TOKENIZER_TYPE:-} ]]; then
    driver_args+=(--tokenizer-type "$TOKENIZER_TYPE")
fi
driver_args+=("$@")

# --wait: once one task has ended the others get 120 s (their own checkpoint save) before
# they are killed, so a crashed rank does not leave the rest hanging in a collective.
srun_args=(--kill-on-bad-exit=0 --wait=120 --label)
case $launcher in
    srun)
        command=("$python" "$repo/pretrain_gpt.py" "${driver_args[@]}")
        ;;
    torchrun)
        gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
        srun_args+=(--ntasks="$SLURM_NNODES" --ntasks-per-node=1)
        # torchrun itself ignores SIGUSR1 (its default action would kill it); the workers
        # install their own handler, save and exit with code 42.
        command=(bash -c 'trap "" USR1; exec "$@"' torchrun
                 "$python" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node="$gpus_per_node"
                 --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
                 "$repo/pretrain_gpt.py" "${driver_args[@]}")
        ;;
    *)
        echo "LAUNCHER must be srun or torchrun, got '$launcher'" >&2
        exit 2
        ;;
esac
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    srun_args+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$repo"
                --container-mounts="${CONTAINER_MOUNTS:-$repo:$repo,$checkpoints:$checkpoints}")
elif [[ -n ${APPTAINER_IMAGE:-} ]]; then
    command=(apptainer exec --nv --bind "${APPTAINER_BIND:-$repo,$checkpoints}" "$APPTAINER_IMAGE" "${command[@]}")
fi

# --- run, forwarding the preemption signal ------------------------------------------------
signalled=0
step_pid=
# shellcheck disable=SC2329  # invoked by the trap below
forward_signal() {
    signalled=1
    echo "$(date -Is) SIGUSR1: asking the training step to save a checkpoint and stop"
    if [[ -n $step_pid ]]; then
        kill -USR1 "$step_pid"  # srun forwards it to every task of the step
    fi
}
trap forward_signal USR1

mkdir -p "$checkpoints"
echo "$(date -Is) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]," \
     "$launcher launcher, master $MASTER_ADDR:$MASTER_PORT, checkpoints $checkpoints"
srun "${srun_args[@]}" "${command[@]}" &
step_pid=$!
# A trapped signal interrupts `wait`; keep waiting until the step has really ended.
while true; do
    wait "$step_pid"
    status=$?
    kill -0 "$step_pid" 2>/dev/null || break
done
echo "$(date -Is) training step exited with code $status"

# 42: every rank saved on a signal. A signal without 42 (it came before the driver installed
# its handler, or torchrun reported the workers' exit as a failure) resumes from the last
# periodic checkpoint; a run that finished (0) is not requeued.
if ((status == EXIT_SIGNAL_SAVED || (signalled && status != 0))); then
    echo "$(date -Is) requeueing job $SLURM_JOB_ID to resume from $checkpoints"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "scontrol requeue failed (cancelled job?); resubmit to resume from $checkpoints" >&2
fi
exit "$status"

#!/usr/bin/env bash
# One node, no scheduler: torchrun over this machine's GPUs (docs/CLUSTER.md).
#
#   DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=/data/tokenizer.model \
#       bash examples/run_single_node.sh --config examples/configs/gpt-350m/baseline.yaml
#
# Arguments go to pretrain_gpt.py. Environment (all optional): NPROC (processes, default
# one per visible GPU), CHECKPOINT_DIR (--save and --load, default runs/single-node/checkpoints),
# DATA_PATH, TOKENIZER_TYPE, TOKENIZER_MODEL (as for examples/slurm/pretrain_gpt.sh),
# PYTHON (default python).
#
# Stopping: `kill -TERM <pid of this script>`: torchrun passes SIGTERM to the workers,
# which save a checkpoint and exit (torchrun waits 30 s for them). Running the same
# command again resumes from CHECKPOINT_DIR.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
checkpoints=${CHECKPOINT_DIR:-$repo/runs/single-node/checkpoints}
nproc=${NPROC:-$( (nvidia-smi --list-gpus 2>/dev/null || true) | wc -l)}  # 0 without nvidia-smi or a GPU
if ((nproc < 1)); then
    echo "no GPU found: set NPROC (e.g. NPROC=2 ... --device cpu for the CPU path)" >&2
    exit 2
fi

args=(--save "$checkpoints" --load "$checkpoints")
if [[ -n ${DATA_PATH:-} ]]; then
    read -r -a data_path <<<"$DATA_PATH"
    args+=(--data-path "${data_path[@]}")
fi
if [[ -n ${TOKENIZER_MODEL:-} ]]; then
    args+=(--tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}" --tokenizer-model "$TOKENIZER_MODEL")
elif [[ -n ${TOKENIZER_TYPE:-} ]]; then
    args+=(--tokenizer-type "$TOKENIZER_TYPE")
fi
args+=("$@")  # flags given to this script come last and win

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$checkpoints"
exec "$python" -m torch.distributed.run --standalone --nproc-per-node="$nproc" "$repo/pretrain_gpt.py" "${args[@]}"

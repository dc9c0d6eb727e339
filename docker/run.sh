#!/usr/bin/env bash
# Run a command in the megatron-ext image with every GPU, the host's IPC namespace (for
# the data loader's shared memory and NCCL), unlimited locked memory and mounts for data
# and checkpoints (docs/DOCKER.md).
#
#   DATA_DIR=/data CHECKPOINT_DIR=/checkpoints bash docker/run.sh \
#       torchrun --nproc-per-node 8 pretrain_gpt.py --config examples/configs/gpt-125m/baseline.yaml \
#       --data-path /data/corpus_text_document --tokenizer-type SentencePieceTokenizer \
#       --tokenizer-model /data/tokenizer.model --save /checkpoints --load /checkpoints
#
# Environment: IMAGE (default megatron-ext:latest), DATA_DIR (mounted read-only at /data,
# default ./data), CHECKPOINT_DIR (mounted at /checkpoints, default ./checkpoints),
# SOURCE_DIR (optional: a checkout mounted over the image's copy, for development).
# Without a command it opens a shell.
set -euo pipefail

image=${IMAGE:-megatron-ext:latest}
data_dir=$(cd "${DATA_DIR:-data}" && pwd)
checkpoint_dir=$(mkdir -p "${CHECKPOINT_DIR:-checkpoints}" && cd "${CHECKPOINT_DIR:-checkpoints}" && pwd)

options=(--rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
         --volume "$data_dir:/data:ro" --volume "$checkpoint_dir:/checkpoints")
if [[ -n ${SOURCE_DIR:-} ]]; then
    options+=(--volume "$(cd "$SOURCE_DIR" && pwd):/workspace/megatron-ext")
fi
if [[ -t 0 && -t 1 ]]; then
    options+=(--interactive --tty)
fi
if (($# == 0)); then
    set -- bash
fi

exec docker run "${options[@]}" "$image" "$@"

#!/usr/bin/env bash
# CPU smoke run of the Slurm launcher: examples/tiny_cpu.yaml on 2 gloo ranks of one node,
# submitted through examples/slurm/pretrain_gpt.sh exactly as a GPU job is.
#
#   bash examples/smoke_cpu_slurm.sh [extra pretrain_gpt.py flags]
#
# Environment: RUN_DIR (default runs/smoke-cpu-slurm), NTASKS (default 2), PYTHON (default
# python), TRAIN_ITERS (default 40), CONFIG (default examples/tiny_cpu.yaml). The dataset is
# the byte-level encoding of the prose bundled with CPython, built into $RUN_DIR/data on
# the first run.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=${RUN_DIR:-$repo/runs/smoke-cpu-slurm}
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
ntasks=${NTASKS:-2}
python=${PYTHON:-python}
config=${CONFIG:-$repo/examples/tiny_cpu.yaml}
data_prefix=$run_dir/data/topics_text_document

if [[ ! -f $data_prefix.idx ]]; then
    mkdir -p "$run_dir/data"
    PYTHONPATH=$repo "$python" "$repo/tools/sample_corpus.py" --output "$run_dir/data/topics.jsonl"
    PYTHONPATH=$repo "$python" "$repo/tools/preprocess_data.py" --input "$run_dir/data/topics.jsonl" \
        --output-prefix "$run_dir/data/topics" --tokenizer-type ByteLevelTokenizer --append-eod --workers 1
fi

# sbatch options override the launcher's GPU #SBATCH defaults: one node, no GPUs; the global
# batch is tiny_cpu.yaml's micro-batch (8) on every rank.
status=0
job=$(MEGATRON_EXT_DIR=$repo CHECKPOINT_DIR=$run_dir/checkpoints PYTHON=$python \
      DATA_PATH=$data_prefix TOKENIZER_TYPE=ByteLevelTokenizer \
      sbatch --parsable --wait --job-name=smoke-cpu --nodes=1 --ntasks="$ntasks" --ntasks-per-node="$ntasks" \
             --gpus-per-node=0 --cpus-per-task=1 --time=00:15:00 --output="$run_dir/%x-%j.out" \
             "$repo/examples/slurm/pretrain_gpt.sh" --config "$config" --device cpu \
             --global-batch-size $((8 * ntasks)) --train-iters "${TRAIN_ITERS:-40}" --lr-warmup-iters 4 "$@") || status=$?
log=$run_dir/smoke-cpu-${job%%;*}.out
echo "job ${job%%;*} exited with code $status; log: $log"
if ((status != 0)); then
    tail -n 40 "$log" >&2
    exit "$status"
fi
grep -q "world size: $ntasks " "$log" || { echo "no 'world size: $ntasks' in $log" >&2; exit 1; }
grep "saved checkpoint at iteration" "$log"
echo "checkpoint tracker: $(cat "$run_dir/checkpoints/latest_checkpointed_iteration.txt")"

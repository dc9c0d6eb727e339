#!/usr/bin/env bash
# shellcheck disable=SC2329  # train and the stage_* functions are called indirectly ("stage_$stage")
# GPU evidence for issue 8 on one H100 (docs/GPU_EVIDENCE_PLAN.md): run from the repository
# root with the megatron-core cp312 wheel in .whl/ and tools/prepare_gpu_data.py's output in
# data/gpu/ (both carried).
#
#   bash bench/gpu_evidence.sh check speed            # device call 1 (about 7 minutes)
#   bash bench/gpu_evidence.sh memory                 # device call 2 (about 2 minutes)
#   bash bench/gpu_evidence.sh convergence            # device call 3 (about 8 minutes)
#
# Stages: check (a 30-iteration pretrain_gpt.py run of the convergence model: the GPU path
# works, and its tokens/s), speed (bench/step_time.py), memory (bench/memory_13b.py),
# convergence (7 pretrain_gpt.py runs side by side on the GPU, then tools/plot_runs.py).
# A failing stage does not stop the next. Everything lands in $OUT (default: runs/gpu_evidence):
# the JSON results, the PNG and its table, and evidence.tar.gz with every log and metrics.jsonl.
# CONV_ITERS (default 500) and CONV_TIMEOUT (seconds, default 480) bound the convergence stage.
# DRIVER_FLAGS (default none) go to every pretrain_gpt.py run and every step_time.py variant,
# e.g. DRIVER_FLAGS="--no-bias-dropout-fusion --no-bias-gelu-fusion" if torch.compile fails there.
set -u -o pipefail

OUT=${OUT:-runs/gpu_evidence}
WORK=${WORK:-/tmp/gpu_evidence}
CONV_ITERS=${CONV_ITERS:-500}
CONV_TIMEOUT=${CONV_TIMEOUT:-480}
DRIVER_FLAGS=${DRIVER_FLAGS:-}
MANIFEST=data/gpu/manifest.json
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/megatron_core-0.16.1-*.whl || { echo "cannot install .whl/megatron_core-0.16.1-*.whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$WORK/device.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)" \
    | tee -a "$WORK/device.txt"

manifest() { python3 -c "import json, sys; print(json.load(open('$MANIFEST'))[sys.argv[1]])" "$1"; }
DATA=(--data-path "$(manifest data_path)" --split "$(manifest split)" --tokenizer-model "$(manifest tokenizer_model)")

# name -> extra flags of one convergence run
declare -A RUNS=(
    [baseline]=""
    [prores]="--prores --prores-warmup 20"
    [wesar]="--wesar"
    [normformer]="--normformer"
    [all]="--prores --prores-warmup 20 --wesar --normformer"
    [baseline-lr10x]="--lr 6e-3 --min-lr 6e-4"
    [all-lr10x]="--lr 6e-3 --min-lr 6e-4 --prores --prores-warmup 20 --wesar --normformer"
)
ORDER=(baseline prores wesar normformer all baseline-lr10x all-lr10x)

train() {  # train NAME ITERS EXTRA...: one pretrain_gpt.py run into $WORK/runs/NAME (RUN_TIMEOUT s, 0: none)
    local name=$1 iters=$2; shift 2
    # shellcheck disable=SC2086  # DRIVER_FLAGS is a flag list
    timeout "${RUN_TIMEOUT:-0}" python3 pretrain_gpt.py --config bench/convergence_small.yaml --device cuda --bf16 "${DATA[@]}" \
        --train-iters "$iters" --tensorboard-dir "$WORK/runs/$name" --data-cache-path "$WORK/cache/$name" "$@" $DRIVER_FLAGS
}

stage_check() {
    train check 30 --lr-warmup-iters 5 --eval-interval 15 --eval-iters 2 --log-interval 5 \
        --prores --prores-warmup 2 --wesar --normformer
}

stage_speed() { python3 bench/step_time.py --extra-flags="$DRIVER_FLAGS" --output "$OUT/step_time.json"; }

stage_memory() { python3 bench/memory_13b.py --output "$OUT/memory_13b.json"; }

stage_convergence() {
    local pids=() name rc=0
    for name in "${ORDER[@]}"; do
        # shellcheck disable=SC2086  # RUNS values are flag lists
        RUN_TIMEOUT=$CONV_TIMEOUT train "$name" "$CONV_ITERS" ${RUNS[$name]} >"$WORK/convergence_$name.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { echo "convergence run ${ORDER[$i]} exited with $?"; rc=1; }
    done
    local dirs=()
    for name in "${ORDER[@]}"; do dirs+=("$WORK/runs/$name"); done
    python3 tools/plot_runs.py "${dirs[@]}" --labels "${ORDER[@]}" --output "$OUT/convergence.png" \
        --title "GPT 12x512, seq 512, Wikipedia (AA+AB train, AC valid), $CONV_ITERS x 64 x 512 tokens" \
        | tee "$OUT/convergence.md"
    return "$rc"
}

status=0
for stage in "$@"; do
    echo "=== stage $stage ($(date -u +%H:%M:%S))"
    start=$SECONDS
    "stage_$stage" 2>&1 | tee "$WORK/$stage.log"
    rc=$?
    echo "=== stage $stage: exit $rc after $((SECONDS - start)) s" | tee -a "$WORK/summary.txt"
    [ $rc -eq 0 ] || status=1
done
cp "$WORK/summary.txt" "$WORK/device.txt" "$OUT/" 2>/dev/null
tar -czf "$OUT/evidence.tar.gz" -C "$WORK" --exclude cache --exclude 'events.out.*' .
exit $status

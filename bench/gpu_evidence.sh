#!/usr/bin/env bash
# shellcheck disable=SC2329  # train and the stage_* functions are called indirectly ("stage_$stage")
# GPU evidence for issue 8 on one GPU (docs/GPU_EVIDENCE_PLAN.md): run from the repository
# root with the megatron-core cp312 wheel in .whl/ and tools/prepare_gpu_data.py's output in
# data/gpu/ (both carried). Sized for 15 minutes of device time in two calls:
#
#   bash bench/gpu_evidence.sh check speed memory     # device call 1 (at most 9.5 minutes)
#   bash bench/gpu_evidence.sh convergence            # device call 2, while warm (about 5.5 minutes)
#
# Stages: check (a 20-iteration pretrain_gpt.py run of the convergence model with all three
# methods, saved at 10 and resumed from there: the GPU path works, resumes exactly, and its
# tokens/s), speed (bench/step_time.py), memory (bench/memory_13b.py), convergence (7
# pretrain_gpt.py runs side by side on the GPU, then tools/plot_runs.py). Each stage runs
# under its own time limit (CHECK_TIMEOUT, SPEED_TIMEOUT, MEMORY_TIMEOUT, CONV_TIMEOUT
# seconds) so that one call never reaches the device's 600 s limit and the results so far
# always come back; step_time.py writes its JSON after every variant. A failing stage does not
# stop the next. Everything lands in $OUT (default: runs/gpu_evidence): the JSON results,
# the PNG and its table, and evidence.tar.gz with every log and metrics.jsonl.
# CONV_ITERS (default 300) sets the convergence length (the same for every run).
# DRIVER_FLAGS (default none) go to every pretrain_gpt.py run and every step_time.py variant,
# e.g. DRIVER_FLAGS="--no-bias-dropout-fusion --no-bias-gelu-fusion" if torch.compile fails there.
set -u -o pipefail

OUT=${OUT:-runs/gpu_evidence}
WORK=${WORK:-/tmp/gpu_evidence}
CONV_ITERS=${CONV_ITERS:-300}
CONV_TIMEOUT=${CONV_TIMEOUT:-300}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-100}
SPEED_TIMEOUT=${SPEED_TIMEOUT:-270}
MEMORY_TIMEOUT=${MEMORY_TIMEOUT:-140}
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

CHECK_FLAGS=(--lr-warmup-iters 5 --eval-interval 10 --eval-iters 2 --log-interval 1 --prores --prores-warmup 2 --wesar --normformer)

stage_check() {  # 20 iterations saved at 10, then the same run resumed from iteration 10
    TORCH_LOGS=recompiles RUN_TIMEOUT=$CHECK_TIMEOUT train check 20 "${CHECK_FLAGS[@]}" --save "$WORK/runs/check" \
        --save-interval 10 2>&1 | tee "$WORK/check-first.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || return "$rc"  # 124: the time limit
    # The fused kernels compile in the first iteration (and the evaluation before it); none after.
    echo "torch.compile recompilations after iteration 1:" \
        "$(sed -n '/ iteration  *1\//,$p' "$WORK/check-first.log" | grep -c 'Recompiling function')"
    mkdir -p "$WORK/runs/check-resumed"
    cp -r "$WORK/runs/check/iter_0000010" "$WORK/runs/check-resumed/"
    echo 10 >"$WORK/runs/check-resumed/latest_checkpointed_iteration.txt"
    RUN_TIMEOUT=$CHECK_TIMEOUT train check-resumed 20 "${CHECK_FLAGS[@]}" --load "$WORK/runs/check-resumed" || return
    python3 - "$WORK/runs/check" "$WORK/runs/check-resumed" <<'PY'
import json, sys
def losses(d):
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "lm_loss" in r}
whole, resumed = map(losses, sys.argv[1:])
diffs = {it: abs(resumed[it] - whole[it]) / whole[it] for it in resumed}
print("resume check: iterations", sorted(resumed), "max relative loss difference", max(diffs.values()))
sys.exit(0 if sorted(resumed) == list(range(11, 21)) and max(diffs.values()) < 1e-3 else 1)
PY
}

stage_speed() {  # the largest shape first: its MFU is a target, and a time limit then cuts 125M, not 1.3B
    timeout "$SPEED_TIMEOUT" python3 bench/step_time.py --shapes 1.3b 350m 125m --warmup 8 --iters 20 \
        --extra-flags="$DRIVER_FLAGS" --output "$OUT/step_time.json"
}

stage_memory() { timeout "$MEMORY_TIMEOUT" python3 bench/memory_13b.py --output "$OUT/memory_13b.json"; }

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

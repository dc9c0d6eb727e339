#!/usr/bin/env bash
# shellcheck disable=SC2329  # train and the stage_* functions are called indirectly ("stage_$stage")
# GPU evidence for issue 8 on one GPU (docs/GPU_EVIDENCE_PLAN.md): run from the repository
# root with the megatron-core cp312 wheel in .whl/ and tools/prepare_gpu_data.py's output in
# data/gpu/ (both carried). Sized for 15 minutes of device time in two calls:
#
#   bash bench/gpu_evidence.sh check+memory speed     # device call 1 (at most about 7 minutes)
#   bash bench/gpu_evidence.sh convergence            # device call 2, while warm (about 5.5 minutes)
#   bash bench/gpu_evidence.sh speed profile          # the fixes' measurement (at most about 7.5 minutes)
#   bash bench/gpu_evidence.sh accumulation           # once per step against per micro batch (at most 4 minutes)
#
# Stages named together with '+' run side by side (check and memory: the memory stage
# measures each process's own peak allocation, which the other process does not change,
# and its time is not a result); stages named apart run one after the other (speed alone).
# Stages: check (a 20-iteration pretrain_gpt.py run of the convergence model with all three
# methods, saved at 10 and resumed from there: the GPU path works, resumes exactly, and its
# tokens/s), speed (bench/step_time.py), profile (bench/profile_step.py: where the 1.3B
# overheads go), accumulation (bench/profile_step.py with 4 micro batches per iteration: the
# weight-side scales once per step against per micro batch), memory (bench/memory_13b.py),
# convergence (7 pretrain_gpt.py runs side by side on the GPU, then tools/plot_runs.py). Each
# stage runs under its own time limit (CHECK_TIMEOUT, SPEED_TIMEOUT, PROFILE_TIMEOUT,
# ACCUMULATION_TIMEOUT, MEMORY_TIMEOUT, CONV_TIMEOUT seconds) so that one call never reaches
# the device's 600 s limit and the results so far always come back; the benchmarks write
# their JSON after every variant, and a variant or primitive that raises is recorded there
# with its error (its traceback in the stage's log) while the others go on, the stage then
# exiting 1. A failing stage does not stop the next. Everything lands in $OUT (default:
# runs/gpu_evidence): the JSON results, the PNG and its table, and evidence.tar.gz with
# every log and metrics.jsonl (not the checkpoints). The output ends in a digest of the
# results (summary, speed table, memory fit, the check's throughput) for a reader who sees
# only its last lines.
# CONV_ITERS (default 300) sets the convergence length (the same for every run); ProRes'
# --prores-warmup is CONV_ITERS / 15 (20 at 300), so that all 12 layers are on at 80% of it.
# DRIVER_FLAGS (default none) go to every pretrain_gpt.py run and every step_time.py variant,
# e.g. DRIVER_FLAGS="--no-bias-dropout-fusion --no-bias-gelu-fusion" if torch.compile fails there.
set -u -o pipefail

OUT=${OUT:-runs/gpu_evidence}
WORK=${WORK:-/tmp/gpu_evidence}
CONV_ITERS=${CONV_ITERS:-300}
PRORES_WARMUP=$((CONV_ITERS / 15))
CONV_TIMEOUT=${CONV_TIMEOUT:-300}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-90}
SPEED_TIMEOUT=${SPEED_TIMEOUT:-240}
MEMORY_TIMEOUT=${MEMORY_TIMEOUT:-150}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-210}
ACCUMULATION_TIMEOUT=${ACCUMULATION_TIMEOUT:-240}
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
    [prores]="--prores --prores-warmup $PRORES_WARMUP"
    [wesar]="--wesar"
    [normformer]="--normformer"
    [all]="--prores --prores-warmup $PRORES_WARMUP --wesar --normformer"
    [baseline-lr10x]="--lr 6e-3 --min-lr 6e-4"
    [all-lr10x]="--lr 6e-3 --min-lr 6e-4 --prores --prores-warmup $PRORES_WARMUP --wesar --normformer"
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

stage_profile() {  # phases, kernels, host ops and synchronisations of the 1.3B variants, set against the baseline
    timeout "$PROFILE_TIMEOUT" python3 bench/profile_step.py --shapes 1.3b --primitives --output "$OUT/profile.json" \
        --variants baseline wesar wesar+scale-fusion normformer normformer+scale-fusion all all+scale-fusion
}

stage_accumulation() {  # 4 micro batches per iteration: once per step (the default) against +per-micro-batch
    timeout "$ACCUMULATION_TIMEOUT" python3 bench/profile_step.py --shapes 1.3b --micro-batches 4 --warmup 3 \
        --iters 5 --profile-iters 1 --output "$OUT/accumulation.json" \
        --variants baseline wesar wesar+per-micro-batch all all+per-micro-batch
}

stage_memory() {  # MEMORY_FILL (default 0.9) leaves room for a stage beside it (check: a few GiB)
    timeout "$MEMORY_TIMEOUT" python3 bench/memory_13b.py --fill "${MEMORY_FILL:-0.9}" --output "$OUT/memory_13b.json"
}

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

run_stage() {  # run_stage NAME: one stage under its log, its exit status and seconds in summary.txt
    local start=$SECONDS rc
    "stage_$1" >"$WORK/$1.log" 2>&1
    rc=$?
    echo "=== stage $1: exit $rc after $((SECONDS - start)) s" | tee -a "$WORK/summary.txt"
    return "$rc"
}

digest() {  # the results in a few lines, for the end of the output
    echo "=== digest"
    cat "$WORK/summary.txt"
    grep -h "resume check\|recompilations after" "$WORK/check.log" 2>/dev/null
    grep -h " iteration  *20/" "$WORK/check-first.log" 2>/dev/null
    [ -f "$OUT/step_time.json" ] && python3 -W ignore -c "import json, sys; sys.path.insert(0, 'bench'); import step_time
r = json.load(open('$OUT/step_time.json')); print(step_time.markdown(r['results'], r['matmul_ceiling_tflops']))"
    [ -f "$OUT/memory_13b.json" ] && python3 -c "import json; r = json.load(open('$OUT/memory_13b.json'))
gib = lambda x: 'n/a' if x is None else '%.2f' % (x / 2**30)
for name, v in r['variants'].items():
    for p in v.get('points', []): print(name, p['layers'], 'layers, GiB: peak', gib(p['peak_allocated']), 'forward-backward',
                                gib(p.get('peak_forward_backward')), 'optimizer step', gib(p.get('peak_optimizer_step')),
                                'estimated', gib(p.get('estimated_peak')), p.get('adam_kernel'), 'Adam')
    print(name, {k: x for k, x in v.items() if k != 'points'})
print('layouts_13b', json.dumps(r.get('layouts_13b'))[:2500])"
    for profile in profile accumulation; do [ -f "$OUT/$profile.json" ] && python3 -W ignore -c "import json, sys
sys.path.insert(0, 'bench'); import profile_step
print('$profile:', profile_step.summary(json.load(open('$OUT/$profile.json'))))"
    done
    [ -f "$OUT/convergence.md" ] && cat "$OUT/convergence.md"
}

status=0
for group in "$@"; do  # a group: stages joined by '+', run side by side
    echo "=== stages $group ($(date -u +%H:%M:%S))"
    IFS=+ read -r -a stages <<<"$group"
    pids=()
    for stage in "${stages[@]}"; do run_stage "$stage" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    for stage in "${stages[@]}"; do tail -n 25 "$WORK/$stage.log"; done
done
cp "$WORK/summary.txt" "$WORK/device.txt" "$OUT/" 2>/dev/null
tar -czf "$OUT/evidence.tar.gz" -C "$WORK" --exclude cache --exclude 'events.out.*' --exclude 'iter_*' .
digest
exit $status

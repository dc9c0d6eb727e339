#!/usr/bin/env bash
# A rehearsal of bench/gpu_evidence.sh on a CPU machine, before device time is spent on it:
# the same script, stages and time limits, with every Python script run under emulated
# CUDA (tests/emulated_cuda.py), the pip install and nvidia-smi stood in for, and a toy
# model (DRIVER_FLAGS). It checks the script's plumbing (data manifest, the resume
# comparison, time limits that keep partial results, the plot and table, the archive),
# not the GPU: no timings, memory figures or losses from it mean anything.
#
#   bash bench/gpu_evidence_dry_run.sh check+memory speed profile   # about 4.5 minutes on 2 cores
#   CONV_ITERS=60 bash bench/gpu_evidence_dry_run.sh convergence
#
# Needs .venv (tools/bootstrap.sh; VENV names another, e.g. one with the device's torch,
# docs/GPU.md), data/gpu (tools/prepare_gpu_data.py) and the wheel in .whl/
# (docs/GPU_EVIDENCE_PLAN.md). Results land in $OUT (default runs/gpu_evidence_dry_run);
# the work directory is temporary unless WORK is given.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
VENV_DIR=${VENV:-.venv}
[[ $VENV_DIR = /* ]] || VENV_DIR=$REPO/$VENV_DIR
SHIMS=$(mktemp -d)
trap 'rm -rf "$SHIMS"' EXIT

cat >"$SHIMS/python3" <<EOF
#!/usr/bin/env bash
# python3 for the rehearsal: scripts under emulated CUDA, toy sizes for the benchmarks.
PY="$VENV_DIR/bin/python"
EMULATE="$REPO/tests/emulated_cuda.py"
if [ "\$1" = -m ] && [ "\$2" = pip ]; then echo "[dry run] skipped: pip \${*:3}"; exit 0; fi
case "\$1" in
    *step_time.py) exec "\$PY" "\$EMULATE" "\$@" --ceiling-size 256 ;;  # an 8192^3 matmul takes minutes on a CPU
    *memory_13b.py) exec "\$PY" "\$EMULATE" "\$@" --tiny ;;
    *profile_step.py) exec "\$PY" "\$EMULATE" "\$@" --tiny --warmup 1 --iters 3 --profile-iters 1 ;;
    *plot_runs.py) exec "\$PY" "\$@" ;;
    *.py) exec "\$PY" "\$EMULATE" "\$@" ;;
esac
exec "\$PY" "\$@"
EOF
cat >"$SHIMS/nvidia-smi" <<'EOF'
#!/usr/bin/env bash
echo "name, memory.total [MiB], driver_version, clocks.max.sm [MHz]"
echo "emulated CUDA (CPU), 81920 MiB, none, 0"
EOF
chmod +x "$SHIMS/python3" "$SHIMS/nvidia-smi"

TOY="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 --seq-length 64"
TOY+=" --micro-batch-size 4 --global-batch-size 8 --eval-iters 2 --lr-warmup-iters 10"
PATH="$SHIMS:$PATH" OMP_NUM_THREADS=1 OUT="${OUT:-runs/gpu_evidence_dry_run}" WORK="${WORK:-$SHIMS/work}" \
    SPEED_TIMEOUT="${SPEED_TIMEOUT:-150}" DRIVER_FLAGS="$TOY ${DRIVER_FLAGS:-}" bash bench/gpu_evidence.sh "$@"

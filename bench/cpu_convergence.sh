#!/usr/bin/env bash
# A small CPU study on real Wikipedia text: baseline, each method alone, all three, and a
# high-learning-rate pair, same data and token budget, plotted with tools/plot_runs.py.
#
#   bash bench/cpu_convergence.sh            # PYTHON=... to choose the interpreter
#   SEED=1 RUN_NAMES="baseline all" bash bench/cpu_convergence.sh   # other seeds, some runs
#
# Needs ../shared/data (the Wikipedia shards, see its SOURCES.md). Writes data/cpu_study/,
# runs/cpu_study/<run>/ (runs/cpu_study/seed<SEED>/<run>/ for a SEED other than 1234) and,
# for all runs of seed 1234, docs/cpu_convergence.png; prints the table for docs/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
WIKI=../shared/data/enwiki-2015-wikiextractor/text_AA_wiki_00-99.txt.xz
DATA=data/cpu_study
SEED="${SEED:-1234}"
RUNS=runs/cpu_study
[ "$SEED" = 1234 ] || RUNS="runs/cpu_study/seed$SEED"
ITERS="${ITERS:-400}"
ALL_RUNS="baseline prores wesar wesar-noclip normformer all baseline-lr5x all-lr5x"
RUN_NAMES="${RUN_NAMES:-$ALL_RUNS}"
mkdir -p "$DATA" "$RUNS"

if [ ! -f "$DATA/wiki.txt" ]; then
    # The first 6 MB of shard AA, whole articles only.
    # (xz ends on SIGPIPE, status 141, once head has its bytes)
    { xz -dc "$WIKI" || [ $? -eq 141 ]; } | head -c 6000000 | awk '/<\/doc>/ { last = NR } { lines[NR] = $0 } END { for (i = 1; i <= last; i++) print lines[i] }' > "$DATA/wiki.txt"
fi
[ -f "$DATA/tok.model" ] || "$PYTHON" tools/train_tokenizer.py --input "$DATA/wiki.txt" \
    --model-prefix "$DATA/tok" --vocab-size 4000 --model-type bpe --max-sentences 200000
[ -f "$DATA/wiki_text_document.bin" ] || "$PYTHON" tools/preprocess_data.py --input "$DATA/wiki.txt" \
    --output-prefix "$DATA/wiki" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model" \
    --append-eod --workers 2 --no-progress

# The quick-start model without its method switches (everything above "# methods").
sed '/^# methods/,$d' examples/tiny_cpu.yaml > "$DATA/base.yaml"
common=(--config "$DATA/base.yaml" --data-path "$DATA/wiki_text_document" --split "98,2,0"
        --tokenizer-model "$DATA/tok.model" --train-iters "$ITERS" --lr-warmup-iters 40
        --micro-batch-size 16 --global-batch-size 16 --eval-interval 50 --eval-iters 8
        --log-interval 25 --save-interval 100000 --seed "$SEED")

train() {  # name, extra flags...: skipped unless the name is in RUN_NAMES
    local name=$1
    shift
    [[ " $RUN_NAMES " == *" $name "* ]] || return 0
    rm -rf "${RUNS:?}/$name"
    "$PYTHON" pretrain_gpt.py "${common[@]}" --save "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
}

train baseline
train prores --prores --prores-warmup 20
train wesar --wesar
train wesar-noclip --wesar --wesar-exclude-gates-from-clip
train normformer --normformer
train all --prores --prores-warmup 20 --wesar --normformer
train baseline-lr5x --lr 1.5e-2 --min-lr 1.5e-3
train all-lr5x --lr 1.5e-2 --min-lr 1.5e-3 --prores --prores-warmup 20 --wesar --normformer

if [ "$SEED" = 1234 ] && [ "$RUN_NAMES" = "$ALL_RUNS" ]; then
    "$PYTHON" tools/plot_runs.py "$RUNS"/{baseline,prores,wesar,wesar-noclip,normformer,all,baseline-lr5x,all-lr5x} \
        --output docs/cpu_convergence.png --title "4-layer GPT on 6 MB of Wikipedia, CPU, ${ITERS} iterations"
else
    dirs=()
    for name in $RUN_NAMES; do dirs+=("$RUNS/$name"); done
    "$PYTHON" tools/plot_runs.py "${dirs[@]}" --output "$RUNS/convergence.png" \
        --title "4-layer GPT on 6 MB of Wikipedia, CPU, ${ITERS} iterations, seed $SEED"
fi

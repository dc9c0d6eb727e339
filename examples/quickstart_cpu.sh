#!/usr/bin/env bash
# From nothing to a trained small GPT on the CPU: corpus, tokenizer, dataset, training.
# Uses $PYTHON when set; otherwise installs the project into .venv (tools/bootstrap.sh)
# and uses that. Writes data/quickstart/ and runs/quickstart/; extra arguments go to
# pretrain_gpt.py.
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    bash tools/bootstrap.sh
    PYTHON=.venv/bin/python
fi
DATA=data/quickstart

mkdir -p "$DATA"
"$PYTHON" tools/sample_corpus.py --output "$DATA/topics.jsonl"
"$PYTHON" tools/train_tokenizer.py --input "$DATA/topics.jsonl" --model-prefix "$DATA/tok" \
    --vocab-size 2000 --model-type bpe
"$PYTHON" tools/preprocess_data.py --input "$DATA/topics.jsonl" --output-prefix "$DATA/topics" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model" \
    --append-eod --workers 2 --no-progress
"$PYTHON" pretrain_gpt.py --config examples/tiny_cpu.yaml "$@"

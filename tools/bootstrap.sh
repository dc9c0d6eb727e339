#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install megatron-ext into it.
#
# torch goes in first: an unpinned torch with none installed pulls a multi-GB CUDA
# build, so we ask for the CPU release that the project's range admits (TORCH_SPEC
# overrides, e.g. TORCH_SPEC=torch for a GPU machine). Then the project and its test
# extras. Re-running is cheap: what is installed already is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
venv=${VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet "$torch_spec"
fi
"$venv/bin/python" -m pip install --quiet -e ".[test]"

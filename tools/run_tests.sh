#!/usr/bin/env bash
# The project's test command: install into .venv if needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/bootstrap.sh
exec "${VENV:-.venv}/bin/python" -m pytest -q tests "$@"

#!/usr/bin/env bash
# After bench/run_experiments.sh: the setting with the best cross-validation accuracy, on dev with 3 seeds; the table.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python bench/experiments.py chosen --seeds 1 2 3
.venv/bin/python bench/experiments.py table

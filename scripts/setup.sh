#!/usr/bin/env bash
# Make .venv with the versions this project is tested with, and install peft_tuner (editable) into it.
# Idempotent: a second run with an unchanged requirements-lock.txt returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
PIP=".venv/bin/python -m pip"
stamp=.venv/.peft_tuner-installed
want="$(cat requirements-lock.txt setup.cfg | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
# torch first and pinned: a bare requirement would pull a multi-GB CUDA build onto a CPU box.
# A machine that already has torch in this venv (a GPU image, say) keeps its own.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
$PIP install -q -r requirements-lock.txt
$PIP install -q --no-deps -e .
echo "$want" > "$stamp"

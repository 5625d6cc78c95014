#!/usr/bin/env bash
# The GPU numbers in one call, on a lent GPU machine with no network (bench/gpu_numbers.py: our step eager, compiled,
# with Liger, both; half the blocks; the Trainer and TRL on the same workload; an 8B shape under ZeRO-3 in bf16 and nf4;
# within BUDGET seconds, 480 by default). Two steps:
#   bash bench/gpu_numbers.sh --wheels WHEELS                # here, with network: the wheels the machine lacks, < 64 MiB
#   bash bench/gpu_numbers.sh DATA_ROOT WHEELS [BUDGET]      # there: installs WHEELS into a folder, then runs the cases
# (torch, tokenizers, safetensors and huggingface-hub are taken from the machine's own image). A trial on a CPU:
#   .venv/bin/python bench/gpu_numbers.py --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ "${1:-}" = "--wheels" ]; then
  OUT=${2:?give the folder for the wheels}
  mkdir -p "$OUT"
  PIP=".venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version ${GPU_PYTHON:-3.12} \
       --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d $OUT"
  $PIP transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 trl==1.16.0 liger-kernel==0.8.5 bitsandbytes==0.50.2 \
       hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  .venv/bin/python -m pip wheel --no-deps -w "$OUT" deepspeed==0.19.8
  du -sh "$OUT"
  exit 0
fi
DATA_ROOT=$(realpath "${1:?give the folder that holds raft/twitter_complaints/ and wikitext-2/}")
WHEELS=${2:?give the wheels folder made with --wheels}
SITE=$(mktemp -d /tmp/gpu_site-XXXX)
$PY -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$(pwd)" PATH="$SITE/bin:$PATH"
$PY bench/gpu_numbers.py --data "$DATA_ROOT" --budget "${3:-480}"

#!/usr/bin/env bash
# The GPU numbers in one run, on a CUDA machine (run on purpose there; CI has no GPU): the GPU-only tests, the model
# FLOPs utilization of our training step (bench/step_mfu.py) on a random Llama of 1.1B parameters, bf16, LoRA r=16 on
# every linear layer, on twitter_complaints rows and WikiText-2 blocks (padding-free batches through flash-attention's
# varlen kernel, then under SDPA's block-diagonal mask for comparison, then twice the blocks a step, eager and with
# train.compile=true), and the pipeline check (bench/gpu_check.sh); with WITH_8B=1 also a Llama-3-8B shape under
# ZeRO-3 on WikiText-2 blocks. A failed step is reported and the next one runs; the script fails at the end if any did.
#   bash bench/gpu_numbers.sh DATA_ROOT [LOG_DIR]    (DATA_ROOT holds raft/twitter_complaints/ and wikitext-2/)
# A machine without network access needs the locked packages it lacks as wheels, made beside the project first (for
# its Python, here 3.12; the versions this project's .venv holds):
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d WHEELS \
#     transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5
#   .venv/bin/pip wheel --no-deps -w WHEELS deepspeed==0.19.8
# and there `pip install --no-index --no-deps --target SITE WHEELS/*.whl` with PYTHONPATH=SITE and DEEPSPEED=SITE/bin/deepspeed
# (torch, tokenizers, safetensors and huggingface-hub are taken from the machine's own image).
# Output: LOG_DIR/*.log (work folders go to a temporary folder); bench/results/step_mfu.jsonl and the step_mfu table
# of docs/benchmarks.md.
# A trial of the script's steps on a CPU: ALLOW_CPU=1 LAYERS=2 DTYPE=fp32 PY=.venv/bin/python bash bench/gpu_numbers.sh ...
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=$(realpath "${1:?give the folder that holds raft/twitter_complaints/ and wikitext-2/}")
LOGS=${2:-outputs/gpu_numbers}
PY=${PY:-python3}
export PY
WORK=$(mktemp -d /tmp/gpu_numbers-XXXX)
mkdir -p "$LOGS"
failed=()
step() {  # step NAME COMMAND...: the command's output to LOGS/NAME.log and the screen, stopped after STEP_TIMEOUT seconds
  echo "== $1: $(date -u +%H:%M:%S)"
  timeout "${STEP_TIMEOUT:-0}" "${@:2}" 2>&1 | tee "$LOGS/$1.log" || failed+=("$1")
}
MFU=(--dtype "${DTYPE:-bf16}" --data "$DATA_ROOT" ${LAYERS:+--layers "$LAYERS"})
[ "${ALLOW_CPU:-}" = 1 ] || step gpu_tests $PY -m pytest -q -p no:cacheprovider tests/test_training.py -k varlen
step step_mfu_1b $PY bench/step_mfu.py --models llama-1b "${MFU[@]}"
step step_mfu_1b_mask $PY bench/step_mfu.py --models llama-1b --workloads wikitext --packed-attention mask "${MFU[@]}"
step step_mfu_1b_16blocks $PY bench/step_mfu.py --models llama-1b --workloads wikitext --batch 16 "${MFU[@]}"
step step_mfu_1b_16blocks_compiled $PY bench/step_mfu.py --models llama-1b --workloads wikitext --batch 16 --compile "${MFU[@]}"
step gpu_check bash bench/gpu_check.sh "$DATA_ROOT/raft/twitter_complaints" "$WORK/gpu_check"
if [ "${WITH_8B:-}" = 1 ]; then
  step step_mfu_8b $PY bench/step_mfu.py --models llama-8b --zero3 --workloads wikitext "${MFU[@]}"
fi
rm -rf "$WORK"
[ ${#failed[@]} = 0 ] || { echo "gpu numbers: failed: ${failed[*]}"; exit 1; }
echo "gpu numbers: done; the table is in docs/benchmarks.md (step_mfu)"

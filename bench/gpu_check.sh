#!/usr/bin/env bash
# The pipeline on a CUDA machine (run on purpose there; CI has no GPU): a tiny Llama trained through the python,
# deepspeed and torchrun launchers at ZeRO-0/2/3 (fp32 and bf16), then evaluate, merge and generate on the GPU.
# Each step prints its summary line; the script stops at the first failure.
#   bash bench/gpu_check.sh DATA_DIR [OUT_DIR]     (DATA_DIR: the RAFT twitter_complaints folder)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?give the RAFT twitter_complaints folder}
OUT=${2:-outputs/gpu_check}
PY=${PY:-python3}
BIN=$(dirname "$(command -v $PY)")
mkdir -p "$OUT"
[ "${ALLOW_CPU:-}" = 1 ] || $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name())"
$PY -m peft_tuner.cli make-tiny-model "$OUT/tiny" --arch llama > /dev/null
RECIPE=configs/twitter_complaints_smollm2.yaml
COMMON=(model.name_or_path="$OUT/tiny" data.train_file="$DATA" data.eval_file="$DATA/dev.csv" data.test_file="$DATA"
        train.epochs=2 train.learning_rate=1e-2 train.eval_each_epoch=true --overwrite)
$PY launch/train.py $RECIPE "${COMMON[@]}" output_dir="$OUT/python" | grep "done |"
${DEEPSPEED:-$BIN/deepspeed} --num_gpus 1 launch/train.py $RECIPE "${COMMON[@]}" output_dir="$OUT/ds_zero2_bf16" model.dtype=bf16 \
  --deepspeed ds_configs/zero2.json 2>&1 | grep "done |"
${TORCHRUN:-$BIN/torchrun} --nproc_per_node 1 launch/train.py $RECIPE "${COMMON[@]}" output_dir="$OUT/torchrun_zero3" \
  --deepspeed ds_configs/zero3.json 2>&1 | grep "done |"
$PY -m peft_tuner.cli evaluate $RECIPE "${COMMON[@]:0:4}" --adapter "$OUT/torchrun_zero3/adapter" --out "$OUT/eval" | grep "evaluate |"
$PY -m peft_tuner.cli merge $RECIPE "${COMMON[@]:0:4}" --adapter "$OUT/torchrun_zero3/adapter" --out "$OUT/merged" | tail -1
$PY -m peft_tuner.cli generate --model "$OUT/merged" --prompt "Tweet text : my order never came Label : " generate.max_new_tokens=4 | tail -2
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for run in ("python", "ds_zero2_bf16", "torchrun_zero3"):
    s = json.loads((Path(sys.argv[1]) / run / "summary.json").read_text())
    print(run, {k: s[k] for k in ("zero_stage", "final_loss", "adapter_max_logit_diff", "peak_memory_gb", "mean_step_seconds")})
EOF
echo "gpu check: all steps passed"

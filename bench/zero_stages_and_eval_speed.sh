#!/usr/bin/env bash
# Speed and memory figures for docs/benchmarks.md (about 15 minutes on 2 CPU cores). Needs `peft-tuner demo` first
# (its adapter is evaluated) and the prepared SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=outputs/bench
mkdir -p $OUT
export OMP_NUM_THREADS=1
RECIPE=configs/twitter_complaints_smollm2.yaml
# 1. One training job per ZeRO stage: SmolLM2-135M, LoRA r=8 q,v, 2 processes x 4 sequences, 2 epochs (14 steps).
for stage in 2 3; do
  .venv/bin/deepspeed --num_accelerators 2 --master_port 2950$stage launch/train.py $RECIPE --deepspeed ds_configs/zero$stage.json 'peft.target_modules=[q_proj, v_proj]' \
    train.epochs=2 output_dir=$OUT/zero$stage --overwrite > $OUT/zero$stage.log 2>&1
done
# 2. Evaluation speed on the same 300 dev rows: rank classification and generation (bf16, 1 process, 2 threads).
export OMP_NUM_THREADS=2
for method in rank generate; do
  $PY -m peft_tuner.cli evaluate --adapter outputs/demo/train/adapter --method $method eval.max_new_tokens=4 \
    --out $OUT/eval_$method > $OUT/eval_$method.log 2>&1
done
# 3. Whole test splits in bounded memory: twitter_complaints (3,399 rows, 2 classes), banking_77 (all 5,000 rows, 77 classes: about 50 min here).
$PY -m peft_tuner.cli evaluate --adapter outputs/demo/train/adapter --split test --out $OUT/test_twitter > $OUT/test_twitter.log 2>&1
$PY -m peft_tuner.cli evaluate $RECIPE --split test data.test_file=../shared/data/raft/banking_77 \
  data.train_file=../shared/data/raft/banking_77 data.text_column=Query data.label_column=Label \
  'data.prompt_template="Query : {Query} Label : "' data.max_length=96 output_dir=$OUT/banking77 --out $OUT/test_banking77 > $OUT/test_banking77.log 2>&1
$PY bench/zero_stages_and_eval_speed_report.py

#!/usr/bin/env bash
# The experiments recorded in docs/experiments.md, in the order they were run (about 35 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
run() { .venv/bin/python bench/experiments.py run "$@"; }
BATCH="train.batch_size=8"   # one process: the global batch of 8 that 2 processes x 4 give in the demo
CHAT='data.prompt_template="<|im_start|>user\nIs this tweet a complaint about a product or service? Answer yes or no.\nTweet: {Tweet text}<|im_end|>\n<|im_start|>assistant\n"'
YESNO='data.label_words={complaint: "yes", "no complaint": "no"}'

# 1. Settings compared by 2-fold cross-validation on the 50 training rows (seed 1).
run cv-reference-prompt --seeds 1 --cv 2 -- $BATCH
run cv-chat-yes-no --seeds 1 --cv 2 -- $BATCH "$CHAT" "$YESNO"
run cv-chat-yes-no-all-linear --seeds 1 --cv 2 -- $BATCH "$CHAT" "$YESNO" peft.target_modules=all-linear peft.r=16 train.learning_rate=1e-3
run cv-reference-calibrated --seeds 1 --cv 2 -- $BATCH eval.calibrate=true
# 2. The PEFT example's recipe through peft_tuner, on dev, 3 seeds (generation as the example does it, and rank).
run peft-example --seeds 1 2 3 --eval --also-generate -- $BATCH data.max_length=64
# 3. Added later: the reference prompt without its trailing space, class names as the model writes them (leading space).
run cv-spaced-label-words --seeds 1 --cv 2 -- $BATCH 'data.prompt_template="Tweet text : {Tweet text} Label :"' \
  'data.label_words={complaint: " complaint", "no complaint": " no complaint"}'
.venv/bin/python bench/experiments.py chosen --seeds 1 2 3
.venv/bin/python bench/experiments.py table

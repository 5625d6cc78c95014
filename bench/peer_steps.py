"""One training workload through the loops a GPU user would otherwise run, for bench/gpu_numbers.py: transformers'
Trainer and TRL's SFTTrainer, both padding-free, on the same random Llama folder, WikiText-2 blocks and LoRA (r=16,
alpha 32, dropout 0.05 on every linear layer) as ours. Prints one JSON line: real tokens/s over the steps after the
first two, peak memory, the losses.

    python bench/peer_steps.py --loop hf-trainer --model FOLDER --data DATA --block 1024 --batch 16 --steps 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def blocks(model: Path, data: Path, block: int, count: int) -> list[list[int]]:
    """The first `count` WikiText-2 blocks of `block` tokens, as the trainer packs them (data.pack_text)."""
    from transformers import AutoTokenizer

    from peft_tuner.data.formats import pack_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    lines, n = (data / "wikitext-2" / "train.txt").read_text(encoding="utf-8").splitlines(), 64
    while len(packed := pack_text(tokenizer, lines[:n], block)) < count and n < len(lines):
        n *= 2
    return [b["input_ids"] for b in packed[:count]]


class Clock:
    """Seconds and loss of each optimizer step, from the trainer's callbacks."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.seconds.append(time.perf_counter() - clock.began)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.losses.append(logs["loss"])

        self.seconds, self.losses, self.callback = [], [], Callback()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", required=True, choices=["hf-trainer", "trl-sft"])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = p.parse_args()
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gpu = Path(args.model), torch.cuda.is_available()
    rows = blocks(model_dir, Path(args.data), args.block, args.batch * (args.steps + 2))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    common = dict(per_device_train_batch_size=args.batch, learning_rate=5e-4, max_steps=args.steps + 2, logging_steps=1,
                  save_strategy="no", report_to=[], bf16=args.dtype == "bf16" and gpu, use_cpu=not gpu,
                  dataloader_num_workers=0, disable_tqdm=True, seed=0)
    with tempfile.TemporaryDirectory() as out:
        if args.loop == "hf-trainer":
            from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

            trainer = Trainer(model=get_peft_model(model, lora), args=TrainingArguments(output_dir=out, **common),
                              train_dataset=Dataset.from_list([{"input_ids": r, "labels": r} for r in rows]),
                              data_collator=DataCollatorWithFlattening(), callbacks=[clock.callback])
        else:
            from trl import SFTConfig, SFTTrainer

            trainer = SFTTrainer(model=model, peft_config=lora, processing_class=tokenizer, callbacks=[clock.callback],
                                 train_dataset=Dataset.from_list([{"input_ids": r} for r in rows]),
                                 args=SFTConfig(output_dir=out, padding_free=True, max_length=None, packing=False,
                                                dataset_kwargs={"skip_prepare_dataset": False}, **common))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    measured = clock.seconds[2:]
    tokens = args.batch * args.block
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    print("RESULT", json.dumps({"loop": args.loop, "tokens_per_step": tokens, "steps": len(measured),
                                "median_step_seconds": statistics.median(measured),
                                "tokens_per_second": tokens * len(measured) / sum(measured),
                                "peak_memory_gb": peak, "losses": clock.losses}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

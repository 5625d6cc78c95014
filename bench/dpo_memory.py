"""DPO's peak memory and step time with the reference as the adapter switched off (ours, and TRL's with a PEFT model)
against a second copy of the model as the reference (TRL's DPOTrainer given ref_model: what it does for a model
without an adapter, and what a user does who passes one), on SmolLM2-135M-Instruct, the same pairs, LoRA and batch.
Each loop runs in its own process; peak memory is that process's peak resident set (a CPU) or peak CUDA allocation.

    python bench/dpo_memory.py --pairs outputs/chat_data/pairs_train.jsonl --steps 8 --batch 4
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = Path("~/.cache/peft_tuner/models/SmolLM2-135M-Instruct").expanduser()
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def ours(args) -> dict:
    import yaml

    out = Path(tempfile.mkdtemp(prefix="dpo-ours-"))
    recipe = {"model": {"name_or_path": str(args.model)},
              "data": {"task": "chat", "format": "preference", "train_file": str(args.pairs), "max_length": args.max_length,
                       "max_rows": args.steps * args.batch, "cache": False},
              "peft": {"method": "lora", **LORA},
              "train": {"objective": "dpo", "beta": 0.1, "epochs": 1, "learning_rate": 1e-4, "batch_size": args.batch,
                        "verify_adapter": False},
              "output_dir": str(out / "run")}
    (out / "r.yaml").write_text(yaml.safe_dump(recipe))
    subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), str(out / "r.yaml")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step_seconds"] for r in log if r.get("event") == "step"]
    end = next(r for r in log if r.get("event") == "end")
    return {"peak_memory_gb": end["peak_memory_gb"], "step_seconds": sum(steps[1:]) / max(len(steps) - 1, 1),
            "first_loss": next(r["loss"] for r in log if r.get("event") == "step")}


def trl(args, copy: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peft_tuner import distributed as dist

    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()][: args.steps * args.batch]
    rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.began = time.time()

        def on_step_end(self, *a, **k):
            times.append(time.time() - self.began)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32) if copy else None
    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo-trl-"), per_device_train_batch_size=args.batch,
                       max_steps=args.steps, learning_rate=1e-4, beta=0.1, max_length=args.max_length, report_to=[],
                       use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no",
                       dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[Clock()],
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules="all-linear"))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"peak_memory_gb": dist.peak_memory_gb(), "step_seconds": sum(times[1:]) / max(len(times) - 1, 1),
            "first_loss": losses[0] if losses else None}


LOOPS = {"peft-tuner (adapter off)": lambda a: ours(a), "TRL (adapter off)": lambda a: trl(a, copy=False),
         "TRL (second model copy)": lambda a: trl(a, copy=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=str(ROOT / "outputs" / "chat_data" / "pairs_train.jsonl"))
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--loop", choices=list(LOOPS), help="run one loop here and print its JSON line")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "dpo_memory.jsonl"))
    args = parser.parse_args()
    if args.loop:
        print(json.dumps({"loop": args.loop, **LOOPS[args.loop](args)}))
        return
    rows = []
    for loop in LOOPS:  # one process each: a peak is that loop's alone
        done = subprocess.run([sys.executable, __file__, "--loop", loop, "--pairs", args.pairs, "--model", args.model,
                               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.processor() or platform.machine(),
              "command": "python bench/dpo_memory.py " + " ".join(sys.argv[1:]), "steps": args.steps, "batch": args.batch,
              "rows": rows}
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

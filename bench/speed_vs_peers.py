"""How fast does peft_tuner train and evaluate, against the loops its users would otherwise run? One command:

    .venv/bin/pip install -r bench/requirements.txt     # TRL, for its SFTTrainer (once)
    .venv/bin/python bench/speed_vs_peers.py            # tiny Llama and SmolLM2-135M-Instruct; 1 and 2 processes
    .venv/bin/python bench/speed_vs_peers.py --models tiny --repeats 1  # a minute: does every loop run?
    .venv/bin/python bench/speed_vs_peers.py --tasks wikitext --models smollm2   # the text case alone

Same model, rows (RAFT twitter_complaints: the 50 training rows, 300 dev rows), settings and machine for every loop:
the PEFT example's (LoRA r=8, alpha 32, dropout 0.1 on q_proj and v_proj, AdamW lr 3e-3, linear schedule, batch 8,
rows cut at 64 tokens, fp32). Each loop runs in its own process, one after another (two CPU-heavy jobs at once slow
each other down), in rounds: every loop once a round, --repeats rounds. Figures are medians over the rounds; a ratio
ours / peer is the median of the ratios taken within each round (the pair ran minutes apart), with their range.

- peft-example: the PEFT example's loop (peft_lora_clm_accelerate_ds_zero3_offload.py), written again here: every row
  left-padded to 64 tokens, label + pad token appended, labels -100 on prompt and padding, accelerate's Accelerator
  (its DeepSpeed plugin under `accelerate launch`, on 2 processes under ZeRO-2 and ZeRO-3 as ours); evaluation by
  greedy generation of 10 tokens, matched exactly.
- hf-trainer, hf-trainer-grouped: transformers' Trainer on the peft model, DataCollatorForSeq2Seq, group_by_length
  off and on.
- trl-sft-padding-free: TRL's SFTTrainer with padding_free=True (prompt / completion rows, loss on the completion).
- peft-tuner, peft-tuner-padding-free: launch/train.py with the same settings (configs/twitter_complaints_peft_example.yaml),
  then with train.padding_free=true; evaluated by rank classification (fp32, and bf16) and by generation.
- peft-tuner-padding-free-bf16, where the machine computes bf16 natively (a CPU with AVX-512 BF16 or AMX, a GPU):
  the same with model.dtype=bf16 (the frozen weights and the forward in bf16, the optimizer's master weights in fp32);
  evaluated by rank classification in bf16.

The text case (--tasks wikitext): the first 100 lines of WikiText-2's train.txt, each line's tokens and an EOS
joined and cut into blocks of 128 (transformers' run_clm group_texts, which is ours too), with the same LoRA and
optimizer settings; evaluation is the perplexity of the first 100 lines of valid.txt, cut alike.
- peft-example: the same plain loop over the blocks (labels = the block), perplexity from its own evaluation loop.
- hf-trainer: the Trainer over the blocks (group_by_length is moot: every block is as long).
- trl-sft-packing: TRL's SFTTrainer on the lines with packing=True, packing_strategy="wrapped", max_length=128 (what
  LLaMA-Factory's and axolotl's pre-training stages do to text).
- peft-tuner, peft-tuner-bf16: launch/train.py with configs/wikitext2_lora.yaml given the same settings, in fp32 and
  with model.dtype=bf16; `peft-tuner evaluate` in fp32 and in bf16.
Ours runs with what docs/cpu.md recommends for the case (RECOMMENDED: under ZeRO-3 on a CPU, text blocks without the
malloc setting); each result records the CPU tuning in force.

Training figures: real (non-padding) tokens per second of the training loop (model loading left out), seconds per
epoch, peak resident memory of the process (the largest rank's), final loss. Raw results go to
bench/results/speed_vs_peers.jsonl; the table, the ratios (ours / peer, within one run) and a plot of loss against
wall-clock time go to docs/benchmarks.md and docs/speed_vs_peers-KIND.png, one block and one plot per kind of machine
(a CPU's widest bf16 instructions, or the GPU's name), so that a run on one kind keeps the other kinds' latest runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from report_blocks import BENCHMARKS, cpu_name, write_between_markers  # noqa: E402  (bench/ is the script's folder)
from peft_tuner.data.sources import data_root  # noqa: E402
DATA = data_root() / "raft" / "twitter_complaints"
TEXT = data_root() / "wikitext-2"
RESULTS = ROOT / "bench" / "results" / "speed_vs_peers.jsonl"

SETTINGS = {"r": 8, "alpha": 32, "dropout": 0.1, "targets": ["q_proj", "v_proj"], "lr": 3e-3, "batch": 8, "max_length": 64,
            "seed": 42, "new_tokens": 10}
PROMPT = "Tweet text : {} Label : "
PEERS = ("peft-example", "hf-trainer", "hf-trainer-grouped", "trl-sft-padding-free")
OURS = ("peft-tuner", "peft-tuner-padding-free", "peft-tuner-padding-free-bf16")
EVALUATED = ("peft-example", "peft-tuner-padding-free", "peft-tuner-padding-free-bf16")  # on 1 process, every repeat
TEXT_SETTINGS = {"lines": 100, "block": 128}
# Per task: the peers on 1 process, ours, the loops evaluated, and ours in fp32 and bf16 as the ratios' columns.
TASKS = {"twitter": {"peers": PEERS, "ours": OURS, "evaluated": EVALUATED,
                     "compared": ("peft-tuner-padding-free", "peft-tuner-padding-free-bf16")},
         "wikitext": {"peers": ("peft-example", "hf-trainer", "trl-sft-packing"), "ours": ("peft-tuner", "peft-tuner-bf16"),
                      "evaluated": ("peft-example", "peft-tuner", "peft-tuner-bf16"),
                      "compared": ("peft-tuner", "peft-tuner-bf16")}}


# ----------------------------------------------------------------------------------------------------------------------
# Data and model, alike for every loop


def rows(split: str, limit: int | None = None) -> list[tuple[str, str]]:
    import csv

    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        table = [(r["Tweet text"], r["Label"]) for r in csv.DictReader(f)]
    return table[:limit] if limit else table


def text_lines(split: str) -> list[str]:
    """The first TEXT_SETTINGS["lines"] lines of WikiText-2's train.txt or valid.txt."""
    with open(TEXT / f"{split}.txt", encoding="utf-8") as f:
        return f.read().splitlines()[:TEXT_SETTINGS["lines"]]


def text_blocks(tokenizer, split: str) -> list[list[int]]:
    """transformers' run_clm group_texts: every non-blank line's tokens and an EOS, joined, cut into full blocks. The
    rule is ours too (data.pack_text), so every loop trains on the same blocks."""
    from peft_tuner.data.formats import pack_text

    return [b["input_ids"] for b in pack_text(tokenizer, text_lines(split), TEXT_SETTINGS["block"])]


def model_path(name: str) -> Path:
    if name == "tiny":
        from peft_tuner.tiny import build_tiny_model

        folder = Path(tempfile.gettempdir()) / "peft_tuner_bench_tiny_llama"
        return folder if (folder / "config.json").is_file() else build_tiny_model(folder, "llama")
    from peft_tuner.prepare import prepare_model

    return prepare_model("smollm2")


def lora_config():
    import peft

    return peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"],
                           lora_dropout=SETTINGS["dropout"], target_modules=SETTINGS["targets"])


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def perplexity(model, blocks: list[list[int]], batch: int = 8) -> dict:
    """run_clm_no_trainer's evaluation: the blocks in batches, the mean next-token loss, its exponential."""
    import math

    import torch

    model.eval()
    total, tokens, started = 0.0, 0, time.time()
    for start in range(0, len(blocks), batch):
        ids = torch.tensor(blocks[start:start + batch])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        count = ids.numel() - ids.shape[0]  # the first token of each block is not predicted
        total, tokens = total + float(loss) * count, tokens + count
    seconds = time.time() - started
    return {"examples_per_second": round(len(blocks) / seconds, 2), "perplexity": round(math.exp(total / tokens), 4),
            "rows": len(blocks)}


def generate_accuracy(model, tokenizer, dev: list[tuple[str, str]], batch: int = 8) -> dict:
    """The PEFT example's evaluation: prompts left-padded to max_length, greedy generation of 10 tokens, the decoded
    continuation stripped and compared with the class name."""
    import torch

    model.eval()
    tokenizer.padding_side = "left"
    correct, started = 0, time.time()
    for start in range(0, len(dev), batch):
        chunk = dev[start:start + batch]
        enc = tokenizer([PROMPT.format(t) for t, _ in chunk], padding="max_length", truncation=True,
                        max_length=SETTINGS["max_length"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=SETTINGS["new_tokens"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(text.strip() == label for text, (_, label) in zip(texts, chunk))
    seconds = time.time() - started
    return {"examples_per_second": round(len(dev) / seconds, 2), "accuracy": round(correct / len(dev), 4), "rows": len(dev)}


# ----------------------------------------------------------------------------------------------------------------------
# The peers, each run in a process of its own: `python bench/speed_vs_peers.py _run LOOP MODEL EPOCHS OUT.json`


def run_peft_example(model_dir: Path, epochs: int, evaluate: bool, task: str = "twitter") -> dict:
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    accelerator = Accelerator()
    torch.manual_seed(SETTINGS["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    n = SETTINGS["max_length"]
    if task == "wikitext":  # the blocks as they are, every token a label
        examples = [{"input_ids": torch.tensor(b), "attention_mask": torch.ones(len(b), dtype=torch.long),
                     "labels": torch.tensor(b)} for b in text_blocks(tokenizer, "train")]
    else:
        examples = []
        for text, label in rows("train"):  # the example's preprocess_function, row by row
            prompt = tokenizer(PROMPT.format(text)).input_ids
            target = tokenizer(label).input_ids + [tokenizer.pad_token_id]
            ids, labels = prompt + target, [-100] * len(prompt) + target
            pad = n - len(ids)
            examples.append({"input_ids": torch.tensor(([tokenizer.pad_token_id] * pad + ids)[:n]),
                             "attention_mask": torch.tensor(([0] * pad + [1] * len(ids))[:n]),
                             "labels": torch.tensor(([-100] * pad + labels)[:n])})
    # The processes and this one's rank as the launcher set them. On a GPU accelerate counts them too; on a machine
    # with no accelerator `accelerate launch` starts them and DeepSpeed joins them (deepspeed.initialize reads the
    # launcher's environment), but accelerate's own state counts one process: so the batch per rank and the loader's
    # shard come from the launcher's environment, the loader sharded here rather than by accelerate.
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    per_rank = SETTINGS["batch"] // world
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # the example's accelerate config names the batch; here the DeepSpeed file says "auto"
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=per_rank, gradient_accumulation_steps=1,
                                       train_batch_size=SETTINGS["batch"])
    sampler = torch.utils.data.DistributedSampler(examples, num_replicas=world, rank=rank, shuffle=True, seed=SETTINGS["seed"])
    loader = torch.utils.data.DataLoader(examples, sampler=sampler, batch_size=per_rank)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, len(loader) * epochs)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    curve, tokens, loop_seconds, loss = [], 0, 0.0, float("nan")
    for epoch in range(epochs):
        model.train()
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            began = time.time()
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            loss = float(loss.detach())
            loop_seconds += time.time() - began
            tokens += int(batch["attention_mask"].sum())
            curve.append((round(loop_seconds, 3), loss))
    result = {"loop_seconds": loop_seconds, "real_tokens": tokens, "final_loss": loss, "curve": curve,
              "peak_memory_gb": peak_rss_gb(), "rank": rank, "processes": world}
    if evaluate and rank == 0 and task == "wikitext":
        result["eval"] = {"perplexity": perplexity(accelerator.unwrap_model(model), text_blocks(tokenizer, "valid"))}
    elif evaluate and rank == 0:
        result["eval"] = {"generate": generate_accuracy(accelerator.unwrap_model(model), tokenizer, rows("dev"))}
    return result


class StepClock:
    """A TrainerCallback's worth: the wall time of each optimizer step and the loss the Trainer logs for it."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.began = time.time()

            def on_step_end(self, args, state, control, **kwargs):
                clock.seconds += time.time() - clock.began

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.curve.append((round(clock.seconds, 3), float(logs["loss"])))

        self.began, self.seconds, self.curve, self.callback = 0.0, 0.0, [], Callback()


def training_arguments(cls, out: str, epochs: int, **extra):
    return cls(output_dir=out, per_device_train_batch_size=SETTINGS["batch"], learning_rate=SETTINGS["lr"],
               lr_scheduler_type="linear", num_train_epochs=epochs, seed=SETTINGS["seed"], logging_steps=1,
               save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **extra)


def run_hf_trainer(model_dir: Path, epochs: int, grouped: bool, task: str = "twitter") -> dict:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    if task == "wikitext":
        features = [{"input_ids": b, "attention_mask": [1] * len(b), "labels": b} for b in text_blocks(tokenizer, "train")]
    else:
        features = []
        for text, label in rows("train"):
            prompt = tokenizer(PROMPT.format(text)).input_ids
            target = tokenizer(label).input_ids + [tokenizer.eos_token_id]
            ids = (prompt + target)[-SETTINGS["max_length"]:]
            labels = ([-100] * len(prompt) + target)[-SETTINGS["max_length"]:]
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora_config())
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        sampling = "group_by_length" if grouped else "random"
        trainer = Trainer(model=model, args=training_arguments(TrainingArguments, out, epochs, train_sampling_strategy=sampling),
                          train_dataset=Dataset.from_list(features), callbacks=[clock.callback],
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer.train()
    return {"loop_seconds": clock.seconds, "real_tokens": sum(len(f["input_ids"]) for f in features) * epochs,
            "final_loss": clock.curve[-1][1], "curve": clock.curve, "peak_memory_gb": peak_rss_gb()}


def run_trl_sft(model_dir: Path, epochs: int, task: str = "twitter") -> dict:
    """twitter: prompt / completion rows, padding-free, the loss on the completion; wikitext: the lines, packed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if task == "wikitext":
        data = Dataset.from_list([{"text": line} for line in text_lines("train") if line.strip()])
        settings = {"packing": True, "packing_strategy": "wrapped", "max_length": TEXT_SETTINGS["block"]}
    else:  # without packing, padding_free does not cut rows at max_length: every row here is shorter than 64 tokens
        data = Dataset.from_list([{"prompt": PROMPT.format(t), "completion": label} for t, label in rows("train")])
        settings = {"padding_free": True, "max_length": None, "completion_only_loss": True}
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(SFTConfig, out, epochs, bf16=False, **settings)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=lora_config(), callbacks=[clock.callback])
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * epochs
        trainer.train()
    return {"loop_seconds": clock.seconds, "real_tokens": tokens, "final_loss": clock.curve[-1][1], "curve": clock.curve,
            "peak_memory_gb": peak_rss_gb()}


def run_one(loop: str, model: str, epochs: int, out: Path, evaluate: bool, task: str) -> None:
    model_dir = model_path(model)
    if loop == "peft-example":
        result = run_peft_example(model_dir, epochs, evaluate, task)
    elif loop.startswith("hf-trainer"):
        result = run_hf_trainer(model_dir, epochs, grouped=loop.endswith("grouped"), task=task)
    elif loop.startswith("trl-sft"):
        result = run_trl_sft(model_dir, epochs, task)
    else:
        raise SystemExit(f"unknown loop {loop}")
    rank = result.get("rank", 0)
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------------
# Ours: the launch script a user runs, then the evaluate command


# What docs/cpu.md recommends for a case where the default is not the fastest: under ZeRO-3 on a CPU, full text blocks
# allocate activations as large as the gathered weights, which the CPU tuning's malloc setting maps afresh every step.
RECOMMENDED = {("wikitext", 3): ["train.cpu_tuning=[auto,-malloc]"]}


def run_ours(loop: str, model: str, epochs: int, processes: int, stage: int, work: Path, evaluate: bool,
             task: str = "twitter") -> dict:
    python = sys.executable
    run_dir = work / "run"
    overrides = [f"model.name_or_path={model_path(model)}", f"train.epochs={epochs}",
                 f"train.batch_size={SETTINGS['batch'] // processes}", f"output_dir={run_dir}",
                 "train.verify_adapter=false", "data.cache=false", "--overwrite"]
    if task == "twitter":
        recipe = "twitter_complaints_peft_example.yaml"
        overrides += [f"data.train_file={DATA}", f"data.eval_file={DATA / 'dev.csv'}"]
    else:  # the text recipe given the peers' settings
        recipe = "wikitext2_lora.yaml"
        overrides += [f"data.train_file={TEXT / 'train.txt'}", f"data.eval_file={TEXT / 'valid.txt'}",
                      f"data.max_rows={TEXT_SETTINGS['lines']}", f"data.max_length={TEXT_SETTINGS['block']}",
                      f"peft.target_modules=[{','.join(SETTINGS['targets'])}]", f"peft.r={SETTINGS['r']}",
                      f"peft.alpha={SETTINGS['alpha']}", f"peft.dropout={SETTINGS['dropout']}",
                      f"train.learning_rate={SETTINGS['lr']}", "train.lr_scheduler=linear", "train.warmup_ratio=0",
                      f"train.seed={SETTINGS['seed']}"]
    if not _has_gpu():
        overrides += RECOMMENDED.get((task, stage), [])
    if "padding-free" in loop:
        overrides.append("train.padding_free=true")
    if loop.endswith("-bf16"):
        overrides.append("model.dtype=bf16")
    script = [str(ROOT / "launch" / "train.py"), str(ROOT / "configs" / recipe), *overrides]
    if processes == 1:
        cmd = [python, *script]
    else:
        cmd = [str(Path(python).parent / "torchrun"), "--standalone", "--nproc-per-node", str(processes), *script,
               "--deepspeed", str(ROOT / "ds_configs" / f"zero{stage}.json")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env(processes))
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in log if r["event"] == "step"]
    summary = json.loads((run_dir / "summary.json").read_text())
    clock, curve = 0.0, []
    for r in steps:
        clock += r["step_seconds"]
        curve.append((round(clock, 3), r["loss"]))
    result = {"loop_seconds": clock, "real_tokens": round(sum(r["tokens_per_second"] * r["step_seconds"] for r in steps)),
              "final_loss": steps[-1]["loss"], "curve": curve, "peak_memory_gb": summary["peak_memory_gb"],
              "cpu_tuning": next(r for r in log if r["event"] == "start").get("cpu_tuning")}
    if evaluate and task == "wikitext":
        result["eval"] = {}
        for name, dtype in (("perplexity", "fp32"), ("perplexity-bf16", "bf16")):
            if loop.endswith("-bf16") and dtype == "fp32":
                continue
            subprocess.run([python, "-m", "peft_tuner.cli", "evaluate", "--adapter", str(run_dir / "adapter"),
                            f"eval.dtype={dtype}", f"eval.batch_size={SETTINGS['batch']}", "--out", str(work / f"eval-{name}")],
                           check=True, capture_output=True, text=True, env=_env(1))
            metrics = json.loads((work / f"eval-{name}" / "metrics_text.json").read_text())
            result["eval"][name] = {"examples_per_second": round(metrics["blocks"] / metrics["seconds"], 2),
                                    "perplexity": round(metrics["perplexity"], 4), "rows": metrics["blocks"]}
    elif evaluate:
        result["eval"] = {}
        methods = {"rank": ["--method", "rank", "eval.dtype=fp32"], "rank-bf16": ["--method", "rank", "eval.dtype=bf16"],
                   "generate": ["--method", "generate", "eval.dtype=fp32", f"eval.max_new_tokens={SETTINGS['new_tokens']}",
                                "eval.batch_size=8"]}
        for name, extra in methods.items():
            if loop.endswith("-bf16") and name != "rank-bf16":
                continue
            subprocess.run([python, "-m", "peft_tuner.cli", "evaluate", "--adapter", str(run_dir / "adapter"), *extra,
                            "--out", str(work / f"eval-{name}")], check=True, capture_output=True, text=True, env=_env(1))
            metrics = json.loads((work / f"eval-{name}" / "metrics_eval.json").read_text())
            result["eval"][name] = {k: metrics[k] for k in ("examples_per_second", "accuracy", "rows")}
    return result


def _env(processes: int) -> dict:
    """The cores shared out between the processes (peft_tuner picks DeepSpeed's CPU accelerator itself)."""
    cores = os.cpu_count() or 1
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes)), "TOKENIZERS_PARALLELISM": "false"}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_peer(loop: str, model: str, epochs: int, processes: int, stage: int, work: Path, evaluate: bool,
             task: str = "twitter") -> dict:
    out = work / "result.json"
    entry = [str(Path(__file__).resolve()), "_run", loop, model, str(epochs), str(out), "eval" if evaluate else "-", task]
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "ds_configs" / f"accelerate_zero{stage}.yaml"), "--num_processes", str(processes), *entry]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(processes))
    files = [Path(f"{out}.rank{r}") for r in range(processes)]
    if proc.returncode != 0 and not all(f.exists() for f in files):
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    parts = [json.loads(f.read_text()) for f in files]
    result = parts[0]
    if proc.returncode != 0:  # every rank reported, then the launcher failed (a rank aborting on its way out)
        result["exit"] = f"exit code {proc.returncode} after every rank wrote its result: {proc.stderr.strip()[-300:]}"
    result["real_tokens"] = sum(p["real_tokens"] for p in parts)
    result["loop_seconds"] = max(p["loop_seconds"] for p in parts)
    result["peak_memory_gb"] = max(p["peak_memory_gb"] for p in parts)
    result["final_loss"] = statistics.mean(p["final_loss"] for p in parts)  # each rank's loss is of its own rows
    return result


# ----------------------------------------------------------------------------------------------------------------------
# The whole comparison


def cases(models: list[str], tasks: list[str]) -> list[dict]:
    """(task, model, processes, ZeRO stage, loops): every loop on 1 process; the example's loop and ours on 2 under
    ZeRO-2 and ZeRO-3 (the example's under `accelerate launch` with the DeepSpeed plugin, as its README runs it). Ours
    in bf16 where the machine computes it natively."""
    from peft_tuner.runtime import native_bf16

    out = []
    for task in tasks:
        ours = [loop for loop in TASKS[task]["ours"] if native_bf16() or not loop.endswith("-bf16")]
        for model in models:
            out.append({"task": task, "model": model, "processes": 1, "stage": 0, "loops": list(TASKS[task]["peers"]) + ours})
            for stage in (2, 3):
                out.append({"task": task, "model": model, "processes": 2, "stage": stage, "loops": ["peft-example"] + ours})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["twitter", "wikitext"], choices=list(TASKS),
                   help="twitter: RAFT twitter_complaints rows; wikitext: WikiText-2 blocks, the text case")
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loops", nargs="+", help="only these loops")
    p.add_argument("--processes", type=int, choices=[1, 2], help="only the cases on this many processes")
    p.add_argument("--stages", type=int, nargs="+", choices=[0, 2, 3], help="only the cases under these ZeRO stages")
    p.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = p.parse_args(argv)
    for task, folder in (("twitter", DATA), ("wikitext", TEXT)):
        if task in args.tasks and not folder.is_dir():
            raise SystemExit(f"{folder}: the data of --tasks {task} is not there")
    import peft
    import torch
    import transformers

    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if _has_gpu() else None,
               "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    command = "python bench/speed_vs_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for case in cases(args.models, args.tasks):
        if (args.processes and case["processes"] != args.processes) or (args.stages and case["stage"] not in args.stages):
            continue
        loops = [loop for loop in case["loops"] if not args.loops or loop in args.loops]
        for repeat in range(args.repeats):  # rounds: every loop once a round, so a slow spell of the host hits them alike
            for loop in loops:
                evaluate = case["processes"] == 1 and loop in TASKS[case["task"]]["evaluated"]
                with tempfile.TemporaryDirectory() as work:
                    runner = run_ours if loop in TASKS[case["task"]]["ours"] else run_peer
                    try:
                        result = runner(loop, case["model"], args.epochs, case["processes"], case["stage"], Path(work),
                                        evaluate, case["task"])
                    except subprocess.CalledProcessError as e:
                        result = {"error": (e.stderr or "")[-1500:]}
                record = {"run": run_id, "command": command, "machine": machine, "task": case["task"], "model": case["model"],
                          "processes": case["processes"], "zero_stage": case["stage"], "loop": loop, "repeat": repeat,
                          "epochs": args.epochs, **result}
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                said = "error" if "error" in result else f"{result['real_tokens'] / result['loop_seconds']:.0f} tok/s"
                print(f"{case['task']} {case['model']} x{case['processes']} z{case['stage']} {loop} #{repeat}: {said}", flush=True)
    if not args.no_write:
        write_report(run_id)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# docs/benchmarks.md, between its markers, and the plot


def machine_kind(machine: dict) -> str:
    """What a block of the report is kept per: the GPU's name, else the CPU's widest bf16 instructions (AMX computes
    bf16 several times faster than AVX-512 BF16, which computes it faster than fp32; without either bf16 is emulated)."""
    if machine["gpu"]:
        return "".join(c if c.isalnum() else "-" for c in machine["gpu"].lower()).strip("-")
    cpu = machine["cpu"]
    return "amx" if "AMX" in cpu else "avx512-bf16" if "AVX-512 BF16" in cpu else "no-bf16"


def write_report(run_id: str) -> None:
    """One block per kind of machine and task: a run of one task keeps the other task's latest tables."""
    records = [json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip()]
    records = [r for r in records if r["run"] == run_id]
    for task in TASKS:
        mine = [r for r in records if r.get("task", "twitter") == task]
        if mine:
            write_task_report(task, mine)


def short(loop: str) -> str:
    """ours, ours-bf16: the loops of ours that the ratios compare with each peer."""
    return loop.replace("peft-tuner-padding-free", "ours").replace("peft-tuner", "ours")


def write_task_report(task: str, records: list[dict]) -> None:
    first, text = records[0], task == "wikitext"
    kind = machine_kind(first["machine"])
    plot = BENCHMARKS.parent / (f"speed_vs_peers-{kind}-wikitext.png" if text else f"speed_vs_peers-{kind}.png")
    data = (f"WikiText-2 blocks of {TEXT_SETTINGS['block']} tokens (the first {TEXT_SETTINGS['lines']} lines of "
            "train.txt; perplexity on the first as many lines of valid.txt)") if text else "the 50 training rows"
    lines = ["", f"Run {first['run']}: `{first['command']}` on {first['machine']['cpu']} "
             f"({first['machine']['cores']} cores{', ' + first['machine']['gpu'] if first['machine']['gpu'] else ''}), "
             f"torch {first['machine']['torch']}, transformers {first['machine']['transformers']}, "
             f"peft {first['machine']['peft']}; {first['epochs']} epochs over {data}; medians of "
             f"{max(r['repeat'] for r in records) + 1} rounds (evaluation included); a ratio is the median of the ratios "
             "within each round, its range in brackets. "
             "Raw results: `bench/results/speed_vs_peers.jsonl`.", ""]
    groups: dict = {}
    for r in records:
        groups.setdefault((r["model"], r["processes"], r["zero_stage"]), {}).setdefault(r["loop"], []).append(r)
    for (model, processes, stage), loops in groups.items():
        title = f"{'tiny Llama' if model == 'tiny' else 'SmolLM2-135M-Instruct'}, {processes} process" + \
                ("es, ZeRO-" + str(stage) if processes > 1 else ", DeepSpeed ZeRO-0 for ours")
        ok = {loop: [r for r in runs if "error" not in r] for loop, runs in loops.items()}
        by_round = {loop: {r["repeat"]: r for r in runs} for loop, runs in ok.items()}
        speed = {loop: statistics.median(r["real_tokens"] / r["loop_seconds"] for r in runs) for loop, runs in ok.items() if runs}
        memory = {loop: statistics.median(r["peak_memory_gb"] for r in runs) for loop, runs in ok.items() if runs}
        ours = [loop for loop in TASKS[task]["compared"] if loop in speed]
        header = "".join(f" {short(loop)} / this |" for loop in ours)
        lines += [f"### {title}", "", f"| loop | real tokens/s | s/epoch | peak memory (GB) | final loss |{header}",
                  "|---|---|---|---|---|" + "---|" * len(ours)]
        for loop, runs in loops.items():
            if not ok[loop]:
                error = runs[0]["error"].strip()
                lines.append(f"| {loop} | failed: {error.splitlines()[-1][:120] if error else 'see the raw results'} | | | |"
                             + " |" * len(ours))
                continue
            ratios = "".join(f" {paired_ratio(by_round[o], by_round[loop], tokens_per_second)} |" for o in ours)
            lines.append(f"| {loop} | {speed[loop]:.0f} | {statistics.median(r['loop_seconds'] for r in ok[loop]) / ok[loop][0]['epochs']:.2f} | "
                         f"{memory[loop]:.2f} | {statistics.median(r['final_loss'] for r in ok[loop]):.4f} |{ratios}")
        evals = {}
        for loop, runs in ok.items():
            for r in runs:
                for name, e in r.get("eval", {}).items():
                    evals.setdefault((loop, name), []).append(e)
        rate = {key: statistics.median(e["examples_per_second"] for e in es) for key, es in evals.items()}
        quality = "perplexity" if text else "accuracy"
        accuracy = {key: statistics.median(e[quality] for e in es) for key, es in evals.items()}
        reference = ("peft-example", "perplexity" if text else "generate")
        if evals:
            lines += ["", (f"| evaluation on the {next(iter(evals.values()))[0]['rows']} validation blocks | blocks/s | "
                           "perplexity | / the example's |") if text else
                      "| evaluation on the 300 dev rows | examples/s | accuracy | / the example's generate |", "|---|---|---|---|"]
            for key in evals:
                ratio = paired_ratio(by_round[key[0]], by_round[reference[0]], examples_per_second(key[1]),
                                     examples_per_second(reference[1])) if reference in rate else "-"
                lines.append(f"| {key[0]}, {key[1]} | {rate[key]:.2f} | {accuracy[key]:.4f} | {ratio} |")
        if "peft-example" in speed and ours:  # rank classification's target is the classification task's
            lines += [""] + targets(by_round, memory, rate, accuracy, ours, None if text else reference)
        lines.append("")
    if _plot(records, plot):
        lines += [f"![loss against wall-clock time]({plot.name})", ""]
    name = f"speed_vs_peers wikitext {kind}" if text else f"speed_vs_peers {kind}"
    markers = (f"<!-- {name}: begin (written by bench/speed_vs_peers.py) -->", f"<!-- {name}: end -->")
    machine = first['machine']['gpu'] or first['machine']['cpu']
    write_between_markers("\n".join(lines), markers, title=f"Text (WikiText-2 blocks): speed against the peers on {machine}"
                          if text else f"Speed against the peers on {machine}")
    print(f"wrote {BENCHMARKS}")


def tokens_per_second(record: dict) -> float:
    return record["real_tokens"] / record["loop_seconds"]


def examples_per_second(method: str):
    return lambda record: record["eval"][method]["examples_per_second"] if method in record.get("eval", {}) else None


def round_ratios(ours: dict, peer: dict, value, peer_value=None) -> list[float]:
    """value(ours) / value(peer) within each round that both finished ({round: record} each)."""
    peer_value = peer_value or value
    pairs = [(value(ours[k]), peer_value(peer[k])) for k in sorted(ours.keys() & peer.keys())]
    return [a / b for a, b in pairs if a is not None and b]


def paired_ratio(ours: dict, peer: dict, value, peer_value=None) -> str:
    """The median of the within-round ratios, and their range where there are several."""
    ratios = round_ratios(ours, peer, value, peer_value)
    if not ratios:
        return "-"
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if min(ratios) != max(ratios) else ""
    return f"{statistics.median(ratios):.2f}x{spread}"


def targets(by_round: dict, memory: dict, rate: dict, accuracy: dict, ours: list[str], reference: tuple) -> list[str]:
    """The targets the comparison is held to, each against ours in fp32 and (where run) in bf16; speed ratios are the
    medians of the within-round ratios."""
    lines = ["| target | " + " | ".join(short(o) for o in ours) + " |",
             "|---|" + "---|" * len(ours)]

    def row(name: str, cell) -> None:
        cells = [cell(o) for o in ours]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c[0]:.2f}{c[1]} {'met' if c[2] else 'missed'}"
                                              for c in cells) + " |")

    def median_ratio(o: str, peer: dict, value, peer_value=None):
        ratios = round_ratios(by_round[o], peer, value, peer_value)
        return statistics.median(ratios) if ratios else None

    def speed_row(name: str, peer: dict, times: float) -> None:
        row(name, lambda o: None if (x := median_ratio(o, peer, tokens_per_second)) is None else (x, "x", x >= times))

    speed_row("training real tokens/s >= 2x the example's loop", by_round["peft-example"], 2)
    trainers = [by_round[l] for l in ("hf-trainer", "hf-trainer-grouped") if by_round.get(l)]
    if trainers:  # each round, the faster of the Trainer's two loops
        fastest = {k: max((t[k] for t in trainers if k in t), key=tokens_per_second)
                   for k in set().union(*(t.keys() for t in trainers))}
        speed_row("training real tokens/s >= 1.2x the Trainer's faster loop", fastest, 1.2)
    row("peak memory <= the example's loop", lambda o: (memory[o], " GB", memory[o] <= memory["peft-example"]))
    if reference and reference in rate:
        def evaluation(o):  # the fastest rank classification of this loop's adapter that is as accurate
            keys = [key for key in rate if key[0] == o and key[1].startswith("rank")]
            if not keys:
                return None
            good = [key for key in keys if accuracy[key] >= accuracy[reference]] or keys
            key = max(good, key=rate.get)
            x = median_ratio(o, by_round[reference[0]], examples_per_second(key[1]), examples_per_second(reference[1]))
            if x is None:
                return None
            return x, f"x ({key[1]}, accuracy {accuracy[key]:.4f})", x >= 5 and accuracy[key] >= accuracy[reference]
        row("rank classification >= 5x the example's generate examples/s, accuracy no lower", evaluation)
    return lines


def _plot(records: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in records if r["processes"] == 1 and r["repeat"] == 0 and "curve" in r]
    if not chosen:
        return False
    models = sorted({r["model"] for r in chosen})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in chosen if r["model"] == model):
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, label=r["loop"], linewidth=1.2)
        ax.set_title(f"{model}, 1 process"), ax.set_xlabel("training loop seconds"), ax.set_ylabel("loss"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        loop, model, epochs, out, evaluate, task = sys.argv[2:8]
        run_one(loop, model, int(epochs), Path(out), evaluate == "eval", task)
    else:
        sys.exit(main())

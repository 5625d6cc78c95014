"""Which step settings pay for the default recipe's training step on this machine: torch.compile of the decoder
(inductor, dynamic shapes), and the optimizer: AdamW's fused kernel, its foreach kernels, DeepSpeed's CPU Adam (its
C++ op, built on first use), against the eager step with torch's plain AdamW (one tensor at a time on a CPU; the
trainer takes the fused kernel). The optimizer's step is timed on its own too: on the CPU its share of the step is
small and the host's noise between processes can hide it.
One process, the recipe's micro-batches of 4 RAFT twitter_complaints rows as the trainer builds them (padding-free,
attention row by row on the CPU), LoRA r=8 on every linear layer of SmolLM2-135M-Instruct; each setting in a fresh
process, the same 12 batches: the first step (compilation included) and the medians of the last 10.

    OMP_NUM_THREADS=2 .venv/bin/python bench/step_options.py            # about 15 minutes on a 2-core CPU

Writes its table to docs/benchmarks.md between the step_options markers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from recipe_model import DEFAULT_RECIPE  # noqa: E402  (bench/ is the script's folder)
from report_blocks import cpu_name, write_between_markers  # noqa: E402

MARKERS = ("<!-- step_options: begin (written by bench/step_options.py) -->", "<!-- step_options: end -->")
TITLE = "Step settings: torch.compile and the optimizer's kernels"
SETTINGS = {"eager": "eager, torch.optim.AdamW (on a CPU: one tensor at a time)",
            "fused-adamw": "eager, AdamW(fused=True) (the trainer's)",
            "foreach-adamw": "eager, AdamW(foreach=True)", "deepspeed-cpu-adam": "eager, DeepSpeedCPUAdam (adamw_mode)",
            "compile": "torch.compile(decoder, dynamic=True), torch.optim.AdamW"}


def one(setting: str, recipe: str, steps: int) -> dict:
    """Time `steps` + 2 training steps under one setting, in this process."""
    import torch

    from peft_tuner.trainer import token_loss_sum
    from recipe_model import micro_batch, recipe_rows_and_model

    cfg, tokenizer, examples, model = recipe_rows_and_model(recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if setting == "deepspeed-cpu-adam":
        from peft_tuner.distributed import use_cpu_accelerator_if_no_gpu  # DeepSpeed's op builder follows it

        use_cpu_accelerator_if_no_gpu()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(trainable, lr=cfg.train.learning_rate, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.learning_rate, fused=setting == "fused-adamw" or None,
                                      foreach=setting == "foreach-adamw" or None)
    if setting == "compile":
        decoder = model.get_base_model().model
        model.get_base_model().model = torch.compile(decoder, dynamic=True)
    micro = cfg.train.batch_size
    seconds, optimizer_seconds = [], []
    for step in range(steps + 2):
        rows = [examples[(step * micro + i) % len(examples)] for i in range(micro)]
        batch = micro_batch(cfg, tokenizer, rows)
        began = time.perf_counter()
        token_loss_sum(model, batch, pass_positions=True).backward()
        stepping = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - began)
        optimizer_seconds.append(time.perf_counter() - stepping)
    return {"setting": setting, "first_step_seconds": seconds[0], "median_step_seconds": statistics.median(seconds[2:]),
            "median_optimizer_seconds": statistics.median(optimizer_seconds[2:]), "trainable_tensors": len(trainable),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.recipe, args.steps)))
        return

    results = []
    for setting in args.settings:
        out = subprocess.run([sys.executable, __file__, "--one", setting, "--recipe", args.recipe, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    eager = next((r["median_step_seconds"] for r in results if r["setting"] == "eager"), None)
    lines = [f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}: `OMP_NUM_THREADS={results[0]['threads']} "
             f"python bench/step_options.py{''.join(' ' + a for a in sys.argv[1:])}` on {cpu_name()} ({results[0]['threads']} threads), torch {results[0]['torch']}; "
             f"the recipe `{Path(args.recipe).relative_to(ROOT)}`, 1 process, micro-batches of its 4 rows, "
             f"{results[0]['trainable_tensors']} trainable tensors; each setting in a process of its own, one after the other.", "",
             "| setting | first step (s) | median step after it (s) | of which the optimizer's step (ms) | eager / this |",
             "|---|---|---|---|---|"]
    for r in results:
        ratio = f"{eager / r['median_step_seconds']:.2f}x" if eager else "-"
        lines.append(f"| {SETTINGS[r['setting']]} | {r['first_step_seconds']:.1f} | {r['median_step_seconds']:.3f} | "
                     f"{1000 * r['median_optimizer_seconds']:.1f} | {ratio} |")
    print("\n".join(lines))
    write_between_markers("\n".join(lines), MARKERS, title=TITLE)


if __name__ == "__main__":
    main()

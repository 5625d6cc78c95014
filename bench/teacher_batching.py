"""How much could training the distillation teachers together save? Stacking N teachers' micro-batches into one
forward and backward does not remove any multiply-add: each teacher's rows still go through the whole model. What it
can save is the per-row cost of small batches. This driver measures that cost: seconds per training row of one
forward + backward + AdamW step of the default recipe's model (LoRA r=8 on every linear layer of SmolLM2-135M-Instruct,
fp32, the recipe's micro-batches of RAFT twitter_complaints rows, labels on the class name), at the recipe's micro-batch (4 rows) and
at the micro-batches of 2, 3 and 6 teachers stacked (8, 12, 24 rows). The best case for N teachers trained together is
N x (seconds per row at 4N rows) / (seconds per row at 4 rows) recipe runs of training time.

    OMP_NUM_THREADS=2 .venv/bin/python bench/teacher_batching.py            # about 3 minutes on a 2-core CPU

Writes its table to docs/benchmarks.md between the teacher_batching markers.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peft_tuner.trainer import token_loss_sum  # noqa: E402
from recipe_model import DEFAULT_RECIPE, micro_batch, recipe_rows_and_model  # noqa: E402  (bench/ is the script's folder)
from report_blocks import cpu_name, write_between_markers  # noqa: E402  (bench/ is the script's folder)

MARKERS = ("<!-- teacher_batching: begin (written by bench/teacher_batching.py) -->", "<!-- teacher_batching: end -->")
TITLE = "Training the distillation teachers together: the most it could save"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 2, 3, 6])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size (after one warm-up step)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe, e.g. model.dtype=bf16")
    args = parser.parse_args()

    cfg, tokenizer, examples, model = recipe_rows_and_model(args.recipe, args.overrides)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate)

    rows = []
    for teachers in args.teachers:
        micro = cfg.train.batch_size * teachers
        seconds = []
        for step in range(args.steps + 1):
            chosen = [examples[(step * micro + i) % len(examples)] for i in range(micro)]
            batch = micro_batch(cfg, tokenizer, chosen)
            began = time.perf_counter()
            token_loss_sum(model, batch, pass_positions=True).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:  # the first step pays for warm-up
                seconds.append((time.perf_counter() - began) / micro)
        rows.append({"teachers": teachers, "micro_batch": micro, "seconds_per_row": statistics.median(seconds)})
        print(rows[-1], flush=True)
    single = rows[0]["seconds_per_row"]
    lines = [f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}: `OMP_NUM_THREADS={torch.get_num_threads()} "
             f"python bench/teacher_batching.py{''.join(' ' + o for o in args.overrides)}` on {cpu_name()} "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}; the recipe "
             f"`{Path(args.recipe).relative_to(ROOT)}` ({cfg.model.dtype} weights), medians of {args.steps} steps.", "",
             "| teachers stacked | rows per forward | s per row (forward + backward + AdamW) | best-case training time of the teachers, in recipe runs |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teachers']} | {r['micro_batch']} | {r['seconds_per_row']:.4f} | "
                     f"{r['teachers'] * r['seconds_per_row'] / single:.2f} (separately: {r['teachers']}) |")
    write_between_markers("\n".join(lines), MARKERS, title=TITLE)



if __name__ == "__main__":
    main()

"""Padding-free batches: how much does attention row by row save against SDPA over the whole packed sequence under a
block-diagonal mask? One forward + backward of 8 packed rows through SmolLM2-135M-Instruct with LoRA (the PEFT
example's recipe, configs/twitter_complaints_peft_example.yaml, dropout off), rows of random tokens of a few lengths,
the two attention paths interleaved step by step so that both see the same machine.

    OMP_NUM_THREADS=2 .venv/bin/python bench/packed_attention.py            # about 3 minutes on a 2-core CPU

Writes its table to docs/benchmarks.md between the packed_attention markers.
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
from peft_tuner.config import load_config  # noqa: E402
from peft_tuner.data import collate_padding_free  # noqa: E402
from peft_tuner.modeling import ROW_BY_ROW, attend_row_by_row, build_peft_model, load_base_model  # noqa: E402
from peft_tuner.trainer import token_loss_sum  # noqa: E402
from report_blocks import cpu_name, write_between_markers  # noqa: E402  (bench/ is the script's folder)

MARKERS = ("<!-- packed_attention: begin (written by bench/packed_attention.py) -->", "<!-- packed_attention: end -->")
TITLE = "Padding-free rows: attention row by row against one masked attention over the packed sequence"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[30, 200], help="tokens per row")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per path (after one warm-up step)")
    args = parser.parse_args()

    cfg = load_config(str(ROOT / "configs" / "twitter_complaints_peft_example.yaml"), ["peft.dropout=0.0"])
    torch.manual_seed(0)
    model = build_peft_model(load_base_model(cfg.model), cfg.peft, cfg.model, total_steps=100)
    model.train()
    attend_row_by_row(model)
    base = model.get_base_model()
    generator = torch.Generator().manual_seed(0)
    lines = [f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}: `OMP_NUM_THREADS={torch.get_num_threads()} "
             f"python bench/packed_attention.py` on {cpu_name()} ({torch.get_num_threads()} threads), torch "
             f"{torch.__version__}; SmolLM2-135M-Instruct, LoRA r=8 on q,v; {args.rows} rows a batch; medians of "
             f"{args.steps} steps.", "",
             "| tokens per row | packed length | s per forward + backward, masked SDPA | row by row | speed-up |", "|---|---|---|---|---|"]
    for length in args.lengths:
        rows = [{"input_ids": torch.randint(100, 40000, (length,), generator=generator).tolist()} for _ in range(args.rows)]
        for row in rows:  # the label: the last tenth of the row, as a class name or an answer would be
            cut = length - max(1, length // 10)
            row["labels"] = [-100] * cut + row["input_ids"][cut:]
        batch = collate_padding_free(rows)
        seconds: dict[str, list[float]] = {"sdpa": [], ROW_BY_ROW: []}
        for step in range(args.steps + 1):
            for implementation, times in seconds.items():
                base.set_attn_implementation(implementation)
                began = time.perf_counter()
                token_loss_sum(model, batch, pass_positions=True).backward()
                if step:  # the first step pays for warm-up
                    times.append(time.perf_counter() - began)
        masked, by_row = statistics.median(seconds["sdpa"]), statistics.median(seconds[ROW_BY_ROW])
        print(length, masked, by_row, flush=True)
        lines.append(f"| {length} | {length * args.rows} | {masked:.2f} | {by_row:.2f} | {masked / by_row:.2f}x |")
    write_between_markers("\n".join(lines), MARKERS, title=TITLE)


if __name__ == "__main__":
    main()

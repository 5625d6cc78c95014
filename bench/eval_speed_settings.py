"""Which settings make rank classification fastest: prompts per forward (eval.batch_size), on the CPU plain attention
or SDPA, and the prompts' shared head run once or in every prompt? Scores the 300 dev rows of RAFT twitter_complaints with the default recipe's model (the base model:
the speed does not depend on the weights' values) in fp32 and, where this machine computes bf16 natively, in bf16.
One warm-up batch first, then medians of repeated passes over all the rows; 1 process, every core.

    .venv/bin/python bench/eval_speed_settings.py                       # about 10 minutes on 2 cores
    .venv/bin/python bench/eval_speed_settings.py --sizes 16 32 --attention eager --repeats 1
    .venv/bin/python bench/eval_speed_settings.py --sizes 32 --dtypes bf16 --attention eager --prefix on off \
        --set data.chat_format=true                                     # the shared head: its own table

Raw results go to bench/results/eval_speed_settings.jsonl, the table to docs/benchmarks.md between its markers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peft_tuner.config import load_config  # noqa: E402
from peft_tuner.data import Encoder, build_task, prepare_split, read_table  # noqa: E402
from peft_tuner.modeling import load_base_model, load_tokenizer, native_bf16, prepare_tokenizer  # noqa: E402
from peft_tuner import scoring  # noqa: E402
from report_blocks import cpu_name, write_between_markers  # noqa: E402  (bench/ is the script's folder)

RESULTS = ROOT / "bench" / "results" / "eval_speed_settings.jsonl"
MARKERS = ("<!-- eval_speed_settings: begin (written by bench/eval_speed_settings.py) -->", "<!-- eval_speed_settings: end -->")
TITLE = "Evaluation: prompts per forward and attention"
PREFIX_MARKERS = ("<!-- eval_speed_settings prefix: begin (written by bench/eval_speed_settings.py --prefix on off) -->",
                  "<!-- eval_speed_settings prefix: end -->")
PREFIX_TITLE = "Evaluation: the prompts' shared head run once"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "twitter_complaints_smollm2.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 48, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"] if native_bf16() else ["fp32"])
    parser.add_argument("--attention", nargs="+", default=["sdpa", "eager"], choices=["sdpa", "eager"],
                        help="eager: what rank classification uses on the CPU; sdpa: with that switched off")
    parser.add_argument("--prefix", nargs="+", default=["on"], choices=["on", "off"],
                        help="on: the tokens most prompts start with run once (rank classification's way); off: in "
                             "every prompt. Comparing both writes its own table")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides, e.g. data.chat_format=true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    cfg = load_config(args.recipe, args.set)
    tokenizer = prepare_tokenizer(load_tokenizer(cfg.model), cfg.model)
    task = build_task(cfg.data, read_table(cfg.data.train_file, "train"), tokenizer)
    rows = prepare_split(task, read_table(cfg.data.eval_file, "eval"), cfg.data, require_labels=False, role="eval").rows
    encoder = Encoder(tokenizer, task, cfg.data.max_length)
    run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = "python bench/eval_speed_settings.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    records = []
    for dtype in args.dtypes:
        model = load_base_model(cfg.model, dtype).eval()
        for size in args.sizes:
            for attention in args.attention:
                scoring.SCORE_WITH_EAGER_ATTENTION_ON_CPU = attention == "eager"
                scoring.rank_scores(model, encoder, rows[:size], size)  # warm-up: the first forward of a shape costs more
                rates = {prefix: [] for prefix in args.prefix}
                for _ in range(args.repeats):
                    for prefix in args.prefix:  # alternated, so that a slower spell of the machine hits both
                        scoring.SHARE_PROMPT_PREFIX = prefix == "on"
                        started = time.perf_counter()
                        scoring.rank_scores(model, encoder, rows, size)
                        rates[prefix].append(len(rows) / (time.perf_counter() - started))
                for prefix in args.prefix:
                    record = {"run": run, "command": command, "machine": machine, "recipe": Path(args.recipe).name,
                              "overrides": args.set, "dtype": dtype, "batch_size": size, "attention": attention,
                              "prefix": prefix, "rows": len(rows), "examples_per_second": [round(r, 2) for r in rates[prefix]]}
                    records.append(record)
                    print(f"{dtype} batch {size} {attention} prefix {prefix}: {statistics.median(rates[prefix]):.2f} "
                          "examples/s", flush=True)
        del model
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if "off" in args.prefix:
        write_between_markers(report(records), PREFIX_MARKERS, title=PREFIX_TITLE)
    else:
        write_between_markers(report(records), MARKERS, title=TITLE)
    return 0


def report(records: list[dict]) -> str:
    first = records[0]
    overrides = f" with {' '.join(first['overrides'])}" if first.get("overrides") else ""
    lines = [f"Run {first['run']}: `{first['command'].strip()}` on {first['machine']}; {first['recipe']}'s base model{overrides}, "
             f"rank classification of the {first['rows']} dev rows, 1 process; medians of "
             f"{len(first['examples_per_second'])} passes after a warm-up batch.", "",
             "| dtype | eval.batch_size | attention | shared head once | examples/s (each pass) | against the best of this dtype |",
             "|---|---|---|---|---|---|"]
    best = {}
    for r in records:
        best[r["dtype"]] = max(best.get(r["dtype"], 0.0), statistics.median(r["examples_per_second"]))
    for r in records:
        rate = statistics.median(r["examples_per_second"])
        passes = ", ".join(f"{x:.2f}" for x in r["examples_per_second"])
        lines.append(f"| {r['dtype']} | {r['batch_size']} | {r.get('attention', 'sdpa')} | {r.get('prefix', 'off')} | {rate:.2f} ({passes}) | "
                     f"{rate / best[r['dtype']]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

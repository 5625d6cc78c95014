"""Accuracy experiments on RAFT twitter_complaints with SmolLM2-135M-Instruct (run on purpose, never by the tests).

    python bench/experiments.py run NAME --seeds 1 2 3 [--cv 2] [--eval] -- section.key=value ...

Each run trains with `python launch/train.py` (one process, ZeRO off: same loop as every launcher) and evaluates with
`peft_tuner.evaluate`. `--cv K` trains on K-1 folds of the 50 training rows and scores the held-out fold: settings are
chosen on that, never on dev.csv labels. `--eval` scores dev.csv (300 labelled rows). Every result is appended to
bench/results/experiments.jsonl; `python bench/experiments.py table` rewrites the table in docs/experiments.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from report_blocks import write_between_markers  # noqa: E402  (bench/ is the script's folder)
RECIPE = ROOT / "configs" / "twitter_complaints_smollm2.yaml"
RESULTS = ROOT / "bench" / "results" / "experiments.jsonl"
TABLE_MARKERS = ("<!-- experiments table: begin (written by `python bench/experiments.py table`) -->",
                 "<!-- experiments table: end -->")
WORK = ROOT / "outputs" / "experiments"
TRAIN_CSV = ROOT.parent / "shared" / "data" / "raft" / "twitter_complaints" / "train.csv"


def train(name: str, overrides: list[str], out: Path) -> float:
    started = time.time()
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), str(RECIPE), *overrides, f"output_dir={out}",
           "train.verify_adapter=false", "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"{name}: training failed\n{proc.stderr[-3000:]}")
    return time.time() - started


def evaluate(overrides: list[str], adapter: Path, eval_file: str, out: Path) -> dict:
    from peft_tuner.config import load_config
    from peft_tuner.evaluate import evaluate as run_evaluation

    cfg = load_config(str(RECIPE), overrides + [f"data.eval_file={eval_file}"])
    return run_evaluation(cfg, out, split="eval", adapter_dir=str(adapter), quiet=True)


def folds(k: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """K stratified folds of train.csv: (training file without the fold, the fold)."""
    rows = list(csv.DictReader(open(TRAIN_CSV, encoding="utf-8")))
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row["Label"], []).append(row)
    rng = random.Random(seed)
    assignment = []
    for label_rows in by_label.values():
        rng.shuffle(label_rows)
        assignment += [(i % k, r) for i, r in enumerate(label_rows)]
    out = []
    folder = WORK / f"folds{k}"
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(k):
        train_file, held_file = folder / f"train_{f}.csv", folder / f"held_{f}.csv"
        for path, keep in ((train_file, lambda i: i != f), (held_file, lambda i: i == f)):
            with open(path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=["Tweet text", "Label", "ID"])
                writer.writeheader()
                writer.writerows(r for i, r in assignment if keep(i))
        out.append((train_file, held_file))
    return out


def run(args) -> None:
    overrides = list(args.overrides)
    for seed in args.seeds:
        seeded = overrides + [f"train.seed={seed}"]
        record = {"name": args.name, "seed": seed, "overrides": overrides, "time": time.strftime("%Y-%m-%d %H:%M")}
        if args.cv:
            scores = []
            for f, (train_file, held_file) in enumerate(folds(args.cv)):
                out = WORK / args.name / f"seed{seed}-fold{f}"
                train(args.name, seeded + [f"data.train_file={train_file}"], out)
                scores.append(evaluate(seeded, out / "adapter", str(held_file), out / "eval")["accuracy"])
            record["cv_accuracy"] = statistics.mean(scores)
            record["cv_folds"] = scores
        if args.eval:
            out = WORK / args.name / f"seed{seed}"
            record["train_seconds"] = round(train(args.name, seeded, out), 1)
            result = evaluate(seeded, out / "adapter", "../shared/data/raft/twitter_complaints/dev.csv", out / "eval")
            record.update(dev_accuracy=result["accuracy"], dev_macro_f1=result["macro_f1"])
            if args.also_generate:
                generated = evaluate(seeded + ["eval.method=generate"], out / "adapter",
                                     "../shared/data/raft/twitter_complaints/dev.csv", out / "eval_generate")
                record.update(dev_accuracy_generate=generated["accuracy"], dev_invalid_generate=generated["invalid"])
        record["command"] = "python bench/experiments.py run " + " ".join(
            [args.name, "--seeds", str(seed)] + (["--cv", str(args.cv)] if args.cv else []) + (["--eval"] if args.eval else [])
            + (["--also-generate"] if args.also_generate else []) + ["--", *overrides])
        print(json.dumps(record), flush=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(record) + "\n")


def chosen(args) -> None:
    """Run, on dev, the cross-validated setting with the best mean CV accuracy (dev labels play no part in the choice)."""
    records = [json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip()]
    groups: dict[str, list] = {}
    for r in records:
        if "cv_accuracy" in r:
            groups.setdefault(r["name"], []).append(r)
    name, rs = max(groups.items(), key=lambda kv: statistics.mean(r["cv_accuracy"] for r in kv[1]))
    print(f"chosen by CV: {name} ({statistics.mean(r['cv_accuracy'] for r in rs):.3f})", flush=True)
    run(argparse.Namespace(name=f"chosen:{name.removeprefix('cv-')}", seeds=args.seeds, cv=0, eval=True,
                           also_generate=False, overrides=rs[0]["overrides"]))


def table(_args) -> None:
    records = [json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip()] if RESULTS.is_file() else []
    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r["name"], []).append(r)
    lines = ["| experiment | overrides of configs/twitter_complaints_smollm2.yaml | seeds | CV accuracy on train (mean ± sd) "
             "| dev accuracy, rank (mean ± sd) | dev accuracy, generate | dev macro-F1 |", "|---|---|---|---|---|---|---|"]

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    for name, rs in groups.items():
        overrides = (" ".join(rs[0]["overrides"]) or "(recipe as is)").replace("|", "\\|")  # a pipe would end the cell
        lines.append(f"| {name} | `{overrides}` | {', '.join(str(r['seed']) for r in rs)} "
                     f"| {stat([r.get('cv_accuracy') for r in rs])} | {stat([r.get('dev_accuracy') for r in rs])} "
                     f"| {stat([r.get('dev_accuracy_generate') for r in rs])} | {stat([r.get('dev_macro_f1') for r in rs])} |")
    write_between_markers("\n".join([*lines, "", "Every row's commands are in bench/results/experiments.jsonl."]), TABLE_MARKERS,
                          doc=ROOT / "docs" / "experiments.md", new_doc="# Experiments\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("name")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--cv", type=int, default=0, help="K-fold cross-validation on the 50 training rows")
    p.add_argument("--eval", action="store_true", help="train on all 50 rows and score dev.csv")
    p.add_argument("--also-generate", action="store_true", help="also score dev.csv by generation")
    p.set_defaults(run=run)
    p = sub.add_parser("chosen", help="evaluate on dev the setting with the best CV accuracy")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.set_defaults(run=chosen)
    p = sub.add_parser("table")
    p.set_defaults(run=table)
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides
    args.run(args)


if __name__ == "__main__":
    main()

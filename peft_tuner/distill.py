"""Pseudo-labels for distillation: trained adapters (one, or a seed ensemble) label the unlabelled rows of
data.test_file, and those rows join the labelled training rows in one CSV that a fresh adapter then trains on.

    peft-tuner pseudo-label RECIPE.yaml --adapter seed1/adapter --adapter seed2/adapter --rows 400 --out distilled.csv
    python launch/train.py RECIPE.yaml data.train_file=distilled.csv train.epochs=3

The classes are given out in the shares of the training labels: each class, the rarest first, takes its share of the
rows it is most confident of (probability normalised over the classes), each row once; the most common class takes
the rest. So a model that leans towards one class does not pass the lean on to its student.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from peft_tuner.config import Config, ConfigError
from peft_tuner.data import prepare_split, read_table


def pseudo_label(cfg: Config, out_csv: str | Path, adapter_dir: Optional[str | list[str]] = None,
                 model_dir: Optional[str] = None, rows: Optional[int] = None, overwrite: bool = False) -> dict:
    """Score the first `rows` rows of data.test_file (all by default) by rank classification, label them, and write
    the training rows followed by the labelled rows to `out_csv`; the scores stay in `<out_csv stem>_scores/`."""
    from peft_tuner.evaluate import evaluate, load_task, training_shares

    out = Path(out_csv)
    scores_dir = out.with_name(f"{out.stem}_scores")
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out}: the pseudo-labelled rows are written as CSV; give a path ending in .csv")
    for path in (out, scores_dir):
        if path.exists() and not overwrite:
            raise ConfigError(f"--out: {path} exists; pass --overwrite to replace it, or choose another --out")
    if cfg.data.task != "classification":
        raise ConfigError(f"data.task: pseudo-labels are classes; this recipe's task is '{cfg.data.task}'")
    if rows is not None and rows < 1:
        raise ConfigError(f"--rows {rows}: must be at least 1")
    if not cfg.data.test_file:
        raise ConfigError("data.test_file: not set; it holds the unlabelled rows to label")
    members = adapter_dir if isinstance(adapter_dir, (list, tuple)) else [adapter_dir]
    task = load_task(cfg, members[0] or model_dir)
    train = read_table(cfg.data.train_file, "train")
    shares = training_shares(train, task)  # data problems surface before any model loads

    scoring = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_rows=rows),
                                  eval=dataclasses.replace(cfg.eval, match_prior=False))
    evaluate(scoring, scores_dir, split="test", model_dir=model_dir, adapter_dir=adapter_dir, method="rank")
    unlabelled = prepare_split(task, read_table(cfg.data.test_file, "test"), scoring.data, require_labels=False).rows
    predictions = [json.loads(line) for line in (scores_dir / "predictions_test.jsonl").open() if line.strip()]
    scores = torch.tensor([[p["scores"][c] for c in task.class_names] for p in predictions])
    labels = split_by_shares(scores, shares)

    labelled_rows = [{**unlabelled[p["index"]], task.label_column: task.class_names[c]} for p, c in zip(predictions, labels)]
    columns = list(dict.fromkeys(list(train.columns) + [c for r in labelled_rows for c in r]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(train.rows)
        writer.writerows(labelled_rows)
    counts = {name: labels.count(i) for i, name in enumerate(task.class_names)}
    print(f"pseudo-label | {len(train.rows)} training rows + {len(labelled_rows)} rows of {cfg.data.test_file} labelled "
          f"({', '.join(f'{n} {c}' for c, n in counts.items())}) -> {out} | scores: {scores_dir}")
    return {"out": str(out), "scores": str(scores_dir), "training_rows": len(train.rows), "pseudo_rows": len(labelled_rows),
            "counts": counts, "training_shares": dict(zip(task.class_names, shares.tolist()))}


def split_by_shares(scores: torch.Tensor, shares: torch.Tensor) -> list[int]:
    """A class for each row of [rows, classes] scores, the classes given out in `shares`: the rarest class takes the
    round(share x rows) rows it is most confident of, then the next; the most common class takes the rest."""
    confidence = scores.double().log_softmax(-1)
    labels = [-1] * len(scores)
    order = sorted(range(len(shares)), key=lambda c: float(shares[c]))
    for c in order[:-1]:
        free = [i for i in range(len(scores)) if labels[i] < 0]
        quota = round(float(shares[c]) * len(scores))
        for i in sorted(free, key=lambda i: -float(confidence[i, c]))[:quota]:
            labels[i] = c
    return [order[-1] if c < 0 else c for c in labels]

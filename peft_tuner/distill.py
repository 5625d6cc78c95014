"""Pseudo-labels for distillation: trained adapters (one, or a seed ensemble) label the unlabelled rows of
data.test_file, and those rows join the labelled training rows in one CSV that a fresh adapter then trains on.

    peft-tuner pseudo-label RECIPE.yaml --adapter seed1/adapter --adapter seed2/adapter --rows 400 --out distilled.csv
    python launch/train.py RECIPE.yaml data.train_file=distilled.csv train.epochs=3

The classes are given out in the shares of the training labels: each class, the rarest first, takes its share of the
rows it is most confident of (probability normalised over the classes), each row once; the most common class takes
the rest. So a model that leans towards one class does not pass the lean on to its student.

`peft-tuner distill RECIPE.yaml --out DIR` runs the whole recipe in one command: the teachers (the recipe with seeds
1..N; distill.parallel of them at once, the cores shared out between them), their labels, the student (teachers and
student in distill.dtype), and the evaluation of each on data.eval_file; a second call continues where the first
stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from peft_tuner.checkpoint import CHECKPOINT_DIR
from peft_tuner.config import Config, ConfigError
from peft_tuner.data import build_task, prepare_split, read_table, select_rows
from peft_tuner.metrics import headline_metrics


def pseudo_label(cfg: Config, out_csv: str | Path, adapter_dir: Optional[str | list[str]] = None,
                 model_dir: Optional[str] = None, rows: Optional[int] = None, overwrite: bool = False) -> dict:
    """Score the first `rows` rows of data.test_file (all by default) by rank classification, label them, and write
    the training rows followed by the labelled rows to `out_csv`; each row's class scores go to
    `<out_csv stem>_scores.jsonl`."""
    from peft_tuner.evaluate import load_task, training_shares
    from peft_tuner.scoring import score_rows

    out = Path(out_csv)
    scores_file = out.with_name(f"{out.stem}_scores.jsonl")
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out}: the pseudo-labelled rows are written as CSV; give a path ending in .csv")
    for path in (out, scores_file):
        if path.exists() and not overwrite:
            raise ConfigError(f"--out: {path} exists; pass --overwrite to replace it, or choose another --out")
    members = adapter_dir if isinstance(adapter_dir, (list, tuple)) else [adapter_dir]
    train = check_inputs(cfg, rows)  # data problems surface before any model loads
    task = load_task(cfg, members[0] or model_dir)
    shares = training_shares(train, task)  # in the classes of the adapters' task

    test_data = dataclasses.replace(cfg.data, max_rows=rows)
    unlabelled = prepare_split(task, read_table(cfg.data.test_file, "test"), test_data, require_labels=False, role="test").rows
    scores, scored_by, _ = score_rows(cfg, task, unlabelled, model_dir, members)
    labels = split_by_shares(scores, shares)

    train_rows = [train.rows[i] for i in select_rows(train.rows, cfg.data, "train", task.label_column)]  # as the adapters saw them
    labelled_rows = [{**row, task.label_column: task.class_names[c]} for row, c in zip(unlabelled, labels)]
    columns = list(dict.fromkeys(list(train.columns) + [c for r in labelled_rows for c in r]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(train_rows)
        writer.writerows(labelled_rows)
    with open(scores_file, "w", encoding="utf-8") as f:
        for i, (row, s) in enumerate(zip(unlabelled, scores)):
            f.write(json.dumps({"index": i, "id": row.get(cfg.data.id_column), "scored_by": scored_by,
                                "scores": dict(zip(task.class_names, s.tolist()))}, ensure_ascii=False) + "\n")
    counts = {name: labels.count(i) for i, name in enumerate(task.class_names)}
    train_with = student_overrides(task, out, cfg.data.max_rows)
    print(f"pseudo-label | {len(train_rows)} training rows + {len(labelled_rows)} rows of {cfg.data.test_file} labelled "
          f"({', '.join(f'{n} {c}' for c, n in counts.items())}) -> {out} | scores: {scores_file}\n"
          f"train a student on it with: {' '.join(repr(o) if ' ' in o else o for o in train_with)}")
    return {"out": str(out), "scores": str(scores_file), "training_rows": len(train_rows), "pseudo_rows": len(labelled_rows),
            "counts": counts, "training_shares": dict(zip(task.class_names, shares.tolist())), "train_with": train_with}


def student_overrides(task, distilled_csv: str | Path, max_rows: Optional[int] = None) -> list[str]:
    """Overrides that train on the pseudo-labelled CSV: a plain CSV does not say which column is the text and which the
    label (a RAFT folder's task.json did), so they are named; and data.max_rows, which cut the teachers' training rows
    (the CSV holds just those), would cut the pseudo-labelled rows off the end of the CSV, so it goes."""
    return [f"data.train_file={distilled_csv}", f"data.text_column={task.text_column}",
            f"data.label_column={task.label_column}"] + (["data.max_rows=null"] if max_rows else [])


def check_inputs(cfg: Config, rows: Optional[int]):
    """What pseudo-labelling needs from a recipe, checked before any model loads (or, for distill, trains); returns
    the training table."""
    from peft_tuner.evaluate import training_shares

    if cfg.data.task != "classification":
        raise ConfigError(f"data.task: pseudo-labels are classes; this recipe's task is '{cfg.data.task}'")
    if rows is not None and rows < 1:
        raise ConfigError(f"--rows {rows}: must be at least 1")
    if not cfg.data.test_file:
        raise ConfigError("data.test_file: not set; it holds the unlabelled rows to label")
    if cfg.data.eval_fraction:
        raise ConfigError("data.eval_fraction: the student trains on a new CSV, which would be split again; give the "
                          "held-out rows as data.eval_file instead")
    read_table(cfg.data.test_file, "test")
    train = read_table(cfg.data.train_file, "train")
    training_shares(train, build_task(cfg.data, train))
    return train


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


# ----------------------------------------------------------------------------------------------------------------------
# The whole recipe in one command

PLAN_FILE = "distill_plan.json"


def teacher_settings(plan: dict) -> tuple:
    """What a teacher's training depends on, besides its seed: the recipe and its overrides, but for distill.*, and
    the dtype it trains in."""
    import yaml

    recipe = yaml.safe_load(plan.get("recipe_text") or "") or {}
    recipe.pop("distill", None)
    return plan.get("recipe"), recipe, [o for o in plan.get("overrides", []) if not o.startswith("distill.")], plan.get("dtype")


def distill(recipe: str | Path, out_dir: str | Path, overrides: Optional[list[str]] = None, processes: int = 1,
            overwrite: bool = False, log=print) -> dict:
    """Teachers (the recipe, seeds 1..distill.teachers) -> their ensemble labels the first distill.rows rows of
    data.test_file -> a student (the recipe for distill.student_epochs epochs on the labelled and pseudo-labelled rows)
    -> each evaluated on data.eval_file. A step whose result is in `out_dir` is not run again; `processes` > 1 trains
    under DeepSpeed ZeRO-2."""
    import shutil
    import time

    from peft_tuner.config import load_config
    from peft_tuner.runner import Run, train_in_subprocesses
    from peft_tuner.evaluate import evaluate, load_task
    from peft_tuner.runtime import resolve_dtype

    started = time.time()
    out = Path(out_dir).resolve()
    overrides = list(overrides or [])
    if not Path(recipe).is_file():
        raise ConfigError(f"{recipe}: no such recipe file")
    if processes < 1:
        raise ConfigError(f"--processes {processes}: must be at least 1")
    cfg = load_config(str(recipe), overrides)
    teachers, rows, student_epochs = cfg.distill.teachers, cfg.distill.rows, cfg.distill.student_epochs
    dtype = resolve_dtype(cfg.distill.dtype, cfg.model.dtype)  # `auto`: bf16 on this machine, or the recipe's
    in_dtype = [f"model.dtype={dtype}"] if dtype != cfg.model.dtype else []
    plan = {"recipe": str(Path(recipe).resolve()), "recipe_text": Path(recipe).read_text(),
            "overrides": [o for o in overrides if not o.startswith("distill.parallel=")],  # how, not what, to train
            "teachers": teachers, "rows": rows, "student_epochs": student_epochs,  # an edited recipe is other settings
            **({"dtype": dtype} if in_dtype else {})}
    if out.exists() and any(out.iterdir()):
        if not (out / PLAN_FILE).is_file():
            raise ConfigError(f"--out {out}: holds files that distill did not write; choose another folder")
        before = json.loads((out / PLAN_FILE).read_text())
        same_teachers = teacher_settings(before) == teacher_settings(plan)
        if before != plan:
            if not overwrite:
                raise ConfigError(f"--out {out}: holds a distillation with other settings ({out / PLAN_FILE}); pass "
                                  "--overwrite to replace it" + (" (its finished teachers, trainings of the same recipe, "
                                  "are kept)" if same_teachers else "") + ", or choose another folder")
            if same_teachers:  # teachers depend on the recipe and their seed only: keep them, redo the rest
                changes = [("the recipe's distill section" if k == "recipe_text" else f"{k} {before.get(k)} -> {plan[k]}")
                           for k in plan if before.get(k) != plan[k]]
                log(f"[plan] {', '.join(changes)}: the finished teachers are kept, the labels and the student made again")
                for path in out.iterdir():
                    if not path.name.startswith("teacher"):
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
            else:
                shutil.rmtree(out)
    check_inputs(cfg, rows)  # before hours of training, not after
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2))

    def to_train(name: str, run_dir: Path, run_overrides: list[str], again: bool) -> list[Run]:
        """The run, unless run_dir holds it finished (and nothing it was trained from changed); it continues from its
        newest checkpoint if an interrupted call left one."""
        if (run_dir / "summary.json").is_file() and not again:
            log(f"[{name}] kept: {run_dir}")
            return []
        resume = not again and (run_dir / CHECKPOINT_DIR / "latest").is_file()
        log(f"[{name}] " + (f"continuing from its newest checkpoint in {run_dir}" if resume else f"training in {run_dir}"))
        return [Run(name, overrides + run_overrides + [f"output_dir={run_dir}"], run_dir, resume)]

    report = {"plan": plan, "teachers": []}
    teacher_dirs = [out / f"teacher{seed}" for seed in range(1, teachers + 1)]
    runs = [run for seed, run_dir in enumerate(teacher_dirs, 1)
            for run in to_train(f"teacher {seed}/{teachers}, train.seed={seed}" + (f", {dtype}" if in_dtype else ""), run_dir,
                                [f"train.seed={seed}"] + in_dtype, again=False)]
    train_in_subprocesses(recipe, runs, processes, at_once=cfg.distill.parallel, cpu_tuning=cfg.train.cpu_tuning)
    retrained = bool(runs)  # the teachers are independent; the labels depend on all of them, the student on the labels
    report["teachers"] = [_trained(run_dir) for run_dir in teacher_dirs]
    adapters = [t["adapter"] for t in report["teachers"]]

    distilled, labels_file = out / "distilled.csv", out / "labels.json"
    relabelled = retrained or not labels_file.is_file()  # labels.json is written last: there, the CSV is whole
    if relabelled:
        log(f"[labels] the {teachers} teachers as one ensemble label {rows or 'all'} rows of {cfg.data.test_file}")
        labels_file.unlink(missing_ok=True)
        labels_file.write_text(json.dumps(pseudo_label(cfg, distilled, adapters, rows=rows, overwrite=True), indent=2))
    else:
        log(f"[labels] kept: {distilled}")
    report["labels"] = json.loads(labels_file.read_text())

    student_dir = out / "student"
    student = student_overrides(load_task(cfg, adapters[0]), distilled, cfg.data.max_rows) + [f"train.epochs={student_epochs}"] + in_dtype
    train_in_subprocesses(recipe, to_train(f"student, {student_epochs} epochs on {distilled.name}", student_dir, student,
                                           again=relabelled), processes, cpu_tuning=cfg.train.cpu_tuning)
    report["student"] = _trained(student_dir)

    if cfg.data.eval_file:
        log(f"[evaluate] each teacher, their ensemble and the student on {cfg.data.eval_file}")
        ensemble = (evaluate(cfg, out / "ensemble_eval", split="eval", adapter_dir=adapters, method="rank", quiet=True)
                    if teachers > 1 else {})
        # The ensemble's pass scored each teacher too; by rank classification, as the recipe's own evaluation would
        in_ensemble = ensemble.get("members") if cfg.eval.method == "rank" else None
        for member, scored in zip(report["teachers"] + [report["student"]], (in_ensemble or [None] * teachers) + [None]):
            member["eval"] = headline_metrics(scored or evaluate(cfg, Path(member["adapter"]).parent / "eval", split="eval",
                                                                 adapter_dir=member["adapter"], quiet=True))
        if ensemble:
            report["ensemble_eval"] = headline_metrics(ensemble)
    report["wall_seconds"] = round(time.time() - started, 1)
    (out / "distill_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    log(format_distill_report(report))
    return report


def _trained(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"adapter": summary["adapter_dir"], "train_seconds": summary["train_seconds"], "steps": summary.get("steps_done")}


def format_distill_report(report: dict) -> str:
    def line(name: str, member: dict) -> str:
        scores = member.get("eval") or {}
        figures = f"accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}" if "accuracy" in scores else "not evaluated"
        seconds = f"{member['train_seconds']} s" if "train_seconds" in member else "-"
        return f"| {name} | {figures} | {seconds} | {member.get('adapter', '-')} |"

    rows = [line(f"teacher {i}", t) for i, t in enumerate(report["teachers"], 1)]
    if "ensemble_eval" in report:
        rows.append(line(f"the {len(report['teachers'])} teachers as one ensemble", {"eval": report["ensemble_eval"]}))
    rows.append(line("**student**", report["student"]))
    return "\n".join(["", "| model | on data.eval_file | training | adapter |", "|---|---|---|---|", *rows, "",
                      f"distill wall time (this call) {report['wall_seconds']} s; the student is one adapter: "
                      f"{report['student']['adapter']}"])

"""Many accuracy experiments at once (a GPU machine, or patience): cross-validation on the 50 training rows, dev.csv,
self-training on the unlabelled tweets, seed ensembles. Run on purpose, never by the tests.

    python bench/sweep.py SPEC.json --results bench/results/sweep.jsonl --workers 12 [--data DIR] [--deadline SECONDS]

SPEC.json is a list of settings: {"name", "overrides": [...], "seeds": [...], "cv": K (0: none), "dev": true/false,
"self_train": {"pseudo": N, "rounds": R} (optional), "unlabelled": N (optional: also store the final model's class
scores for the first N rows of test_unlabeled.csv, so that label-free calibration is measured later from the file),
"teacher": {"name": SETTING, "seeds": [...]} (optional: distillation, below)}.
Every (setting, seed, fold or dev) is one job: train with `python launch/train.py` (same loop as every launcher),
score the held-out rows with `peft-tuner evaluate`, append one line to --results holding the accuracy and every row's
class scores (so that seed ensembles are computed later from the file, with no model). Jobs already in --results are
skipped: a sweep cut off by --deadline continues where it stopped.
With self-training, the model trained on the labelled rows labels test_unlabeled.csv; the N most confident rows (split
over the classes as in the labelled rows) join the labelled rows and a fresh adapter is trained on them, R times.
With a teacher, the student of each fold (or of dev) trains on its labelled rows plus every unlabelled row that the
teacher setting's models of the same fold stored in --results, labelled by their seed ensemble as `peft-tuner
pseudo-label` labels rows: the ensemble's knowledge in one adapter.
`--choose N` then picks, from the CV results alone, the setting to run on dev with N seeds.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peft_tuner.data.sources import data_root  # noqa: E402

RECIPE = ROOT / "configs" / "twitter_complaints_smollm2.yaml"
FIELDS = ["Tweet text", "Label", "ID"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_folds(train_csv: Path, k: int, folder: Path) -> list[tuple[Path, Path]]:
    """K stratified folds of the labelled rows (fixed split, seed 0): (training file without the fold, the fold)."""
    by_label: dict[str, list] = {}
    for row in read_rows(train_csv):
        by_label.setdefault(row["Label"], []).append(row)
    rng = random.Random(0)
    assignment = []
    for rows in by_label.values():
        rng.shuffle(rows)
        assignment += [(i % k, r) for i, r in enumerate(rows)]
    return [(write_rows(folder / f"train_{f}.csv", [r for i, r in assignment if i != f]),
             write_rows(folder / f"held_{f}.csv", [r for i, r in assignment if i == f])) for f in range(k)]


class Sweep:
    def __init__(self, args):
        self.data = Path(args.data).resolve()
        self.work = Path(args.work).resolve()
        self.results = Path(args.results)
        self.deadline = time.time() + args.deadline if args.deadline else None
        self.workers = args.workers
        self.base = [f"data.train_file={self.data}", f"data.test_file={self.data}",
                     f"data.eval_file={self.data / 'dev.csv'}", "train.verify_adapter=false", "train.eval_each_epoch=false"]

    def done(self) -> set:
        if not self.results.is_file():
            return set()
        return {(r["name"], r["seed"], r["fold"]) for r in map(json.loads, self.results.read_text().splitlines()) if r}

    def jobs(self, settings: list[dict]) -> list[tuple[dict, int, object]]:
        done = self.done()
        out = []
        for s in settings:
            for seed in s.get("seeds", [1]):
                folds = list(range(s.get("cv", 0))) + (["dev"] if s.get("dev") else [])
                out += [(s, seed, f) for f in folds if (s["name"], seed, f) not in done]
        return out

    def folds(self, k: int) -> list[tuple[Path, Path]]:
        folder = self.work / f"folds{k}"
        if not (folder / f"held_{k - 1}.csv").is_file():
            make_folds(self.data / "train.csv", k, folder)
        return [(folder / f"train_{f}.csv", folder / f"held_{f}.csv") for f in range(k)]

    def run(self, settings: list[dict], workers: int) -> None:
        todo = self.jobs(settings)
        for k in {s.get("cv", 0) for s in settings} - {0}:
            self.folds(k)  # written once, before the jobs read them
        print(f"{len(todo)} jobs, {workers} at a time", flush=True)
        with ThreadPoolExecutor(workers) as pool:
            for record in pool.map(lambda job: self.job(*job), todo):
                if record:
                    print(json.dumps({k: v for k, v in record.items() if k != "rows"}), flush=True)

    # -- one job ------------------------------------------------------------------------------------------------------

    def job(self, setting: dict, seed: int, fold) -> dict | None:
        if self.deadline and time.time() > self.deadline:
            return None
        started = time.time()
        name = setting["name"]
        out = self.work / name.replace(":", "_") / f"seed{seed}-{fold if fold == 'dev' else f'fold{fold}'}"
        overrides = self.base + list(setting["overrides"]) + [f"train.seed={seed}"]
        if fold == "dev":
            train_csv, held = self.data / "train.csv", self.data / "dev.csv"
        else:
            train_csv, held = self.folds(setting["cv"])[fold]
        pseudo_counts = []
        try:
            if setting.get("teacher"):
                rows, counts = taught_rows(read_rows(train_csv), self.teacher_scores(setting["teacher"], fold),
                                           self.unlabelled())
                pseudo_counts.append(counts)
                train_csv = write_rows(out / "distilled" / "train.csv", rows)
            adapter = self.train(overrides, train_csv, out / "round0")
            st = setting.get("self_train")
            for r in range(st["rounds"] if st else 0):
                scored = self.evaluate(overrides, adapter, "test", out / f"round{r}" / "unlabelled")
                rows, counts = pseudo_label(read_rows(train_csv), scored, self.unlabelled(), st["pseudo"])
                pseudo_counts.append(counts)
                mixed = write_rows(out / f"round{r + 1}" / "train.csv", rows)
                adapter = self.train(overrides, mixed, out / f"round{r + 1}")
            scored = self.evaluate(overrides + [f"data.eval_file={held}"], adapter, "eval", out / "held")
            unlabelled = []
            if setting.get("unlabelled"):
                rows = f"data.max_rows={setting['unlabelled']}"  # the evaluation reads the training rows for the class names only
                unlabelled = self.evaluate(overrides + [rows], adapter, "test", out / "unlabelled_final")
        except RuntimeError as error:
            print(f"FAILED {name} seed {seed} fold {fold}: {error}", flush=True)
            return None
        correct = sum(p["prediction"] == p["gold"] for p in scored)
        record = {"name": name, "seed": seed, "fold": fold, "accuracy": correct / len(scored), "n": len(scored),
                  "overrides": setting["overrides"], "self_train": setting.get("self_train"), "pseudo": pseudo_counts,
                  "teacher": setting.get("teacher"),
                  "seconds": round(time.time() - started, 1), "device": os.environ.get("SWEEP_DEVICE", "cpu"),
                  "rows": [[p["gold"], p["scores"]] for p in scored]}
        if unlabelled:
            labels = [r["Label"] for r in read_rows(train_csv)]
            record["train_prior"] = {c: labels.count(c) / len(labels) for c in sorted(set(labels))}
            record["unlabelled_rows"] = [p["scores"] for p in unlabelled]
        with open(self.results, "a") as f:  # one short write per line: concurrent jobs do not interleave
            f.write(json.dumps(record) + "\n")
        return record

    def teacher_scores(self, teacher: dict, fold) -> list[dict]:
        """The teacher's seed ensemble on the unlabelled rows its models of this fold scored: each class's
        log-probability normalised over the classes, averaged over the seeds."""
        mine = [r for r in load(self.results) if r["name"] == teacher["name"] and r["fold"] == fold
                and r["seed"] in teacher["seeds"]]
        if sorted(r["seed"] for r in mine) != sorted(teacher["seeds"]) or not all("unlabelled_rows" in r for r in mine):
            raise RuntimeError(f"{self.results} lacks the unlabelled scores of teacher {teacher['name']}, fold {fold}, "
                               f"seeds {teacher['seeds']}: run that setting with \"unlabelled\" first")
        ids = [r["ID"] for r in read_rows(self.data / "test_unlabeled.csv")]
        return [{"id": ids[i], "scores": mean_log_probs(rows)} for i, rows in enumerate(zip(*(r["unlabelled_rows"] for r in mine)))]

    def unlabelled(self) -> dict[str, dict]:
        return {r["ID"]: r for r in read_rows(self.data / "test_unlabeled.csv")}

    def train(self, overrides: list[str], train_csv: Path, out: Path) -> Path:
        cmd = [sys.executable, str(ROOT / "launch" / "train.py"), str(RECIPE), *overrides, f"data.train_file={train_csv}",
               f"output_dir={out / 'run'}", "--overwrite"]
        self.call(cmd, out / "train.log")
        return out / "run" / "adapter"

    def evaluate(self, overrides: list[str], adapter: Path, split: str, out: Path) -> list[dict]:
        cmd = [sys.executable, "-m", "peft_tuner.cli", "evaluate", str(RECIPE), *overrides, "--adapter", str(adapter),
               "--split", split, "--out", str(out)]
        self.call(cmd, out.parent / f"{out.name}.log")
        return [json.loads(line) for line in (out / f"predictions_{split}.jsonl").read_text().splitlines() if line]

    def call(self, cmd: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        threads = str(max(1, (os.cpu_count() or 1) // self.workers))  # the cores shared out between the jobs
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": threads})
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {log}\n" + log.read_text()[-1500:])


def pseudo_label(labelled: list[dict], scored: list[dict], unlabelled: dict[str, dict], n: int) -> tuple[list[dict], dict]:
    """The labelled rows plus n unlabelled rows, split over the classes as the labelled rows are: for each class the
    rows with the highest probability of that class (normalised over the classes), each row taken once."""
    share = {c: sum(r["Label"] == c for r in labelled) / len(labelled) for c in dict.fromkeys(r["Label"] for r in labelled)}
    taken, rows, counts = set(), list(labelled), {}
    for c, fraction in sorted(share.items(), key=lambda kv: kv[1]):  # the rarer class picks first
        def confidence(p):
            return p["scores"][c] - math.log(sum(math.exp(v) for v in p["scores"].values()))

        best = [p for p in sorted(scored, key=confidence, reverse=True) if p["id"] not in taken][: round(n * fraction)]
        taken.update(p["id"] for p in best)
        counts[c] = len(best)
        rows += [{**unlabelled[str(p["id"])], "Label": c, "ID": f"u{p['id']}"} for p in best]
    return rows, counts


def taught_rows(labelled: list[dict], scored: list[dict], unlabelled: dict[str, dict]) -> tuple[list[dict], dict]:
    """The labelled rows plus every scored unlabelled row, labelled as `peft-tuner pseudo-label` labels them
    (peft_tuner.distill.split_by_shares: the classes given out in the labelled rows' shares)."""
    import torch

    from peft_tuner.distill import split_by_shares

    classes = list(dict.fromkeys(r["Label"] for r in labelled))
    shares = torch.tensor([sum(r["Label"] == c for r in labelled) / len(labelled) for c in classes])
    labels = split_by_shares(torch.tensor([[p["scores"][c] for c in classes] for p in scored]), shares)
    taught = [{**unlabelled[str(p["id"])], "Label": classes[i], "ID": f"u{p['id']}"} for p, i in zip(scored, labels)]
    return labelled + taught, {c: labels.count(i) for i, c in enumerate(classes)}


# -- reading the results ------------------------------------------------------------------------------------------------


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ensemble_accuracy(records: list[dict]) -> float:
    """Average each class's normalised log-probability over the records (same rows, other seeds), then argmax."""
    correct = 0
    for rows in zip(*(r["rows"] for r in records)):
        mean = mean_log_probs(scores for _, scores in rows)
        correct += max(mean, key=mean.get) == rows[0][0]
    return correct / len(records[0]["rows"])


def mean_log_probs(members) -> dict[str, float]:
    """One row's class scores from several models as one: each class's log-probability normalised over the classes,
    averaged over the models."""
    members = list(members)
    total: dict[str, float] = {}
    for scores in members:
        norm = math.log(sum(math.exp(v) for v in scores.values()))
        for c, v in scores.items():
            total[c] = total.get(c, 0.0) + (v - norm) / len(members)
    return total


def prior_matched_correct(record: dict) -> int:
    """Held-out rows right after prior matching: class offsets set on the job's unlabelled rows so that the mean
    predicted class shares there equal the shares of its training labels (peft_tuner.evaluate.prior_offsets)."""
    import torch

    from peft_tuner.evaluate import prior_offsets

    classes = sorted(record["train_prior"])
    unlabelled = torch.tensor([[scores[c] for c in classes] for scores in record["unlabelled_rows"]])
    offsets = prior_offsets(unlabelled, torch.tensor([record["train_prior"][c] for c in classes]))
    held = torch.tensor([[scores[c] for c in classes] for _, scores in record["rows"]]).log_softmax(-1) + offsets
    return sum(classes[int(i)] == gold for i, (gold, _) in zip(held.argmax(-1), record["rows"]))


def pooled_f1(records: list[dict]) -> tuple[float, dict[str, float]]:
    """Macro-F1 (RAFT's metric) and each class's recall over the rows of `records` pooled (one seed's folds)."""
    pairs = [(gold, max(scores, key=scores.get)) for r in records for gold, scores in r["rows"]]
    classes = sorted({g for g, _ in pairs} | {p for _, p in pairs})
    f1s, recall = [], {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in pairs)
        predicted, actual = sum(p == c for _, p in pairs), sum(g == c for g, _ in pairs)
        precision, recall[c] = tp / predicted if predicted else 0.0, tp / actual if actual else 0.0
        f1s.append(2 * precision * recall[c] / (precision + recall[c]) if precision + recall[c] else 0.0)
    return sum(f1s) / len(f1s), recall


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per setting: CV accuracy (mean over seeds of the pooled held-out accuracy), CV accuracy of the seed ensemble,
    dev accuracy per seed, dev accuracy of the seed ensemble; with unlabelled scores, CV and dev accuracy after prior
    matching too."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in records):
        mine = [r for r in records if r["name"] == name]
        cv = [r for r in mine if r["fold"] != "dev"]
        seeds = sorted({r["seed"] for r in cv})
        folds = sorted({r["fold"] for r in cv})
        entry = {"overrides": mine[0]["overrides"], "self_train": mine[0].get("self_train"),
                 "teacher": mine[0].get("teacher")}
        complete = [s for s in seeds if all(any(r["seed"] == s and r["fold"] == f for r in cv) for f in folds)]
        if complete:
            per_seed = [sum(r["accuracy"] * r["n"] for r in cv if r["seed"] == s) / sum(r["n"] for r in cv if r["seed"] == s)
                        for s in complete]
            entry["cv"] = per_seed
            entry["cv_macro_f1"] = [pooled_f1([r for r in cv if r["seed"] == s])[0] for s in complete]
            entry["cv_recall"] = {c: statistics.mean(pooled_f1([r for r in cv if r["seed"] == s])[1][c] for s in complete)
                                  for c in pooled_f1(cv)[1]}
            if all("unlabelled_rows" in r for r in cv if r["seed"] in complete):
                entry["cv_prior"] = [sum(prior_matched_correct(r) for r in cv if r["seed"] == s) /
                                     sum(r["n"] for r in cv if r["seed"] == s) for s in complete]
            if len(complete) > 1:
                hits = sum(ensemble_accuracy([r for r in cv if r["fold"] == f and r["seed"] in complete]) *
                           next(r["n"] for r in cv if r["fold"] == f) for f in folds)
                entry["cv_ensemble"] = hits / sum(next(r["n"] for r in cv if r["fold"] == f) for f in folds)
        dev = sorted((r for r in mine if r["fold"] == "dev"), key=lambda r: r["seed"])
        if dev:
            entry["dev"] = {r["seed"]: r["accuracy"] for r in dev}
            entry["dev_macro_f1"] = {r["seed"]: pooled_f1([r])[0] for r in dev}
            if all("unlabelled_rows" in r for r in dev):
                entry["dev_prior"] = {r["seed"]: prior_matched_correct(r) / r["n"] for r in dev}
            if len(dev) > 1:
                entry["dev_ensemble"] = ensemble_accuracy(dev)
        out[name] = entry
    return out


def choose(summary: dict[str, dict], metric: str = "cv") -> str:
    """The setting (one model, as a recipe runs it) with the best mean CV accuracy (`cv`) or macro-F1 (`cv_macro_f1`)
    over seeds. Dev plays no part."""
    return max((statistics.mean(e[metric]), name) for name, e in summary.items() if e.get(metric))[1]


def f1_markdown(summary: dict[str, dict]) -> str:
    """Macro-F1 first (RAFT's metric), accuracy and each class's recall beside it, for the settings with CV results."""
    def stat(values) -> str:
        values = list(values or [])
        if not values:
            return "-"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    classes = sorted({c for e in summary.values() for c in e.get("cv_recall", {})})
    lines = ["| setting | overrides | seeds | CV macro-F1 | CV accuracy | " + " | ".join(f"CV recall: {c}" for c in classes)
             + " | dev macro-F1 | dev accuracy |", "|---|---|---|---|---|" + "---|" * len(classes) + "---|---|"]
    for name, e in summary.items():
        if not e.get("cv"):
            continue
        overrides = (" ".join(e["overrides"]) or "(as is)").replace("|", "\\|")
        recall = " | ".join(f"{e['cv_recall'].get(c, 0):.3f}" for c in classes)
        lines.append(f"| {name} | `{overrides}` | {len(e['cv'])} | {stat(e['cv_macro_f1'])} | {stat(e['cv'])} | {recall} "
                     f"| {stat((e.get('dev_macro_f1') or {}).values())} | {stat((e.get('dev') or {}).values())} |")
    return "\n".join(lines)


def markdown(summary: dict[str, dict]) -> str:
    """The summary as a table for bench/results/experiments-log.md."""
    def stat(values) -> str:
        values = list(values or [])
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f} ({len(values)})"

    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["| setting | overrides of the recipe as it was before this sweep | self-training or teacher | 5-fold CV on train: "
             "mean ± sd (seeds) | CV, prior matched | CV, seed ensemble | dev: mean ± sd (seeds) | dev, prior matched "
             "| dev, seed ensemble |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        overrides = (" ".join(e["overrides"]) or "(as is)").replace("|", "\\|")
        st, teacher = e.get("self_train"), e.get("teacher")
        self_train = (f"{st['pseudo']} rows, {st['rounds']} round(s)" if st else
                      f"distilled from {teacher['name']} (seeds {', '.join(map(str, teacher['seeds']))})" if teacher else "-")
        lines.append(f"| {name} | `{overrides}` | {self_train} | {stat(e.get('cv'))} | {stat(e.get('cv_prior'))} "
                     f"| {number(e.get('cv_ensemble'))} | {stat((e.get('dev') or {}).values())} "
                     f"| {stat((e.get('dev_prior') or {}).values())} | {number(e.get('dev_ensemble'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", help="JSON list of settings")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "sweep.jsonl"))
    parser.add_argument("--data", default=str(data_root() / "raft" / "twitter_complaints"))
    parser.add_argument("--work", default=str(ROOT / "outputs" / "sweep"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--deadline", type=float, help="start no job after this many seconds")
    parser.add_argument("--choose", type=int, metavar="SEEDS", help="then run on dev the CV-best setting with this many seeds")
    parser.add_argument("--summary", action="store_true", help="print the summary of --results and stop")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a markdown table and stop")
    parser.add_argument("--f1", action="store_true", help="with --markdown: macro-F1, accuracy and per-class recall")
    parser.add_argument("--names", nargs="+", help="with --markdown: only the settings whose name starts with one of these")
    parser.add_argument("--by", choices=["cv", "cv_macro_f1"], default="cv", help="what --choose maximises")
    args = parser.parse_args()
    sweep = Sweep(args)
    if args.markdown:
        records = [r for r in load(sweep.results) if not args.names or r["name"].startswith(tuple(args.names))]
        print((f1_markdown if args.f1 else markdown)(summarise(records)))
        return
    settings = json.loads(Path(args.spec).read_text()) if args.spec else []
    if not args.summary:
        sweep.run(settings, args.workers)
    if args.choose and not args.summary:
        name = choose(summarise([r for r in load(sweep.results) if r["name"] in {s["name"] for s in settings}]), args.by)
        setting = next(s for s in settings if s["name"] == name)
        print(f"chosen by CV: {name}", flush=True)
        sweep.run([{**setting, "name": f"chosen:{name}", "cv": 0, "dev": True, "seeds": list(range(1, args.choose + 1))}],
                  args.workers)
    if sweep.results.is_file():
        print(json.dumps(summarise(load(sweep.results)), indent=1))


if __name__ == "__main__":
    main()

"""The demo's pipeline end to end on a tiny model and a handful of rows: every stage runs (DeepSpeed training on 2
processes included), and the report states the figures that the artefacts hold."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from conftest import run

pytestmark = pytest.mark.slow  # trains in subprocesses (pytest -m "not slow" leaves it out)


def test_demo_runs_end_to_end_and_reports_what_it_wrote(tmp_path, data_dir):
    out = tmp_path / "demo"
    raft = data_dir / "raft"  # 16 training rows, 8 labelled dev rows, 10 unlabelled test rows
    proc = run([sys.executable, "-m", "peft_tuner.cli", "demo", "--tiny", "--out", str(out), "--test-rows", "8",
                f"data.train_file={raft}", f"data.eval_file={raft}/dev.csv", f"data.test_file={raft}",
                "data.max_rows=12", "train.epochs=2", "data.max_length=48", "eval.match_prior=true"], timeout=400)
    report = json.loads((out / "demo_report.json").read_text())
    tuned = json.loads((out / "eval_tuned" / "metrics_eval.json").read_text())
    base = json.loads((out / "eval_base" / "metrics_eval.json").read_text())
    assert report["tuned"]["accuracy"] == tuned["accuracy"] and report["base"]["accuracy"] == base["accuracy"]
    assert report["tuned"]["n"] == 8 == sum(sum(row.values()) for row in tuned["confusion_matrix"].values())
    text = (out / "demo_report.md").read_text()
    assert f"| LoRA-tuned | {tuned['accuracy']:.4f} | {tuned['macro_f1']:.4f} |" in text
    assert f"| base model | {base['accuracy']:.4f} | {base['macro_f1']:.4f} |" in text
    assert "peak memory" in text and "demo wall time" in text and text in proc.stdout
    prior = report["tuned"]["prior_matching"]  # measured on the first 10 test rows (all of them: data.max_rows=12)
    assert prior == tuned["prior_matching"] and prior["rows"] == 10
    assert "set on 10 unlabelled test rows" in text and f"complaint {prior['offsets']['complaint']:+.2f}" in text
    train_summary = json.loads((out / "train" / "summary.json").read_text())
    assert train_summary["world_size"] == 2 and train_summary["zero_stage"] == 2
    assert f"peak memory {train_summary['peak_memory_gb']:.2f} GB" in text
    evals = [json.loads(l) for l in (out / "train" / "train_log.jsonl").read_text().splitlines() if '"eval"' in l]
    assert [e["epoch"] for e in evals] == [1, 2]
    with open(report["artifacts"]["submission"]) as f:
        submission = list(csv.DictReader(f))
    assert len(submission) == report["test_rows"] == 8
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "merged" / "config.json").is_file() and report["merge_max_logit_diff"] < 1e-4
    # a second run replaces the demo's own folder; a folder the demo did not write is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = run([sys.executable, "-m", "peft_tuner.cli", "demo", "--tiny", "--out", str(tmp_path / "mine")], check=False)
    assert refused.returncode == 2 and "holds files the demo did not write" in refused.stderr

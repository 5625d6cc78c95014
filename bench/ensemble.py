"""Seed ensembles from the predictions the experiments already wrote: average each class's log-probability (normalised
over the classes) across seeds, then take the best class. No training, no model: only the saved per-row scores.

    python bench/ensemble.py outputs/experiments/peft-example/seed{1,2,3}/eval/predictions_eval.jsonl
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import ensemble_accuracy  # noqa: E402

runs = [{"rows": [[p["gold"], p["scores"]] for p in map(json.loads, open(path)) if p]} for path in sys.argv[1:]]
print(json.dumps({"members": sys.argv[1:], "rows": len(runs[0]["rows"]), "accuracy": ensemble_accuracy(runs)}))

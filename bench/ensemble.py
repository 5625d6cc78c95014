"""Seed ensembles from the predictions the experiments already wrote: average each class's log-probability (normalised
over the classes) across seeds, then take the best class. No training, no model: only the saved per-row scores.

    python bench/ensemble.py outputs/experiments/peft-example/seed{1,2,3}/eval/predictions_eval.jsonl
"""
import json
import math
import sys

runs = [[json.loads(line) for line in open(path)] for path in sys.argv[1:]]
classes = list(runs[0][0]["scores"])
correct = 0
for rows in zip(*runs):
    total = {c: 0.0 for c in classes}
    for row in rows:
        norm = math.log(sum(math.exp(v) for v in row["scores"].values()))
        for c in classes:
            total[c] += row["scores"][c] - norm
    correct += max(total, key=total.get) == rows[0]["gold"]
print(json.dumps({"members": sys.argv[1:], "rows": len(runs[0]), "accuracy": correct / len(runs[0])}))

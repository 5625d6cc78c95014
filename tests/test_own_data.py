"""A user's own data outside this repository: the README's example recipe, copied and changed only in its paths and
column names, trains and evaluates on a CSV with other columns (review, sentiment)."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from conftest import REVIEWS, ROOT, run, write_csv

pytestmark = pytest.mark.slow  # trains in a subprocess


def test_the_example_recipe_trains_and_evaluates_a_csv_with_other_column_names(tiny_models, tmp_path):
    user = tmp_path / "my_project"  # outside the repository, as a user's own folder is
    data = user / "data"
    data.mkdir(parents=True)
    sentiment = {"1": "positive", "0": "negative"}
    rows = [{"review": review, "sentiment": sentiment[label]} for label, review in REVIEWS]
    write_csv(data / "reviews_train.csv", rows[:6] + rows[8:14])
    write_csv(data / "reviews_dev.csv", rows[6:8] + rows[14:])
    recipe = yaml.safe_load((ROOT / "configs" / "example_csv.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tiny_models["gpt2"])
    recipe["data"].update(train_file="data/reviews_train.csv", eval_file="data/reviews_dev.csv", text_column="review",
                          label_column="sentiment")
    recipe["train"]["epochs"] = 2  # a quick run; nothing else of the example changes
    (user / "my_recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))

    cli = [sys.executable, "-m", "peft_tuner.cli"]
    run(cli + ["train", "my_recipe.yaml"], cwd=user, timeout=300)
    adapter = user / "outputs" / "example_csv" / "adapter"
    task = json.loads((adapter / "peft_tuner_task.json").read_text())
    assert task["class_names"] == ["negative", "positive"] and task["text_column"] == "review"
    assert task["prompt_template"] == "review : {review} Label : "
    proc = run(cli + ["evaluate", "--adapter", str(adapter)], cwd=user, timeout=300)
    metrics = json.loads((user / "outputs" / "example_csv" / "eval" / "metrics_eval.json").read_text())
    assert metrics["rows"] == 4 and 0 <= metrics["accuracy"] <= 1 and "macro_f1" in metrics, proc.stdout

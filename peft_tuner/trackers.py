"""Experiment trackers beside train_log.jsonl: TensorBoard event files, an MLflow run, a Weights & Biases run (offline).

Each is an optional package (`pip install peft_tuner[tensorboard]`, `[mlflow]`, `[wandb]`); `check_trackers` names a
missing one before anything loads. Rank 0 alone writes. Every tracker receives the resolved config once, then the
numeric values of each logged step, evaluation and the run's end, under `train/`, `eval/` and `final/`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Optional

from peft_tuner import distributed as dist
from peft_tuner.config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
PREFIXES = {"step": "train", "eval": "eval", "end": "final"}  # a train_log.jsonl event -> its trackers' prefix
OUTPUTS = ("tensorboard", "mlruns", "wandb", "mlflow_run_id")  # what the trackers write in output_dir


def check_trackers(names: list[str]) -> None:
    missing = [name for name in names if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(f"train.report_to: {', '.join(missing)} not installed; install with "
                          f"`pip install -e '.[{extras}]'` (or `pip install {' '.join(PACKAGES[m] for m in missing)}`), "
                          f"or remove it from train.report_to")


def open_trackers(names: list[str], output_dir: Path, config: dict, resume: bool) -> list:
    makers = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
    return [makers[name](Path(output_dir), config, resume) for name in names]


def numeric(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("time", "step", "epoch")}


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("label_words",):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = str(value)[:500]
    return out


class TensorBoard:
    """Event files in output_dir/tensorboard (`tensorboard --logdir output_dir/tensorboard`)."""

    def __init__(self, output_dir: Path, config: dict, resume: bool):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True) + "```")

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """A run in the experiment `peft_tuner`: in MLFLOW_TRACKING_URI if set, else in a local file store,
    output_dir/mlruns (`mlflow ui --backend-store-uri output_dir/mlruns`). A resumed run continues the same MLflow run."""

    def __init__(self, output_dir: Path, config: dict, resume: bool):
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").resolve().as_uri()
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this before a file store
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("peft_tuner")
        run_id_file = output_dir / "mlflow_run_id"
        run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
        self.mlflow, self.run = mlflow, mlflow.start_run(run_id=run_id, run_name=output_dir.name)
        run_id_file.write_text(self.run.info.run_id)
        if run_id is None:
            mlflow.log_params(flat_config(config))
            mlflow.log_dict(config, "run_config.yaml")

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    """An offline run in output_dir/wandb (`wandb sync output_dir/wandb/offline-run-*` uploads it later)."""

    def __init__(self, output_dir: Path, config: dict, resume: bool):
        import wandb

        self.run = wandb.init(project="peft_tuner", name=output_dir.name, dir=str(output_dir), mode="offline",
                              config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """JSON lines in output_dir (rank 0), the trackers of train.report_to, and one-line summaries on stdout."""

    def __init__(self, path: Path, append: bool, trackers: Optional[list] = None):
        self.path, self.trackers = path, trackers or []
        if dist.is_main() and not append:
            path.write_text("")

    def record(self, values: dict) -> None:
        if dist.is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **values}) + "\n")
            prefix = PREFIXES.get(values.get("event"))
            if prefix and values.get("step", values.get("steps_done")) is not None:
                scalars = {f"{prefix}/{k}": v for k, v in numeric(values).items()}
                for tracker in self.trackers:
                    tracker.log(scalars, int(values.get("step", values.get("steps_done"))))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def line(self, text: str) -> None:
        if dist.is_main():
            print(text, flush=True)

"""Shared fixtures: tiny models of four families, small twitter_complaints-like files in every format, and a helper
that runs the CLI under each launcher with a timeout (a hung rank must never hold CI)."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the network: a hub name fails at once, offline
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

COMPLAINTS = [
    ("my order never arrived and support ignores me", "complaint"),
    ("thanks for the quick help today", "no complaint"),
    ("the app crashed again, this is useless", "complaint"),
    ("great coffee this morning", "no complaint"),
    ("still waiting on my refund after weeks", "complaint"),
    ("happy birthday to the whole team", "no complaint"),
    ("my flight got cancelled and nobody answers", "complaint"),
    ("love the new store design", "no complaint"),
    ("charged twice for one ticket, fix it", "complaint"),
    ("see you all at the game tonight", "no complaint"),
    ("internet down for the third day", "complaint"),
    ("what a lovely sunny day", "no complaint"),
    ("broken screen on arrival, very poor", "complaint"),
    ("congrats on the launch", "no complaint"),
    ("no signal at home again", "complaint"),
    ("reading a good book", "no complaint"),
]


# ChnSentiCorp-like rows (label 1 positive, 0 negative), sorted by label as the real file is.
REVIEWS = [
    ("1", "房间很干净，服务很好。"), ("1", "早餐丰富，位置方便。"), ("1", "前台热情，下次还来。"), ("1", "环境安静，床很舒服。"),
    ("1", "性价比高，推荐入住。"), ("1", "交通便利，服务周到。"), ("1", "设施新，房间大。"), ("1", "员工友好，体验很好。"),
    ("0", "房间很脏，服务很差。"), ("0", "隔音太差，一夜没睡。"), ("0", "早餐难吃，价格太贵。"), ("0", "前台态度差，不推荐。"),
    ("0", "空调坏了，没人修。"), ("0", "设施旧，房间小。"), ("0", "位置偏，交通不便。"), ("0", "卫生间有异味，很失望。"),
]


def complaint_rows() -> list[dict]:
    return [{"Tweet text": t, "Label": l, "ID": i} for i, (t, l) in enumerate(COMPLAINTS)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from peft_tuner.tiny import ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def chinese_model(tmp_path_factory) -> Path:
    """The Chinese tutorial's kind of model: GPT-2 with a BERT character vocabulary over the reviews."""
    from peft_tuner.tiny import build_tiny_bert_vocab_gpt2

    texts = [review for _, review in REVIEWS] + ["评论：情感：正面负面"]
    return build_tiny_bert_vocab_gpt2(tmp_path_factory.mktemp("models") / "gpt2-bert-chinese", texts)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """train/dev/test of a RAFT-layout folder, plus the same training rows as csv, json, jsonl and parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    rows = complaint_rows()
    raft = root / "raft"
    raft.mkdir()
    write_csv(raft / "train.csv", rows)
    write_csv(raft / "dev.csv", rows[:8])
    write_csv(raft / "test_unlabeled.csv", [{"Tweet text": r["Tweet text"], "ID": 100 + r["ID"]} for r in rows[:10]])
    (raft / "task.json").write_text(json.dumps({"name": "toy", "data_columns": ["Tweet text", "ID"],
                                                "label_columns": {"Label": ["complaint", "no complaint"]}}))
    write_csv(root / "train.csv", rows)
    (root / "train.json").write_text(json.dumps(rows))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    write_csv(root / "reviews.csv", [{"label": label, "review": review} for label, review in REVIEWS])
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(path: Path, model_path: Path, train_file: Path, output_dir: Path, **sections) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_path)},
        "data": {"train_file": str(train_file), "max_length": 48},
        "peft": {"method": "lora", "r": 4, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": 3, "learning_rate": 5e-2, "batch_size": 4, "seed": 7},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path.write_text(yaml.safe_dump(recipe))
    return path


# The tests' DeepSpeed configs: the shipped ones, except that under ZeRO-3 every weight is partitioned
# (stage3_param_persistence_threshold 0). Tiny models otherwise stay below DeepSpeed's default threshold, nothing is
# partitioned, and code that reads a parameter's shape passes here and breaks on a real model.
TEST_DS_DIR: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def tokenization_cache(tmp_path_factory):
    """The tests' own tokenization cache (subprocesses inherit it), never the user's."""
    os.environ["PEFT_TUNER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return Path(os.environ["PEFT_TUNER_CACHE"]) / "tokenized"


@pytest.fixture(scope="session", autouse=True)
def partitioning_deepspeed_configs(tmp_path_factory):
    global TEST_DS_DIR
    TEST_DS_DIR = tmp_path_factory.mktemp("ds_configs")
    for shipped in (ROOT / "ds_configs").glob("*.json"):
        config = json.loads(shipped.read_text())
        if config.get("zero_optimization", {}).get("stage") == 3:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (TEST_DS_DIR / shipped.name).write_text(json.dumps(config, indent=2))
    for shipped in (ROOT / "ds_configs").glob("accelerate_*.yaml"):
        config = yaml.safe_load(shipped.read_text())
        config["deepspeed_config"]["deepspeed_config_file"] = str(TEST_DS_DIR / Path(config["deepspeed_config"]["deepspeed_config_file"]).name)
        (TEST_DS_DIR / shipped.name).write_text(yaml.safe_dump(config))
    return TEST_DS_DIR


def ds_config(name: str) -> str:
    """The tests' copy of ds_configs/NAME (ZeRO-3 ones partition every weight)."""
    return str(TEST_DS_DIR / Path(name).name)


def launch_command(launcher: str, script: str = "launch/train.py", stage: int = 2, nproc: int = 2) -> list[str]:
    port = str(free_port())
    script = str(ROOT / script)
    if launcher == "python":
        return [sys.executable, script]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_accelerators", str(nproc), "--master_port", port, script]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, script]
    if launcher == "mpirun":
        return [str(BIN / "mpirun"), "-n", str(nproc), "-genv", "MASTER_PORT", port, sys.executable, script]
    if launcher == "accelerate":
        return [str(BIN / "accelerate"), "launch", "--config_file", ds_config(f"accelerate_zero{stage}.yaml"),
                "--num_processes", str(nproc), "--main_process_port", port, script]
    raise ValueError(launcher)


def run(cmd: list[str], timeout: int = 300, env: dict | None = None, check: bool = True,
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # env={"NAME": None} leaves NAME unset
    # Its own process group, killed whole on timeout or Ctrl-C: a launcher's workers outliving the test would load the
    # machine (or hold an op-build lock) for the rest of the suite.
    with subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except BaseException:  # the timeout, or Ctrl-C
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def records(output_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (output_dir / "train_log.jsonl").read_text().splitlines() if l.strip()]


def step_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in records(output_dir) if r.get("event") == "step"]


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_models, data_dir):
    """Training runs shared across test modules: (launcher, ZeRO stage, arch, micro batch) -> (output_dir, process)."""
    cache = {}

    def get(launcher: str, stage: int, arch: str, batch_size: int = 4, ds_file: str | None = None, extra: tuple = ()):
        key = (launcher, stage, arch, batch_size, ds_file, extra)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{launcher}-z{stage}-{arch}")
            recipe = write_recipe(out / "recipe.yaml", tiny_models[arch], data_dir / "raft", out / "run",
                                  train={"batch_size": batch_size, "epochs": 4})
            cmd = launch_command(launcher, stage=stage) + [str(recipe), *(e.format(data=data_dir) for e in extra)]
            if launcher not in ("python", "accelerate"):
                cmd += ["--deepspeed", ds_config(ds_file or f"zero{stage}.json")]
            # The deepspeed launcher sets no thread count (each process would take every core): its runs leave
            # OMP_NUM_THREADS unset, and the processes share the cores themselves.
            proc = run(cmd, timeout=420, env={"OMP_NUM_THREADS": None} if launcher == "deepspeed" else None)
            cache[key] = (out / "run", proc)
        return cache[key]

    return get

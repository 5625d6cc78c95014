"""Adapter saving (gathered under ZeRO-3), training checkpoints that are complete or absent, and resume.

Layout of `output_dir`:
    run_config.yaml           the resolved config of the run (refused on --resume if it changed what the result is)
    train_log.jsonl           every logged value
    adapter/                  the final adapter (or whole model for method=full), with tokenizer, config and task
    best_adapter/             the same, at the best evaluation during training (kept across --resume)
    checkpoints/latest        name of the newest complete checkpoint, moved last
    checkpoints/step-00000010 DeepSpeed checkpoint without frozen weights + each rank's RNG state + meta.json
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path
from typing import Optional

import torch

from peft_tuner import distributed as dist
from peft_tuner.config import Config, ConfigError, save_config
from peft_tuner.errors import PeftTunerError

CONFIG_FILE = "run_config.yaml"
ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"  # the adapter at the best evaluation so far (train.eval_steps / eval_epochs / eval_each_epoch)
CHECKPOINT_DIR = "checkpoints"
TASK_FILE = "peft_tuner_task.json"
ADAPTER_CONFIG_FILE = "peft_tuner_config.yaml"

# Keys whose change alters the result of a run; anything else (logging, checkpoint cadence) may change on --resume.
RESUME_INSENSITIVE = {"train.checkpoint_steps", "train.keep_checkpoints", "train.log_steps", "train.deepspeed_patches",
                      "output_dir", "eval", "generate",
                      "distill", "data.eval_file", "data.test_file", "data.cache"}


def kill_point(point: str, step: int) -> None:
    """Fault injection for the crash tests: PEFT_TUNER_KILL_AT=POINT:STEP[:RANK] sends SIGKILL to this process there
    (points: after_step, in_checkpoint)."""
    spec = os.environ.get("PEFT_TUNER_KILL_AT")
    if spec:
        name, at, *who = spec.split(":")
        if name == point and int(at) == step and (not who or int(who[0]) == dist.rank()):
            os.kill(os.getpid(), signal.SIGKILL)


class ResumeError(PeftTunerError):
    """The checkpoint cannot continue this run; the message says what differs."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place: the old one (if any) is moved aside first, then removed."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------------------------------------------------
# Adapter


def save_adapter(model, tokenizer, cfg: Config, task: Optional[dict], out_dir: Path, zero_stage: int) -> Path:
    """Write the adapter (or the whole model for method=full) from rank 0, gathered first under ZeRO-3."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    params = [p for p in model.parameters() if p.requires_grad or cfg.peft.method == "full"]
    if dist.is_main() and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    with dist.gathered(params, zero_stage):
        # Every rank builds the state dict (prompt-learning methods run their prompt encoder, a collective under
        # ZeRO-3); rank 0 alone writes.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*empty.*")  # frozen ZeRO-3 weights are not saved anyway
            model.save_pretrained(tmp, safe_serialization=True, is_main_process=dist.is_main())
    dist.barrier()
    if dist.is_main():
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / ADAPTER_CONFIG_FILE)
        if task is not None:
            (tmp / TASK_FILE).write_text(json.dumps(task, indent=2, ensure_ascii=False))
        replace_dir(tmp, out_dir)
    dist.barrier()
    return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.output_dir) / CHECKPOINT_DIR


def save_checkpoint(engine, cfg: Config, state: dict) -> Path:
    """DeepSpeed checkpoint (frozen weights left out) + RNG per rank, written under a temporary name, then renamed."""
    root = checkpoint_root(cfg)
    step = state["global_step"]
    name = f"step-{step:08d}"
    tmp_tag = f".tmp-{name}"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"peft_tuner": state}, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(_rng_state(), root / tmp_tag / f"rng_state_rank{dist.rank()}.pt")
    kill_point("in_checkpoint", step)
    dist.barrier()
    if dist.is_main():
        (root / tmp_tag / "meta.json").write_text(json.dumps({**state, "complete": True}, indent=2))
        replace_dir(root / tmp_tag, root / name)
        atomic_write_text(root / "latest", name)  # the pointer moves last
        complete = sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file())
        for old in complete[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / name


def find_latest_checkpoint(cfg: Config) -> Optional[Path]:
    """The newest complete checkpoint; a half-written one is skipped with a warning, never loaded."""
    root = checkpoint_root(cfg)
    if not root.is_dir():
        return None
    for partial in sorted(root.glob(".tmp-*")):
        warnings.warn(f"{partial}: half-written checkpoint left by an interrupted run; ignored")
    pointer = root / "latest"
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        if (candidate / "meta.json").is_file():
            return candidate
        warnings.warn(f"{candidate}: checkpoint has no meta.json (incomplete); ignored")
    return None


def load_checkpoint(engine, path: Path) -> dict:
    """Restore weights, optimizer, LR schedule and this rank's RNG; returns the saved loop state."""
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise ResumeError(f"{path}: DeepSpeed could not load this checkpoint")
    rng_file = path / f"rng_state_rank{dist.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "meta.json").read_text())


def check_resume_compatible(cfg: Config, saved_cfg: dict, meta: dict, world_size: int, stage: int) -> None:
    """Refuse a checkpoint whose run differs in anything that changes the result; list every difference."""
    differences = []
    current = _flatten(cfg.to_dict())
    for key, value in _flatten(saved_cfg).items():
        if any(key == k or key.startswith(k + ".") for k in RESUME_INSENSITIVE):
            continue
        if current.get(key) != value:
            differences.append(f"{key}: checkpoint has {value!r}, this run has {current.get(key)!r}")
    if meta.get("world_size") != world_size:
        differences.append(f"world size: checkpoint was written by {meta.get('world_size')} processes, this run has {world_size}")
    if meta.get("zero_stage") != stage:
        differences.append(f"ZeRO stage: checkpoint has {meta.get('zero_stage')}, this run has {stage}")
    if differences:
        raise ResumeError("--resume: the checkpoint belongs to a different run:\n  - " + "\n  - ".join(differences)
                          + "\nrun with the checkpoint's settings, or start afresh with --overwrite")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("label_words",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------------
# The run folder before training: refused, replaced or resumed


def check_output_dir(cfg: Config, resume: bool, overwrite: bool) -> None:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file; choose a folder")
    holds_run = out.is_dir() and any((out / name).exists() for name in (CONFIG_FILE, ADAPTER_DIR, BEST_ADAPTER_DIR, CHECKPOINT_DIR))
    if resume and not (out / CHECKPOINT_DIR).is_dir():
        raise ConfigError(f"--resume: {out} has no checkpoints/ to resume from; drop --resume to start afresh")
    if holds_run and not (resume or overwrite):
        raise ConfigError(f"output_dir: {out} already holds a run; pass --resume to continue it, --overwrite to replace "
                          f"it, or choose another output_dir")


def prepare_output_dir(cfg: Config, overwrite: bool) -> None:
    out = Path(cfg.output_dir)
    if overwrite:
        from peft_tuner.trackers import OUTPUTS

        for name in (CHECKPOINT_DIR, ADAPTER_DIR, BEST_ADAPTER_DIR, *OUTPUTS):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("train_log.jsonl", "summary.json", *OUTPUTS):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE)


def find_resumable_checkpoint(cfg: Config, world: int, stage: int) -> Path:
    """The newest complete checkpoint, refused if it belongs to a run that differs in anything that changes the result."""
    import yaml

    path = find_latest_checkpoint(cfg)
    if path is None:
        raise ConfigError(f"--resume: {checkpoint_root(cfg)} holds no complete checkpoint; drop --resume to start afresh")
    meta = json.loads((path / "meta.json").read_text())
    saved_cfg = yaml.safe_load((Path(cfg.output_dir) / CONFIG_FILE).read_text())
    check_resume_compatible(cfg, saved_cfg, meta, world, stage)
    return path

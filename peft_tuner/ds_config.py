"""The DeepSpeed config of a run: a JSON file (ds_configs/) or accelerate's plugin, its "auto" values filled from the
recipe, a concrete value that contradicts the recipe refused. Plain dict work: nothing here touches a process group.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional

from peft_tuner.config import Config, ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Used when no --deepspeed file is given: one loop, ZeRO off.
DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000_000,
}


def read_deepspeed_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (DS_CONFIG_DIR / p.name).is_file() and p.parent == Path("ds_configs"):
        p = DS_CONFIG_DIR / p.name
    if not p.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file; shipped ones are in {DS_CONFIG_DIR}: "
                          f"{', '.join(sorted(f.name for f in DS_CONFIG_DIR.glob('*.json')))}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: line {e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object")
    return raw


def deepspeed_source(cfg: Config) -> tuple[dict, str]:
    """The DeepSpeed config to use and where it came from: --deepspeed, accelerate's plugin, or ZeRO off."""
    if cfg.deepspeed:
        return read_deepspeed_file(cfg.deepspeed), cfg.deepspeed
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() != "none":
            return read_deepspeed_file(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]), env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        raw = copy.deepcopy(DEFAULT_DS_CONFIG)
        raw["zero_optimization"] = {"stage": stage}
        for kind in ("optimizer", "param"):
            where = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
            if where != "none":
                raw["zero_optimization"][f"offload_{kind}"] = {"device": where}
                raw["zero_force_ds_cpu_optimizer"] = False
        return raw, f"accelerate plugin (ZeRO-{stage})"
    return copy.deepcopy(DEFAULT_DS_CONFIG), "built-in (ZeRO off)"


def resolve_deepspeed_config(raw: dict, cfg: Config, n_processes: int, source: str = "deepspeed config") -> dict:
    """Fill "auto" values from the recipe; concrete values that contradict it are errors naming both."""
    ds = copy.deepcopy(raw)
    t = cfg.train
    filled = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": t.batch_size * t.gradient_accumulation * n_processes,
        "gradient_clipping": t.max_grad_norm,
    }
    recipe_key = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.gradient_accumulation",
                  "train_batch_size": f"train.batch_size x train.gradient_accumulation x {n_processes} processes",
                  "gradient_clipping": "train.max_grad_norm"}
    problems = []
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            problems.append(f"{source}: {key}={ds[key]} contradicts the recipe's {recipe_key[key]}={value}; "
                            f"set it to \"auto\" or change the recipe")
    for precision in ("bf16", "fp16"):
        section = ds.setdefault(precision, {})
        wanted = cfg.model.dtype == precision
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
        elif section["enabled"] != wanted:
            problems.append(f"{source}: {precision}.enabled={section['enabled']} contradicts model.dtype={cfg.model.dtype}")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", t.learning_rate), ("weight_decay", t.weight_decay), ("betas", [0.9, 0.999]), ("eps", 1e-8)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    if "scheduler" in ds:
        problems.append(f"{source}: has a 'scheduler' section; remove it and set train.lr_scheduler / train.warmup_ratio instead")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]  # bucket sizes and the like: DeepSpeed's defaults
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        problems.append(f"{source}: zero_optimization.stage={zero.get('stage')} is not 0, 1, 2 or 3")
    if any(zero.get(f"offload_{k}", {}).get("device", "none") != "none" for k in ("optimizer", "param")):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # the client AdamW steps offloaded states on the CPU
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 1_000_000_000)
    leftover = [path for path in _auto_paths(ds)]
    if leftover:
        problems.append(f"{source}: no recipe value fills \"auto\" at {', '.join(leftover)}; give a number there")
    if problems:
        raise ConfigError("\n  - ".join(["the DeepSpeed config does not fit the recipe:"] + problems))
    return ds


def _auto_paths(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _auto_paths(v, f"{prefix}{k}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def check_method_fits_zero(method: str, stage: int) -> Optional[str]:
    """A PEFT method that cannot work under a ZeRO stage, as a message (None when it fits)."""
    if method == "adalora" and stage >= 2:
        return (f"peft.method=adalora needs every rank's full gradients to allocate its rank budget, which ZeRO-{stage} "
                f"partitions; use ds_configs/zero0.json or zero1.json, or peft.method=lora")
    return None

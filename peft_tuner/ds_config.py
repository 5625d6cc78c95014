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


def deepspeed_source(cfg: Config) -> tuple[dict, str, Optional[bool]]:
    """The DeepSpeed config to use, where it came from (--deepspeed, accelerate's plugin, or ZeRO off), and whether
    accelerate asks for the ZeRO-3 partitioned loading (its `zero3_init_flag`; None when accelerate did not launch us:
    then train.zero3_init decides)."""
    if cfg.deepspeed:
        return read_deepspeed_file(cfg.deepspeed), cfg.deepspeed, None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return _from_accelerate_plugin()
    return copy.deepcopy(DEFAULT_DS_CONFIG), "built-in (ZeRO off)", None


def _from_accelerate_plugin() -> tuple[dict, str, bool]:
    """`accelerate launch` with a DeepSpeed YAML passes its settings as ACCELERATE_DEEPSPEED_* variables; accelerate's
    own DeepSpeedPlugin reads them (the config file it names, else the stage and offload devices)."""
    from accelerate.utils import DeepSpeedPlugin

    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    given = read_deepspeed_file(file) if file.lower() != "none" else None  # our message for a missing or broken file
    plugin = DeepSpeedPlugin(hf_ds_config=given)
    raw = copy.deepcopy(plugin.deepspeed_config)
    raw.pop("steps_per_print", None)  # the plugin's is infinity, which DeepSpeed's config does not take
    for kind in ("optimizer", "param"):
        offload = raw.get("zero_optimization", {}).get(f"offload_{kind}")
        if isinstance(offload, dict) and offload.get("nvme_path") is None:
            offload.pop("nvme_path", None)
    source = file if given is not None else f"accelerate plugin (ZeRO-{plugin.zero_stage})"
    return raw, source, bool(plugin.zero3_init_flag)


# ZeRO's sizes that "auto" fills from the model's hidden size h, as transformers' Trainer and accelerate fill them.
# DeepSpeed's own defaults (prefetch 5e7 parameters, reduce buckets of 5e8) suit billions of parameters: on SmolLM2
# (h=576) under ZeRO-3 on 2 CPU processes they gave 2.89 GB per process and 66 tokens/s, these 2.37 GB and 79-88.
HIDDEN_SIZE_AUTO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def resolve_deepspeed_config(raw: dict, cfg: Config, n_processes: int, source: str = "deepspeed config",
                             hidden_size: Optional[int] = None) -> dict:
    """Fill "auto" values from the recipe (and ZeRO's sizes from the model's `hidden_size`); concrete values that
    contradict the recipe are errors naming both."""
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
        if hidden_size and key in HIDDEN_SIZE_AUTO:
            zero[key] = HIDDEN_SIZE_AUTO[key](hidden_size)
        else:
            del zero[key]  # the other sizes: DeepSpeed's defaults
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
    if method == "adalora" and stage >= 1:
        return (f"peft.method=adalora reads each weight's gradient (param.grad) to allocate its rank budget, which "
                f"ZeRO-{stage} keeps in its own partitioned buffers instead; use ds_configs/zero0.json (or no --deepspeed), "
                f"or peft.method=lora")
    return None

"""Merge an adapter into its base model: one process, ZeRO off, in fp32; verified against base+adapter; saved in the
dtype asked for as a standalone folder that plain transformers loads (no peft needed)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from peft_tuner.checkpoint import ADAPTER_CONFIG_FILE, TASK_FILE, replace_dir
from peft_tuner.config import Config
from peft_tuner.errors import PeftTunerError
from peft_tuner.modeling import DTYPES, load_base_model, load_tokenizer
from peft_tuner.quantization import quantized

UNMERGEABLE = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}
PROBE_TEXTS = ["Tweet text : my order never came Label : ", "The weather today is", "Hello"]


class MergeError(PeftTunerError):
    """The adapter cannot be merged, or the merge did not reproduce the adapter's outputs."""


def check_mergeable(adapter_dir: Path) -> dict:
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        if (Path(adapter_dir) / "config.json").is_file():
            raise MergeError(f"{adapter_dir}: holds a whole model (method=full or already merged); nothing to merge, "
                             f"load it directly with from_pretrained")
        raise MergeError(f"{adapter_dir}: no adapter_config.json; give the adapter folder a training run saved")
    adapter = json.loads(config_file.read_text())
    if adapter.get("peft_type") in UNMERGEABLE:
        raise MergeError(f"{adapter_dir}: a {adapter['peft_type']} adapter adds virtual tokens instead of changing weights, "
                         f"so it cannot be merged; serve it with the adapter: peft-tuner evaluate/generate "
                         f"--adapter {adapter_dir}")
    return adapter


def merge(cfg: Config, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "fp32", overwrite: bool = False,
          max_shard_size: str = "2GB", tolerance: float = 1e-3) -> dict:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    # Cheap checks first: nothing is loaded and nothing written until they pass.
    check_mergeable(adapter_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"{out_dir}: not empty; choose another folder or pass --overwrite")
    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    from peft import PeftModel

    tokenizer = load_tokenizer(cfg.model)
    probe = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True)
    full_precision = dataclasses.replace(cfg.model, quantization="none")  # a QLoRA adapter merges into the fp32 base
    model = PeftModel.from_pretrained(load_base_model(full_precision, dtype="fp32"), str(adapter_dir)).eval()
    with torch.no_grad():
        expected = model(**probe).logits
        merged = model.merge_and_unload()
        got = merged(**probe).logits
    mask = probe["attention_mask"].bool()
    difference = float((expected - got).abs()[mask].max())
    if not difference <= tolerance:
        raise MergeError(f"merged logits differ from base+adapter by {difference:.3g} (> {tolerance}); not saved")
    merged = merged.to(DTYPES[dtype])
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp)
    for name in (TASK_FILE, ADAPTER_CONFIG_FILE):  # evaluate reads the task and settings back from here
        if (adapter_dir / name).is_file():
            shutil.copy(adapter_dir / name, tmp / name)
    replace_dir(tmp, out_dir)
    result = {"out_dir": str(out_dir), "max_logit_diff": difference, "dtype": dtype,
              "parameters": sum(p.numel() for p in merged.parameters())}
    if quantized(cfg.model):
        del model, merged
        result["quantized_max_logit_diff"] = against_quantized(cfg, adapter_dir, out_dir, probe)
    return result


def against_quantized(cfg: Config, adapter_dir: Path, merged_dir: Path, probe: dict) -> float:
    """A QLoRA adapter was trained on the quantized base: the largest |logit| difference between that model (the
    quantized base with the adapter) and the merged full-precision folder, which is what merging gives up."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = PeftModel.from_pretrained(load_base_model(cfg.model), str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (trained(**probe).logits.float() - merged(**probe).logits).abs()
    return float(difference[probe["attention_mask"].bool()].max())

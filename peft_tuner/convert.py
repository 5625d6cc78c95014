"""Bring LoRA weights trained with Microsoft's loralib (`loralib.lora_state_dict`, as its GPT-2 examples save them) into
a peft adapter folder: `PeftModel.from_pretrained` loads it, and merge, evaluate and generate take it as one of ours.

loralib keeps, per adapted layer, `lora_A` (k*r x in) and `lora_B` (k*m x r), scaled by alpha / r:
- `loralib.Linear`: k = 1, the update is B @ A, as in peft.
- `loralib.MergedLinear` (GPT-2's fused `c_attn`, with `enable_lora=[True, False, True]` for q and v): the output is
  len(enable_lora) chunks of m rows, and the i-th enabled chunk gets B_i @ A_i (a grouped 1x1 convolution). That is
  exactly a peft LoRA of rank k*r on the whole layer: A as it is, B laid out block by block (zero rows for the chunks
  without LoRA), and lora_alpha = alpha * k so that lora_alpha / (k*r) = alpha / r.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from peft_tuner.config import ConfigError, ModelConfig
from peft_tuner.modeling import ModelError, load_base_model, load_tokenizer

# The GPT-2 examples of loralib adapt c_attn's query and value chunks of (query, key, value).
GPT2_EXAMPLE_ENABLE_LORA = [True, False, True]


def convert_loralib(checkpoint: str | Path, base: str, out_dir: str | Path, r: int, alpha: int,
                    enable_lora: Optional[list[bool]] = None, overwrite: bool = False) -> dict:
    """Write a peft adapter equivalent to the loralib weights in `checkpoint` on the base model `base`."""
    import peft
    from peft import set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    from peft_tuner.checkpoint import ADAPTER_CONFIG_FILE, replace_dir
    from peft_tuner.config import load_config, save_config

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out_dir}: not empty; choose another folder or pass --overwrite")
    if r < 1:
        raise ConfigError(f"--r {r}: the rank loralib trained with, at least 1")
    layers = read_loralib_checkpoint(checkpoint)
    model_cfg = ModelConfig(name_or_path=base)
    tokenizer = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg, dtype="fp32")
    modules = dict(model.named_modules())

    weights, ranks, fan_in_fan_out = {}, set(), set()
    for prefix, (lora_a, lora_b) in layers.items():
        name = _match_module(prefix, modules, checkpoint)
        layer = modules[name]
        if not isinstance(layer, (torch.nn.Linear, Conv1D)):
            raise ModelError(f"{checkpoint}: {prefix} is a {type(layer).__name__} in the base model; only linear layers "
                             f"(torch Linear, GPT-2's Conv1D) are converted")
        out_features, in_features = (layer.weight.shape[1], layer.weight.shape[0]) if isinstance(layer, Conv1D) else layer.weight.shape
        full_a, full_b = _as_one_lora(prefix, lora_a, lora_b, r, in_features, out_features, enable_lora, checkpoint)
        weights[f"base_model.model.{name}.lora_A.weight"] = full_a
        weights[f"base_model.model.{name}.lora_B.weight"] = full_b
        ranks.add(full_a.shape[0])
        fan_in_fan_out.add(isinstance(layer, Conv1D))
    if len(ranks) != 1 or len(fan_in_fan_out) != 1:
        raise ModelError(f"{checkpoint}: the layers differ in rank {sorted(ranks)} or kind; convert them separately")
    (rank,), (transposed,) = ranks, fan_in_fan_out
    targets = sorted(name for name in modules if f"base_model.model.{name}.lora_A.weight" in weights)
    lora_alpha = alpha * (rank // r)  # lora_alpha / rank = alpha / r
    config = peft.LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets,
                             fan_in_fan_out=transposed, task_type=peft.TaskType.CAUSAL_LM)
    adapted = peft.get_peft_model(model, config)
    result = set_peft_model_state_dict(adapted, weights)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    assert not unexpected, f"peft did not take {unexpected}"

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    adapted.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    run_cfg = load_config(None, [f"model.name_or_path={base}", "peft.method=lora", f"peft.r={rank}",
                                 f"peft.alpha={lora_alpha}", "peft.dropout=0.0"])
    run_cfg.peft.target_modules = targets
    save_config(run_cfg, tmp / ADAPTER_CONFIG_FILE)
    (tmp / "loralib_source.json").write_text(json.dumps({"checkpoint": str(checkpoint), "r": r, "alpha": alpha,
                                                          "layers": sorted(layers)}, indent=2))
    replace_dir(tmp, out_dir)
    return {"out_dir": str(out_dir), "layers": len(layers), "peft_r": rank, "peft_lora_alpha": lora_alpha}


def read_loralib_checkpoint(checkpoint: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer prefix: (lora_A, lora_B)} from a loralib state dict (torch.save or safetensors), bare or wrapped as the
    examples save it ({'model_state_dict': ...}); other tensors (base weights) are left out."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"{checkpoint}: no such file (a torch.save of loralib.lora_state_dict(model))")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in several types
            raise ConfigError(f"{checkpoint}: not a readable torch checkpoint ({e})") from e
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"{checkpoint}: expected a state dict of tensors")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith("." + part):
                prefix = key[: -len(part) - 1].removeprefix("module.")
                layers.setdefault(prefix, {})[part] = value.float()
    if not layers:
        raise ConfigError(f"{checkpoint}: no lora_A / lora_B tensors in it; is it a loralib checkpoint?")
    incomplete = [p for p, parts in layers.items() if len(parts) != 2]
    if incomplete:
        raise ConfigError(f"{checkpoint}: {incomplete} have lora_A or lora_B, not both")
    return {prefix: (parts["lora_A"], parts["lora_B"]) for prefix, parts in layers.items()}


def _match_module(prefix: str, modules: dict, checkpoint) -> str:
    """The base model's module for a loralib layer name: the same name, or one that ends with it (or it with one)."""
    if prefix in modules:
        return prefix
    found = [n for n in modules if n and (n.endswith("." + prefix) or prefix.endswith("." + n))]
    if len(found) != 1:
        raise ModelError(f"{checkpoint}: layer {prefix} matches {found or 'no module'} of the base model; is --base the "
                         f"model loralib was trained on?")
    return found[0]


def _as_one_lora(prefix: str, lora_a: torch.Tensor, lora_b: torch.Tensor, r: int, in_features: int, out_features: int,
                 enable_lora: Optional[list[bool]], checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one peft LoRA of rank k*r whose update equals loralib's for this layer."""
    where = f"{checkpoint}: {prefix}"
    if lora_a.shape[1] != in_features or lora_a.shape[0] % r or lora_b.shape[1] != r:
        raise ModelError(f"{where}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit rank --r {r} "
                         f"on a layer of {in_features} inputs; is --r the rank it was trained with?")
    k = lora_a.shape[0] // r
    if k == 1 and lora_b.shape[0] == out_features:
        return lora_a, lora_b  # loralib.Linear
    chunk = lora_b.shape[0] // k
    if lora_b.shape[0] % k or out_features % chunk:
        raise ModelError(f"{where}: lora_B {tuple(lora_b.shape)} does not split into {k} chunks of a {out_features}-output layer")
    enabled = enable_lora or (GPT2_EXAMPLE_ENABLE_LORA if (out_features // chunk, k) == (3, 2) else None)
    if enabled is None and out_features // chunk == k:
        enabled = [True] * k
    if enabled is None or len(enabled) != out_features // chunk or sum(enabled) != k:
        raise ModelError(f"{where}: a MergedLinear with {k} of {out_features // chunk} chunks adapted; say which with "
                         f"--enable-lora (e.g. true,false,true for GPT-2's q,k,v with q and v adapted)")
    full_b = torch.zeros((out_features, k * r))
    positions = [i for i, on in enumerate(enabled) if on]
    for g, position in enumerate(positions):
        full_b[position * chunk:(position + 1) * chunk, g * r:(g + 1) * r] = lora_b[g * chunk:(g + 1) * chunk]
    return lora_a, full_b

"""A quantized base model (QLoRA): its weights loaded in 4 bits (NF4 or FP4) or 8 bits through bitsandbytes, the
adapter trained on top in full precision.

`model.quantization: nf4 | fp4 | int8` builds transformers' BitsAndBytesConfig: 4-bit with double quantization by
default, computing in `model.compute_dtype` (bf16 where the machine computes it natively, else fp32), its packed
weights stored as `model.quant_storage` (under ZeRO-3 the compute dtype, so that DeepSpeed can partition them as it
partitions any weight: PEFT's recipe for QLoRA with ZeRO-3; else uint8). The base is then prepared as peft prepares
k-bit models for training (norms in fp32, the embeddings' output requiring grad). Under ZeRO-3 the quantized weights
are partitioned like any other (the start record counts them). What cannot work is refused before anything loads
(`check_quantization`): full fine-tuning (the quantized weights do not train), a GGUF base, bitsandbytes missing.

The adapter is saved as any adapter is, and loads on the unquantized base with PeftModel.from_pretrained; `merge`
merges it into the full-precision base and reports how far that is from the quantized model it was trained on.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
STORAGE = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quantized(model_cfg) -> bool:
    return model_cfg.quantization not in (None, "none")


def compute_dtype(model_cfg) -> str:
    """model.compute_dtype, `auto` (the default) resolved: bf16 where the machine computes it natively, else fp32."""
    from peft_tuner.runtime import resolve_dtype

    return resolve_dtype(model_cfg.compute_dtype or "auto", "fp32")


def storage_dtype(model_cfg, zero_stage: Optional[int]) -> str:
    """model.quant_storage, `auto` resolved: the compute dtype under ZeRO-3 (partitioned like any weight), else uint8."""
    wanted = model_cfg.quant_storage or "auto"
    if wanted != "auto":
        return wanted
    return compute_dtype(model_cfg) if zero_stage == 3 else "uint8"


def bnb_config(model_cfg, zero_stage: Optional[int] = None):
    """transformers' BitsAndBytesConfig for model.quantization, or None for a full-precision base."""
    if not quantized(model_cfg):
        return None
    from transformers import BitsAndBytesConfig

    from peft_tuner.modeling import DTYPES

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quantization,
                              bnb_4bit_use_double_quant=model_cfg.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype(model_cfg)],
                              bnb_4bit_quant_storage=STORAGE[storage_dtype(model_cfg, zero_stage)])


def check_quantization(model_cfg, method: str, zero_stage: Optional[int]) -> Optional[str]:
    """Why model.quantization cannot work in this run, or None."""
    if not quantized(model_cfg):
        return None
    key = f"model.quantization={model_cfg.quantization}"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{key}: needs bitsandbytes (pip install -e '.[qlora]', or pip install bitsandbytes)"
    if method == "full":
        return f"{key}: the quantized weights cannot train; use an adapter (peft.method=lora) or model.quantization=none"
    if model_cfg.gguf_file or str(model_cfg.name_or_path).endswith(".gguf"):
        return f"{key}: the base is a GGUF file; convert it first (peft-tuner convert-gguf) and quantize the folder"
    return None


def prepare_for_training(model, gradient_checkpointing: bool):
    """peft's preparation of a k-bit model: norms and the head in fp32, the embeddings' output requiring grad. And on a
    CPU with AVX-512 BF16, bitsandbytes repacks a 4-bit weight for its inference kernel the first time the layer runs
    in eval mode without gradients (an evaluation, the padding-free check), in place, and the repacked weight then
    trains wrongly (SmolLM2, nf4, padding-free: the loss rose from 9.8 to 11.4 where it fell to 7.4 without the
    check): a model that trains keeps the layout it trains with."""
    from peft import prepare_model_for_kbit_training

    keep_training_layout(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_training_layout(model):
    """For a model that trains (prepare_for_training), on the CPU: no in-place repacking of its 4-bit weights, and a
    forward without gradients (an evaluation, a check) through bitsandbytes' training kernel, since its CPU inference
    kernel reads the packed weights as uint8 and fails on ZeRO-3's storage in the compute dtype."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and not getattr(module, "_peft_tuner_training_kernel", False):
            module.support_avx512bf16_for_cpu = False
            module.forward = _through_training_kernel(module.forward)
            module._peft_tuner_training_kernel = True
    return model


def _through_training_kernel(forward):
    def run(x, *args, **kwargs):
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return forward(x, *args, **kwargs)
        with torch.enable_grad():
            return forward(x.detach().requires_grad_(), *args, **kwargs).detach()

    return run


def partitioned_weights(model) -> tuple[int, int]:
    """(how many of the quantized layers' weights ZeRO-3 holds partitioned on this process, how many there are)."""
    weights = {id(m.weight): m.weight for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    return sum(hasattr(w, "ds_id") and w.numel() < w.ds_numel for w in weights.values()), len(weights)


def footprint_gb(model) -> float:
    """The model's weights and buffers in memory, in GB (a quantized base's packed weights counted as stored)."""
    return round(model.get_memory_footprint() / 2**30, 4)

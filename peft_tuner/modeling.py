"""Load a base causal LM (hub id, local folder, GGUF file) and wrap it with a PEFT method.

Knows nothing of distribution: the engine partitions what this returns.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Optional

import torch

from peft_tuner.config import Config, ModelConfig, PeftSettings
from peft_tuner.errors import PeftTunerError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# LoRA targets by architecture, as the PEFT examples use them; anything else falls back to peft's table, then all-linear.
LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}


class ModelError(PeftTunerError):
    """The model or PEFT settings cannot work; the message says what to change."""


def resolve_model_source(cfg: ModelConfig) -> tuple[str, Optional[str]]:
    """(folder or hub id, gguf file name); checks local paths and the GGUF magic before anything is loaded."""
    source, gguf_file = os.path.expandvars(os.path.expanduser(cfg.name_or_path)), cfg.gguf_file
    if not source:
        raise ModelError("model.name_or_path: not set; give a local folder, a .gguf file or a hub id")
    path = Path(source)
    if path.suffix == ".gguf":
        source, gguf_file = str(path.parent), path.name
        path = path.parent
    # A hub id is NAME or ORG/NAME (gpt2, HuggingFaceTB/SmolLM2-135M-Instruct); a path or anything deeper is local.
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelError(f"model.name_or_path: {source} does not exist; give a model folder, a .gguf file, or a hub id "
                         f"like HuggingFaceTB/SmolLM2-135M-Instruct (run `peft-tuner prepare-model smollm2` for the default)")
    if gguf_file is not None and path.is_dir():
        file = path / gguf_file
        if not file.is_file():
            raise ModelError(f"model.gguf_file: {file} does not exist")
        check_gguf_magic(file, "model.gguf_file")
    elif looks_local and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return source, ggufs[0]
        raise ModelError(f"model.name_or_path: {source} has no config.json"
                         + (f"; set model.gguf_file to one of {ggufs}" if ggufs else "; is it a model folder?"))
    return source, gguf_file


def check_gguf_magic(file: Path, key: str) -> None:
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{key}: {file} is not a GGUF file (it does not start with the GGUF magic)")


def load_base_model(cfg: ModelConfig, dtype: Optional[str] = None, zero_stage: Optional[int] = None):
    """The base model in `dtype` (else model.dtype), quantized where model.quantization says so (peft_tuner.quantization;
    `zero_stage` decides how the packed weights are stored)."""
    from transformers import AutoModelForCausalLM

    from peft_tuner.quantization import bnb_config

    source, gguf_file = resolve_model_source(cfg)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=DTYPES[dtype or cfg.dtype],
                                                 trust_remote_code=cfg.trust_remote_code,
                                                 quantization_config=bnb_config(cfg, zero_stage))
    if gguf_file is not None:
        # Dequantized GGUF weights are plain tensors; transformers still marks the model "quantized" and refuses training.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    contiguous_head_inputs(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def contiguous_head_inputs(model):
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_inputs)
    return model


def _contiguous_inputs(module, args):
    """Before the LM head. Scoring and generation keep the last position only (logits_to_keep), a [batch, 1, hidden]
    slice that is not contiguous; with the head's weight frozen (always, but for full fine-tuning), torch's matmul then
    expands the weight to one copy per row (a bmm) instead of one matrix product. Measured on SmolLM2 (bf16, 2 cores):
    rank classification 9.0 examples/s with frozen weights, 30.7 with trainable ones; a contiguous input is as fast."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def load_trained_model(model_cfg: ModelConfig, trained_dir, dtype: Optional[str] = None):
    """An adapter folder on its base model (peft), or a standalone folder (method=full, or a merged model)."""
    trained_dir = Path(trained_dir)
    if (trained_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base_model(model_cfg, dtype), str(trained_dir))
    from transformers import AutoModelForCausalLM

    if not (trained_dir / "config.json").is_file():
        raise ModelError(f"{trained_dir}: neither an adapter (adapter_config.json) nor a model folder (config.json)")
    from peft_tuner.quantization import bnb_config

    return contiguous_head_inputs(AutoModelForCausalLM.from_pretrained(str(trained_dir), dtype=DTYPES[dtype or model_cfg.dtype],
                                                                       quantization_config=bnb_config(model_cfg)))


def load_for_inference(cfg: Config, model_dir: Optional[str] = None, adapter_dir: Optional[str] = None):
    """(model in eval mode, tokenizer, kind): an adapter on its base model, a standalone folder (a merged model; what
    method=full saves where the adapter would be), or the base model alone. Never with gradient checkpointing, which
    turns the generation cache off.

    A LoRA-like adapter is merged in memory, in fp32 (as exact as base + adapter), and the merged model is cast to
    eval.dtype (else model.dtype): it runs as fast as the base model. Prompt-learning adapters stay wrapped, and so does
    any adapter on a quantized base (eval.quantization, else model.quantization)."""
    from transformers import AutoTokenizer

    from peft_tuner.runtime import configure_cpu, eval_dtype

    configure_cpu(cfg.train.cpu_tuning)
    dtype = eval_dtype(cfg)
    quantization = cfg.eval.quantization if cfg.eval.quantization is not None else cfg.model.quantization
    model_cfg = dataclasses.replace(cfg.model, gradient_checkpointing=False, quantization=quantization)
    quantized = quantization not in (None, "none")
    if adapter_dir and not (Path(adapter_dir) / "adapter_config.json").is_file() \
            and (Path(adapter_dir) / "config.json").is_file():
        model_dir, adapter_dir = adapter_dir, None
    if adapter_dir:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise ModelError(f"--adapter {adapter_dir}: no adapter_config.json there")
        model = load_trained_model(model_cfg, adapter_dir, dtype if quantized else "fp32")
        kind = model.peft_config["default"].peft_type.value.lower()
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json").is_file() \
            else load_tokenizer(model_cfg)
        if not quantized:
            model = (model if is_prompt_learning(model) else model.merge_and_unload()).to(DTYPES[dtype])
    elif model_dir:
        if not (Path(model_dir) / "config.json").is_file():
            raise ModelError(f"--model {model_dir}: no config.json there; give a merged model folder")
        model, tokenizer, kind = load_trained_model(model_cfg, model_dir, dtype), AutoTokenizer.from_pretrained(model_dir), "merged"
    else:
        model, tokenizer, kind = load_base_model(model_cfg, dtype), load_tokenizer(model_cfg), "base"
    return model.eval(), prepare_tokenizer(tokenizer, model_cfg), kind


def linear_layer_names(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return sorted(names - {"lm_head", "score"})


def resolve_target_modules(model, settings: PeftSettings):
    """The modules LoRA / AdaLoRA / IA3 adapt: as configured, else by architecture; each must match a layer."""
    targets = settings.target_modules
    if targets is None:
        if settings.method == "ia3":
            return None  # peft's own IA3 table knows target and feed-forward modules together
        targets = LORA_TARGETS.get(model.config.model_type)
        if targets is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table

            targets = peft_table.get(model.config.model_type, "all-linear")
    if targets == "all-linear":
        return targets
    targets = [targets] if isinstance(targets, str) else list(targets)
    module_names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        raise ModelError(f"peft.target_modules: {missing} match no module of this {model.config.model_type} model; "
                         f"its linear layers are: {', '.join(linear_layer_names(model))} (or use all-linear)")
    return targets


def model_hidden_size(model_cfg: ModelConfig) -> Optional[int]:
    """The model's hidden size from its config alone; None where it cannot be read (the model checks say why)."""
    config = _model_config(model_cfg)
    size = config and (getattr(config, "hidden_size", None) or max(getattr(config, "hidden_sizes", None) or [0]))
    return int(size) if size else None


def model_type(model_cfg: ModelConfig) -> Optional[str]:
    """The model's type (llama, gpt2, ...) from its config alone; None where it cannot be read."""
    config = _model_config(model_cfg)
    return getattr(config, "model_type", None) if config is not None else None


def _model_config(model_cfg: ModelConfig):
    from transformers import AutoConfig

    try:
        source, gguf_file = resolve_model_source(model_cfg)
        return AutoConfig.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=model_cfg.trust_remote_code)
    except Exception:
        return None


def check_peft_applies(model_cfg: ModelConfig, settings: PeftSettings) -> None:
    """Target modules and method checked on a weightless skeleton of the model (meta device): seconds, not minutes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if settings.method not in ("lora", "adalora", "ia3"):
        return
    source, gguf_file = resolve_model_source(model_cfg)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    resolve_target_modules(skeleton, settings)
    _check_ia3_default(skeleton, settings)


def _check_ia3_default(model, settings: PeftSettings) -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as ia3_table

    if settings.method == "ia3" and settings.target_modules is None and model.config.model_type not in ia3_table:
        raise ModelError(f"peft.target_modules: IA3 has no default for {model.config.model_type}; "
                         f"name them, from: {', '.join(linear_layer_names(model))}")


def build_peft_model(model, settings: PeftSettings, model_cfg: ModelConfig, total_steps: int):
    """Wrap the base model with the configured PEFT method; `full` trains every weight and wraps nothing."""
    import peft

    if settings.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is not None:
        from peft_tuner.quantization import prepare_for_training

        model = prepare_for_training(model, model_cfg.gradient_checkpointing)
    common = dict(task_type=peft.TaskType.CAUSAL_LM)
    if settings.method in ("lora", "adalora", "ia3"):
        common["target_modules"] = resolve_target_modules(model, settings)
    if settings.method == "lora":
        config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                 use_rslora=settings.use_rslora, use_dora=settings.use_dora, **common)
    elif settings.method == "adalora":
        config = peft.AdaLoraConfig(init_r=max(settings.r * 3 // 2, settings.r + 1), target_r=settings.r,
                                    lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                    total_step=max(total_steps, 3), tinit=0, tfinal=0, **common)
    elif settings.method == "ia3":
        _check_ia3_default(model, settings)
        config = peft.IA3Config(**common)
    elif settings.method == "prompt_tuning":
        init = dict(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=settings.prompt_init_text,
                    tokenizer_name_or_path=resolve_model_source(model_cfg)[0]) if settings.prompt_init_text else {}
        config = peft.PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, **init, **common)
    elif settings.method == "prefix_tuning":
        config = peft.PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, **common)
    elif settings.method == "p_tuning":
        config = peft.PromptEncoderConfig(num_virtual_tokens=settings.num_virtual_tokens,
                                          encoder_hidden_size=model.config.hidden_size, **common)
    else:
        raise ModelError(f"peft.method: unknown method '{settings.method}'")
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ModelError(f"peft.method={settings.method} does not apply to this {model.config.model_type} model: {e}") from e


def add_neftune_noise(model, alpha: float, padding_free: bool = False):
    """NEFTune (Jain et al. 2023): while the model trains, add uniform noise in [-m, m] to the input embeddings, with
    m = alpha / sqrt(sequence length * hidden size), the length of the (padded) batch as the paper's code and the
    Trainer take it. A padding-free batch is one sequence of several rows: there each token's m takes its own row's
    length (read from the position ids, which restart at each row), so a row gets the noise it would get alone, not
    that of the whole packed sequence. Evaluation (model.eval()) sees clean embeddings. The noise comes from torch's
    generator, which checkpoints save and restore, so a resumed run draws the same noise. Returns the hooks' handles
    (none when alpha is 0)."""
    if alpha <= 0:
        return []
    batch = {}  # the position ids of the forward that runs now

    def remember_positions(module, args, kwargs):
        batch["position_ids"] = kwargs.get("position_ids")

    def noise(module, inputs, output):
        if not module.training:
            return output
        positions = batch.get("position_ids")
        if padding_free and positions is not None and positions.shape[0] == 1 == output.shape[0]:
            lengths = row_length_of_each_token(positions[0]).to(output.device, torch.float32)
            magnitude = (alpha / torch.sqrt(lengths * output.shape[-1])).to(output.dtype).unsqueeze(-1)
            return output + torch.empty_like(output).uniform_(-1, 1) * magnitude
        magnitude = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

    handles = [model.get_input_embeddings().register_forward_hook(noise)]
    if padding_free:
        handles.append(model.register_forward_pre_hook(remember_positions, with_kwargs=True))
    return handles


def row_length_of_each_token(positions: torch.Tensor) -> torch.Tensor:
    """For a padding-free sequence's position ids (0, 1, 2, 0, 1, ...: a row starts where they restart at 0), the
    length of the row each token belongs to."""
    starts = torch.nonzero(positions == 0).flatten().tolist() + [positions.numel()]
    lengths = torch.tensor([b - a for a, b in zip(starts, starts[1:])])
    return lengths.repeat_interleave(lengths)


def keep_adalora_mask(model) -> None:
    """After an optimizer step: the singular values AdaLoRA pruned are zero again. The step moves them off zero (Adam's
    moments), and the saved adapter, cut to the rank pattern, drops them: its reload differed from the trained model."""
    config = model.peft_config["default"]
    if config.rank_pattern:
        model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, config.rank_pattern)


def is_prompt_learning(model) -> bool:
    """peft's prompt-learning models prepend virtual tokens: they ignore (with a warning) any position ids, and a
    prompt's cache cannot be shared between candidates."""
    config = getattr(model, "peft_config", {}).get("default")
    return bool(config is not None and config.is_prompt_learning)


def count_parameters(model) -> tuple[int, int]:
    def numel(p):
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty local tensor

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(numel(p) for p in model.parameters())


# The tokenizer's side, in peft_tuner.tokenization; named here too, where the model's loaders are.
from peft_tuner.tokenization import decode, load_tokenizer, prepare_tokenizer, stop_token_ids  # noqa: E402,F401

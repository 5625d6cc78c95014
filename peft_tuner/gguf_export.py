"""Write GGUF files for llama.cpp and Ollama with the `gguf` package: a whole model (from a merged or standalone folder)
and a LoRA adapter alone (what llama.cpp's `--lora` loads on the base model's GGUF).

Supported: the Llama family, as GGUF's `llama` architecture (Llama, SmolLM2, Mistral without sliding windows) and
`qwen2` (Qwen2, with its attention biases), with a BPE tokenizer (tokenizer.json). The tensors get GGUF's names
(gguf's own tensor map), and a Llama's query and key rows are reordered from the Hugging Face layout (each head's
rotary pairs are dimension i and i + d/2) to GGML's (pairs 2i and 2i + 1); Qwen2 keeps the Hugging Face layout, which
llama.cpp rotates as NeoX does. The tokenizer goes into the metadata as llama.cpp's converter writes it: the token list
with each token's type, the merges, the special tokens' ids, the add-BOS / add-EOS flags, the chat template, and the
pre-tokenizer's name. f32, f16, bf16 and q8_0 are what the gguf package writes; K-quants need llama.cpp's
`llama-quantize` on the f16 file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from peft_tuner.errors import PeftTunerError

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # config.json model_type -> GGUF architecture
DTYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q3_k_m", "q4_0", "q4_1", "q5_0",
            "q5_1", "iq4_nl", "iq4_xs")


class ExportError(PeftTunerError):
    """What cannot be exported, and what can be done instead."""


def check_architecture(config: dict, where: str) -> str:
    """The GGUF architecture of a model's config.json, or an ExportError naming what is supported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{where}: a {model_type} model; the GGUF writer covers {', '.join(sorted(ARCHITECTURES))} "
                          f"(the Llama family: Llama, SmolLM2, Mistral, Qwen2)")
    if model_type == "mistral" and config.get("sliding_window"):
        raise ExportError(f"{where}: a Mistral with a sliding window of {config['sliding_window']}, which the llama "
                          f"architecture of GGUF does not express")
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ExportError(f"{where}: rope scaling {scaling}, which this writer does not carry; convert it with "
                          f"llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def check_dtype(dtype: str) -> str:
    if dtype in DTYPES:
        return dtype
    if dtype.lower() in K_QUANTS:
        raise ExportError(f"--dtype {dtype}: the gguf package writes {', '.join(DTYPES)}; for {dtype.upper()} export f16 "
                          f"and run llama.cpp's `llama-quantize MODEL-f16.gguf MODEL-{dtype.upper()}.gguf {dtype.upper()}`")
    raise ExportError(f"--dtype {dtype}: choose among {', '.join(DTYPES)}")


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """A query or key projection's output rows (or a LoRA B's), from the Hugging Face rotary layout to GGML's: within
    each head, rows i and i + d/2 become rows 2i and 2i + 1."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(name: str, arch: str, blocks: int) -> Optional[str]:
    """GGUF's name for a Hugging Face weight (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`), or
    None for what GGUF does not store (rotary frequencies)."""
    import gguf

    if name.endswith("rotary_emb.inv_freq"):
        return None
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], blocks)
    mapped = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ExportError(f"{name}: no GGUF name for this weight of a {arch} model")
    return mapped


def _quantized(array: np.ndarray, dtype: str):
    """(data, its GGML type) for `dtype`: 1-D tensors and rows that do not fill whole blocks stay f32 / f16."""
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or dtype == "f32":
        return array, types["f32"]
    if dtype == "f16" or (dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[types["q8_0"]][0]):
        return array.astype(np.float16), types["f16"]
    return gguf.quants.quantize(array, types[dtype]), types[dtype]


def file_type(dtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every weight of a safetensors model folder (one file or shards), as fp32 numpy arrays."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no .safetensors weights")
    return {name: tensor.float().numpy() for f in files for name, tensor in load_file(str(f)).items()}


def write_model_gguf(model_dir: Path, path: Path, dtype: str, name: str) -> dict:
    """The model in `model_dir` (a merged or standalone safetensors folder with its tokenizer) as one GGUF file."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    arch = check_architecture(config, str(model_dir))
    blocks, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(blocks)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type(dtype))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, config["vocab_size"])
    weights = read_weights(model_dir)
    tied = config.get("tie_word_embeddings", False)
    for hf_name, array in weights.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output head from the token embeddings where output.weight is absent
        gguf_name = gguf_tensor_name(hf_name, arch, blocks)
        if gguf_name is None:
            continue
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            array = permute_rotary_rows(array, heads if "q_proj" in hf_name else kv_heads)
        data, qtype = _quantized(array, dtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    _write(writer)
    return {"path": str(path), "dtype": dtype, "bytes": path.stat().st_size, "tensors": len(weights), "architecture": arch}


def rope_theta(config: dict) -> float:
    return (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """Tokens with their types, merges, special token ids and flags, chat template, pre-tokenizer: BPE only."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError(f"{model_dir}: no tokenizer.json; the GGUF writer takes BPE tokenizers (tokenizer.json)")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE":
        raise ExportError(f"{model_dir}: a {spec.get('model', {}).get('type')} tokenizer; the GGUF writer takes BPE")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: a for i, a in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if "bos" not in special.add_special_token:  # said explicitly, as llama.cpp's converter does: its default differs
        plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
        special.add_special_token["bos"] = tokenizer("hello")["input_ids"][:1] != plain[:1]
    special.add_to_gguf(writer, quiet=True)
    if spec.get("pre_tokenizer", {}).get("type") in ("ByteLevel", "Sequence"):
        writer.add_add_space_prefix(bool(_byte_level(spec).get("add_prefix_space", False)))


def _byte_level(spec: dict) -> dict:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    return next((s for s in steps if s.get("type") == "ByteLevel"), {})


def pre_tokenizer_name(pre: Optional[dict]) -> str:
    """llama.cpp's name for how a tokenizer splits text before BPE, read from tokenizer.json's pre_tokenizer: GPT-2's
    byte-level regex alone is `gpt-2`; the same after single digits are split off is `smollm`; a split by Llama 3's
    or Qwen2's pattern is `llama-bpe` / `qwen2`; anything else `default` (llama.cpp's GPT-2-like default)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    patterns = " ".join(json.dumps(s.get("pattern", {})) for s in steps if s.get("type") == "Split")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if "Split" in kinds and r"\\p{N}{1,3}" in patterns:
        return "llama-bpe"
    if "Split" in kinds and r"\\p{N}" in patterns and "{1,3}" not in patterns:
        return "qwen2"
    return "default"


def write_lora_gguf(adapter_dir: Path, base_config: dict, path: Path, dtype: str, name: str) -> dict:
    """A peft LoRA adapter as llama.cpp's LoRA GGUF: `<base tensor>.lora_a` [r, in] and `.lora_b` [out, r] per
    adapted weight, and the scale as `adapter.lora.alpha` (llama.cpp scales by alpha / r, so rsLoRA's alpha / sqrt(r)
    is written as alpha x sqrt(r), which gives the same scale)."""
    import gguf
    from safetensors.torch import load_file

    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    arch = check_architecture(base_config, "the adapter's base model")
    refuse_unservable_lora(adapter, str(adapter_dir))
    r = adapter["r"]
    alpha = adapter["lora_alpha"] * (r ** 0.5 if adapter.get("use_rslora") else 1.0)
    blocks, heads = base_config["num_hidden_layers"], base_config["num_attention_heads"]
    kv_heads = base_config.get("num_key_value_heads") or heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    count = 0
    for key, tensor in sorted(weights.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        base = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        gguf_name = gguf_tensor_name(base, arch, blocks)
        array = tensor.float().numpy()
        if ".lora_B." in key and arch == "llama" and base.endswith(("q_proj.weight", "k_proj.weight")):
            array = permute_rotary_rows(array, heads if "q_proj" in base else kv_heads)
        data, qtype = _quantized(array, "f32" if dtype == "f32" else "f16" if dtype != "bf16" else "bf16")
        writer.add_tensor(f"{gguf_name}.lora_{'a' if '.lora_A.' in key else 'b'}", data, raw_dtype=qtype)
        count += 1
    _write(writer)
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": count, "alpha": alpha, "r": r}


def refuse_unservable_lora(adapter: dict, where: str) -> None:
    if adapter.get("peft_type") != "LORA":
        raise ExportError(f"{where}: a {adapter.get('peft_type')} adapter; llama.cpp's --lora takes LoRA adapters only")
    if adapter.get("use_dora"):
        raise ExportError(f"{where}: a DoRA adapter, which llama.cpp's --lora cannot apply; export the merged model instead")
    if adapter.get("modules_to_save"):
        raise ExportError(f"{where}: trains whole modules too ({adapter['modules_to_save']}), which a LoRA GGUF cannot "
                          f"carry; export the merged model instead")


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

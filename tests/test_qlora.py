"""QLoRA (model.quantization): a tiny Llama loaded in nf4 or int8 through bitsandbytes' CPU library trains a LoRA on 1
process and on 2 under ZeRO-2 and ZeRO-3 (every weight partitioned, the quantized ones too); the adapter reloads on
the quantized base and on the unquantized one; merge goes into the full-precision base and says how far that is from
the quantized model; a killed run resumes to the same adapter; what cannot work is refused before anything loads."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ds_config, launch_command, records, run, step_losses, summary, write_recipe
from peft_tuner.config import ConfigError, ModelConfig, load_config

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
RECIPE = str(ROOT / "configs" / "twitter_complaints_smollm2.yaml")
# (launcher, ZeRO stage, quantization): each kind on 1 process and on 2 under ZeRO-2 and ZeRO-3
RUNS = [(launcher, stage, kind) for kind in ("nf4", "int8") for launcher, stage in (("python", 0), ("torchrun", 2), ("torchrun", 3))]


def test_quantization_settings_are_checked_and_zero3_stores_the_packed_weights_in_the_compute_dtype(monkeypatch):
    from peft_tuner import quantization

    with pytest.raises(ConfigError, match="model.quantization: 'nf3' is not one of none, nf4, fp4, int8"):
        load_config(RECIPE, ["model.quantization=nf3"])
    with pytest.raises(ConfigError, match="eval.quantization: 'q4' is not one of"):
        load_config(RECIPE, ["eval.quantization=q4"])
    nf4 = ModelConfig(name_or_path="x", quantization="nf4", compute_dtype="bf16")
    assert quantization.storage_dtype(nf4, zero_stage=2) == "uint8" and quantization.storage_dtype(nf4, zero_stage=3) == "bf16"
    assert quantization.bnb_config(ModelConfig(name_or_path="x")) is None
    if importlib.util.find_spec("bitsandbytes") is not None:
        config = quantization.bnb_config(nf4, zero_stage=3)
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_quant_storage == torch.bfloat16 and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert "the quantized weights cannot train" in quantization.check_quantization(nf4, "full", 0)
    assert "convert it first" in quantization.check_quantization(ModelConfig(name_or_path="m.gguf", quantization="int8"), "lora", 0)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "needs bitsandbytes" in quantization.check_quantization(nf4, "lora", 0)


def test_full_fine_tuning_of_a_quantized_base_is_refused_before_anything_loads(tiny_models, data_dir, tmp_path, capsys):
    from peft_tuner.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], data_dir / "raft", tmp_path / "run",
                          model={"name_or_path": str(tiny_models["llama"]), "quantization": "nf4"}, peft={"method": "full"})
    assert main(["train", str(recipe)]) == 2
    assert "model.quantization=nf4: the quantized weights cannot train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def quantized_runs(tiny_models, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    outs = {}
    for launcher, stage, kind in RUNS:
        out = root / f"{launcher}-z{stage}-{kind}"
        out.mkdir()
        recipe = write_recipe(out / "recipe.yaml", tiny_models["llama"], data_dir / "raft", out / "run",
                              model={"name_or_path": str(tiny_models["llama"]), "quantization": kind},
                              train={"epochs": 4, "batch_size": 8 if launcher == "python" else 4})
        cmd = launch_command(launcher, stage=stage) + [str(recipe)]
        run(cmd + (["--deepspeed", ds_config(f"zero{stage}.json")] if stage else []), timeout=420)
        outs[launcher, stage, kind] = out / "run"
    out = root / "python-z0-nf4-padding-free"  # evaluations (no gradients, eval mode) between the steps
    out.mkdir()
    recipe = write_recipe(out / "recipe.yaml", tiny_models["llama"], data_dir / "raft", out / "run",
                          model={"name_or_path": str(tiny_models["llama"]), "quantization": "nf4"},
                          data={"train_file": str(data_dir / "raft"), "max_length": 48, "eval_file": str(data_dir / "raft")},
                          train={"epochs": 4, "batch_size": 8, "padding_free": True, "eval_each_epoch": True})
    run(launch_command("python") + [str(recipe)], timeout=420)
    outs["padding-free"] = out / "run"
    return outs


@needs_bnb
@pytest.mark.slow
def test_evaluations_between_steps_leave_the_quantized_weights_as_they_train(quantized_runs):
    """On a CPU with AVX-512 BF16, bitsandbytes repacks a 4-bit weight in place for its inference kernel when a layer
    first runs in eval mode without gradients, and the repacked weight then trained wrongly: the padding-free check
    and every evaluation did that. Trained with both, the losses are the padded run's (bf16 compute's rounding)."""
    packed, padded = step_losses(quantized_runs["padding-free"]), step_losses(quantized_runs["python", 0, "nf4"])
    assert len(packed) == len(padded) == 8
    assert max(abs(a - b) for a, b in zip(packed, padded)) < 2e-2, (packed, padded)
    assert [r["event"] for r in records(quantized_runs["padding-free"])].count("eval") == 4
    assert summary(quantized_runs["padding-free"])["adapter_max_logit_diff"] < 1e-4


@needs_bnb
@pytest.mark.slow
@pytest.mark.parametrize("launcher,stage,kind", RUNS, ids=[f"{k}-{l}-zero{s}" for l, s, k in RUNS])
def test_a_lora_trains_on_the_quantized_base_and_reloads(quantized_runs, launcher, stage, kind):
    out = quantized_runs[launcher, stage, kind]
    losses = step_losses(out)
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    start = next(r for r in records(out) if r["event"] == "start")
    q = start["quantization"]
    assert q["kind"] == kind and q["quantized_weights"] == 14 and q["base_memory_gb"] > 0
    assert q["partitioned_weights"] == (14 if stage == 3 else 0)  # ZeRO-3 partitions the quantized weights too
    assert summary(out)["adapter_max_logit_diff"] < 1e-4  # reloaded on the quantized base, as it trained
    one = step_losses(quantized_runs["python", 0, kind])
    assert max(abs(a - b) for a, b in zip(losses, one)) < 2e-3  # 2 processes x 4 rows train as 1 x 8


@needs_bnb
@pytest.mark.slow
def test_the_adapter_loads_on_the_unquantized_base_and_merges_into_it(quantized_runs, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_tuner.cli import main

    adapter = quantized_runs["torchrun", 3, "nf4"] / "adapter"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), adapter)  # peft as it is
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # the full-precision base, not dequantized nf4
    assert not getattr(merged.config, "quantization_config", None)


@needs_bnb
@pytest.mark.slow
def test_a_killed_quantized_run_resumes_to_the_same_adapter(quantized_runs, tiny_models, data_dir, tmp_path):
    reference = quantized_runs["torchrun", 2, "nf4"]
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], data_dir / "raft", tmp_path / "run",
                          model={"name_or_path": str(tiny_models["llama"]), "quantization": "nf4"},
                          train={"epochs": 4, "batch_size": 4, "checkpoint_steps": 2})
    cmd = launch_command("torchrun", stage=2) + [str(recipe), "--deepspeed", ds_config("zero2.json")]
    assert run(cmd, env={"PEFT_TUNER_KILL_AT": "after_step:5"}, timeout=300, check=False).returncode != 0
    run(cmd + ["--resume"], timeout=300)
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_done"] == 8

"""Recipes, dotted overrides, and the errors a typo gets; every shipped recipe and DeepSpeed config parses."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from peft_tuner.config import ConfigError, load_config
from peft_tuner.ds_config import read_deepspeed_file, resolve_deepspeed_config, zero_stage

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
CHNSENTICORP = ROOT / "configs" / "chnsenticorp_lora.yaml"
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_parses(recipe):
    cfg = load_config(str(recipe))
    assert cfg.data.train_file and cfg.model.name_or_path


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_every_shipped_deepspeed_config_fills_from_a_recipe(path):
    cfg = load_config(str(RECIPES[0]), ["train.batch_size=3", "train.gradient_accumulation=2"])
    ds = resolve_deepspeed_config(read_deepspeed_file(str(path)), cfg, n_processes=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 12)
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == cfg.train.max_grad_norm


def test_overrides_change_typed_values(tmp_path):
    cfg = load_config(str(RECIPES[0]), ["train.epochs=1", "train.learning_rate=1e-4", "peft.target_modules=[q_proj,k_proj]",
                                        "model.name_or_path=./my-model", "data.class_names=a,b"])
    assert cfg.train.epochs == 1 and cfg.train.learning_rate == 1e-4
    assert cfg.peft.target_modules == ["q_proj", "k_proj"]
    assert cfg.model.name_or_path == "./my-model" and cfg.data.class_names == ["a", "b"]


@pytest.mark.parametrize("override,message", [
    ("train.lr=1e-3", "train.lr: unknown key: did you mean train.learning_rate?"),
    ("trian.epochs=1", "trian: unknown key"),
    ("train.epochs=two", "train.epochs: expected int, got 'two'"),
    ("train.batch_size=1.5", "train.batch_size: expected int"),
    ("peft.method=lroa", "peft.method: 'lroa' is not one of .*did you mean lora"),
    ("model.dtype=fp8", "model.dtype: 'fp8' is not one of fp32, bf16, fp16"),
    ("train.packed_attention=flash", "train.packed_attention: 'flash' is not one of rows, mask"),
    ("distill.dtype=fp8", "distill.dtype: 'fp8' is not one of fp32, bf16, fp16, auto"),
    ("peft.use_dora=true", None),
    ("train.epochs", "write it as section.key=value"),
])
def test_typos_and_wrong_types_name_the_key(override, message):
    if message is None:
        assert load_config(str(RECIPES[0]), [override]).peft.use_dora is True
        return
    with pytest.raises(ConfigError, match=message):
        load_config(str(RECIPES[0]), [override])


@pytest.mark.parametrize("value", ["Tweet text : {Tweet text} Label :", "{a", "[{text}, y"])
def test_an_override_value_yaml_cannot_read_names_the_key_and_how_to_quote_it(value):
    """Colons and braces make a value YAML cannot read; the message names the key and the quoting that works."""
    with pytest.raises(ConfigError, match="override data.prompt_template: the value .* is not valid YAML .* Quote the value") as e:
        load_config(str(RECIPES[0]), [f"data.prompt_template={value}"])
    quoted = str(e.value).split('on the shell: "', 1)[1].rsplit('"', 1)[0]  # the override as the message writes it
    assert load_config(str(RECIPES[0]), [quoted]).data.prompt_template == value


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(str(RECIPES[0]), ["train.lr=1", "peft.method=ia3", "peft.use_dora=true", "train.epochs=0"])
    text = str(e.value)
    assert "3 problem(s)" in text and "train.lr" in text and "peft.use_dora" in text and "train.epochs" in text


def test_match_prior_needs_rank_classification_and_unlabelled_rows():
    with pytest.raises(ConfigError, match="eval.match_prior: works on rank classification's class scores; set eval.method=rank"):
        load_config(str(RECIPES[0]), ["eval.match_prior=true", "eval.method=generate"])
    with pytest.raises(ConfigError, match=r"eval.match_prior: needs data.test_file \(unlabelled rows"):
        load_config(str(RECIPES[0]), ["eval.match_prior=true", "data.test_file=null"])
    with pytest.raises(ConfigError, match="eval.prior_rows: must be positive"):
        load_config(str(RECIPES[0]), ["eval.prior_rows=0"])


def test_zero_sizes_left_auto_follow_the_models_hidden_size(tiny_models):
    """As transformers' Trainer and accelerate fill them: reduce buckets h^2, ZeRO-3 prefetch 0.9 h^2, persistence
    10 h; a size given as a number is kept, and without a readable model DeepSpeed's defaults apply."""
    from peft_tuner.modeling import model_hidden_size

    cfg = load_config(str(RECIPES[0]), [f"model.name_or_path={tiny_models['gpt2']}"])
    hidden = model_hidden_size(cfg.model)
    assert hidden == 64  # GPT-2 names it n_embd; its config answers to hidden_size too
    raw = read_deepspeed_file(str(ROOT / "ds_configs" / "zero3.json"))
    raw["zero_optimization"]["reduce_bucket_size"] = 1000
    zero = resolve_deepspeed_config(raw, cfg, 2, hidden_size=hidden)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
        == (1000, int(0.9 * 64 * 64), 640)
    zero = resolve_deepspeed_config(read_deepspeed_file(str(ROOT / "ds_configs" / "zero3.json")), cfg, 2)["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in zero and "reduce_bucket_size" not in zero
    assert model_hidden_size(load_config(str(RECIPES[0]), ["model.name_or_path=/no/such/model"]).model) is None


def test_deepspeed_batch_sizes_that_contradict_the_recipe(tmp_path):
    cfg = load_config(str(RECIPES[0]), ["train.batch_size=4"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 contradicts the recipe's train.batch_size=4"):
        resolve_deepspeed_config({"train_micro_batch_size_per_gpu": 8}, cfg, 2)
    with pytest.raises(ConfigError, match="train_batch_size=16 contradicts"):
        resolve_deepspeed_config({"train_batch_size": 16}, cfg, 2)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3},}')
    with pytest.raises(ConfigError, match="bad.json: line 1: not valid JSON"):
        read_deepspeed_file(str(bad))
    with pytest.raises(ConfigError, match="no such file; shipped ones are in"):
        read_deepspeed_file(str(tmp_path / "zero9.json"))


def test_recipe_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [epochs: 1\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(Path(tmp_path) / "missing.yaml"))


def test_readme_commands_call_programs_the_setup_installs():
    """mpirun (and mpiexec) come from the mpich wheel inside .venv/bin; a bare `mpirun` works only with it on PATH."""
    import re
    import sys

    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\.venv/bin/([\w.-]+)", readme))
    assert {"mpirun", "python", "peft-tuner"} <= named
    missing = [name for name in named if not (Path(sys.executable).parent / name).exists()]
    assert not missing, f"README names .venv/bin/{missing}, which the setup does not install"
    commands = [c for line in readme.splitlines() for c in re.findall(r"`([^`]*)`", line) or [line]]
    mpirun_commands = [c for c in commands if re.match(r"\s*(\S*/)?mpirun ", c)]
    assert mpirun_commands and all(c.lstrip().startswith(".venv/bin/mpirun") for c in mpirun_commands), mpirun_commands


def test_the_configuration_page_is_the_config_as_it_is_now():
    """docs/configuration.md is generated from the dataclasses; regenerate it when a key, default or help changes."""
    from peft_tuner.config import describe_markdown

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == describe_markdown(), "docs/configuration.md is stale: run `peft-tuner config --markdown > docs/configuration.md`"


def test_config_command_lists_every_key_with_type_default_and_help(capsys):
    import dataclasses

    from peft_tuner.cli import main
    from peft_tuner.config import TrainConfig

    assert main(["config", "train"]) == 0
    listing = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):  # every field, none left out, each with its help line under it
        line = next(l for l in listing.splitlines() if l.startswith(f"train.{f.name}: "))
        assert listing.splitlines()[listing.splitlines().index(line) + 1].strip() == f.metadata["help"]
    assert "train.learning_rate: float = 0.0003\n    Peak learning rate of AdamW." in listing
    assert all(l.startswith(("train.", "    ")) for l in listing.splitlines())  # the train section alone
    assert main(["config", "trian"]) == 2 and "did you mean train?" in capsys.readouterr().err


def test_rslora_with_adalora_is_refused_and_ignored_keys_are_warned_about(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"peft.use_rslora: only applies to peft.method=lora"):
        load_config(str(CHNSENTICORP), ["peft.method=adalora", "peft.use_rslora=true"])
    load_config(str(CHNSENTICORP), ["peft.method=prompt_tuning", "peft.r=16", "eval.num_beams=4"])
    err = capsys.readouterr().err
    assert "warning: peft.r: ignored with peft.method=prompt_tuning" in err
    assert "warning: eval.num_beams: ignored with eval.method=rank" in err
    assert "warning: peft.alpha: ignored with peft.method=prompt_tuning" in err  # written in the recipe itself
    assert "peft.num_virtual_tokens" not in err and "peft.use_dora" not in err  # used, or never written
    for recipe in RECIPES:
        load_config(str(recipe))
        assert "warning" not in capsys.readouterr().err, recipe  # a shipped recipe as it is: nothing ignored


@pytest.mark.parametrize("env,stage,offload,zero3_init", [
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero3.json", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}, 3, None, False),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero3.json", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, 3, None, True),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, 2, "cpu", False),
])
def test_accelerate_deepspeed_settings_are_read_through_its_plugin(monkeypatch, env, stage, offload, zero3_init):
    """What an accelerate YAML sets reaches the run: the config file or the stage and offload device, and
    zero3_init_flag (passed by accelerate as ACCELERATE_DEEPSPEED_ZERO3_INIT) decides the partitioned loading."""
    from peft_tuner.ds_config import deepspeed_source

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(str(RECIPES[0]), [])
    raw, source, init = deepspeed_source(cfg)
    ds = resolve_deepspeed_config(raw, cfg, n_processes=2, source=source)
    assert zero_stage(ds) == stage and init is zero3_init
    assert ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == (offload or "none")
    assert ds["gradient_accumulation_steps"] == cfg.train.gradient_accumulation


def test_training_evaluates_after_the_steps_and_epochs_the_config_names():
    """train.eval_epochs=N: after every N-th epoch and the last; eval_each_epoch: every epoch; eval_steps: every N steps."""
    from peft_tuner.config import evaluates_after_step

    recipe = str(ROOT / "configs" / "twitter_complaints_smollm2.yaml")
    steps_per_epoch, epochs = 3, 5

    def evaluated(*overrides):
        cfg = load_config(recipe, [f"train.epochs={epochs}", *overrides])
        return [done for done in range(1, steps_per_epoch * epochs + 1) if evaluates_after_step(cfg, done, steps_per_epoch)]

    assert evaluated() == []
    assert evaluated("train.eval_epochs=2") == [6, 12, 15]
    assert evaluated("train.eval_epochs=1") == evaluated("train.eval_each_epoch=true") == [3, 6, 9, 12, 15]
    assert evaluated("train.eval_steps=4") == [4, 8, 12]
    with pytest.raises(ConfigError, match="train.eval_epochs"):
        load_config(recipe, ["train.eval_epochs=-1"])

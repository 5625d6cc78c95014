"""Recipes, dotted overrides, and the errors a typo gets; every shipped recipe and DeepSpeed config parses."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from peft_tuner.config import ConfigError, load_config
from peft_tuner.distributed import read_deepspeed_file, resolve_deepspeed_config

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
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
    ("peft.use_dora=true", None),
    ("train.epochs", "write it as section.key=value"),
])
def test_typos_and_wrong_types_name_the_key(override, message):
    if message is None:
        assert load_config(str(RECIPES[0]), [override]).peft.use_dora is True
        return
    with pytest.raises(ConfigError, match=message):
        load_config(str(RECIPES[0]), [override])


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

"""The Chinese tutorial's kind of model: GPT-2 with a BERT character vocabulary ([CLS]/[SEP]/[PAD], no EOS declared).

It trains as classification (label words 正面 / 负面) and as text, generates top-k continuations, and generate-mode
evaluation reads its answers as the classes (decoded without the WordPiece spaces between characters).
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import REVIEWS, launch_command, run, write_recipe
from peft_tuner.config import DataConfig, ModelConfig

CJK_SPACE = re.compile(r"[\u4e00-\u9fff\uff00-\uffef\u3000-\u303f] [\u4e00-\u9fff\uff00-\uffef\u3000-\u303f]")
SENTIMENT = {"text_column": "review", "label_column": "label", "prompt_template": "评论：{review} 情感：",
             "class_names": ["0", "1"], "label_words": {"0": "负面", "1": "正面"}, "max_length": 64}


@pytest.fixture(scope="module")
def tokenizer(chinese_model):
    from peft_tuner.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(chinese_model)))


def test_sep_ends_texts_and_no_special_token_lands_inside_a_prompt(tokenizer, chinese_model, data_dir):
    from peft_tuner.data import Encoder, build_task, encode_prompt, read_table
    from peft_tuner.modeling import ModelError, decode, load_tokenizer, stop_token_ids

    assert tokenizer.eos_token == "[SEP]"  # the folder declares none
    assert stop_token_ids(tokenizer) == [tokenizer.sep_token_id, tokenizer.pad_token_id]
    table = read_table(str(data_dir / "reviews.csv"))
    task = build_task(DataConfig(**SENTIMENT), table)
    example, _ = Encoder(tokenizer, task, 64).training_example(table.rows[0])
    ids = example["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids[0] == cls and ids.count(cls) == 1  # [CLS] starts the text, as the tokenizer puts it
    assert ids.count(sep) == 1 and ids[-1] == sep  # no [SEP] after the prompt: only the end of the label
    assert decode(tokenizer, [ids]) == [task.prompt(table.rows[0]).replace(" ", "") + "正面"]  # no "正 面"
    assert encode_prompt(tokenizer, "房间很好")[-1] != sep

    assert load_tokenizer(ModelConfig(name_or_path=str(chinese_model), eos_token="[MASK]")).eos_token == "[MASK]"
    with pytest.raises(ModelError, match=r"model.eos_token: '<eos>' is not in the vocabulary"):
        load_tokenizer(ModelConfig(name_or_path=str(chinese_model), eos_token="<eos>"))


@pytest.mark.slow
def test_classification_trains_and_generate_mode_evaluation_reads_the_label_words(chinese_model, data_dir, tmp_path):
    from peft_tuner.cli import main

    recipe = write_recipe(tmp_path / "recipe.yaml", chinese_model, data_dir / "reviews.csv", tmp_path / "run",
                          data={**SENTIMENT, "eval_fraction": 0.25}, peft={"target_modules": "all-linear", "r": 8},
                          train={"epochs": 60, "learning_rate": 1e-2})  # every one of seeds 1-7 learns the label words
    run(launch_command("python") + [str(recipe)], timeout=200)
    start = json.loads((tmp_path / "run" / "train_log.jsonl").open().readline())
    assert start["event"] == "start" and start["cpu_tuning"]["dropout"] > 0  # GPT-2's and LoRA's dropouts trained as CpuDropout
    adapter = tmp_path / "run" / "adapter"
    assert main(["evaluate", "--adapter", str(adapter), "--method", "generate", "eval.max_new_tokens=4",
                 "--out", str(tmp_path / "generate")]) == 0
    metrics = json.loads((tmp_path / "generate" / "metrics_eval.json").read_text())
    assert metrics["n"] == 4  # the 25% of each class that training held out: 2 + 2 of 16 rows
    assert metrics["invalid"] == 0
    outputs = [json.loads(line)["output"] for line in (tmp_path / "generate" / "predictions_eval.jsonl").open()]
    assert set(outputs) <= {"正面", "负面"}, outputs  # stopped at [SEP], no spaces, no special tokens
    trained_on = {json.loads(line)["prompt"] for line in (tmp_path / "generate" / "predictions_eval.jsonl").open()}
    held_out = {f"评论：{review} 情感：" for _, review in REVIEWS} & trained_on
    assert len(held_out) == 4


@pytest.mark.slow
def test_text_task_trains_and_samples_top_k_continuations_of_a_review(chinese_model, data_dir, tmp_path):
    from peft_tuner.config import load_config
    from peft_tuner.modeling import load_for_inference
    from peft_tuner.generate import generate

    recipe = write_recipe(tmp_path / "recipe.yaml", chinese_model, data_dir / "reviews.csv", tmp_path / "run",
                          data={"task": "text", "text_column": "review", "max_length": 16}, train={"epochs": 3})
    run(launch_command("python") + [str(recipe)], timeout=200)
    cfg = load_config(str(recipe), ["generate.do_sample=true", "generate.top_k=5", "generate.max_new_tokens=12",
                                    "generate.num_return_sequences=2"])
    model, tokenizer, _ = load_for_inference(cfg, adapter_dir=str(tmp_path / "run" / "adapter"))
    prompts = [review[:4] for _, review in REVIEWS[:2]]  # the tutorial takes 10 characters of longer reviews
    first = generate(model, tokenizer, prompts, cfg, seed=1)
    assert first == generate(model, tokenizer, prompts, cfg, seed=1)
    assert first != generate(model, tokenizer, prompts, cfg, seed=2)  # the seed is used: sampling happens
    assert [len(outputs) for outputs in first] == [2, 2] and any(text for outputs in first for text in outputs)
    for text in (text for outputs in first for text in outputs):
        assert not CJK_SPACE.search(text) and not re.search(r"\[(CLS|SEP|PAD)\]", text), text

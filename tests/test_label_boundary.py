"""Where the prompt ends and the label begins (data.label_boundary): `example` keeps the PEFT example's tokenization,
`word` gives the label the tokenizer's own word token; and at the word boundary our rank-classification scores are
lm-evaluation-harness's own log-likelihoods of the same contexts and continuations."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from peft_tuner.config import DataConfig, ModelConfig
from peft_tuner.data import Encoder, boundary_advice, build_task, read_table
from peft_tuner.data.formats import fill_template
from peft_tuner.modeling import load_base_model, load_tokenizer
from peft_tuner.scoring import rank_scores


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_models["llama"])))


@pytest.fixture(scope="module")
def table(data_dir):
    return read_table(str(data_dir / "raft"), "train")


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_the_example_boundary_ends_the_prompt_with_a_lone_space_and_the_word_boundary_does_not(tokenizer, table):
    row = {"Tweet text": "my order never came", "Label": "complaint"}
    encoded = {}
    for boundary in ("example", "word"):
        task = build_task(DataConfig(label_boundary=boundary), table)
        encoder = Encoder(tokenizer, task, 48)
        example, _ = encoder.training_example(row)
        labelled = [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
        encoded[boundary] = (tokens(tokenizer, example["input_ids"][:-len(labelled)]), tokens(tokenizer, labelled))
    (prompt_ex, label_ex), (prompt_word, label_word) = encoded["example"], encoded["word"]
    assert prompt_ex[-1] == "Ġ" and label_ex[0] != "Ġcomplaint"  # the PEFT example's tokens: a lone space, then the word
    assert prompt_word == prompt_ex[:-1] and prompt_word[-1] == "Ġ:"  # the space moved out of the prompt ...
    assert label_word[0] == "Ġcomplaint" and label_word[-1] == tokenizer.eos_token  # ... into the label's own word
    assert tokens(tokenizer, tokenizer(" : complaint", add_special_tokens=False)["input_ids"])[-1] == "Ġcomplaint"


def test_the_boundary_is_saved_with_the_task_and_the_example_boundary_is_named_where_it_splits_words(tokenizer, table):
    example = build_task(DataConfig(), table)
    word = build_task(DataConfig(label_boundary="word"), table)
    assert example.to_dict()["label_boundary"] == "example" and word.to_dict()["label_boundary"] == "word"
    assert word.prompt({"Tweet text": "hi"}) == "Tweet text : hi Label :" and word.label_text("complaint") == " complaint"
    assert example.prompt({"Tweet text": "hi"}) == "Tweet text : hi Label : " and example.label_text("complaint") == "complaint"
    advice = boundary_advice(example, tokenizer)
    assert advice and "data.label_boundary=word" in advice and "Ġcomplaint" in advice
    assert boundary_advice(word, tokenizer) is None
    no_space = build_task(DataConfig(prompt_template="Tweet text : {Tweet text} Label:"), table)
    assert boundary_advice(no_space, tokenizer) is None  # nothing to move


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed (tests/requirements.txt)")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_scores_at_the_word_boundary_are_the_harness_log_likelihoods(tiny_models, table, arch):
    """The harness's HFLM scores (context, continuation) after moving the context's trailing space into the
    continuation; our rank classification, with the shared prompt head and the candidates' token tree, at the word
    boundary: the same numbers within 1e-4 (fp32)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    config = ModelConfig(name_or_path=str(tiny_models[arch]))
    tokenizer = load_tokenizer(config)
    model = load_base_model(config, "fp32").eval()
    task = build_task(DataConfig(label_boundary="word", class_names=["complaint", "no complaint", "maybe"],
                                 label_words={"maybe": "no idea at all"}), table)
    rows = table.rows[:9]
    encoder = Encoder(tokenizer, task, 96)
    assert not any(encoder.prompt_ids(row)[1] for row in rows)  # no prompt cut: the harness sees every context whole
    ours = rank_scores(model, encoder, rows, batch_size=4)
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    requests = [Instance(request_type="loglikelihood", doc={}, idx=i,
                         arguments=(fill_template(task.prompt_template, row), task.label_words[name] + tokenizer.eos_token))
                for i, (row, name) in enumerate((row, name) for row in rows for name in task.class_names)]
    theirs = torch.tensor([logprob for logprob, _ in harness.loglikelihood(requests)]).view(len(rows), -1)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)

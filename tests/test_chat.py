"""Instruction and chat data: which tokens are trained on under three chat templates, completion rows, packing, the
errors users get; then completion and chat training with evaluation, trackers, early stopping and the best adapter."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import ds_config, launch_command, records, run, summary, write_recipe
from peft_tuner.data import IGNORE_INDEX, DataError, SftEncoder, build_sft_task, collate, collate_padding_free, read_table
from peft_tuner.data.chat import BUILTIN_TEMPLATES, assistant_token_mask, uses_generation_marks
from peft_tuner.config import load_config

# SmolLM2-135M-Instruct's own template, as its tokenizer ships it (no generation marks; a default system message).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# (template, its end-of-turn token, whether it marks the assistant's tokens with {% generation %})
TEMPLATES = {"smollm2-chatml": (SMOLLM2_TEMPLATE, "<|im_end|>", False),
             "llama3": (BUILTIN_TEMPLATES["llama3"], "<|eot_id|>", True),
             "zephyr": (BUILTIN_TEMPLATES["zephyr"], "<|endoftext|>", False)}

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "is my order late"},
                {"role": "assistant", "content": "yes it is late"},
                {"role": "user", "content": "thanks for the help"},
                {"role": "assistant", "content": "happy to help today"}]

QA = [("my order never arrived", "complaint"), ("great coffee this morning", "no complaint"),
      ("the app crashed again", "complaint"), ("love the new store", "no complaint"),
      ("still waiting on my refund", "complaint"), ("happy birthday team", "no complaint"),
      ("flight cancelled again", "complaint"), ("what a lovely day", "no complaint")]


def chat_rows(pairs=QA) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tweet text : {t} Is it a complaint?"},
                          {"role": "assistant", "content": label}]} for t, label in pairs]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from peft_tuner.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama-chat", "llama", chat=True)


@pytest.fixture(scope="module")
def chat_tokenizer(chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model)


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows()) + "\n")
    with open(root / "chat.csv", "w", newline="") as f:  # the conversation as JSON text in a CSV cell
        writer = csv.DictWriter(f, fieldnames=["messages"])
        writer.writeheader()
        writer.writerows({"messages": json.dumps(r["messages"])} for r in chat_rows())
    # Answers unlike the training rows': training on one set makes the other's loss rise.
    unlike = [(t, "the game began development") for t, _ in QA]
    (root / "chat_unlike.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(unlike)) + "\n")
    with open(root / "completion.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows({"prompt": f"Tweet text : {t} Label :", "completion": f" {label}"} for t, label in QA)
    return root


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


@pytest.mark.parametrize("name", TEMPLATES)
def test_exactly_the_assistant_tokens_and_their_end_of_turn_are_trained(chat_tokenizer, name):
    template, end_of_turn, marked = TEMPLATES[name]
    assert uses_generation_marks(template) == marked
    ids, mask = assistant_token_mask(chat_tokenizer, template, CONVERSATION, "assistant")
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_text(chat_tokenizer, ids, mask) == "".join(a + end_of_turn for a in answers)
    expected_count = sum(len(chat_tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    assert sum(mask) == expected_count  # no stray token at a turn's edges
    ids, mask = assistant_token_mask(chat_tokenizer, template, CONVERSATION, "last_assistant")
    assert trained_text(chat_tokenizer, ids, mask) == answers[-1] + end_of_turn
    ids, mask = assistant_token_mask(chat_tokenizer, template, CONVERSATION, "all")
    assert all(mask) and chat_tokenizer.decode(ids) == chat_tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False)


def test_marked_template_and_incremental_rendering_agree(chat_tokenizer):
    marked = BUILTIN_TEMPLATES["llama3"]
    unmarked = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert uses_generation_marks(marked) and not uses_generation_marks(unmarked)
    assert assistant_token_mask(chat_tokenizer, marked, CONVERSATION) == \
        assistant_token_mask(chat_tokenizer, unmarked, CONVERSATION)


def sft_encoder(tokenizer, files, *overrides):
    cfg = load_config(None, ["model.name_or_path=unused", *overrides])
    table = read_table(str(files / ("completion.csv" if cfg.data.task == "completion" else "chat.jsonl")))
    return SftEncoder(tokenizer, build_sft_task(cfg.data, table, tokenizer), cfg.data.max_length), table


def test_completion_trains_on_the_completion_and_eos_and_keeps_it_when_cut(chat_tokenizer, sft_files):
    encoder, table = sft_encoder(chat_tokenizer, sft_files, "data.task=completion")
    row = table.rows[1]
    example, cut = encoder.training_example(row)
    target = chat_tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [chat_tokenizer.eos_token_id]
    assert not cut and example["labels"][-len(target):] == target
    assert set(example["labels"][:-len(target)]) == {IGNORE_INDEX}
    short, _ = sft_encoder(chat_tokenizer, sft_files, "data.task=completion", "data.max_length=10")
    example, cut = short.training_example(row)
    assert cut and len(example["input_ids"]) <= 10 and example["labels"][-len(target):] == target


def test_chat_rows_read_from_a_csv_cell_as_from_jsonl(chat_tokenizer, sft_files):
    from peft_tuner.data import sft_rows

    cfg = load_config(None, ["model.name_or_path=unused", "data.task=chat"])
    rows = {name: sft_rows(build_sft_task(cfg.data, read_table(str(sft_files / name))), read_table(str(sft_files / name)),
                           cfg.data, "train", require_target=True) for name in ("chat.csv", "chat.jsonl")}
    assert [r["messages"] for r in rows["chat.csv"]] == [r["messages"] for r in rows["chat.jsonl"]]


def test_bad_conversations_are_reported_with_their_row(tmp_path, chat_tokenizer):
    from peft_tuner.data import sft_rows

    cfg = load_config(None, ["model.name_or_path=unused", "data.task=chat"])
    cases = {'{"messages": "not json ["}': "row 1, column 'messages': not a JSON list",
             '{"messages": [{"role": "robot", "content": "hi"}]}': "row 1, column 'messages': message 1 has role 'robot'",
             '{"messages": [{"role": "user", "content": "hi"}]}': "row 1: the conversation has no assistant turn"}
    for line, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n")
        table = read_table(str(path))
        with pytest.raises(DataError, match=message):
            sft_rows(build_sft_task(cfg.data, table), table, cfg.data, "train", require_target=True)


@pytest.mark.parametrize("task", ["chat", "completion"])
def test_packed_chat_and_completion_rows_have_the_padded_loss(chat_model, chat_tokenizer, sft_files, task):
    from transformers import AutoModelForCausalLM

    from peft_tuner.losses import token_loss_sum

    encoder, table = sft_encoder(chat_tokenizer, sft_files, f"data.task={task}")
    examples = [encoder.training_example(r)[0] for r in table.rows[:4]]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of several lengths: padding matters
    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    with torch.no_grad():
        padded = float(token_loss_sum(model, collate(examples, chat_tokenizer.pad_token_id), True))
        packed = float(token_loss_sum(model, collate_padding_free(examples), True))
    assert math.isclose(padded, packed, rel_tol=1e-5), (padded, packed)


# ----------------------------------------------------------------------------------------------------------------------
# Training runs (subprocesses, one process: the DeepSpeed engine at ZeRO-0)


def sft_recipe(tmp_path, chat_model, sft_files, task, eval_file=None, **train):
    train_file = sft_files / ("chat.csv" if task == "chat" else "completion.csv")
    return write_recipe(tmp_path / "recipe.yaml", chat_model, train_file, tmp_path / "run",
                        data={"task": task, "max_length": 64, "eval_file": str(eval_file or train_file)},
                        train={"epochs": 4, "batch_size": 4, "learning_rate": 3e-2, **train},
                        eval={"max_new_tokens": 4, "batch_size": 8})


# (task, launcher, ZeRO stage): chat under DeepSpeed ZeRO-3 on 2 processes, every weight partitioned
RUNS = [("chat", "deepspeed", 3), ("completion", "python", 0)]


@pytest.mark.slow
@pytest.mark.parametrize("task,launcher,stage", RUNS, ids=[f"{t}-{l}-zero{z}" for t, l, z in RUNS])
def test_completion_and_chat_train_and_report_loss_perplexity_and_answer_metrics(tmp_path, chat_model, sft_files, task,
                                                                                 launcher, stage):
    recipe = sft_recipe(tmp_path, chat_model, sft_files, task, eval_steps=2, padding_free=task == "chat",
                        batch_size=2 if launcher == "deepspeed" else 4)
    extra = ["--deepspeed", ds_config(f"zero{stage}.json")] if launcher == "deepspeed" else []
    run(launch_command(launcher, stage=stage) + [str(recipe), *extra], timeout=400)
    evals = [r for r in records(tmp_path / "run") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the targets are learnt (eval rows = training rows)
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert summary(tmp_path / "run")["best_step"] == min(evals, key=lambda r: r["eval_loss"])["step"]
    assert (tmp_path / "run" / "best_adapter" / "adapter_config.json").is_file()
    out = tmp_path / "eval"
    run(launch_command("python", "launch/evaluate.py") + ["--adapter", str(tmp_path / "run" / "adapter"), "--out", str(out)],
        timeout=300)
    metrics = json.loads((out / "metrics_eval.json").read_text())
    assert metrics["with_reference"] == len(QA) and metrics["task"] == task
    assert metrics["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-3)  # the same targets, the same weights
    predictions = [json.loads(l) for l in (out / "predictions_eval.jsonl").read_text().splitlines()]
    assert {"output", "reference", "exact_match", "token_f1", "rouge_l"} <= set(predictions[0])
    for key in ("exact_match", "token_f1", "rouge_l"):
        assert metrics[key] == pytest.approx(sum(p[key] for p in predictions) / len(predictions))
        assert 0 <= metrics[key] <= 1


def early_stopping_recipe(tmp_path, chat_model, sft_files, **train):
    # The eval rows' answers are unlike the training rows': their loss rises as training goes on.
    return sft_recipe(tmp_path, chat_model, sft_files, "chat", eval_file=sft_files / "chat_unlike.jsonl", eval_steps=1,
                      early_stopping_patience=2, report_to=["tensorboard", "mlflow"], epochs=6, **train)


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory, chat_model, sft_files):
    root = tmp_path_factory.mktemp("early")
    run(launch_command("python") + [str(early_stopping_recipe(root, chat_model, sft_files))], timeout=300)
    return root / "run"


@pytest.mark.slow
def test_early_stopping_keeps_the_best_adapter_and_trackers_record_the_run(tmp_path, early_stopped, monkeypatch):
    result = summary(early_stopped)
    evals = [r for r in records(early_stopped) if r.get("event") == "eval"]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert result["stopped_early"] and result["steps_done"] == evals[-1]["step"] < 12
    assert result["best_step"] == best["step"] and len([e for e in evals if e["step"] > best["step"]]) == 2
    # best_adapter/ is the adapter of that evaluation: evaluated again, it gives the logged loss
    out = tmp_path / "eval_best"
    run(launch_command("python", "launch/evaluate.py") + ["--adapter", str(early_stopped / "best_adapter"), "--out",
                                                         str(out), "eval.max_new_tokens=1"], timeout=300)
    assert json.loads((out / "metrics_eval.json").read_text())["loss"] == pytest.approx(best["eval_loss"], rel=1e-3)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(early_stopped / "tensorboard"))
    events.Reload()
    steps = [r for r in records(early_stopped) if r.get("event") == "step"]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in steps]
    assert [e.value for e in events.Scalars("eval/eval_loss")] == pytest.approx([r["eval_loss"] for r in evals])

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when told to
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (early_stopped / "mlruns").resolve().as_uri())  # undone after the test
    (found,) = mlflow.search_runs(experiment_names=["peft_tuner"], output_format="list")
    assert found.data.params["data.task"] == "chat" and found.data.params["train.early_stopping_patience"] == "2"
    history = mlflow.tracking.MlflowClient().get_metric_history(found.info.run_id, "eval_eval_loss")
    assert [m.value for m in history] == pytest.approx([r["eval_loss"] for r in evals])


@pytest.mark.slow
def test_resume_keeps_the_best_so_far(tmp_path, chat_model, sft_files, early_stopped):
    from safetensors.torch import load_file

    recipe = early_stopping_recipe(tmp_path, chat_model, sft_files, checkpoint_steps=2)
    best_step = summary(early_stopped)["best_step"]
    kill_at = best_step + 1 if (best_step + 1) % 2 == 0 else best_step + 2  # after a checkpoint past the best
    killed = run(launch_command("python") + [str(recipe)], env={"PEFT_TUNER_KILL_AT": f"after_step:{kill_at}"},
                 timeout=300, check=False)
    assert killed.returncode != 0 and (tmp_path / "run" / "best_adapter").is_dir()
    run(launch_command("python") + [str(recipe), "--resume"], timeout=300)
    resumed = summary(tmp_path / "run")
    assert resumed["stopped_early"] and resumed["best_step"] == best_step
    assert resumed["steps_done"] == summary(early_stopped)["steps_done"]
    expected = load_file(early_stopped / "best_adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "run" / "best_adapter" / "adapter_model.safetensors")
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6


def test_a_tracker_that_is_not_installed_is_refused_before_training(monkeypatch):
    import importlib.util

    from peft_tuner.config import ConfigError
    from peft_tuner.trackers import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb not installed; install with .*\[wandb\]"):
        check_trackers(["tensorboard", "wandb"])
    with pytest.raises(Exception, match="train.report_to: 'neptune' is not one of tensorboard, mlflow, wandb"):
        load_config(None, ["model.name_or_path=x", "train.report_to=neptune"])


def test_classification_rows_rendered_as_chat_are_scored_in_the_chat_format(chat_model, chat_tokenizer, data_dir):
    from transformers import AutoModelForCausalLM

    from peft_tuner.data import Encoder, build_task, encode_training_rows
    from peft_tuner.scoring import rank_scores

    cfg = load_config(None, ["model.name_or_path=unused", f"data.train_file={data_dir / 'raft'}", "data.chat_format=true",
                             "data.system_prompt=Classify the tweet."])
    table = read_table(cfg.data.train_file)
    task = build_task(cfg.data, table, chat_tokenizer)
    encoder = Encoder(chat_tokenizer, task, max_length=96)
    row = table.rows[0]
    expected = chat_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Classify the tweet."}, {"role": "user", "content": task.prompt(row)}],
        tokenize=False, add_generation_prompt=True)
    assert chat_tokenizer.decode(encoder.prompt_ids(row)[0]) == expected
    assert chat_tokenizer.decode(encoder.label_ids["no complaint"]) == "no complaint<|im_end|>"
    (example,), _, _ = encode_training_rows(encoder, [row])
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert trained == encoder.label_ids[row["Label"]]  # the answer and its end-of-turn token, nothing else
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    scores = rank_scores(model, encoder, table.rows[:3], batch_size=2)
    reference = rank_scores(model, encoder, table.rows[:3], batch_size=2, share_cache=False)  # each answer appended
    assert torch.allclose(scores, reference, atol=1e-4)


def test_the_chat_recipes_instruction_set_is_built_from_the_data_at_hand(tmp_path):
    from conftest import SHARED_DATA
    from peft_tuner.chat_data import SIZES, build_chat_set

    if not (SHARED_DATA / "raft").is_dir():
        pytest.skip("needs ../shared/data beside the checkout")
    assert build_chat_set(SHARED_DATA, tmp_path) == SIZES
    splits = {s: [json.loads(l) for l in (tmp_path / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "eval")}
    questions = {s: {r["messages"][0]["content"] for r in rows} for s, rows in splits.items()}
    assert not questions["train"] & questions["eval"]  # no eval question is trained on
    answers = {r["source"]: set() for r in splits["train"]}
    for row in splits["train"] + splits["eval"]:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        answers[row["source"]].add(row["messages"][1]["content"])
    assert answers["twitter_complaints"] == {"complaint", "no complaint"} and answers["chnsenticorp"] == {"正面", "负面"}
    assert build_chat_set(SHARED_DATA, tmp_path) == SIZES  # the same files again: nothing to replace
    (tmp_path / "eval.jsonl").write_text("mine\n")
    with pytest.raises(DataError, match="eval.jsonl is there with other content; pass --overwrite"):
        build_chat_set(SHARED_DATA, tmp_path)
    assert (tmp_path / "eval.jsonl").read_text() == "mine\n"


def test_answer_metrics_count_words_and_chinese_characters():
    from rouge_score import rouge_scorer

    from peft_tuner.metrics import answer_scores

    assert rouge_scorer.RougeScorer(["rougeL"]).score("正面", "正面")["rougeL"].fmeasure == 0  # its tokenizer drops CJK
    same, partial, other = answer_scores(["正面", "The cat sat.", "no complaint"], ["正面", "the cat sat on the mat", "complaint"])
    assert same == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    assert partial["exact_match"] == 0 and partial["token_f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # 3 of 6 words
    assert partial["rouge_l"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert other["token_f1"] == pytest.approx(2 * 0.5 * 1 / 1.5) and other["exact_match"] == 0


def test_keys_completion_and_chat_never_read_are_warned_about(capsys):
    load_config(None, ["model.name_or_path=x", "data.task=completion", "eval.calibrate=true", "data.messages_column=m"])
    err = capsys.readouterr().err
    assert "warning: eval.calibrate: ignored with data.task=completion" in err
    assert "warning: data.messages_column: ignored with data.task=completion" in err
    load_config(None, ["model.name_or_path=x", "data.task=chat", "data.prompt_template='Q: {x}'", "data.loss_on=all"])
    err = capsys.readouterr().err
    assert "warning: data.prompt_template: ignored with data.task=chat" in err and "loss_on" not in err

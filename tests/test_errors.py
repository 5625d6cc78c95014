"""Bad input is caught before the model loads: one message naming the file / row / key and what to do, exit code 2,
and nothing in output_dir changed. One case per item; all run in-process through the CLI (they fail before any
process group exists)."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import complaint_rows, write_csv, write_recipe
from peft_tuner.cli import main


def snapshot(folder):
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


@pytest.fixture
def make_case(tmp_path, tiny_models, data_dir):
    def make(rows=None, train_file=None, **sections):
        train = train_file or (write_csv(tmp_path / "train.csv", rows) if rows is not None else data_dir / "raft")
        sections["data"] = {"text_column": "Tweet text", "label_column": "Label", **sections.get("data", {})}
        return write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], train, tmp_path / "run", **sections)
    return make


def run_cli(capsys, recipe, *extra):
    out_dir = yaml.safe_load(recipe.read_text())["output_dir"]
    from pathlib import Path

    before = snapshot(Path(out_dir))
    code = main(["train", str(recipe), *extra])
    assert snapshot(Path(out_dir)) == before, "output_dir changed"
    return code, capsys.readouterr().err


def rows_with(**changes):
    rows = complaint_rows()
    for index, row in changes.items():
        rows[int(index[1:])] = {**rows[int(index[1:])], **row}
    return rows


CASES = {
    "missing data file": (dict(train_file="missing.csv"), [], r"missing.csv: no such file or folder"),
    "missing text column": (dict(data={"text_column": "tweet"}), [], r"data.text_column: 'tweet' is not a column of .*columns there: Tweet text, Label, ID"),
    "missing label column": (dict(data={"label_column": "Class"}), [], r"data.label_column: 'Class' is not a column"),
    "label not a class": (dict(rows=rows_with(r3={"Label": "angry"})), ["data.class_names=[complaint,no complaint]"],
                          r"row 4: label 'angry' is not a known class"),
    "empty text refused": (dict(rows=rows_with(r2={"Tweet text": "  "})), ["data.empty_text=error"],
                           r"row 3 has an empty 'Tweet text'; remove it or set data.empty_text=drop"),
    "template column": (dict(data={"prompt_template": "{Author}: {Tweet text} Label : "}), [], r"names column 'Author'"),
    "max_length too short": (dict(data={"max_length": 8}), [], r"data.max_length: 8 tokens cannot hold"),
    "model path": (dict(model={"name_or_path": "/nowhere/model"}), [], r"model.name_or_path: /nowhere/model does not exist"),
    "target module": (dict(peft={"target_modules": ["qkv"]}), [], r"\['qkv'\] match no module .* its linear layers are: down_proj"),
    "unknown method": (dict(peft={"method": "lora2"}), [], r"peft.method: 'lora2' is not one of .*did you mean lora"),
    # a bare hub id is a hub id, not a missing folder: from_pretrained is asked (offline in the tests) and its word given
    "hub model id": (dict(model={"name_or_path": "gpt2"}), [], r"model.name_or_path: gpt2 is not a local folder, so it was read as a hub id, and from_pretrained could not get it"),
    "eval split twice": (dict(data={"eval_fraction": 0.2, "eval_file": "dev.csv"}), [], r"data.eval_fraction: data.eval_file is set too"),
    "deepspeed not json": (dict(), ["--deepspeed", "{bad}"], r"line 1: not valid JSON"),
    "deepspeed batch contradicts": (dict(), ["--deepspeed", "{batch}"], r"train_micro_batch_size_per_gpu=16 contradicts the recipe's train.batch_size=4"),
    "adalora under zero-1": (dict(peft={"method": "adalora"}), ["--deepspeed", "ds_configs/zero1.json"], r"adalora reads each weight's gradient"),
    "compile under zero-3": (dict(train={"compile": True}), ["--deepspeed", "ds_configs/zero3.json"], r"train.compile: for ZeRO-0 to ZeRO-2"),
    "typo in a key": (dict(), ["train.lr=0.1"], r"train.lr: unknown key: did you mean train.learning_rate\?"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_message(case, make_case, tmp_path, capsys):
    sections, extra, message = CASES[case]
    sections = dict(sections)
    if sections.get("train_file") == "missing.csv":
        sections["train_file"] = tmp_path / "missing.csv"
    recipe = make_case(**sections)
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2},}')
    (tmp_path / "batch.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    extra = [e.replace("{bad}", str(tmp_path / "bad.json")).replace("{batch}", str(tmp_path / "batch.json")) for e in extra]
    code, err = run_cli(capsys, recipe, *extra)
    assert code == 2
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err


def test_broken_csv_row_and_encoding_name_the_line(make_case, tmp_path, capsys):
    broken = tmp_path / "broken.csv"
    broken.write_text('Tweet text,Label\nfine,complaint\nnot "closed,no complaint,extra\n')
    code, err = run_cli(capsys, make_case(train_file=broken))
    assert code == 2 and "broken.csv: line 3" in err
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Tweet text,Label\nok,complaint\ncaf\xe9 bad,complaint\n".encode("latin-1"))
    code, err = run_cli(capsys, make_case(train_file=latin))
    assert code == 2 and "latin.csv: line 3 is not UTF-8" in err


def test_split_with_no_rows_and_only_empty_texts(make_case, tmp_path, capsys):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("Tweet text,Label\n")
    code, err = run_cli(capsys, make_case(train_file=header_only))
    assert code == 2 and "empty.csv: the file holds no rows" in err
    blank = write_csv(tmp_path / "blank.csv", [{"Tweet text": " ", "Label": "complaint"}] * 3)
    code, err = run_cli(capsys, make_case(train_file=blank))
    assert code == 2 and "no rows left to use (3 empty texts dropped)" in err


def test_fake_gguf_is_refused(make_case, tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    code, err = run_cli(capsys, make_case(model={"name_or_path": str(fake)}))
    assert code == 2 and "is not a GGUF file" in err


def test_output_dir_holding_a_run_is_refused_and_kept(make_case, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "run_config.yaml").write_text("mine: true\n")
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"precious")
    code, err = run_cli(capsys, make_case())
    assert code == 2 and "already holds a run; pass --resume to continue it, --overwrite to replace it" in err
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == b"precious"
    assert os.environ.get("RANK") is None  # nothing in this module brought up a process group


def test_every_problem_is_named_in_one_message_before_anything_loads(make_case, tmp_path, capsys):
    recipe = make_case()
    code, err = run_cli(capsys, recipe, "train.learnin_rate=1", "data.train_file=missing.csv", "peft.target_modules=q_projj")
    assert code == 2 and "Traceback" not in err
    assert "3 problem(s); nothing was loaded or written" in err
    for expected in ("train.learnin_rate: unknown key: did you mean train.learning_rate?",
                     "peft.target_modules: ['q_projj'] match no module", "missing.csv: no such file or folder"):
        assert expected in err, err
    # with no model to read a tokenizer from, the data is still read and checked
    code, err = run_cli(capsys, recipe, "model.name_or_path=/nowhere/model", "data.text_column=tweet", "--deepspeed", "nope.json")
    assert code == 2 and "3 problem(s)" in err
    assert "/nowhere/model does not exist" in err and "'tweet' is not a column" in err and "--deepspeed nope.json" in err

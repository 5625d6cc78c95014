"""The dataset formats people bring (peft_tuner.data.conversations): Alpaca, ShareGPT, OpenAI messages and preference
pairs, detected from the columns, read alike from jsonl, json, parquet and csv, under other column names with a
mapping; and each bad row named with its file, row and key."""
from __future__ import annotations

import csv
import json

import pytest

from peft_tuner.config import DataConfig
from peft_tuner.data import DataError, read_table
from peft_tuner.data.conversations import as_chat_table, detect_format, normalize

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "is my order late"},
     {"role": "assistant", "content": "yes it is"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
     {"role": "user", "content": "thanks\n\nfor all"}, {"role": "assistant", "content": "any time"}],
]
ALPACA = [{"instruction": "is my order late", "input": "", "output": "yes it is", "system": "Be brief.", "history": []},
          {"instruction": "thanks", "input": "for all", "output": "any time", "system": "", "history": [["hello", "hi there"]]}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "is my order late"},
                               {"from": "gpt", "value": "yes it is"}]},
            {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"},
                               {"from": "human", "value": "thanks\n\nfor all"}, {"from": "gpt", "value": "any time"}]}]
PAIRS = [{"prompt": "is my order late", "chosen": "yes it is", "rejected": "who knows"},
         {"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "hi there"}],
          "rejected": [{"role": "assistant", "content": "go away"}]}]
EXPECTED_PAIRS = [([{"role": "user", "content": "is my order late"}], "yes it is", "who knows"),
                  ([{"role": "user", "content": "hello"}], "hi there", "go away")]


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()}
                                             for r in rows]), path)
    else:  # csv: lists as JSON text in a cell
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()} for r in rows)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
@pytest.mark.parametrize("name,rows", [("alpaca", ALPACA), ("sharegpt", SHAREGPT),
                                       ("messages", [{"messages": c} for c in CONVERSATIONS])])
def test_each_chat_format_is_read_from_each_file_type_as_the_same_conversations(tmp_path, kind, name, rows):
    table = read_table(str(write(tmp_path / f"rows.{kind}", rows, kind)))
    cfg = DataConfig(task="chat")
    assert detect_format(table, cfg, preference=False) == name
    chat, mapping = as_chat_table(table, cfg)
    got = [r["messages"] if isinstance(r["messages"], list) else json.loads(r["messages"]) for r in chat.rows]
    if name == "alpaca":
        got = [[m for m in c if m["content"]] for c in got]
    assert got == CONVERSATIONS and mapping["format"] == name


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_preference_pairs_are_read_from_each_file_type_as_strings_or_messages(tmp_path, kind):
    table = read_table(str(write(tmp_path / f"pairs.{kind}", PAIRS, kind)))
    pairs, mapping = normalize(table, DataConfig(), preference=True)
    assert pairs == EXPECTED_PAIRS and mapping["format"] == "preference"


def test_other_column_names_keys_and_roles_are_read_through_the_mapping(tmp_path):
    rows = [{"question": "is my order late", "good": "yes it is", "bad": "who knows"}]
    table = read_table(str(write(tmp_path / "p.jsonl", rows, "jsonl")))
    cfg = DataConfig(columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert normalize(table, cfg, preference=True)[0] == [EXPECTED_PAIRS[0]]
    dialog = [{"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "hello"}]}]
    table = read_table(str(write(tmp_path / "d.jsonl", dialog, "jsonl")))
    cfg = DataConfig(task="chat", format="sharegpt", columns={"conversations": "dialog"},
                     message_keys={"role": "speaker", "content": "text"}, roles={"customer": "user", "agent": "assistant"})
    chat, mapping = as_chat_table(table, cfg)
    assert chat.rows[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert mapping["columns"]["conversations"] == "dialog" and mapping["roles"] == {"customer": "user", "agent": "assistant"}


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "chosen": "a"}, "found no known format in the columns prompt, chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, r"row 1: no rejected answer in column 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "row 1: the chosen and the rejected answer are the same"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "x", "rejected": "y"},
     "messages 1 and 2 are both user turns; roles must alternate"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "x", "rejected": "y"},
     "the prompt ends with a assistant turn"),
    ({"prompt": [{"role": "boss", "content": "a"}], "chosen": "x", "rejected": "y"}, r"role 'boss'; known: .* \(data.roles"),
])
def test_bad_pairs_are_refused_naming_the_file_row_and_key(tmp_path, row, message):
    table = read_table(str(write(tmp_path / "bad.jsonl", [row], "jsonl")))
    with pytest.raises(DataError, match=message) as e:
        normalize(table, DataConfig(), preference=True)
    assert "bad.jsonl" in str(e.value)


def test_a_file_of_no_known_format_says_what_was_expected(tmp_path):
    table = read_table(str(write(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}], "jsonl")))
    with pytest.raises(DataError, match="data.format=auto found no known format .* expected messages .* data.columns"):
        as_chat_table(table, DataConfig(task="chat"))
    with pytest.raises(DataError, match="data.format=alpaca needs the column"):
        as_chat_table(table, DataConfig(task="chat", format="alpaca"))


def test_a_chat_recipe_trains_on_alpaca_rows_and_keeps_the_format(tmp_path, tiny_models):
    """The preflight of a chat run on an Alpaca file: the rows become conversations, the format goes into the task
    saved with the adapter."""
    from peft_tuner.config import load_config
    from peft_tuner.preflight import preflight

    from conftest import write_recipe

    data = write(tmp_path / "alpaca.jsonl", ALPACA * 4, "jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], data, tmp_path / "run",
                          data={"task": "chat", "train_file": str(data), "max_length": 64,
                                "chat_template": "chatml"})
    checked = preflight(load_config(str(recipe)), resume=False, overwrite=False)
    assert checked.data.rows == 8 and checked.data.task["data_format"]["format"] == "alpaca"

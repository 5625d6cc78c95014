"""Sources in every format, both label encodings, and the formatting: left padding, -100 masks, truncation that keeps
the label."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import SHARED_DATA, complaint_rows
from peft_tuner.config import DataConfig
from peft_tuner.data import IGNORE_INDEX, DataError, Encoder, build_task, collate, encode_training_rows, prepare_split, read_table


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from peft_tuner.config import ModelConfig
    from peft_tuner.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_models["llama"])))


@pytest.mark.parametrize("name", ["train.csv", "train.json", "train.jsonl", "train.parquet", "raft"])
def test_every_format_gives_the_same_rows(data_dir, name):
    table = read_table(str(data_dir / name), "train")
    assert [(str(r["Tweet text"]), r["Label"]) for r in table.rows] == [(r["Tweet text"], r["Label"]) for r in complaint_rows()]


def test_raft_folder_gives_columns_classes_and_splits(data_dir):
    train = read_table(str(data_dir / "raft"), "train")
    assert (train.default_text_column, train.default_label_column) == ("Tweet text", "Label")
    assert train.class_names == ["complaint", "no complaint"]
    assert len(read_table(str(data_dir / "raft"), "eval").rows) == 8
    test = read_table(str(data_dir / "raft"), "test")
    assert "Label" not in test.columns and len(test.rows) == 10


def test_hub_layout_with_integer_class_labels(tmp_path):
    """The hub copy of RAFT stores labels as integers with names ["Unlabeled", "complaint", "no complaint"]."""
    import datasets

    features = datasets.Features({"Tweet text": datasets.Value("string"), "ID": datasets.Value("int64"),
                                  "Label": datasets.ClassLabel(names=["Unlabeled", "complaint", "no complaint"])})
    (tmp_path / "data").mkdir()
    rows = complaint_rows()
    datasets.Dataset.from_dict({"Tweet text": [r["Tweet text"] for r in rows], "ID": [r["ID"] for r in rows],
                                "Label": [1 if r["Label"] == "complaint" else 2 for r in rows]},
                               features=features).to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"Tweet text": ["a", "b"], "ID": [90, 91], "Label": [0, 0]},
                               features=features).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    table = read_table(str(tmp_path), "train")
    assert table.class_names == ["complaint", "no complaint"]
    assert [r["Label"] for r in table.rows] == [r["Label"] for r in rows]
    assert [r["Label"] for r in read_table(str(tmp_path), "test").rows] == [None, None]


@pytest.mark.parametrize("spec,name,config,split", [
    ("nobody-here/no-such-dataset:cfg@train", "nobody-here/no-such-dataset", "cfg", "train"),
    ("wikitext:wikitext-2-raw-v1@validation", "wikitext", "wikitext-2-raw-v1", "validation"),  # no organisation
    ("imdb", "imdb", None, "train"),
])
def test_hub_names_reach_load_dataset(spec, name, config, split):
    """Read as NAME[:CONFIG][@SPLIT] and passed to load_dataset, which fails offline with its own message."""
    with pytest.raises(DataError, match=rf"not a local file or folder, so read as a hub dataset: load_dataset\({name!r}, {config!r}, split={split!r}\) failed"):
        read_table(spec, "train")


@pytest.mark.parametrize("spec", ["missing.csv", "./wikitext", "data/more/train.jsonl"])
def test_paths_that_do_not_exist_are_not_hub_names(spec):
    with pytest.raises(DataError, match="no such file or folder"):
        read_table(spec, "train")


def test_held_out_split_is_stratified_disjoint_and_the_same_every_time(data_dir):
    from peft_tuner.data import select_rows

    rows = read_table(str(data_dir / "reviews.csv")).rows  # 8 positive, then 8 negative
    cfg = DataConfig(eval_fraction=0.25, seed=3)
    train, held_out = select_rows(rows, cfg, "train", "label"), select_rows(rows, cfg, "eval", "label")
    assert sorted(train + held_out) == list(range(16)) and not set(train) & set(held_out)
    assert sorted(rows[i]["label"] for i in held_out) == ["0", "0", "1", "1"]
    assert held_out == select_rows(rows, cfg, "eval", "label")  # train and evaluate split alike
    assert held_out != select_rows(rows, DataConfig(eval_fraction=0.25, seed=4), "eval", "label")


def test_held_out_lines_of_a_text_task_are_disjoint_from_the_training_lines_and_the_same_every_time(tokenizer):
    from peft_tuner.data import Table, text_blocks

    lines = [f"line {i} of the text, with some words to make a block" for i in range(40)]
    table = Table(rows=[{"text": t} for t in lines], columns=["text"], source="lines.txt")
    cfg = DataConfig(task="text", max_length=16, eval_fraction=0.25, seed=5, cache=False)
    decoded = {}
    for role in ("train", "eval"):
        blocks, _ = text_blocks(tokenizer, table, cfg, role)
        stream = tokenizer.decode([t for b in blocks for t in b["input_ids"]])  # blocks are consecutive cuts of one stream
        decoded[role] = set(re.findall(r"line (\d+) of", stream))
        assert blocks == text_blocks(tokenizer, table, cfg, role)[0]  # train and evaluate split alike
    assert decoded["train"] and decoded["eval"] and not decoded["train"] & decoded["eval"]
    assert len(decoded["eval"]) <= 10 < len(decoded["train"])
    whole, _ = text_blocks(tokenizer, table, DataConfig(task="text", max_length=16, cache=False), "train")
    assert len(whole) > len(text_blocks(tokenizer, table, cfg, "train")[0])


def test_a_recipe_switched_to_the_text_task_keeps_its_eval_fraction():
    from peft_tuner.config import load_config
    from conftest import ROOT

    cfg = load_config(str(ROOT / "configs" / "chnsenticorp_lora.yaml"), ["data.task=text"])
    assert cfg.data.task == "text" and cfg.data.eval_fraction == 0.2


def test_shipped_data_paths_resolve_through_the_data_root_and_say_where_the_data_comes_from(tmp_path, monkeypatch):
    """`${PEFT_TUNER_DATA}/...` is read from PEFT_TUNER_DATA (else ../shared/data beside the checkout); where the data
    root lacks the dataset, the error names it, its public source and the variable. Other paths are taken as written."""
    from peft_tuner.data.sources import resolve_data_path

    monkeypatch.setenv("PEFT_TUNER_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"\$\{PEFT_TUNER_DATA\}/raft/twitter_complaints: not found under "
                                        r"PEFT_TUNER_DATA=.*nowhere\. It is RAFT .*github.com/oughtinc/raft-baselines.* "
                                        r"set PEFT_TUNER_DATA"):
        read_table("${PEFT_TUNER_DATA}/raft/twitter_complaints", "train")
    with pytest.raises(DataError, match=r"github.com/pytorch/examples"):
        read_table("$PEFT_TUNER_DATA/wikitext-2/train.txt", "train")
    (tmp_path / "mine" / "raft").mkdir(parents=True)
    (tmp_path / "mine" / "raft" / "train.csv").write_text("Tweet text,Label\nhello,complaint\n")
    monkeypatch.setenv("PEFT_TUNER_DATA", str(tmp_path / "mine"))
    assert resolve_data_path("${PEFT_TUNER_DATA}/raft/train.csv") == str(tmp_path / "mine" / "raft" / "train.csv")
    assert read_table("${PEFT_TUNER_DATA}/raft/train.csv").rows == [{"Tweet text": "hello", "Label": "complaint"}]
    assert resolve_data_path("data/train.csv") == "data/train.csv"  # a user's own path, as written


def test_max_rows_draws_from_a_label_sorted_file_but_takes_the_head_of_test_rows(data_dir):
    from peft_tuner.data import select_rows

    rows = read_table(str(data_dir / "reviews.csv")).rows
    drawn = select_rows(rows, DataConfig(max_rows=6), "train", "label")
    assert len(drawn) == 6 and drawn == sorted(drawn)
    assert {rows[i]["label"] for i in drawn} == {"0", "1"}  # the head of the file holds one class only
    assert select_rows(rows, DataConfig(max_rows=6), "test", "label") == list(range(6))
    assert select_rows(rows, DataConfig(max_rows=6, seed=1), "train", "label") != drawn


@pytest.mark.skipif(not (SHARED_DATA / "raft" / "twitter_complaints").is_dir(), reason="shared data not present")
def test_reference_task_prompt_matches_the_peft_example():
    table = read_table(str(SHARED_DATA / "raft" / "twitter_complaints"), "train")
    task = build_task(DataConfig(), table)
    assert task.prompt(table.rows[0]) == "Tweet text : @HMRCcustomers No this is my first job Label : "
    assert len(table.rows) == 50


def test_training_example_masks_the_prompt_and_ends_with_eos(data_dir, tokenizer):
    table = read_table(str(data_dir / "raft"), "train")
    task = build_task(DataConfig(max_length=64), table)
    encoder = Encoder(tokenizer, task, 64)
    example, cut = encoder.training_example(table.rows[0])
    label_ids = tokenizer("complaint", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert not cut
    assert example["input_ids"][-len(label_ids):] == label_ids
    assert example["labels"] == [IGNORE_INDEX] * (len(example["input_ids"]) - len(label_ids)) + label_ids
    prompt = tokenizer(task.prompt(table.rows[0]), add_special_tokens=False)["input_ids"]
    assert example["input_ids"][: -len(label_ids)][-len(prompt):] == prompt


def test_truncation_cuts_the_start_and_keeps_label_and_suffix(data_dir, tokenizer):
    rows = complaint_rows()
    rows[0]["Tweet text"] = ("very long text " * 40).strip()
    table = read_table(str(data_dir / "raft"), "train")
    task = build_task(DataConfig(), table)
    encoder = Encoder(tokenizer, task, 48)
    examples, cut, _ = encode_training_rows(encoder, rows)
    full = [len(encoder.prefix) + len(tokenizer(task.prompt(r), add_special_tokens=False)["input_ids"])
            + len(encoder.label_ids[r["Label"]]) for r in rows]
    assert cut == sum(n > 48 for n in full) >= 1
    assert [len(e["input_ids"]) for e in examples] == [min(n, 48) for n in full]
    long = examples[0]
    label = tokenizer("complaint", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert long["input_ids"][-len(label):] == label
    assert tokenizer.decode(long["input_ids"][:-len(label)]).endswith("very long text Label : ")
    assert sum(l != IGNORE_INDEX for l in long["labels"]) == len(label)


def test_max_length_too_short_for_the_label_is_refused(data_dir, tokenizer):
    task = build_task(DataConfig(), read_table(str(data_dir / "raft"), "train"))
    with pytest.raises(DataError, match="data.max_length: 8 tokens cannot hold"):
        Encoder(tokenizer, task, 8)


def test_collate_pads_left_to_the_longest_in_batch():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_left_padding_does_not_change_the_logits(tiny_models, tokenizer):
    """Padding is invisible to the model when positions come from the mask: GPT-2 has absolute positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    short, long = [5, 6, 7], list(range(10, 20))
    batch = collate([{"input_ids": short}, {"input_ids": long}], tokenizer.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=torch.tensor([short])).logits
    torch.testing.assert_close(padded[0, -3:], alone[0], atol=1e-5, rtol=1e-4)


def test_bad_rows_are_reported_with_their_place(tmp_path, data_dir):
    table = read_table(str(data_dir / "raft"), "train")
    task = build_task(DataConfig(), table)
    table.rows[3] = {**table.rows[3], "Label": "angry"}
    with pytest.raises(DataError, match=r"row 4: label 'angry' is not a known class"):
        prepare_split(task, table, DataConfig(), require_labels=True)
    table.rows[3] = {**table.rows[3], "Label": "complaint", "Tweet text": "   "}
    split = prepare_split(task, table, DataConfig(), require_labels=True)
    assert split.dropped_empty == 1 and len(split.rows) == 15
    with pytest.raises(DataError, match="row 4 has an empty 'Tweet text'"):
        prepare_split(task, table, DataConfig(empty_text="error"), require_labels=True)


def test_missing_columns_and_template_fields_are_listed(data_dir):
    table = read_table(str(data_dir / "raft"), "train")
    with pytest.raises(DataError, match=r"data.text_column: 'tweet' is not a column .*columns there: Tweet text, Label, ID"):
        build_task(DataConfig(text_column="tweet"), table)
    with pytest.raises(DataError, match=r"data.prompt_template: names column 'Author'"):
        build_task(DataConfig(prompt_template="{Author} wrote {Tweet text}"), table)


def test_broken_files_name_the_line(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('Tweet text,Label\nfine,complaint\n"unclosed, quote,complaint\nx,y\n')
    with pytest.raises(DataError, match=r"bad.csv: line \d+"):
        read_table(str(bad_csv))
    wide = tmp_path / "wide.csv"
    wide.write_text("Tweet text,Label\na,b,c\n")
    with pytest.raises(DataError, match=r"wide.csv: line 2: 3 fields where the header has 2"):
        read_table(str(wide))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Tweet text,Label\ncaf\xe9,complaint\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: line 2 is not UTF-8"):
        read_table(str(latin))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        read_table(str(bad_jsonl))
    empty = tmp_path / "empty.csv"
    empty.write_text("Tweet text,Label\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_table(str(empty))
    with pytest.raises(DataError, match="no such file or folder"):
        read_table(str(tmp_path / "missing.csv"))


def test_plain_text_packs_full_blocks_with_eos_between_lines(tokenizer):
    from peft_tuner.data import pack_text

    blocks = pack_text(tokenizer, ["first line of text", "", "second line", " = Heading = "], block_size=8)
    stream = []
    for line in ["first line of text", "second line", " = Heading = "]:
        stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [b["input_ids"] for b in blocks] == [stream[i:i + 8] for i in range(0, len(stream) // 8 * 8, 8)]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    with pytest.raises(DataError, match="fewer than one block"):
        pack_text(tokenizer, ["short"], block_size=512)


def test_chinese_reviews_with_numeric_labels_and_label_words(tmp_path, tokenizer):
    from conftest import write_csv

    path = write_csv(tmp_path / "reviews.csv", [{"label": 1, "review": "房间很干净，服务很好"}, {"label": 0, "review": "太吵了"},
                                                {"label": 1, "review": ""}])
    cfg = DataConfig(text_column="review", label_column="label", prompt_template="评论：{review} 情感：",
                     class_names=["0", "1"], label_words={"0": "负面", "1": "正面"})
    table = read_table(str(path))
    task = build_task(cfg, table)
    split = prepare_split(task, table, cfg, require_labels=True)
    assert split.dropped_empty == 1 and len(split.rows) == 2
    example, _ = Encoder(tokenizer, task, 64).training_example(split.rows[0])
    label = [t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX]
    assert tokenizer.decode(label[:-1]) == "正面" and label[-1] == tokenizer.eos_token_id


def test_tokenized_data_is_cached_and_rebuilt_when_any_part_of_its_key_changes(data_dir, tiny_models, tokenization_cache,
                                                                               monkeypatch):
    from peft_tuner.config import ModelConfig
    from peft_tuner.data import Table, formats, text_blocks
    from peft_tuner.modeling import load_tokenizer

    builds = []
    real_pack_text = formats.pack_text
    monkeypatch.setattr(formats, "pack_text", lambda *a, **k: builds.append(1) or real_pack_text(*a, **k))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_models["llama"])))
    lines = [{"text": f" line {i} of the text , with some words ."} for i in range(30)]
    table, cfg = Table(rows=lines, columns=["text"], source="lines"), DataConfig(task="text", max_length=16)

    first, hit = text_blocks(tokenizer, table, cfg)
    assert (hit, len(builds)) == (False, 1) and list(tokenization_cache.glob("text-*.pkl"))
    again, hit = text_blocks(tokenizer, table, cfg)
    assert (hit, len(builds), again) == (True, 1, first)  # read, not tokenized
    changed = Table(rows=lines[:-1] + [{"text": " another last line ."}], columns=["text"], source="lines")
    other_eos = load_tokenizer(ModelConfig(name_or_path=str(tiny_models["llama"]), eos_token="<s>"))
    for args in ((tokenizer, table, DataConfig(task="text", max_length=12)), (tokenizer, changed, cfg), (other_eos, table, cfg)):
        assert text_blocks(*args)[1] is False
    assert len(builds) == 4
    assert text_blocks(tokenizer, table, DataConfig(task="text", max_length=16, cache=False)) == (first, False)
    assert len(builds) == 5

    rows = read_table(str(data_dir / "raft"), "train").rows
    task = build_task(DataConfig(), read_table(str(data_dir / "raft"), "train"))
    examples, _, hit = encode_training_rows(Encoder(tokenizer, task, 48), rows, cache=True)
    assert not hit and encode_training_rows(Encoder(tokenizer, task, 48), rows, cache=True) == (examples, 0, True)
    task.prompt_template = "{Tweet text} => "
    assert encode_training_rows(Encoder(tokenizer, task, 48), rows, cache=True)[2] is False

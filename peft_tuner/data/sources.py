"""Read a split into plain rows: csv, json, jsonl, parquet, a RAFT folder, or a hub dataset through `load_dataset`.

A path that starts with `${PEFT_TUNER_DATA}` is read from the data root: the folder PEFT_TUNER_DATA names, else
`../shared/data` beside this checkout (where the shipped recipes' public datasets live); any other path is taken as
written. Every failure names the file, the line or key, and what to do; nothing here loads a model.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peft_tuner.errors import PeftTunerError

# Which file of a RAFT-layout folder serves which role.
RAFT_FILES = {"train": ("train.csv",), "eval": ("dev.csv", "validation.csv"), "test": ("test_unlabeled.csv", "test.csv")}
HUB_SPLITS = {"train": "train", "eval": "validation", "test": "test"}
UNLABELED = "Unlabeled"  # the class the hub copy of RAFT (`ought/raft`) gives test rows


class DataError(PeftTunerError):
    """The data the user pointed at cannot be used; the message says where and what to do."""


@dataclass
class Table:
    rows: list[dict]
    columns: list[str]
    source: str
    class_names: Optional[list[str]] = None  # from task.json or dataset features, when the source declares them
    default_text_column: Optional[str] = None
    default_label_column: Optional[str] = None


DATA_ROOT_VARIABLE = "PEFT_TUNER_DATA"
DATA_ROOT_PREFIXES = ("${PEFT_TUNER_DATA}", "$PEFT_TUNER_DATA")
# Where the shipped recipes' datasets come from, by their folder under the data root.
PUBLIC_SOURCES = {
    "raft": "RAFT (Alex et al., 2021): the folders data/<task>/ of https://github.com/oughtinc/raft-baselines "
            "(train.csv, test_unlabeled.csv, task.json); its twitter_complaints dev.csv holds 300 test tweets with the "
            "gold labels of https://github.com/danielpreotiuc/complaints-social-media",
    "wikitext-2": "WikiText-2 (train.txt, valid.txt, test.txt): word_language_model/data/wikitext-2/ of "
                  "https://github.com/pytorch/examples",
    "chnsenticorp": "ChnSentiCorp hotel reviews: datasets/ChnSentiCorp_htl_all/ChnSentiCorp_htl_all.csv of "
                    "https://github.com/SophonPlus/ChineseNlpCorpus",
}


def data_root() -> Path:
    """The folder `${PEFT_TUNER_DATA}` stands for: $PEFT_TUNER_DATA, else ../shared/data beside this checkout."""
    return Path(os.environ.get(DATA_ROOT_VARIABLE) or Path(__file__).resolve().parents[3] / "shared" / "data")


def resolve_data_path(spec: str) -> str:
    """`spec` with a leading `${PEFT_TUNER_DATA}` replaced by the data root (checked to hold it: else one error naming
    the dataset, its public source and the variable to set); any other spec unchanged."""
    prefix = next((p for p in DATA_ROOT_PREFIXES if spec.startswith(p)), None)
    if prefix is None:
        return spec
    relative = spec[len(prefix):].lstrip("/")
    path = data_root() / relative
    if not path.exists():
        dataset = relative.split("/")[0]
        source = PUBLIC_SOURCES.get(dataset, "the dataset this recipe was written for")
        where = f"PEFT_TUNER_DATA={os.environ[DATA_ROOT_VARIABLE]}" if os.environ.get(DATA_ROOT_VARIABLE) else \
            f"the default data root {data_root()} (PEFT_TUNER_DATA is not set)"
        raise DataError(f"{spec}: not found under {where}. It is {source}. Put {dataset}/ in a folder and set "
                        f"PEFT_TUNER_DATA to that folder, or give the path of your own copy instead of {spec}")
    return str(path)


def read_table(spec: str, role: str = "train") -> Table:
    """`spec` is a file, a RAFT folder, a folder in hub layout, or a hub name NAME[:CONFIG][@SPLIT]; a leading
    `${PEFT_TUNER_DATA}` is the data root."""
    spec = resolve_data_path(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "task.json").is_file() or any((path / n).is_file() for names in RAFT_FILES.values() for n in names):
            return _read_raft_folder(path, role)
        return _read_hub(str(path), None, HUB_SPLITS[role], spec)
    if path.is_file():
        return _read_file(path)
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    # A hub name is NAME or ORG/NAME: not a path (./ / ~), no deeper folders, no data file's suffix.
    looks_like_hub = (not spec.startswith((".", "/", "~")) and name.count("/") <= 1 and name
                      and Path(name).suffix.lower() not in DATA_SUFFIXES)
    if looks_like_hub:
        return _read_hub(name, config or None, split or HUB_SPLITS[role], spec)
    raise DataError(f"{spec}: no such file or folder (give a csv/json/jsonl/parquet file, a RAFT folder, "
                    f"or a hub dataset as NAME[:CONFIG][@SPLIT])")


DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


def _read_file(path: Path) -> Table:
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".txt": _read_txt}
    if suffix not in readers:
        raise DataError(f"{path}: unknown data format '{suffix}'; use .csv, .tsv, .json, .jsonl, .parquet or .txt (one text per line)")
    rows, columns = readers[suffix](path)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return Table(rows=rows, columns=columns, source=str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 ({e.reason} at byte {e.start}); "
                        f"re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    text = _read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    except csv.Error as e:
        raise DataError(f"{path}: line 1: broken header ({e})") from e
    rows = []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: broken CSV row ({e}); fix the quoting on that line") from e
        if not values:
            continue
        if len(values) != len(header):
            raise DataError(f"{path}: line {reader.line_num}: {len(values)} fields where the header has {len(header)} "
                            f"({', '.join(header)}); quote fields that contain '{delimiter}'")
        rows.append(dict(zip(header, values)))
    return rows, header


def _read_txt(path: Path) -> tuple[list[dict], list[str]]:
    return [{"text": line} for line in _read_text(path).splitlines()], ["text"]


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
    if isinstance(data, dict):  # {"data": [...]} or column-oriented {"col": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (one per row); for one object per line use .jsonl")
    return data, list(data[0]) if data else []


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows, list(rows[0]) if rows else []


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    return table.to_pylist(), table.column_names


def _read_raft_folder(folder: Path, role: str) -> Table:
    candidates = [folder / name for name in RAFT_FILES[role]]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"{folder}: RAFT folder has no {' or '.join(RAFT_FILES[role])} for the {role} split")
    table = _read_file(path)
    task_file = folder / "task.json"
    if task_file.is_file():
        try:
            task = json.loads(task_file.read_text())
            (label_column, class_names), = task["label_columns"].items()
            text_columns = [c for c in task.get("data_columns", []) if c != "ID"]
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"{task_file}: expected {{'data_columns': [...], 'label_columns': {{NAME: [classes]}}}} ({e})") from e
        table.class_names = list(class_names)
        table.default_label_column = label_column
        table.default_text_column = text_columns[0] if text_columns else None
    return table


def _read_hub(name: str, config: Optional[str], split: str, spec: str) -> Table:
    """A hub dataset (or a local folder in hub layout) through datasets.load_dataset; integer class labels become names."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all come as different types
        raise DataError(f"{spec}: not a local file or folder, so read as a hub dataset: load_dataset({name!r}, "
                        f"{config!r}, split={split!r}) failed: {e}") from e
    class_names = None
    label_columns = [c for c, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)]
    rows = dataset.to_list()
    for column in label_columns:
        names = dataset.features[column].names
        for row in rows:
            value = row[column]
            row[column] = None if value is None or value < 0 or names[value] == UNLABELED else names[value]
        class_names = [n for n in names if n != UNLABELED]
    if not rows:
        raise DataError(f"{spec}: split '{split}' has no rows")
    return Table(rows=rows, columns=list(dataset.column_names), source=spec, class_names=class_names,
                 default_label_column=label_columns[0] if len(label_columns) == 1 else None)

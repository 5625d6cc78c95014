"""The dataset formats people bring, read into one shape: conversations (`messages`) for chat training, and
(prompt, chosen, rejected) for preference training.

| format | columns | becomes |
|---|---|---|
| alpaca | instruction, input (optional), output, system (optional), history ([[q, a], ...], optional) | system, history turns, user (instruction + input), assistant (output) |
| sharegpt | conversations: [{from, value}] with roles human / gpt / system (and their usual aliases), system (optional) | messages |
| messages | messages: [{role, content}] (OpenAI's) | as they are |
| preference | prompt + chosen + rejected (each a string or a list of messages), or instruction / input + chosen / rejected | a pair |

`data.format: auto` detects the format from the columns; `data.columns` maps these names to a file's own
(`{prompt: question, chosen: good, rejected: bad}`), `data.message_keys` the keys of a message (`{role: from,
content: value}`) and `data.roles` the role names (`{bot: assistant}`). Every problem names the file, the row and the
key, before any model loads.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from peft_tuner.data.chat import read_messages
from peft_tuner.data.sources import DataError, Table

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "preference")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool", "function": "tool",
                "observation": "tool"}
FIELDS = {"alpaca": ("instruction", "input", "output", "system", "history"), "sharegpt": ("conversations", "system"),
          "messages": ("messages",), "preference": ("prompt", "chosen", "rejected", "instruction", "input", "system")}
REQUIRED = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "messages": ("messages",),
            "preference": ("chosen", "rejected")}


def column_of(cfg, name: str) -> str:
    """The file's column for our field `name` (data.columns maps it; `messages` also data.messages_column; else the
    name itself)."""
    default = cfg.messages_column if name == "messages" else name
    return (cfg.columns or {}).get(name, default)


def detect_format(table: Table, cfg, preference: bool) -> str:
    """data.format, `auto` resolved from the table's columns; a named format is checked to have its columns."""
    columns = set(table.columns)
    has = lambda *names: all(column_of(cfg, n) in columns for n in names)  # noqa: E731
    fmt = cfg.format
    if fmt == "auto":
        if preference:
            fmt = "preference" if has("chosen", "rejected") else None
        elif has("messages"):
            fmt = "messages"
        elif has("conversations"):
            fmt = "sharegpt"
        elif has("instruction", "output"):
            fmt = "alpaca"
        else:
            fmt = None
        if fmt is None:
            wanted = "prompt + chosen + rejected" if preference else \
                "messages (OpenAI), conversations (ShareGPT) or instruction + output (Alpaca)"
            raise DataError(f"{table.source}: data.format=auto found no known format in the columns "
                            f"{', '.join(table.columns)}; expected {wanted}, or name the columns with data.columns")
    missing = [column_of(cfg, n) for n in REQUIRED[fmt] if column_of(cfg, n) not in columns]
    if fmt == "preference" and not (has("prompt") or has("instruction")):
        missing.append(f"{column_of(cfg, 'prompt')} (or {column_of(cfg, 'instruction')})")
    if missing:
        raise DataError(f"{table.source}: data.format={fmt} needs the column(s) {', '.join(missing)}; columns there: "
                        f"{', '.join(table.columns)} (data.columns maps other names)")
    return fmt


def mapping_of(cfg, fmt: str) -> dict:
    """What the start line says and the adapter keeps: the format and each field's column."""
    return {"format": fmt, "columns": {n: column_of(cfg, n) for n in FIELDS[fmt]},
            "message_keys": cfg.message_keys or {}, "roles": cfg.roles or {}}


def _listed(value: Any) -> Any:
    """A list written as JSON text (a CSV or parquet cell) as the list; anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _messages(value, cfg, where: str) -> list[dict]:
    """A list of messages under this file's keys and role names, in {role, content} with our roles."""
    value = _listed(value)
    sharegpt = isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]
    keys = {"role": "from", "content": "value"} if sharegpt else {"role": "role", "content": "content"}
    keys.update(cfg.message_keys or {})
    roles = {**ROLE_ALIASES, **(cfg.roles or {})}
    if isinstance(value, list) and value and isinstance(value[0], dict) and keys["role"] in value[0]:
        converted = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or keys["role"] not in m or keys["content"] not in m:
                raise DataError(f"{where}: message {i + 1} has no '{keys['role']}' / '{keys['content']}' "
                                f"(data.message_keys maps other keys)")
            role = roles.get(str(m[keys["role"]]).lower())
            if role is None:
                raise DataError(f"{where}: message {i + 1} has role '{m[keys['role']]}'; known: "
                                f"{', '.join(sorted(roles))} (data.roles maps other names)")
            converted.append({"role": role, "content": m[keys["content"]]})
        value = converted
    return read_messages(value, where)


def row_messages(row: dict, index: int, table: Table, cfg, fmt: str) -> list[dict]:
    """An SFT row as a conversation (alpaca, sharegpt or messages)."""
    where = f"{table.source}: row {index + 1}"
    col = lambda name: column_of(cfg, name)  # noqa: E731
    if fmt == "messages":
        return _messages(row.get(col("messages")), cfg, f"{where}, column '{col('messages')}'")
    if fmt == "sharegpt":
        messages = _messages(row.get(col("conversations")), cfg, f"{where}, column '{col('conversations')}'")
        system = row.get(col("system"))
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": str(system)}] + messages
        check_alternation(messages, where)
        return messages
    messages = [{"role": "system", "content": str(row[col("system")])}] if row.get(col("system")) else []
    for i, turn in enumerate(_listed(row.get(col("history"))) or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise DataError(f"{where}, column '{col('history')}': turn {i + 1} is not a [question, answer] pair")
        messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    messages.append({"role": "user", "content": instruction(row, cfg)})
    output = row.get(col("output"))
    if output is None or not str(output).strip():
        raise DataError(f"{where}: no answer in column '{col('output')}'; fill it or remove the row")
    return messages + [{"role": "assistant", "content": str(output)}]


def instruction(row: dict, cfg) -> str:
    """Alpaca's instruction, and its input after a blank line where there is one."""
    text, extra = str(row.get(column_of(cfg, "instruction")) or ""), row.get(column_of(cfg, "input"))
    return f"{text}\n\n{extra}" if extra not in (None, "") and str(extra).strip() else text


def check_alternation(messages: list[dict], where: str) -> None:
    """After an optional system message, user and assistant turns take turns (tool turns may follow either)."""
    last = None
    for i, m in enumerate(messages):
        if m["role"] in ("system", "tool"):
            if m["role"] == "system" and i > 0:
                raise DataError(f"{where}: message {i + 1} is a system message after the conversation began")
            continue
        if m["role"] == last:
            raise DataError(f"{where}: messages {i} and {i + 1} are both {m['role']} turns; roles must alternate")
        last = m["role"]


def row_pair(row: dict, index: int, table: Table, cfg) -> tuple[list[dict], str, str]:
    """(the prompt as messages, the chosen answer, the rejected one): each side a string or a list of messages whose
    last assistant turn is the answer; refused where an answer is missing or the two are the same."""
    where = f"{table.source}: row {index + 1}"
    col = lambda name: column_of(cfg, name)  # noqa: E731
    if col("prompt") in row and row.get(col("prompt")) not in (None, ""):
        prompt = _listed(row[col("prompt")])
        prompt = [{"role": "user", "content": str(prompt)}] if isinstance(prompt, str) else \
            _messages(prompt, cfg, f"{where}, column '{col('prompt')}'")
    else:
        prompt = [{"role": "user", "content": instruction(row, cfg)}]
    if row.get(col("system")) and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": str(row[col("system")])}] + prompt
    answers = []
    for side in ("chosen", "rejected"):
        value = _listed(row.get(col(side)))
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: no {side} answer in column '{col(side)}'; fill it or remove the row")
        if not isinstance(value, str):
            messages = _messages(value, cfg, f"{where}, column '{col(side)}'")
            assistant = [m for m in messages if m["role"] == "assistant"]
            if not assistant:
                raise DataError(f"{where}, column '{col(side)}': no assistant turn to train on")
            value = assistant[-1]["content"]
        answers.append(str(value))
    if answers[0].strip() == answers[1].strip():
        raise DataError(f"{where}: the chosen and the rejected answer are the same text; a pair must differ")
    check_alternation(prompt, where)
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt ends with a {prompt[-1]['role']} turn; it must end with the user's")
    return prompt, answers[0], answers[1]


def as_chat_table(table: Table, cfg) -> tuple[Table, dict]:
    """A chat task's table with each row's conversation in data.messages_column, whatever format the file has; and the
    format's mapping (for the start line and the adapter)."""
    fmt = detect_format(table, cfg, preference=False)
    if fmt == "messages" and not cfg.message_keys and not cfg.roles and column_of(cfg, "messages") == cfg.messages_column:
        return table, mapping_of(cfg, fmt)
    conversations, mapping = normalize(table, cfg, preference=False)
    rows = [{**row, cfg.messages_column: messages} for row, messages in zip(table.rows, conversations)]
    columns = list(dict.fromkeys([*table.columns, cfg.messages_column]))
    return Table(rows=rows, columns=columns, source=table.source), mapping


def normalize(table: Table, cfg, preference: bool, rows: Optional[list[int]] = None):
    """(the rows as conversations or pairs, the format and its mapping): every row checked."""
    fmt = detect_format(table, cfg, preference)
    indices = range(len(table.rows)) if rows is None else rows
    if preference:
        return [row_pair(table.rows[i], i, table, cfg) for i in indices], mapping_of(cfg, fmt)
    return [row_messages(table.rows[i], i, table, cfg, fmt) for i in indices], mapping_of(cfg, fmt)

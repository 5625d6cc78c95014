"""Instruction rows as token sequences: completion (a prompt and a free-text target) and chat (a conversation).

Completion: input = prompt + completion + EOS, trained on the completion and EOS; a prompt too long for
data.max_length loses its start, then a completion too long loses its end. With data.chat_format the prompt is the
user's turn and the completion the assistant's, rendered by the chat template. Chat: the conversation rendered by the
chat template, trained on the tokens data.loss_on names (see chat.assistant_token_mask); a conversation longer than
data.max_length loses its end, and one left with no token to train on is dropped and counted. For generation, a row's
prompt is everything before its target, and the target is the reference the output is compared with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from peft_tuner.config import DataConfig
from peft_tuner.data.cache import cached_examples, rows_fingerprint, tokenizer_fingerprint
from peft_tuner.data.chat import (answer_stop_ids, assistant_token_mask, encode_rendered, read_messages, render,
                                  resolve_chat_template, split_for_generation)
from peft_tuner.data.formats import IGNORE_INDEX, fill_template, leading_special_tokens, select_rows, template_columns
from peft_tuner.data.sources import DataError, Table


@dataclass
class SftTask:
    kind: str  # completion or chat
    prompt_template: Optional[str] = None  # completion: {column} placeholders
    completion_column: Optional[str] = None
    messages_column: Optional[str] = None
    chat_template: Optional[str] = None  # the Jinja text, when rows are rendered as conversations
    system_prompt: Optional[str] = None
    loss_on: str = "assistant"
    data_format: Optional[dict] = None  # chat: the file's format and column mapping (data.format)

    @property
    def as_chat(self) -> bool:
        return self.chat_template is not None

    @property
    def template_columns(self) -> list[str]:
        return template_columns(self.prompt_template or "")

    def prompt(self, row: dict) -> str:
        return fill_template(self.prompt_template or "", row)

    def to_dict(self) -> dict:
        return asdict(self)


def build_sft_task(cfg: DataConfig, table: Table, tokenizer=None, source: str = "the model") -> SftTask:
    """Columns and template from the config, checked against the training table; the chat template resolved (once a
    tokenizer is at hand)."""
    problems = []

    def need_column(key: str, name: str):
        if name not in table.columns:
            problems.append(f"data.{key}: '{name}' is not a column of {table.source}; columns there: {', '.join(table.columns)}")

    if cfg.task == "chat":
        need_column("messages_column", cfg.messages_column)
        task = SftTask("chat", messages_column=cfg.messages_column, system_prompt=cfg.system_prompt, loss_on=cfg.loss_on)
    else:
        task = SftTask("completion", prompt_template=cfg.prompt_template or "{prompt}",
                       completion_column=cfg.completion_column, system_prompt=cfg.system_prompt)
        try:
            columns = task.template_columns
        except ValueError as e:
            raise DataError(f"data.prompt_template: {e}; write columns as {{column}} and literal braces as {{{{ }}}}") from e
        for name in columns:
            need_column("prompt_template", name)
        need_column("completion_column", cfg.completion_column)
    if problems:
        raise DataError("\n  - ".join(["the data does not fit the config:"] + problems))
    if tokenizer is not None and (cfg.task == "chat" or cfg.chat_format):
        task.chat_template = resolve_chat_template(cfg.chat_template, tokenizer, source)
    return task


def sft_rows(task: SftTask, table: Table, cfg: DataConfig, role: str, require_target: bool) -> list[dict]:
    """The rows of `role` (data.max_rows, data.eval_fraction as for classification), each checked: a conversation
    that reads, or a prompt's columns and, where targets are needed, a completion."""
    rows = []
    for index in select_rows(table.rows, cfg, role, label_column=None):
        row, where = table.rows[index], f"{table.source}: row {index + 1}"
        if task.kind == "chat":
            if task.messages_column not in row:
                raise DataError(f"{where}: no column '{task.messages_column}' (data.messages_column)")
            messages = read_messages(row[task.messages_column], f"{where}, column '{task.messages_column}'")
            if require_target and not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: the conversation has no assistant turn to train on")
            row = {**row, task.messages_column: messages}
        else:
            missing = [c for c in task.template_columns if c not in row]
            if missing:
                raise DataError(f"{where}: no column {missing} (data.prompt_template names it)")
            target = row.get(task.completion_column)
            if require_target and (target is None or not str(target).strip()):
                raise DataError(f"{where}: no completion in column '{task.completion_column}'; fill it or remove the row")
        rows.append(row)
    if not rows:
        raise DataError(f"{table.source}: no rows to use")
    return rows


@dataclass
class SftEncoder:
    """Tokenizes completion and chat rows alike for training, loss evaluation and generation."""

    tokenizer: object
    task: SftTask
    max_length: int
    prefix: list[int] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)  # what ends a generated answer: EOS, the end-of-turn token

    def __post_init__(self):
        self.prefix = leading_special_tokens(self.tokenizer)
        self.stop_ids = answer_stop_ids(self.tokenizer, self.task.chat_template) if self.task.as_chat \
            else [self.tokenizer.eos_token_id]

    def messages(self, row: dict) -> list[dict]:
        """The row as a conversation (a completion row with data.chat_format: user prompt, assistant completion)."""
        if self.task.kind == "chat":
            messages = list(row[self.task.messages_column])
        else:
            messages = [{"role": "user", "content": self.task.prompt(row)}]
            target = row.get(self.task.completion_column)
            if target is not None and str(target).strip():
                messages.append({"role": "assistant", "content": str(target)})
        if self.task.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.task.system_prompt}] + messages
        return messages

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def training_example(self, row: dict) -> tuple[Optional[dict], bool]:
        """({input_ids, labels}, whether it was cut); None when no token to train on is left within max_length."""
        if self.task.as_chat:
            loss_on = self.task.loss_on if self.task.kind == "chat" else "last_assistant"
            ids, mask = assistant_token_mask(self.tokenizer, self.task.chat_template, self.messages(row), loss_on)
            cut = len(ids) > self.max_length
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        else:
            prompt = self._plain(self.task.prompt(row))
            target = self._plain(str(row[self.task.completion_column])) + [self.tokenizer.eos_token_id]
            room = self.max_length - len(self.prefix)
            keep_prompt = max(room - len(target), min(len(prompt), room // 2))  # a long target keeps half the room
            cut = len(prompt) > keep_prompt or len(prompt) + len(target) > room
            prompt = prompt[len(prompt) - keep_prompt:] if len(prompt) > keep_prompt else prompt
            target = target[: room - len(prompt)]
            ids = self.prefix + prompt + target
            labels = [IGNORE_INDEX] * (len(ids) - len(target)) + target
        if all(label == IGNORE_INDEX for label in labels[1:]):
            return None, cut
        return {"input_ids": ids, "labels": labels}, cut

    def generation_prompt(self, row: dict, room: int) -> tuple[list[int], Optional[str]]:
        """(prompt tokens, leaving `room` tokens of max_length to the answer, the start cut first; the reference)."""
        if self.task.as_chat:
            before, reference = split_for_generation(self.messages(row))
            ids = encode_rendered(self.tokenizer, render(self.tokenizer, self.task.chat_template, before, True))
        else:
            ids = self.prefix + self._plain(self.task.prompt(row))
            target = row.get(self.task.completion_column)
            reference = str(target) if target is not None and str(target).strip() else None
        keep = max(self.max_length - room, 1)
        return (ids[len(ids) - keep:] if len(ids) > keep else ids), reference

    def prompt_text(self, row: dict) -> str:
        if self.task.as_chat:
            return render(self.tokenizer, self.task.chat_template, split_for_generation(self.messages(row))[0], True)
        return self.task.prompt(row)


def encode_sft_rows(encoder: SftEncoder, rows: list[dict], cache: bool = False) -> tuple[list[dict], int, int, bool]:
    """(examples, how many were cut to max_length, how many were dropped with nothing to train on left, whether they
    came from the tokenization cache)."""
    def build():
        examples, cut, dropped = [], 0, 0
        for row in rows:
            example, was_cut = encoder.training_example(row)
            cut += was_cut
            if example is None:
                dropped += 1
            else:
                examples.append(example)
        return examples, cut, dropped

    if cache:
        key = {"tokenizer": tokenizer_fingerprint(encoder.tokenizer), "rows": rows_fingerprint(rows),
               "task": encoder.task.to_dict(), "max_length": encoder.max_length}
        (examples, cut, dropped), hit = cached_examples("sft", key, build)
    else:
        (examples, cut, dropped), hit = build(), False
    if not examples:
        raise DataError(f"no row keeps a token to train on within data.max_length={encoder.max_length} "
                        f"({dropped} dropped); raise data.max_length")
    return examples, cut, dropped, hit

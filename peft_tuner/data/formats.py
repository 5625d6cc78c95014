"""Turn rows into token sequences: prompt + label (classification) or packed blocks (plain text); collate batches.

Classification follows the reference recipe: input = prompt + label text + EOS, labels -100 on the prompt and on
padding, left padding to the longest sequence of the batch. A prompt longer than `max_length` loses its start; the end
of the template (`Label : `) and the label always stay.

Where the prompt ends and the label begins (data.label_boundary): `example`, as the PEFT example tokenizes, encodes the
prompt with its trailing space and the label after it ('Label', ' :', ' ' + 'compl', 'aint'); `word` moves the
prompt's trailing whitespace into the label, as lm-evaluation-harness does with a context's, so the label starts with
the tokenizer's own word token (' :' + ' complaint').
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Optional

import torch

from peft_tuner.config import DataConfig
from peft_tuner.data.cache import cached_examples, rows_fingerprint, tokenizer_fingerprint
from peft_tuner.data.sources import DataError, Table

IGNORE_INDEX = -100


@dataclass
class ClassificationTask:
    text_column: str
    label_column: str
    prompt_template: str
    class_names: list[str]
    label_words: dict[str, str]  # class name -> the text the model writes for it
    chat_template: Optional[str] = None  # data.chat_format: the prompt is a user turn of this template
    system_prompt: Optional[str] = None
    label_boundary: str = "example"  # data.label_boundary: example or word

    @property
    def template_columns(self) -> list[str]:
        return template_columns(self.prompt_template)

    @property
    def moved_whitespace(self) -> str:
        """The template's trailing whitespace, which the `word` boundary moves from the prompt into each label (in a
        chat the assistant's turn starts on its own, so there it is dropped from the prompt and given to no label)."""
        if self.label_boundary != "word":
            return ""
        return self.prompt_template[len(self.prompt_template.rstrip()):]

    def prompt(self, row: dict) -> str:
        text = fill_template(self.prompt_template, row)
        return text[:len(text) - len(self.moved_whitespace)] if self.moved_whitespace else text

    def label_text(self, name: str) -> str:
        """What follows the prompt for class `name`: its label words, after the moved whitespace (word boundary)."""
        return ("" if self.chat_template else self.moved_whitespace) + self.label_words[name]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def template_columns(template: str) -> list[str]:
    """The columns a prompt template names in braces."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill_template(template: str, row: dict) -> str:
    """The template with each {column} replaced by the row's value (empty where missing)."""
    return template.format_map({c: str(row.get(c, "") or "") for c in template_columns(template)})


@dataclass
class Split:
    rows: list[dict]
    dropped_empty: int = 0


def build_task(cfg: DataConfig, table: Table, tokenizer=None) -> ClassificationTask:
    """Decide columns, template and class names from the config and the training table; check them all. With
    data.chat_format and a tokenizer, the chat template is resolved too."""
    text_column = cfg.text_column or table.default_text_column
    label_column = cfg.label_column or table.default_label_column
    problems = []
    if text_column is None:
        problems.append(f"data.text_column: not set and {table.source} does not say; columns there: {', '.join(table.columns)}")
    elif text_column not in table.columns:
        problems.append(f"data.text_column: '{text_column}' is not a column of {table.source}; columns there: {', '.join(table.columns)}")
    if label_column is None:
        problems.append(f"data.label_column: not set and {table.source} does not say; columns there: {', '.join(table.columns)}")
    elif label_column not in table.columns:
        problems.append(f"data.label_column: '{label_column}' is not a column of {table.source}; columns there: {', '.join(table.columns)}")
    if problems:
        raise DataError("\n  - ".join(["the data does not fit the config:"] + problems))
    template = cfg.prompt_template or f"{text_column} : {{{text_column}}} Label : "
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise DataError(f"data.prompt_template: {e}; write columns as {{column}} and literal braces as {{{{ }}}}") from e
    for name in fields:
        if name == "" or name not in table.columns:
            problems.append(f"data.prompt_template: names column '{name}', which {table.source} does not have; "
                            f"columns there: {', '.join(table.columns)}")
    if problems:
        raise DataError("\n  - ".join(["the data does not fit the config:"] + problems))
    class_names = cfg.class_names or table.class_names
    if not class_names:
        class_names = sorted({str(r[label_column]) for r in table.rows if r.get(label_column) not in (None, "")})
    label_words = {name: (cfg.label_words or {}).get(name, name) for name in class_names}
    unknown_words = set(cfg.label_words or {}) - set(class_names)
    if unknown_words:
        raise DataError(f"data.label_words: {sorted(unknown_words)} are not classes; the classes are {class_names}")
    task = ClassificationTask(text_column, label_column, template, list(class_names), label_words,
                              label_boundary=cfg.label_boundary)
    if cfg.chat_format and tokenizer is not None:
        from peft_tuner.data.chat import resolve_chat_template

        task.chat_template, task.system_prompt = resolve_chat_template(cfg.chat_template, tokenizer), cfg.system_prompt
    return task


def select_rows(rows: list[dict], cfg: DataConfig, role: str, label_column: str) -> list[int]:
    """The indices of the rows of a table that serve `role` (train, eval or test), in file order.

    With data.eval_fraction, train_file's rows are split: each class gives that share of its rows, drawn with data.seed,
    to eval, and the rest to train (so train and evaluate, split alike, never share a row). Then data.max_rows cuts:
    a labelled split to a seeded draw (a file sorted by label still gives every class), a test split to its head."""
    chosen = range(len(rows))
    if cfg.eval_fraction and role in ("train", "eval"):
        by_class: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_class.setdefault(str(row.get(label_column)), []).append(i)
        held_out = set()
        for name, indices in sorted(by_class.items()):
            held_out.update(random.Random(f"{cfg.seed}:{name}").sample(indices, round(cfg.eval_fraction * len(indices))))
        chosen = [i for i in chosen if (i in held_out) == (role == "eval")]
    if cfg.max_rows and cfg.max_rows < len(chosen):
        chosen = sorted(random.Random(cfg.seed).sample(list(chosen), cfg.max_rows)) if role != "test" else chosen[: cfg.max_rows]
    return list(chosen)


def prepare_split(task: ClassificationTask, table: Table, cfg: DataConfig, require_labels: bool, role: str = "train") -> Split:
    """The rows of `role` (see select_rows), each checked: text present (drop or refuse empties), label a known class;
    counts what was dropped."""
    if task.text_column not in table.columns:
        raise DataError(f"{table.source}: no column '{task.text_column}' (data.text_column); columns there: {', '.join(table.columns)}")
    missing = [c for c in task.template_columns if c not in table.columns]
    if missing:
        raise DataError(f"{table.source}: data.prompt_template names {missing}, not columns here: {', '.join(table.columns)}")
    labelled = task.label_column in table.columns
    if require_labels and not labelled:
        raise DataError(f"{table.source}: no label column '{task.label_column}' (data.label_column); columns there: {', '.join(table.columns)}")
    rows, dropped = [], 0
    known = set(task.class_names)
    for index in select_rows(table.rows, cfg, role, task.label_column):
        row = table.rows[index]
        text = row.get(task.text_column)
        if text is None or not str(text).strip():
            if cfg.empty_text == "error":
                raise DataError(f"{table.source}: row {index + 1} has an empty '{task.text_column}'; remove it or set data.empty_text=drop")
            dropped += 1
            continue
        if labelled:
            label = row.get(task.label_column)
            label = None if label is None or str(label) == "" else str(label)
            if label is not None and label not in known:
                raise DataError(f"{table.source}: row {index + 1}: label '{label}' is not a known class {task.class_names}; "
                                f"fix the row or set data.class_names")
            if label is None and require_labels:
                raise DataError(f"{table.source}: row {index + 1} has no label in '{task.label_column}'")
            row = {**row, task.label_column: label}
        rows.append(row)
    if not rows:
        raise DataError(f"{table.source}: no rows left to use ({dropped} empty texts dropped)")
    return Split(rows=rows, dropped_empty=dropped)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS; [CLS] for a BERT vocabulary). What it puts after
    ([SEP]) is left out: a prompt goes on with the label, a text with the next one."""
    with_specials = tokenizer("hello")["input_ids"]
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    n = len(plain)
    start = next((i for i in range(len(with_specials) - n + 1) if with_specials[i:i + n] == plain), 0)
    return list(with_specials[:start])


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A free-text prompt as generation sees it: the leading special tokens, then the text, nothing after."""
    return leading_special_tokens(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Encoder:
    """Tokenizes prompts and labels the same way for training, rank classification and generation. With a chat
    template (data.chat_format) the prompt is wrapped as a user turn and the label ends with the end-of-turn token."""

    tokenizer: object
    task: ClassificationTask
    max_length: int
    prefix: list[int] = field(default_factory=list)  # special tokens the tokenizer puts first (BOS), or a chat's head
    tail: list[int] = field(default_factory=list)  # a chat's end of the user turn and start of the assistant's

    def __post_init__(self):
        self.prefix, end = leading_special_tokens(self.tokenizer), [self.tokenizer.eos_token_id]
        if self.task.chat_template:
            from peft_tuner.data.chat import end_of_turn_ids, user_turn_wrapping

            self.prefix, self.tail = user_turn_wrapping(self.tokenizer, self.task.chat_template, self.task.system_prompt)
            end = end_of_turn_ids(self.tokenizer, self.task.chat_template)[:1] or end
        self.label_ids = {name: self._label_tokens(name) + end for name in self.task.label_words}
        suffix = self.task.prompt_template.rsplit("}", 1)[-1]
        self.suffix_len = len(self._plain(suffix)) + 1 if suffix else 0  # +1: a merge across the boundary
        longest = max(len(ids) for ids in self.label_ids.values())
        room = self.max_length - len(self.prefix) - len(self.tail) - longest - self.suffix_len
        if room < 1:
            raise DataError(f"data.max_length: {self.max_length} tokens cannot hold the template's end '{suffix}' "
                            f"({self.suffix_len} tokens) and the longest label ({longest} tokens with EOS); "
                            f"raise it to at least {self.max_length - room + 1}")

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _label_tokens(self, name: str) -> list[int]:
        """The label's tokens. At the `example` boundary, the label encoded on its own, as the PEFT example does; at
        the `word` boundary, as they come after the prompt's end when both are encoded together (the harness's rule:
        the whole's tokens past the context's), so that a tokenizer's own word tokens are used."""
        text = self.task.label_text(name)
        if self.task.label_boundary != "word":
            return self._plain(text)
        context = self.task.prompt_template.rstrip().rsplit("}", 1)[-1] or "x"
        before, whole = self._plain(context), self._plain(context + text)
        return whole[len(before):] if whole[:len(before)] == before else self._plain(text)

    def prompt_ids(self, row: dict, reserve: Optional[int] = None) -> tuple[list[int], bool]:
        """Prompt tokens, cut at the start to leave `reserve` tokens for the label; returns (ids, was_cut)."""
        body = self._plain(self.task.prompt(row))
        reserve = max(len(ids) for ids in self.label_ids.values()) if reserve is None else reserve
        keep = self.max_length - len(self.prefix) - len(self.tail) - reserve
        if len(body) > keep:
            return self.prefix + body[len(body) - keep:] + self.tail, True
        return self.prefix + body + self.tail, False

    def training_example(self, row: dict) -> tuple[dict, bool]:
        label_ids = self.label_ids[row[self.task.label_column]]
        prompt, cut = self.prompt_ids(row, reserve=len(label_ids))
        return {"input_ids": prompt + label_ids, "labels": [IGNORE_INDEX] * len(prompt) + label_ids}, cut


def boundary_advice(task: ClassificationTask, tokenizer) -> Optional[str]:
    """A plain word when the `example` boundary splits the model's own words: the prompt ends with whitespace and the
    tokenizer writes a word together with the space before it (byte-level BPE's 'Ġ', SentencePiece's '▁'), so the
    label starts after a lone space token and its first word is cut into pieces the model rarely saw. None otherwise."""
    if task.label_boundary != "example" or task.chat_template or task.prompt_template == task.prompt_template.rstrip():
        return None
    name = task.class_names[0]
    word = task.label_words[name]
    own = tokenizer.convert_ids_to_tokens(tokenizer(" " + word.lstrip(), add_special_tokens=False)["input_ids"])
    apart = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False)["input_ids"])
    if not own or own == apart or own[0][:1] not in ("Ġ", "▁"):
        return None
    return (f"data.label_boundary=example: the prompt ends with a space and this tokenizer writes a word with the space "
            f"before it ({own}), so each label follows a lone space token and starts as {apart}; "
            f"data.label_boundary=word gives the label the model's own word tokens")


def encode_training_rows(encoder: Encoder, rows: list[dict], cache: bool = False) -> tuple[list[dict], int, bool]:
    """(examples, how many prompts were cut, whether they came from the tokenization cache)."""
    def build():
        examples, cut = [], 0
        for row in rows:
            example, was_cut = encoder.training_example(row)
            examples.append(example)
            cut += was_cut
        return examples, cut

    if not cache:
        return (*build(), False)
    key = {"tokenizer": tokenizer_fingerprint(encoder.tokenizer), "rows": rows_fingerprint(rows),
           "task": encoder.task.to_dict(), "max_length": encoder.max_length}
    (examples, cut), hit = cached_examples("classification", key, build)
    return examples, cut, hit


def pack_text(tokenizer, texts: list[str], block_size: int) -> list[dict]:
    """Plain-text task: tokenize every line, join with EOS, cut into full blocks of `block_size` tokens."""
    stream: list[int] = []
    for text in texts:
        if text.strip():
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(f"the text holds {len(stream)} tokens, fewer than one block of data.max_length={block_size}")
    return [{"input_ids": stream[i * block_size:(i + 1) * block_size], "labels": stream[i * block_size:(i + 1) * block_size]}
            for i in range(n_blocks)]


def text_blocks(tokenizer, table: Table, cfg: DataConfig, role: str = "train") -> tuple[list[dict], bool]:
    """Plain-text task: the first data.max_rows texts of data.text_column (default `text`) that serve `role`, packed
    into blocks; returns (blocks, whether they came from the tokenization cache). With data.eval_fraction, that share
    of the lines, drawn with data.seed, is the eval split and the rest the train split (train and evaluate alike)."""
    column = cfg.text_column or "text"
    if column not in table.columns:
        raise DataError(f"{table.source}: no column '{column}' (data.text_column); columns: {', '.join(table.columns)}")
    rows = table.rows
    if cfg.eval_fraction and role in ("train", "eval"):
        held_out = set(random.Random(f"{cfg.seed}:lines").sample(range(len(rows)), round(cfg.eval_fraction * len(rows))))
        rows = [row for i, row in enumerate(rows) if (i in held_out) == (role == "eval")]
    texts = [str(r.get(column, "")) for r in rows[: cfg.max_rows]]
    build = lambda: pack_text(tokenizer, texts, cfg.max_length)  # noqa: E731
    if not cfg.cache:
        return build(), False
    key = {"tokenizer": tokenizer_fingerprint(tokenizer), "rows": rows_fingerprint(texts), "max_length": cfg.max_length}
    return cached_examples("text", key, build)


def collate_padding_free(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The rows one after another as one sequence [1, total tokens], no padding and no attention mask: positions
    restart at 0 on each row, from which transformers confines attention to each row (masking_utils'
    find_packed_sequence_indices, used where no attention mask is given). Each row's first label is -100: it would be
    predicted from the row before (in a padded batch the shift drops it). `cu_seq_lens` holds the row boundaries
    (0, end of row 1, end of row 2, ...), for attention that runs row by row (flash-attention's varlen kernels,
    modeling.row_by_row_attention)."""
    input_ids, labels, positions, bounds = [], [], [], [0]
    for e in examples:
        n = len(e["input_ids"])
        row_labels = list(e.get("labels", [IGNORE_INDEX] * n))
        row_labels[0] = IGNORE_INDEX
        input_ids += e["input_ids"]
        labels += row_labels
        positions += range(n)
        bounds.append(bounds[-1] + n)
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32)}


def real_tokens(batch: dict) -> int:
    """Tokens that are not padding."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to the longest sequence of this batch; -100 labels and 0 attention on padding; positions from the mask."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, width - n:] = torch.tensor(e["input_ids"])
        attention_mask[i, width - n:] = 1
        if "labels" in e:
            labels[i, width - n:] = torch.tensor(e["labels"])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}

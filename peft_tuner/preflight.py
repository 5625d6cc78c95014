"""Everything a training run needs checked before the process group or the model come up: the output folder, the
trackers, the DeepSpeed config against the recipe and the method, the model path and tokenizer, the target modules,
the data (read, checked and tokenized) and the checkpoint to resume. Every problem found is reported in one
ConfigError; nothing is loaded or written before it passes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft_tuner import checkpoint as ckpt
from peft_tuner import distributed as dist
from peft_tuner import ds_config as ds_config_for
from peft_tuner.config import Config, ConfigError, evaluates_during_training
from peft_tuner.data import (DataError, Encoder, SftEncoder, boundary_advice, build_sft_task, build_task, encode_sft_rows,
                             encode_training_rows, prepare_split, read_table, select_rows, sft_rows, text_blocks)
from peft_tuner.data.chat import resolve_chat_template
from peft_tuner.data.conversations import as_chat_table, normalize
from peft_tuner.errors import PeftTunerError
from peft_tuner.modeling import check_peft_applies, load_tokenizer, model_hidden_size, model_type
from peft_tuner.kernels import check_liger
from peft_tuner.quantization import check_quantization
from peft_tuner.trackers import check_trackers


@dataclass
class TrainData:
    examples: list[dict]
    task: Optional[dict]  # classification, completion, chat: columns, templates, classes (saved with the adapter)
    rows: int
    dropped_empty: int = 0  # empty texts, or conversations with nothing to train on left within max_length
    truncated: int = 0
    encoder: Optional[Encoder] = None
    eval_rows: list = field(default_factory=list)  # classification: labelled rows, rank-classified after each epoch
    eval_blocks: list = field(default_factory=list)  # text, completion, chat: examples whose loss and perplexity are measured
    from_cache: bool = False  # the examples were read from the tokenization cache
    notes: list = field(default_factory=list)  # what the user should know about the data's encoding (said at the start)
    eval_pairs: list = field(default_factory=list)  # preference objectives: eval pairs, their loss and rewards measured

    @property
    def preference(self) -> bool:
        """Whether the examples are pairs ({chosen, rejected}) for a preference objective."""
        return (self.task or {}).get("kind") == "preference"

    @property
    def sequences(self) -> list[dict]:
        """The examples as token sequences (a pair's two answers apart), for the checks that run a few of them."""
        return [e[side] for e in self.examples for side in ("chosen", "rejected")] if self.preference else self.examples


@dataclass
class Checked:
    """What the preflight found, for the run to use."""
    world: int  # processes the launcher started
    ds_config: dict  # resolved: no "auto" left
    ds_source: str  # where the DeepSpeed config came from, for the start line
    stage: int  # ZeRO stage
    tokenizer: object
    data: TrainData
    checkpoint: Optional[object] = None  # the checkpoint folder to resume from


def preflight(cfg: Config, resume: bool, overwrite: bool, problems: Optional[list[str]] = None) -> Checked:
    """Check the output folder, the DeepSpeed config against the recipe and the method, the model path and its
    tokenizer, the target modules, the data and the checkpoint to resume, and raise one ConfigError naming every
    problem found (with `problems` found before)."""
    problems = list(problems or [])

    def check(step, *args):
        try:
            return step(*args)
        except PeftTunerError as e:
            problems.append(str(e))
            return None

    check(ckpt.check_output_dir, cfg, resume, overwrite)
    check(check_trackers, cfg.train.report_to)
    world = dist.expected_world_size()
    ds = check(_deepspeed_config, cfg, world)
    ds_config, ds_source, stage = ds or (None, None, None)
    tokenizer = check(load_tokenizer, cfg.model)
    if tokenizer is not None:
        check(check_peft_applies, cfg.model, cfg.peft)
    data = check(setup_data, cfg, tokenizer)
    checkpoint = check(ckpt.find_resumable_checkpoint, cfg, world, stage) if resume and ds else None
    if problems:
        raise ConfigError(f"{len(problems)} problem(s); nothing was loaded or written:\n  - " + "\n  - ".join(problems))
    return Checked(world, ds_config, ds_source, stage, tokenizer, data, checkpoint)


def _deepspeed_config(cfg: Config, world: int) -> tuple[dict, str, int]:
    raw, source, zero3_init = ds_config_for.deepspeed_source(cfg)
    if zero3_init is not None:  # accelerate's zero3_init_flag; the config saved with the run says what was done
        cfg.train.zero3_init = zero3_init
    ds_config = ds_config_for.resolve_deepspeed_config(raw, cfg, world, source, model_hidden_size(cfg.model))
    stage = ds_config_for.zero_stage(ds_config)
    problem = ds_config_for.check_method_fits_zero(cfg.peft.method, stage) or \
        check_quantization(cfg.model, cfg.peft.method, stage) or \
        check_liger(cfg.train.liger_kernels, model_type(cfg.model) if cfg.train.liger_kernels else None, stage)
    if problem:
        raise ConfigError(problem)
    if cfg.train.compile and stage == 3:
        raise ConfigError(f"train.compile: for ZeRO-0 to ZeRO-2 ({source} is ZeRO-3, whose hooks gather each "
                          f"module's weights as it runs; compiling across them is not tested here); use ZeRO-2 or set "
                          f"train.compile=false")
    return ds_config, source, stage


def setup_data(cfg: Config, tokenizer) -> Optional[TrainData]:
    """Read, check and tokenize the training split; nothing heavy has been loaded yet. Without a tokenizer (the model
    could not be read) the rows are still read and checked, and nothing is returned."""
    if not cfg.data.train_file:
        raise DataError("data.train_file: not set; give a file, a RAFT folder or a hub dataset")
    if cfg.train.objective != "sft":
        return setup_pair_data(cfg, tokenizer)
    table, data_format = read_split(cfg, cfg.data.train_file, "train")
    sft = cfg.data.task in ("completion", "chat")
    if tokenizer is None:
        if sft:
            sft_rows(build_sft_task(cfg.data, table), table, cfg.data, "train", require_target=True)
        elif cfg.data.task != "text":
            prepare_split(build_task(cfg.data, table), table, cfg.data, require_labels=True)
        return None
    evaluates = evaluates_during_training(cfg)
    key = next((f"train.{k}" for k in ("eval_each_epoch", "eval_epochs", "eval_steps") if getattr(cfg.train, k)), None)
    if cfg.data.task == "text":
        eval_blocks = []
        if evaluates:
            if not (cfg.data.eval_file or cfg.data.eval_fraction):
                raise ConfigError(f"{key}: needs data.eval_file or data.eval_fraction (text to measure the loss and "
                                  f"perplexity on)")
            eval_table = read_table(cfg.data.eval_file, "eval") if cfg.data.eval_file else table
            eval_blocks, _ = text_blocks(tokenizer, eval_table, cfg.data, role="eval")
        examples, from_cache = text_blocks(tokenizer, table, cfg.data, role="train")
        return TrainData(examples=examples, task=None, rows=len(examples), eval_blocks=eval_blocks, from_cache=from_cache)
    if evaluates and not (cfg.data.eval_file or cfg.data.eval_fraction):
        raise ConfigError(f"{key}: needs data.eval_file or data.eval_fraction (rows with answers to evaluate on)")
    eval_table = (read_split(cfg, cfg.data.eval_file, "eval")[0] if cfg.data.eval_file else table) if evaluates else None
    if sft:
        return setup_sft_data(cfg, tokenizer, table, eval_table, data_format)
    task = build_task(cfg.data, table, tokenizer)
    if task.chat_template:
        tokenizer.chat_template = task.chat_template  # saved with the adapter, for generate --chat
    split = prepare_split(task, table, cfg.data, require_labels=True)
    encoder = Encoder(tokenizer, task, cfg.data.max_length)
    examples, truncated, from_cache = encode_training_rows(encoder, split.rows, cache=cfg.data.cache)
    eval_rows = []
    if eval_table is not None:
        eval_rows = prepare_split(task, eval_table, cfg.data, require_labels=True, role="eval").rows
    advice = boundary_advice(task, tokenizer)
    return TrainData(examples=examples, task=task.to_dict(), rows=len(examples), dropped_empty=split.dropped_empty,
                     truncated=truncated, encoder=encoder, eval_rows=eval_rows, from_cache=from_cache,
                     notes=[advice] if advice else [])


def read_split(cfg: Config, spec: str, role: str):
    """(a split's table, its format): a chat task's rows as conversations, whatever format the file has."""
    table = read_table(spec, role)
    if cfg.data.task == "chat":
        return as_chat_table(table, cfg.data)
    return table, None


def setup_sft_data(cfg: Config, tokenizer, table, eval_table, data_format: Optional[dict] = None) -> TrainData:
    """Completion and chat rows: the training examples, and the eval rows' examples whose loss is measured."""
    task = build_sft_task(cfg.data, table, tokenizer, cfg.model.name_or_path)
    task.data_format = data_format
    if task.as_chat:
        tokenizer.chat_template = task.chat_template  # saved with the adapter, for generate --chat
    rows = sft_rows(task, table, cfg.data, "train", require_target=True)
    encoder = SftEncoder(tokenizer, task, cfg.data.max_length)
    examples, truncated, dropped, from_cache = encode_sft_rows(encoder, rows, cache=cfg.data.cache)
    eval_blocks = []
    if eval_table is not None:
        eval_rows = sft_rows(task, eval_table, cfg.data, "eval", require_target=True)
        eval_blocks = encode_sft_rows(encoder, eval_rows, cache=cfg.data.cache)[0]
    return TrainData(examples=examples, task=task.to_dict(), rows=len(rows), dropped_empty=dropped,
                     truncated=truncated, eval_blocks=eval_blocks, from_cache=from_cache)


def setup_pair_data(cfg: Config, tokenizer) -> Optional[TrainData]:
    """Preference pairs (train.objective dpo, ipo, orpo): every row read and checked, then, with a tokenizer, each
    pair's two answers encoded after the prompt (the chat template's turns, or prompt + answer + EOS)."""
    from peft_tuner.preference import encode_pairs

    def pairs_of(table, role: str) -> tuple[list, dict]:
        return normalize(table, cfg.data, preference=True, rows=select_rows(table.rows, cfg.data, role, label_column=None))

    table = read_table(cfg.data.train_file, "train")
    pairs, mapping = pairs_of(table, "train")
    eval_pairs = []
    if evaluates_during_training(cfg):
        if not (cfg.data.eval_file or cfg.data.eval_fraction):
            raise ConfigError("train.eval_*: needs data.eval_file or data.eval_fraction (pairs to measure the rewards on)")
        eval_pairs = pairs_of(read_table(cfg.data.eval_file, "eval") if cfg.data.eval_file else table, "eval")[0]
    if tokenizer is None:
        return None
    template = resolve_chat_template(cfg.data.chat_template, tokenizer, cfg.model.name_or_path) if cfg.data.task == "chat" else None
    if template:
        tokenizer.chat_template = template  # saved with the adapter, for generate --chat
    examples, cut = encode_pairs(tokenizer, template, pairs, cfg.data.max_length)
    notes = [f"{cut} of {len(pairs)} pairs longer than data.max_length={cfg.data.max_length}: the prompt lost its start "
             f"(one token kept), then the answer its end"] if cut else []
    task = {"kind": "preference", "objective": cfg.train.objective, "beta": cfg.train.beta, "chat_template": template,
            "data_format": mapping}
    return TrainData(examples=examples, task=task, rows=len(examples), truncated=cut, notes=notes,
                     eval_pairs=encode_pairs(tokenizer, template, eval_pairs, cfg.data.max_length)[0])

"""The default recipe's training rows and LoRA model as the trainer builds them in one CPU process, for the drivers
that time a training step by hand (teacher_batching.py, step_options.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peft_tuner.config import Config, load_config  # noqa: E402
from peft_tuner.data import Encoder, build_task, collate, collate_padding_free, encode_training_rows, prepare_split, read_table  # noqa: E402
from peft_tuner.modeling import attend_row_by_row, build_peft_model, cpu_dropout, load_base_model, load_tokenizer  # noqa: E402

DEFAULT_RECIPE = ROOT / "configs" / "twitter_complaints_smollm2.yaml"


def recipe_rows_and_model(recipe: str | Path = DEFAULT_RECIPE, overrides: list[str] | None = None
                          ) -> tuple[Config, object, list[dict], torch.nn.Module]:
    """(config, tokenizer, tokenized training examples, LoRA model in train mode); padding-free rows attend row by row
    and dropout is CpuDropout, as the trainer sets it up on a CPU."""
    cfg = load_config(str(recipe), overrides or [])
    tokenizer = load_tokenizer(cfg.model)
    table = read_table(cfg.data.train_file, "train")
    task = build_task(cfg.data, table)
    examples = encode_training_rows(Encoder(tokenizer, task, cfg.data.max_length),
                                    prepare_split(task, table, cfg.data, require_labels=True).rows)[0]
    torch.manual_seed(0)
    model = build_peft_model(load_base_model(cfg.model), cfg.peft, cfg.model, total_steps=100)
    if cfg.train.padding_free:
        attend_row_by_row(model)
    cpu_dropout(model)
    model.train()
    return cfg, tokenizer, examples, model


def micro_batch(cfg: Config, tokenizer, rows: list[dict]) -> dict:
    """The rows as the trainer collates one micro-batch."""
    return collate_padding_free(rows) if cfg.train.padding_free else collate(rows, tokenizer.pad_token_id)

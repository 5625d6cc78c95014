"""Data: sources (files, RAFT folders, hub datasets), task formats and collation."""
from peft_tuner.data.formats import (IGNORE_INDEX, ClassificationTask, Encoder, Split, build_task, collate,
                                     collate_padding_free, encode_prompt, encode_training_rows, pack_text, prepare_split,
                                     real_tokens, select_rows, text_blocks)
from peft_tuner.data.sources import DataError, Table, read_table

__all__ = ["IGNORE_INDEX", "ClassificationTask", "DataError", "Encoder", "Split", "Table", "build_task", "collate",
           "collate_padding_free", "encode_prompt", "encode_training_rows", "pack_text", "prepare_split", "read_table", "real_tokens",
           "select_rows", "text_blocks"]

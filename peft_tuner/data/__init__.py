"""Data: sources (files, RAFT folders, hub datasets), task formats (classification, text, completion, chat) and
collation."""
from peft_tuner.data.formats import (IGNORE_INDEX, ClassificationTask, Encoder, Split, boundary_advice, build_task, collate,
                                     collate_padding_free, encode_prompt, encode_training_rows, pack_text, prepare_split,
                                     real_tokens, select_rows, text_blocks)
from peft_tuner.data.sft import SftEncoder, SftTask, build_sft_task, encode_sft_rows, sft_rows
from peft_tuner.data.sources import DataError, Table, read_table

__all__ = ["IGNORE_INDEX", "ClassificationTask", "DataError", "Encoder", "SftEncoder", "SftTask", "Split", "Table",
           "boundary_advice",
           "build_sft_task", "build_task", "collate", "collate_padding_free", "encode_prompt", "encode_sft_rows",
           "encode_training_rows", "pack_text", "prepare_split", "read_table", "real_tokens", "select_rows", "sft_rows",
           "text_blocks"]

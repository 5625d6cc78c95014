"""The GPU numbers in one prepared run that fits a lent machine's minutes: our training step at real size against itself
(eager, train.compile, train.liger_kernels, both), at two micro-batches, against the Trainer and TRL's SFTTrainer on
the same workload, and an 8B-shaped Llama under ZeRO-3 (bf16 and nf4 bases) whose gathered adapter is saved and
reloaded. Each case prints its line as soon as it ends and is appended to bench/results/gpu_numbers.jsonl; a case
whose usual time no longer fits --budget is skipped and said so; the table goes to docs/benchmarks.md at the end.

    python bench/gpu_numbers.py --data DATA_ROOT [--budget 480]     # a GPU (DATA_ROOT holds wikitext-2/ and raft/)
    python bench/gpu_numbers.py --dry-run                           # the same cases on a tiny Llama, on a CPU

Workload: a random Llama of TinyLlama-1.1B's shape (bench/step_mfu.py builds it), bf16 weights, LoRA r=16 (alpha 32,
dropout 0.05) on every linear layer, WikiText-2 blocks of 1024 tokens, padding-free, 16 (and 8) blocks a step.
A machine without network access needs the packages it lacks as wheels in one folder, installed first:
    pip install --no-index --no-deps --target SITE WHEELS/*.whl     # transformers, peft, deepspeed, accelerate, trl,
    PYTHONPATH=SITE:. python bench/gpu_numbers.py --data DATA_ROOT  # liger-kernel, bitsandbytes (their versions: README)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from report_blocks import write_between_markers  # noqa: E402  (bench/ is the script's folder)
from peft_tuner.data.sources import data_root  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu_numbers.jsonl"
MARKERS = ("<!-- gpu_numbers: begin (written by bench/gpu_numbers.py) -->", "<!-- gpu_numbers: end -->")


def cases(dry: bool) -> list[dict]:
    """(name, what runs, the seconds it usually takes on an H100 / H200, start included): in the order they run."""
    size = {"model": "tiny", "block": 64, "big": 4, "small": 2, "steps": 3, "dtype": "fp32"} if dry else \
        {"model": "llama-1b", "block": 1024, "big": 16, "small": 8, "steps": 10, "dtype": "bf16"}
    big = "tiny" if dry else "llama-8b"
    ours = dict(kind="ours", model=size["model"], block=size["block"], batch=size["big"], steps=size["steps"], dtype=size["dtype"])
    return [
        dict(ours, name="ours eager", seconds=70),
        dict(ours, name="ours compiled", compile=True, seconds=170),
        dict(ours, name="ours Liger", liger=True, seconds=70),
        dict(ours, name="ours compiled + Liger", compile=True, liger=True, seconds=170),
        dict(ours, name="ours eager, half the blocks", batch=size["small"], seconds=60),
        dict(ours, kind="peer", name="Trainer", loop="hf-trainer", seconds=80),
        dict(ours, kind="peer", name="TRL SFTTrainer", loop="trl-sft", seconds=80),
        dict(ours, name="8B shape, ZeRO-3", model=big, zero3=True, verify=True, steps=2, batch=4 if not dry else 2,
             seconds=240),
        dict(ours, name="8B shape, ZeRO-3, nf4 base", model=big, zero3=True, verify=True, steps=2, batch=4 if not dry else 2,
             quantization="nf4", seconds=240),
    ]


def run_case(case: dict, data: Path, timeout: float) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if case["kind"] == "peer":
        from step_mfu import model_folder  # noqa: E402  (bench/)

        folder = model_folder(case["model"], None, data, case["dtype"])
        cmd = [sys.executable, str(ROOT / "bench" / "peer_steps.py"), "--loop", case["loop"], "--model", str(folder),
               "--data", str(data), "--block", str(case["block"]), "--batch", str(case["batch"]),
               "--steps", str(case["steps"]), "--dtype", case["dtype"]]
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "step_mfu.py"), "--models", case["model"], "--workloads", "wikitext",
               "--dtype", case["dtype"], "--batch", str(case["batch"]), "--block", str(case["block"]),
               "--steps", str(case["steps"]), "--data", str(data), "--no-write", "--results", os.devnull]
        cmd += [flag for key, flag in (("compile", "--compile"), ("liger", "--liger"), ("zero3", "--zero3"),
                                       ("verify", "--verify")) if case.get(key)]
        cmd += ["--quantization", case.get("quantization", "none")]
    began = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"stopped after {timeout:.0f} s (the budget)"}
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": said[-300:], "seconds": round(time.time() - began, 1)}
    lines = [line.removeprefix("RESULT ") for line in proc.stdout.splitlines() if line.startswith(("{", "RESULT "))]
    result = json.loads(lines[-1])
    result["seconds"] = round(time.time() - began, 1)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(data_root()))
    p.add_argument("--budget", type=float, default=480, help="seconds for all the cases")
    p.add_argument("--dry-run", action="store_true", help="the cases on a tiny Llama (a CPU's check of the script)")
    p.add_argument("--only", nargs="+", help="only the cases whose name starts with one of these")
    p.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = p.parse_args()
    import torch

    started, data = time.time(), Path(args.data).resolve()
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    done = []
    for case in cases(args.dry_run):
        if args.only and not case["name"].startswith(tuple(args.only)):
            continue
        left = args.budget - (time.time() - started)
        if case["seconds"] > left and not args.dry_run:
            result = {"skipped": f"needs about {case['seconds']} s, {left:.0f} s of the budget left"}
        else:
            result = run_case(case, data, timeout=max(left, 30) if not args.dry_run else 900)
        record = {"run": run, "machine": machine, "case": case["name"], "settings": case, **result}
        done.append(record)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(line_of(record), flush=True)
    if not args.no_write:
        write_between_markers(table(done, " ".join(sys.argv[1:])), MARKERS, title="GPU numbers")
    return 0


def line_of(r: dict) -> str:
    if "skipped" in r:
        return f"{r['case']}: skipped ({r['skipped']})"
    said = f"{r['case']}: {r['tokens_per_second']:.0f} real tokens/s, {r['median_step_seconds']:.3f} s/step"
    if r.get("datasheet_tflops"):
        said += f", datasheet MFU {r['model_tflops'] / r['datasheet_tflops']:.1%}"
    if r.get("peak_memory_gb") is not None:
        said += f", peak {r['peak_memory_gb']:.1f} GB"
    if r.get("adapter_max_logit_diff") is not None:
        said += f", adapter reload check {r['adapter_max_logit_diff']:.2e}"
    return said + f" ({r['seconds']} s)"


def table(records: list[dict], argv: str) -> str:
    eager = next((r for r in records if r["case"] == "ours eager" and "skipped" not in r), None)
    lines = [f"Run {records[0]['run'] if records else '-'}: `python bench/gpu_numbers.py {argv}` on "
             f"{records[0]['machine'] if records else '-'}.", "",
             "| case | real tokens/s | s / step | datasheet MFU | peak memory (GB) | / ours eager | losses against eager | "
             "adapter reload check |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} | | | | | | |")
            continue
        mfu = f"{r['model_tflops'] / r['datasheet_tflops']:.1%}" if r.get("datasheet_tflops") else "-"
        ratio = f"{r['tokens_per_second'] / eager['tokens_per_second']:.2f}x" if eager else "-"
        same_data = eager and r["settings"].get("model") == eager["settings"]["model"] and r.get("losses")
        drift = (f"{max(abs(a - b) for a, b in zip(r['losses'], eager['losses'])):.2e}" if same_data
                 and r["settings"].get("batch") == eager["settings"]["batch"] else "-")
        peak = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
        check = f"{r['adapter_max_logit_diff']:.2e}" if r.get("adapter_max_logit_diff") is not None else "-"
        lines.append(f"| {r['case']} | {r['tokens_per_second']:.0f} | {r['median_step_seconds']:.3f} | {mfu} | {peak} | "
                     f"{ratio} | {drift} | {check} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

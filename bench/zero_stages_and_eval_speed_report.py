"""Collect the figures bench/zero_stages_and_eval_speed.sh measured into docs/benchmarks.md, between its markers (the
text around them is kept)."""
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_blocks import write_between_markers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "outputs" / "bench"
MARKERS = ("<!-- zero_stages_and_eval_speed: begin (written by bench/zero_stages_and_eval_speed_report.py) -->",
           "<!-- zero_stages_and_eval_speed: end -->")
lines = [f"Measured by `bash bench/zero_stages_and_eval_speed.sh` on {platform.machine()}, "
         f"{torch.get_num_threads()} threads visible, torch {torch.__version__}, no GPU. SmolLM2-135M-Instruct, "
         "RAFT twitter_complaints. Peak memory is each process's peak resident memory on the CPU.", "",
         "### Training under DeepSpeed, 2 processes x 4 sequences, LoRA r=8 on q_proj,v_proj, fp32", "",
         "| ZeRO stage | steps | mean s/step (first step left out) | peak memory per process | final loss |", "|---|---|---|---|---|"]
for stage in (2, 3):
    s = json.loads((OUT / f"zero{stage}" / "summary.json").read_text())
    lines.append(f"| {stage} | {s['steps_done']} | {s['mean_step_seconds']:.2f} | {s['peak_memory_gb']:.2f} GB | {s['final_loss']:.4f} |")
lines += ["", "### Evaluation (bf16, 1 process)", "", "| data | method | rows | classes | examples/s | peak memory | accuracy |",
          "|---|---|---|---|---|---|---|"]
for name, classes in (("eval_rank", 2), ("eval_generate", 2), ("test_twitter", 2), ("test_banking77", 77)):
    files = list((OUT / name).glob("metrics_*.json"))
    m = json.loads(files[0].read_text())
    accuracy = f"{m['accuracy']:.4f}" if "accuracy" in m else "- (unlabelled)"
    lines.append(f"| {m['source']} | {m['method']} | {m['rows']} | {classes} | {m['examples_per_second']} | "
                 f"{m['peak_memory_gb']:.2f} GB | {accuracy} |")
write_between_markers("\n".join(lines), MARKERS)
print("\n".join(lines))

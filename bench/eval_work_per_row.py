"""How much work does each evaluation do per dev row? On a CPU a forward is bound by its matrix multiplies, so the
token positions a method pushes through the model set its speed. Counted here, with the default recipe's tokenizer
on the 300 dev rows of RAFT twitter_complaints (no model run, no timing):

- ours, rank classification: each prompt's real tokens (sorted by length, padded within a batch of eval.batch_size),
  then the class names as one token tree fed after the prompt's cache;
- the PEFT example's evaluation (bench/speed_vs_peers.py reproduces it): every prompt left-padded to 64 tokens, then
  one position per decoded token, between the shortest class name and the 10 tokens it allows.

    .venv/bin/python bench/eval_work_per_row.py          # seconds

Writes its table to docs/benchmarks.md between the eval_work_per_row markers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peft_tuner.config import load_config  # noqa: E402
from peft_tuner.data import Encoder, build_task, prepare_split, read_table  # noqa: E402
from peft_tuner.modeling import load_tokenizer  # noqa: E402
from peft_tuner.scoring import CandidateTree  # noqa: E402
from report_blocks import write_between_markers  # noqa: E402  (bench/ is the script's folder)
from speed_vs_peers import PROMPT, SETTINGS  # noqa: E402

MARKERS = ("<!-- eval_work_per_row: begin (written by bench/eval_work_per_row.py) -->", "<!-- eval_work_per_row: end -->")
TITLE = "Evaluation: token positions computed per dev row"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "twitter_complaints_smollm2.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.recipe)
    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg.data, read_table(cfg.data.train_file, "train"))
    encoder = Encoder(tokenizer, task, cfg.data.max_length)
    dev = prepare_split(task, read_table(cfg.data.eval_file, "eval"), cfg.data, require_labels=True).rows

    # Ours: as scoring.rank_scores batches them.
    candidates = [encoder.label_ids[name] for name in task.class_names]
    reserve = max(len(c) for c in candidates)
    prompts = sorted(len(encoder.prompt_ids(row, reserve=reserve)[0]) for row in dev)
    batch = cfg.eval.batch_size
    padded = sum(max(prompts[i:i + batch]) * len(prompts[i:i + batch]) for i in range(0, len(prompts), batch))
    tree = len(CandidateTree(candidates))
    ours = padded / len(dev) + tree

    # The reference: 64 padded positions, then 1 position per decode step.
    reference_tokens = [tokenizer(PROMPT.format(row[cfg.data.text_column]))["input_ids"] for row in dev]
    cut = sum(len(t) > SETTINGS["max_length"] for t in reference_tokens)
    shortest_answer = min(len(tokenizer(name)["input_ids"]) + 1 for name in task.class_names)  # + the end token
    low, high = SETTINGS["max_length"] + shortest_answer, SETTINGS["max_length"] + SETTINGS["new_tokens"]

    lines = [f"`.venv/bin/python bench/eval_work_per_row.py`: the recipe `{Path(args.recipe).relative_to(ROOT)}`, its "
             f"tokenizer, the {len(dev)} rows of `{Path(cfg.data.eval_file).name}`.", "",
             "| evaluation | token positions per row | of which |", "|---|---|---|",
             f"| ours, rank classification (eval.batch_size {batch}) | {ours:.1f} | {statistics.mean(prompts):.1f} real prompt "
             f"tokens (median {statistics.median(prompts):.0f}, longest {max(prompts)}), {padded / len(dev) - statistics.mean(prompts):.1f} "
             f"padding, {tree} tree nodes for the {len(candidates)} class names |",
             f"| the PEFT example, generate | {low} to {high} | {SETTINGS['max_length']} padded prompt positions "
             f"({cut} prompts cut at {SETTINGS['max_length']}), then {shortest_answer} to {SETTINGS['new_tokens']} decode steps |",
             "", f"Work ratio, reference / ours: {low / ours:.2f}x to {high / ours:.2f}x: the most rank classification can "
             "gain where every position costs the same (a compute-bound CPU); decode steps cost more than prefill "
             "positions only where weight reads, not multiplies, bound the step."]
    print("\n".join(lines))
    write_between_markers("\n".join(lines), MARKERS, title=TITLE)


if __name__ == "__main__":
    main()

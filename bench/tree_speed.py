"""Rank classification on banking_77 (77 classes): the token tree against a copy of the prompt's cache per candidate,
on the same rows of the test split with the base SmolLM2 model. The figures in docs/benchmarks.md came from

    OMP_NUM_THREADS=2 python bench/tree_speed.py --rows 24 --dtype bf16
    OMP_NUM_THREADS=2 python bench/tree_speed.py --rows 6 --dtype fp32
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import peft_tuner.evaluate as ev  # noqa: E402
import peft_tuner.scoring as scoring  # noqa: E402
from peft_tuner.config import load_config  # noqa: E402
from peft_tuner.data import Encoder, read_table  # noqa: E402
from peft_tuner.modeling import load_for_inference  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, default=24)
parser.add_argument("--dtype", default="bf16")
args = parser.parse_args()
data = "../shared/data/raft/banking_77"
cfg = load_config(str(ROOT / "configs" / "twitter_complaints_smollm2.yaml"),
                  [f"eval.dtype={args.dtype}", f"data.train_file={data}", "data.text_column=Query", "data.label_column=Label",
                   'data.prompt_template="Query : {Query} Label : "', "data.max_length=96"])
torch.set_num_threads(2)
model, tokenizer, _ = load_for_inference(cfg)
encoder = Encoder(tokenizer, ev.load_task(cfg, None), cfg.data.max_length)
rows = read_table(data, "test").rows[: args.rows]
started = time.time()
tree = scoring.rank_scores(model, encoder, rows, 8)
tree_seconds = time.time() - started
scoring.takes_tree_mask = lambda _model: False  # the per-candidate cache path
started = time.time()
cache = scoring.rank_scores(model, encoder, rows, 8)
cache_seconds = time.time() - started
print(f"{args.dtype}, {len(rows)} rows: tree {len(rows) / tree_seconds:.2f} examples/s, per-candidate cache "
      f"{len(rows) / cache_seconds:.2f}; largest score difference {(tree - cache).abs().max():.4f}, "
      f"same argmax {(tree.argmax(1) == cache.argmax(1)).float().mean():.3f}")

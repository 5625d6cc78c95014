"""Launcher script: `deepspeed launch/train.py RECIPE`, `accelerate launch ...`, `torchrun ...`, `mpirun ...`, `python ...`.

Every launcher runs the same loop (peft_tuner.trainer); they differ only in how the process group comes up.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from peft_tuner.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["train", *sys.argv[1:]])

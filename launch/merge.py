"""Launcher script: `python launch/merge.py ...`, the same as `peft-tuner merge ...` (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from peft_tuner.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["merge", *sys.argv[1:]])

"""Launcher script: `python launch/generate.py ...`, the same as `peft-tuner generate ...` (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from peft_tuner.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(["generate", *sys.argv[1:]])

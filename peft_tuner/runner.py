"""A training run as a child process, for the jobs that chain several runs (the demo, distill): the same
`launch/train.py` a user would start, under torchrun when it takes several processes.

torchrun --standalone binds its rendezvous port itself (port 0) and its workers join through that open socket, so no
port is picked, released and bound again later (another job can take it in between). A stop signal is passed to the
run's whole process group, so each worker saves a checkpoint before it exits.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_PREFIXES = ("peft-tuner train |", "done |", "epoch ", "stopped by signal")


def training_command(recipe, overrides: list[str], processes: int, resume: bool) -> list[str]:
    """`python launch/train.py ...` for one process; torchrun with ZeRO-2 for several (GPUs where there are, else CPU
    processes over gloo)."""
    script = [str(ROOT / "launch" / "train.py"), str(recipe), *overrides, "--resume" if resume else "--overwrite"]
    if processes == 1:
        return [sys.executable, *script]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--standalone", "--nproc-per-node", str(processes), *script,
            "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]


def train_in_subprocess(recipe, overrides: list[str], processes: int, train_dir: Path, resume: bool = False) -> dict:
    """Train into `train_dir` and return its summary.json. With `resume`, continue from train_dir's newest checkpoint;
    else a run already in train_dir is replaced. The run's summary lines are shown as they come; on failure, the
    error carries the command and the last 40 lines of its output."""
    cmd = training_command(recipe, overrides, processes, resume)
    cores = os.cpu_count() or processes
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))}
    proc = subprocess.Popen(cmd, env=env, cwd=Path.cwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, which a stop signal reaches whole
    lines = []
    started = time.time()
    with stop_signals_passed_to(proc) as stopped:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(SUMMARY_PREFIXES):
                print("      " + line.rstrip(), flush=True)
        proc.wait()
    if stopped:
        from peft_tuner.checkpoint import CHECKPOINT_DIR

        latest = train_dir / CHECKPOINT_DIR / "latest"
        saved = latest.is_file() and latest.stat().st_mtime >= started
        print(f"stopped: the training run in {train_dir} " + ("saved a checkpoint first" if saved
              else f"exited with {proc.returncode} before it saved a checkpoint"), flush=True)
        raise SystemExit(143)
    summary_file = train_dir / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(summary_file.read_text())


@contextlib.contextmanager
def stop_signals_passed_to(proc: subprocess.Popen):
    """Ctrl-C or SIGTERM while a training run works: the run's process group is told (SIGTERM: each worker saves a
    checkpoint at its next step and exits 143), and its output is read until it has. Dying at once would close the
    pipe it writes to, and it would die on its next line, before its checkpoint. Yields the signals received."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals are not ours to take
            pass
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

"""A training run as a child process, for the jobs that chain several runs (the demo, distill): the same
`launch/train.py` a user would start, under torchrun when it takes several processes.

torchrun --standalone binds its rendezvous port itself (port 0) and its workers join through that open socket, so no
port is picked, released and bound again later (another job can take it in between). A stop signal is passed to the
run's whole process group, so each worker saves a checkpoint before it exits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

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


@dataclasses.dataclass
class Run:
    """One training run: its name in the output, the recipe's overrides, its folder, and whether it continues from
    the folder's newest checkpoint (else a run already there is replaced)."""
    name: str
    overrides: list[str]
    train_dir: Path
    resume: bool = False


def train_in_subprocess(recipe, overrides: list[str], processes: int, train_dir: Path, resume: bool = False,
                        cpu_tuning="auto") -> dict:
    """Train into `train_dir` and return its summary.json (one run of train_in_subprocesses)."""
    return train_in_subprocesses(recipe, [Run("", overrides, train_dir, resume)], processes, cpu_tuning=cpu_tuning)[0]


def train_in_subprocesses(recipe, runs: list[Run], processes: int, at_once: int = 1, cpu_tuning="auto") -> list[dict]:
    """Train `runs`, `at_once` of them at a time, and return their summaries in order. On a CPU the cores are shared
    out between the processes that run together (runtime.threads_for_runs_at_once, unless train.cpu_tuning, here
    `cpu_tuning`, leaves threads out). The runs' summary lines are shown as they come, named when several run. A failed
    run stops the others (each saves a checkpoint), then its error carries the command and its last 40 lines of
    output."""
    from peft_tuner.runtime import threads_for_runs_at_once

    pending, started, running, failed = list(runs), [], [], None
    with stop_signals_passed_to(running) as stopped:
        while pending or running:
            while pending and len(running) < at_once and not stopped and failed is None:
                together = min(at_once, len(pending) + len(running))
                proc = _start(recipe, pending.pop(0), processes, threads_for_runs_at_once(processes, together, cpu_tuning),
                              at_once > 1)
                started.append(proc)
                running.append(proc)
                if stopped:  # the signal came while it started
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                running.remove(proc)
                proc.reader.join()
                if (proc.returncode != 0 or not (proc.run.train_dir / "summary.json").is_file()) and failed is None \
                        and not stopped:
                    failed = proc
                    for other in running:  # they save a checkpoint and exit 143
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(other.pid, signal.SIGTERM)
            if not running and (stopped or failed is not None):
                break
    if stopped:
        from peft_tuner.checkpoint import CHECKPOINT_DIR

        for proc in [p for p in started if p.returncode != 0]:  # those the signal stopped
            latest = proc.run.train_dir / CHECKPOINT_DIR / "latest"
            saved = latest.is_file() and latest.stat().st_mtime >= proc.started
            print(f"stopped: the training run in {proc.run.train_dir} " + ("saved a checkpoint first" if saved
                  else f"exited with {proc.returncode} before it saved a checkpoint"), flush=True)
        raise SystemExit(143)
    if failed is not None:
        tail = "\n".join(failed.lines[-40:])
        raise RuntimeError(f"training failed (exit {failed.returncode}): {' '.join(failed.args)}\n{tail}")
    return [json.loads((run.train_dir / "summary.json").read_text()) for run in runs]


def _start(recipe, run: Run, processes: int, threads: Optional[int], named: bool) -> subprocess.Popen:
    """The run as a child process in its own process group (which a stop signal reaches whole), its output read by a
    thread: kept, and its summary lines shown."""
    import threading

    proc = subprocess.Popen(training_command(recipe, run.overrides, processes, run.resume),
                            env={**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}, cwd=Path.cwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.run, proc.started, proc.lines = run, time.time(), []
    prefix = f"      [{run.name}] " if named else "      "

    def read():
        for line in proc.stdout:
            proc.lines.append(line.rstrip())
            if line.startswith(SUMMARY_PREFIXES):
                print(prefix + line.rstrip(), flush=True)

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    return proc


@contextlib.contextmanager
def stop_signals_passed_to(procs: list[subprocess.Popen]):
    """Ctrl-C or SIGTERM while training runs work: each run's process group (`procs` as they are then) is told
    (SIGTERM: each worker saves a checkpoint at its next step and exits 143), and their output is read until they have.
    Dying at once would close the pipe a run writes to, and it would die on its next line, before its checkpoint.
    Yields the signals received."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        for proc in list(procs):
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

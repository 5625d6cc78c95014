"""Crashes cost minutes, not the run: SIGKILL at a step or inside a checkpoint write, then --resume, ends with the same
adapter as a run never interrupted (1 process, and 2 processes under ZeRO-2 and ZeRO-3); SIGTERM checkpoints and exits
cleanly; a changed config is refused; a non-finite loss stops before touching the weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, ds_config, launch_command, records, run, step_losses, summary, write_recipe

pytestmark = pytest.mark.slow  # trains in subprocesses (pytest -m "not slow" leaves it out)

# (launcher, ZeRO stage, arch, micro batch, where the run is killed); the reference is the uninterrupted launcher run.
CRASHES = [
    ("python", 0, "llama", 8, "after_step:5"),
    ("python", 0, "llama", 8, "in_checkpoint:4"),   # leaves a half-written checkpoint behind
    ("deepspeed", 2, "gpt2", 4, "after_step:3:1"),  # rank 1 dies
    ("deepspeed", 3, "llama", 4, "after_step:5:0"),
]
RESUME_TOLERANCE = 1e-6


def crash_recipe(tmp_path, tiny_models, data_dir, arch, batch_size, **extra):
    return write_recipe(tmp_path / "recipe.yaml", tiny_models[arch], data_dir / "raft", tmp_path / "run",
                        train={"batch_size": batch_size, "epochs": 4, "checkpoint_steps": 2, **extra})


def train_command(launcher, stage, recipe):
    cmd = launch_command(launcher, stage=stage) + [str(recipe)]
    return cmd + (["--deepspeed", ds_config(f"zero{stage}.json")] if launcher != "python" else [])


@pytest.mark.parametrize("launcher,stage,arch,batch_size,kill_at", CRASHES,
                         ids=[f"{c[0]}-zero{c[1]}-{c[4].replace(':', '-')}" for c in CRASHES])
def test_killed_run_resumes_to_the_same_adapter(trained, tiny_models, data_dir, tmp_path, launcher, stage, arch,
                                                batch_size, kill_at):
    reference, _ = trained(launcher, stage, arch, batch_size)
    recipe = crash_recipe(tmp_path, tiny_models, data_dir, arch, batch_size)
    killed = run(train_command(launcher, stage, recipe), env={"PEFT_TUNER_KILL_AT": kill_at}, timeout=300, check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "run" / "adapter").exists()
    if kill_at.startswith("in_checkpoint"):
        assert list((tmp_path / "run" / "checkpoints").glob(".tmp-step-*"))  # the half-written one is there ...
    resumed = run(train_command(launcher, stage, recipe) + ["--resume"], timeout=300)
    starts = [r for r in records(tmp_path / "run") if r.get("event") == "start"]
    assert starts[-1]["start_step"] > 0 and starts[-1]["tokenized_from_cache"]  # the same rows: read, not tokenized
    if kill_at.startswith("in_checkpoint"):
        assert "half-written checkpoint" in resumed.stderr  # ... and was skipped with a warning
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= RESUME_TOLERANCE, worst
    assert step_losses(tmp_path / "run")[-1] == pytest.approx(step_losses(reference)[-1], abs=1e-6)
    assert summary(tmp_path / "run")["steps_done"] == 8
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(kept) <= 2  # train.keep_checkpoints


def test_resume_refuses_a_checkpoint_of_another_run(tiny_models, data_dir, tmp_path):
    recipe = crash_recipe(tmp_path, tiny_models, data_dir, "llama", 8)
    run(train_command("python", 0, recipe), env={"PEFT_TUNER_KILL_AT": "after_step:3"}, check=False, timeout=200)
    changed = run(train_command("python", 0, recipe) + ["--resume", "train.learning_rate=0.001", "peft.r=8"], check=False)
    assert changed.returncode == 2
    assert "train.learning_rate: checkpoint has 0.05, this run has 0.001" in changed.stderr
    assert "peft.r: checkpoint has 4, this run has 8" in changed.stderr
    wider = run(train_command("torchrun", 0, recipe) + ["--resume"], check=False, timeout=200)
    assert wider.returncode != 0 and "checkpoint was written by 1 processes, this run has 2" in wider.stderr
    fresh = run(train_command("python", 0, recipe), check=False)
    assert fresh.returncode == 2 and "already holds a run; pass --resume" in fresh.stderr


def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tiny_models, data_dir, tmp_path):
    recipe = crash_recipe(tmp_path, tiny_models, data_dir, "llama", 8, epochs=300, checkpoint_steps=0, log_steps=1)
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(train_command("python", 0, recipe), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count('"event": "step"') >= 3):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"no 3 logged steps within 120 s (exit {proc.poll()}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Continue with the same command plus --resume" in out
    stopped_at = len(step_losses(tmp_path / "run"))
    assert 3 <= stopped_at < 600
    run(train_command("python", 0, recipe) + ["--resume"], timeout=300)
    assert summary(tmp_path / "run")["steps_done"] == 600
    assert len(step_losses(tmp_path / "run")) == 600  # each step logged once


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_models, data_dir, tmp_path):
    recipe = crash_recipe(tmp_path, tiny_models, data_dir, "llama", 8, learning_rate=1e30, checkpoint_steps=1,
                          max_grad_norm=0.0)  # with every weight training, step 1 makes the logits overflow
    recipe.write_text(recipe.read_text().replace("method: lora", "method: full"))
    proc = run(train_command("python", 0, recipe), check=False, timeout=200)
    assert proc.returncode == 2
    assert "error: loss is nan at step 2 (epoch 1); weights not updated. Last good checkpoint:" in proc.stderr
    pointer = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert pointer in proc.stderr and not (tmp_path / "run" / "adapter").exists()
    saved = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 1e30


def build_locks(root, ages: list[float]) -> list:
    """Build lock files of three ops under a torch extensions folder, each `ages[i]` seconds old."""
    locks = [root / "py311_cpu" / op / "lock" for op in ("deepspeed_shm_comm", "cpu_adam", "fused_adam")]
    for lock, age in zip(locks, ages):
        lock.parent.mkdir(parents=True)
        lock.touch()
        os.utime(lock, (time.time() - age, time.time() - age))
    return locks


def test_a_lock_left_by_a_killed_op_build_is_removed(tmp_path, monkeypatch):
    """DeepSpeed JIT-builds its CPU ops under a lock file; a run killed midway leaves it, and the next run waited on it
    for ever (a test run that timed out during the build hung every later one). init_distributed removes a lock over a
    minute old in whose folder no process works; a build in progress keeps its lock."""
    from peft_tuner.cpu_cleanup import remove_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh, building = build_locks(tmp_path, [3600, 0, 3600])
    ninja = subprocess.Popen(["sleep", "60"], cwd=building.parent)  # stands for the build's ninja, working in its folder
    try:
        assert remove_stale_build_locks() == [str(stale)]
    finally:
        ninja.kill()
    assert not stale.exists() and fresh.exists() and building.exists()


def test_a_lock_no_process_holds_open_is_removed_while_deepspeed_comes_up(tmp_path, monkeypatch):
    """A run stopped while it checked an op's build under its lock (before its SIGTERM handler was installed) left the
    lock, and a run started meanwhile waited on it for ever. torch's FileBaton keeps the lock open while it holds it:
    a lock nobody has open is removed, by a thread that watches until DeepSpeed's communication is up."""
    import deepspeed.comm.comm as ds_comm

    from peft_tuner.cpu_cleanup import remove_stale_build_locks, watch_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    abandoned, held, fresh = build_locks(tmp_path, [10, 10, 0])
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(held)!r}); import time; time.sleep(60)"])
    try:
        time.sleep(1.0)  # the holder has opened it
        assert remove_stale_build_locks(min_age_s=2) == [str(abandoned)]
        assert held.exists() and fresh.exists()
        monkeypatch.setattr(ds_comm, "cdb", None)
        watch = watch_build_locks(poll_s=0.1, give_up_s=30)
        os.utime(fresh, (time.time() - 10, time.time() - 10))  # its owner died: the watch removes it
        deadline = time.time() + 10
        while fresh.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert not fresh.exists() and held.exists()
        monkeypatch.setattr(ds_comm, "cdb", object())  # communication is up: the watch ends
        watch.join(timeout=5)
        assert not watch.is_alive()
    finally:
        holder.kill()

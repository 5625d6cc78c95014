"""Two "nodes" on one machine, one process each: `torchrun --nnodes 2 --node_rank N --master_addr 127.0.0.1` and
DeepSpeed's own launcher with `--no_ssh --node_rank N` (a hostfile naming two nodes), at ZeRO-2 and ZeRO-3.

Each run sees the same global batches as the 1-process run and gives its losses; every node exits 0 (a scheduler counts
a node that aborts at exit as a failed job, so the ZeRO-3 run is repeated). A node that cannot see output_dir as rank 0
does is refused before the model loads.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from conftest import BIN, ROOT, ds_config, free_port, step_losses, summary, write_recipe

pytestmark = pytest.mark.slow  # trains in subprocesses (pytest -m "not slow" leaves it out)

RUNS = [("torchrun", 2), ("torchrun", 3), ("deepspeed", 2), ("deepspeed", 3), ("torchrun", 3), ("deepspeed", 3)]


def node_command(launcher: str, node: int, port: int, hostfile) -> list[str]:
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def run_two_nodes(launcher: str, args: list[list[str]], tmp_path, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Both nodes at once (args[n] after the launcher for node n); each in its own process group, killed on timeout."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    children = [subprocess.Popen(node_command(launcher, node, port, hostfile) + args[node], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
                for node in (0, 1)]
    try:
        outputs = [child.communicate(timeout=timeout) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
    return [subprocess.CompletedProcess(c.args, c.returncode, out, err) for c, (out, err) in zip(children, outputs)]


@pytest.mark.parametrize("launcher,stage", RUNS, ids=[f"{l}-zero{s}-{i}" for i, (l, s) in enumerate(RUNS)])
def test_two_nodes_train_as_one_process_does_and_every_node_exits_cleanly(trained, tiny_models, data_dir, tmp_path,
                                                                           launcher, stage):
    one_process, _ = trained("python", 0, "llama", batch_size=8)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], data_dir / "raft", tmp_path / "run",
                          train={"batch_size": 4, "epochs": 4})
    args = [str(ROOT / "launch/train.py"), str(recipe), "--deepspeed", ds_config(f"zero{stage}.json")]
    nodes = run_two_nodes(launcher, [args, args], tmp_path)
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        assert "terminate called" not in proc.stderr
    s = summary(tmp_path / "run")
    assert (s["world_size"], s["zero_stage"]) == (2, stage) and s["adapter_max_logit_diff"] < 1e-4
    assert step_losses(tmp_path / "run") == pytest.approx(step_losses(one_process), abs=1e-4)


def test_a_node_that_does_not_see_output_dir_is_refused(tiny_models, data_dir, tmp_path):
    """Two nodes with a disk each: node 1's output_dir is not the folder rank 0 wrote to."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], data_dir / "raft", tmp_path / "run")
    args = [str(ROOT / "launch/train.py"), str(recipe), "--deepspeed", ds_config("zero2.json")]
    nodes = run_two_nodes("torchrun", [args, args + [f"output_dir={tmp_path / 'node1-disk'}"]], tmp_path)
    assert all(proc.returncode != 0 for proc in nodes)
    assert "rank 1 on" in nodes[0].stderr and "cannot see what rank 0 wrote there" in nodes[0].stderr
    assert "shared filesystem" in nodes[0].stderr
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "train_log.jsonl").exists()

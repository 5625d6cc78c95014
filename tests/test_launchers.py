"""One real multi-process run per launcher and ZeRO stage (2 processes on the CPU), plus one run with no launcher.

Each run: the loss goes down, the adapter is saved once with full tensors, reloads with peft, and reproduces the trained
model's logits. The ZeRO-3 run and the 1-process run see the same global batches and must give the same losses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ds_config, records, run, step_losses, summary, write_recipe

pytestmark = pytest.mark.slow  # trains in subprocesses (pytest -m "not slow" leaves it out)

# launcher, ZeRO stage, architecture, DeepSpeed file (default zero<stage>.json), overrides: every family and stage is
# covered across the launchers, and optimizer + parameter offload, gradient checkpointing and the accuracy after each epoch
# (rank classification inside the ZeRO-3 engine), NEFTune noise and the word label boundary ride along.
RUNS = [
    ("deepspeed", 2, "gpt2", None, ()),
    ("deepspeed", 3, "llama", None, ()),
    ("torchrun", 2, "bloom", "ds_configs/zero2_offload.json", ()),
    ("torchrun", 3, "opt", "ds_configs/zero3_offload.json", ("train.eval_each_epoch=true", "data.eval_file={data}/raft")),
    ("mpirun", 2, "llama", None, ("model.gradient_checkpointing=true",)),
    ("mpirun", 3, "gpt2", None, ("model.gradient_checkpointing=true", "train.lr_scheduler=cosine", "train.warmup_ratio=0.2")),
    ("accelerate", 2, "opt", None, ("train.neftune_alpha=5",)),
    ("accelerate", 3, "bloom", None, ("data.label_boundary=word",)),
]
PORT_FLAGS = ("--master_port", "--main_process_port", "MASTER_PORT")  # deepspeed and torchrun, accelerate, mpirun
LOSS_TOLERANCE = 1e-4  # 1 process vs 2 under ZeRO-3, same seed and global batch: fp32 reduction order only (seen: 1e-5)


@pytest.mark.parametrize("launcher,stage,arch,ds_file,extra", RUNS,
                         ids=[f"{r[0]}-{(r[3] or f'zero{r[1]}').split('/')[-1].removesuffix('.json')}-{r[2]}" for r in RUNS])
def test_launcher_trains_and_saves_a_loadable_adapter(trained, tiny_models, data_dir, launcher, stage, arch, ds_file,
                                                      extra):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, proc = trained(launcher, stage, arch, ds_file=ds_file, extra=extra)
    losses = step_losses(out)
    assert len(losses) == 8  # 16 rows / global batch 8 = 2 steps x 4 epochs
    assert losses[-1] < losses[0] - 0.05, losses
    s = summary(out)
    assert (s["world_size"], s["zero_stage"]) == (2, stage)
    assert s["adapter_max_logit_diff"] < 1e-4
    assert proc.stdout.count("peft-tuner train |") == 1  # rank 0 alone reports
    start = next(r for r in records(out) if r["event"] == "start")
    tuning, patches = start["cpu_tuning"], start["deepspeed_patches"]
    assert tuning["mode"] == "auto"
    # ZeRO-3 on the CPU: gathered weights get their own mappings (runtime.map_gathered_weights_apart); below it, malloc's own rule
    assert tuning["malloc"] == (2**20 if stage == 3 else None), tuning
    assert tuning["onednn_cache"] == "16"  # set before the first kernel (runtime.configure_cpu)
    assert patches == {"state": "on", "zero3_release": "indexed" if stage == 3 else None}  # deepspeed_patches
    assert start["optimizer"] == "AdamW (fused)"  # the client AdamW, fused, stepping DeepSpeed's partitions
    boundary = "word" if "data.label_boundary=word" in extra else "example"
    assert start["label_boundary"] == boundary and (boundary == "word") != bool(start["notes"]), start["notes"]
    if launcher == "deepspeed":  # no OMP_NUM_THREADS: the 2 processes on this machine take half the cores each
        alone = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], check=True,
                               capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
        assert start["cpu_threads"] == max(1, int(alone.stdout) // 2), (start["cpu_threads"], alone.stdout)
    if "train.eval_each_epoch=true" in extra:
        # the accuracy after the last epoch, measured inside the partitioned ZeRO-3 engine, is what evaluate measures
        # on the saved adapter (the 8 rows of dev.csv)
        from peft_tuner.config import load_config
        from peft_tuner.evaluate import evaluate

        evals = [r for r in records(out) if r.get("event") == "eval"]
        assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
        cfg = load_config(str(out.parent / "recipe.yaml"), [e.format(data=data_dir) for e in extra])
        after = evaluate(cfg, out / "eval_after", adapter_dir=str(out / "adapter"), quiet=True)
        assert after["n"] == 8 and evals[-1]["accuracy"] == after["accuracy"]

    port = proc.args[proc.args.index(next(a for a in proc.args if a in PORT_FLAGS)) + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # the CPU all-reduce's RAM is freed

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.numel() > 0 for t in saved.values())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models[arch]), out / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained (LoRA B starts at zero)


def test_without_cpu_tuning_and_deepspeed_patches_zero3_gives_the_same_losses(trained):
    """train.cpu_tuning=off and train.deepspeed_patches=false under partitioned ZeRO-3 on 2 processes (LoRA dropout 0,
    a base without dropout): nothing CPU-specific is set, DeepSpeed's own release walk runs, and every step's loss is
    the tuned, patched run's within 1e-5 (the cores shared differently change only the reduction order)."""
    tuned_out, _ = trained("deepspeed", 3, "llama")
    plain_out, _ = trained("deepspeed", 3, "llama", extra=("train.cpu_tuning=off", "train.deepspeed_patches=false"))
    tuned, plain = step_losses(tuned_out), step_losses(plain_out)
    assert len(plain) == len(tuned) == 8
    assert max(abs(a - b) for a, b in zip(tuned, plain)) < 1e-5, (tuned, plain)
    start = next(r for r in records(plain_out) if r["event"] == "start")
    assert start["cpu_tuning"] == {"mode": "off", "onednn_cache": None, "malloc": None, "threads": None, "dropout": 0,
                                   "short_rows_fp32": None, "eager_scoring": False}
    assert start["deepspeed_patches"] == {"state": "off", "zero3_release": "deepspeed"}
    assert next(r for r in records(tuned_out) if r["event"] == "start")["deepspeed_patches"]["zero3_release"] == "indexed"


def test_zero3_on_two_processes_matches_one_process(trained):
    z3_out, _ = trained("deepspeed", 3, "llama", batch_size=4)
    one_out, _ = trained("python", 0, "llama", batch_size=8)
    z3, one = step_losses(z3_out), step_losses(one_out)
    assert len(z3) == len(one) == 8
    assert max(abs(a - b) for a, b in zip(z3, one)) < LOSS_TOLERANCE, (z3, one)
    assert summary(one_out)["world_size"] == 1
    z3_weights = load_file(z3_out / "adapter" / "adapter_model.safetensors")
    one_weights = load_file(one_out / "adapter" / "adapter_model.safetensors")
    assert z3_weights.keys() == one_weights.keys()
    for key in z3_weights:
        torch.testing.assert_close(z3_weights[key], one_weights[key], atol=1e-4, rtol=1e-3)


LEAVE_GROUP = """
import os, sys, time
from peft_tuner import distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

def threads():  # the process group's threads (gloo's); other libraries' own threads (jemalloc's, say) do not count
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            count += "gloo" in open(f"/proc/self/task/{task}/comm").read()
        except FileNotFoundError:  # a thread that ended since the listing
            pass
    return count

before = threads()
dist.init_distributed()
LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2))  # imports torch.distributed.nn
during = threads()
dist.all_gather_objects([1])
dist.shutdown()
deadline = time.time() + 5  # a stopped thread can take a moment to end on a busy machine; a leaked one never does
while threads() > before and time.time() < deadline:
    time.sleep(0.05)
print(before, during, threads())
"""


def test_deepspeed_comes_up_without_mlflow_and_mlflow_still_imports_after():
    """DeepSpeed's autotuner imports mlflow when its module loads (seconds and about 100 MB a process); our import of
    deepspeed skips that, and mlflow (train.report_to) imports as before afterwards."""
    code = ("import sys; from peft_tuner.distributed import import_deepspeed; ds = import_deepspeed(); "
            "print('mlflow' in sys.modules, ds.__name__); import mlflow; print(mlflow.__name__ in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.stdout.split() == ["False", "deepspeed", "True"], proc.stdout + proc.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_leaving_the_process_group_stops_its_threads():
    """Modules that capture the world group in default arguments kept it alive after destroy_process_group; its gloo
    threads then ran into interpreter shutdown, where one aborted the process now and then."""
    out = subprocess.run([sys.executable, "-c", LEAVE_GROUP], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    before, during, after = map(int, out.stdout.split()[-3:])
    assert during > before, "gloo started no threads: the test no longer sees what it checks"
    assert after <= before, f"{after - before} thread(s) of the process group outlived it"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_shared_memory_that_no_process_maps_is_freed(capsys):
    """DeepSpeed's CPU all-reduce left 132 MB of /dev/shm per 2-process run; 150 runs starved the machine of RAM."""
    import mmap

    from peft_tuner.cpu_cleanup import free_orphaned_shared_memory

    base = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test{os.getpid()}_1_"
    orphan, mapped, fresh = (Path(base + str(i)) for i in range(3))
    for segment in (orphan, mapped, fresh):
        segment.write_bytes(b"x" * 4096)
    an_hour_ago = time.time() - 3600
    for segment in (orphan, mapped):
        os.utime(segment, (an_hour_ago, an_hour_ago))
    try:
        with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            free_orphaned_shared_memory()
        assert not orphan.exists()
        assert mapped.exists() and fresh.exists()  # in use, or just created by a rank that has yet to map it
        assert "segment(s) in /dev/shm" in capsys.readouterr().out
    finally:
        for segment in (orphan, mapped, fresh):
            segment.unlink(missing_ok=True)


EVERY_METHOD_UNDER_ZERO3 = """
import json, sys
from peft_tuner import distributed
from peft_tuner.config import load_config
from peft_tuner.trainer import train

distributed.shutdown = lambda: None  # the runs share one process group of one (DeepSpeed keeps the first it sees)
recipe, out, ds_file = sys.argv[1:4]
for method in ("lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "full"):
    cfg = load_config(recipe, [f"peft.method={method}", f"output_dir={out}/{method}", f"deepspeed={ds_file}",
                               "peft.num_virtual_tokens=4", "train.epochs=2", "train.eval_each_epoch=true"])
    summary = train(cfg)
    print("RESULT", json.dumps({"method": method, "zero_stage": summary["zero_stage"],
                                "adapter_max_logit_diff": summary["adapter_max_logit_diff"]}), flush=True)
"""


def test_every_method_trains_evaluates_saves_and_reloads_under_partitioned_zero3(tiny_models, data_dir, tmp_path):
    """ZeRO-3 with every weight partitioned (the tests' threshold 0): a parameter's local tensor is empty, as on a real
    model. Each method trains with rank classification after every epoch, saves gathered weights, and the reload check
    reproduces the trained logits."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_models["llama"], data_dir / "raft", tmp_path / "unused",
                          data={"eval_file": str(data_dir / "raft")})
    proc = run([sys.executable, "-c", EVERY_METHOD_UNDER_ZERO3, str(recipe), str(tmp_path), ds_config("zero3.json")],
               timeout=400)
    results = {r["method"]: r for r in (json.loads(l.split(" ", 1)[1]) for l in proc.stdout.splitlines() if l.startswith("RESULT"))}
    assert list(results) == ["lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "full"]
    for method, result in results.items():
        assert result["zero_stage"] == 3
        assert result["adapter_max_logit_diff"] < 1e-4, result
        assert [r["epoch"] for r in records(tmp_path / method) if r.get("event") == "eval"] == [1, 2]
        saved = tmp_path / method / "adapter" / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
        tensors = load_file(saved)
        assert tensors and all(t.numel() > 0 for t in tensors.values()), method


LINGERING_GROUP = """
import os, sys, torch.distributed as td
from peft_tuner import distributed as dist

if sys.argv[1] == "held":
    td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1)
    held = td.distributed_c10d._get_default_group()  # as DeepSpeed's engine and ZeRO-3 parameters hold theirs
    td.destroy_process_group()
print("threads", len(dist.process_group_threads()), flush=True)
dist.exit_process(3)
"""


@pytest.mark.parametrize("case", ["held", "none"])
def test_a_process_whose_group_threads_linger_exits_with_its_code_and_skips_finalization(case):
    """A process group referenced past destroy_process_group keeps its gloo threads; meeting interpreter finalization,
    one of them aborted the process now and then after a ZeRO-3 run had saved everything."""
    out = subprocess.run([sys.executable, "-c", LINGERING_GROUP, case], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PEFT_TUNER_DEBUG_EXIT": "1"})
    assert out.returncode == 3, out.stderr[-2000:]
    threads = int(out.stdout.split()[-1])
    skipped = "without interpreter finalization" in out.stderr
    assert (threads > 0, skipped) == ((True, True) if case == "held" else (False, False)), (threads, out.stderr[-1000:])

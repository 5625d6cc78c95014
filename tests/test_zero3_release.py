"""ZeRO-3's release decisions answered from an index of the trace (peft_tuner.deepspeed_patches) are DeepSpeed's own: on a
recorded trace of a LoRA model with every weight partitioned, for every position and several reuse distances; and
DeepSpeed's leaf modules train a LoRA on a frozen base."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, ds_config, records, run, step_losses, write_recipe

pytestmark = pytest.mark.slow  # a DeepSpeed engine in a subprocess

COMPARE = """
import inspect, json, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from peft_tuner import distributed as dist
from peft_tuner.deepspeed_patches import TraceIndex, index_release_decisions
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

dist.init_distributed()  # a group of one
assert index_release_decisions()
import deepspeed
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                       LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 2000}}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
ids = torch.randint(5, 100, (2, 12))
for _ in range(4):  # the trace is recorded in the second step and complete from the third
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
loss = engine(input_ids=ids, labels=ids).loss  # part way through a step: prefetch marks are set
coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
assert coordinator.is_complete_trace()
trace = coordinator._PartitionedParameterCoordinator__submodule_order
walk = Coordinator._PartitionedParameterCoordinator__params_to_release.deepspeed_walk
deepspeed_answer = inspect.getclosurevars(walk).nonlocals["func"].__wrapped__  # the walk itself, not its cache
fetched_for = coordinator._PartitionedParameterCoordinator__most_recent_step_id_param_fetched_for
index = TraceIndex(trace)
weight = next(p for p in model.parameters() if p.ds_numel > 1).ds_numel
compared, released, kept = 0, 0, 0
for distance in (0, 1, weight, 10 * weight, 10**9):
    coordinator._PartitionedParameterCoordinator__max_reuse_dist_in_numel = distance
    for position, module in enumerate(trace):
        for step_id in (position, position + 1):
            theirs = deepspeed_answer(coordinator, module, step_id)
            ours = index.params_to_release(module, step_id, distance, fetched_for)
            assert ours == theirs, (distance, position, step_id, sorted(ours), sorted(theirs))
            compared += 1
            released += bool(ours)
            kept += len(set(p.ds_id for p in module.parameters(recurse=False))) - len(ours)
print("RESULT", json.dumps({"modules": len(trace), "compared": compared, "released": released, "kept": kept}))
"""


def test_indexed_release_decisions_equal_deepspeeds_walk(tiny_models):
    proc = run([sys.executable, "-c", COMPARE, str(tiny_models["llama"])], timeout=300)
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT")).split(" ", 1)[1])
    assert result["modules"] > 50  # LoRA's modules in the trace, forward and backward
    assert result["compared"] == 5 * 2 * result["modules"]
    assert result["released"] > 0 and result["kept"] > 0  # both kinds of answer were compared


def test_zero3_leaf_modules_train_a_lora_on_a_frozen_base(tiny_models, data_dir, tmp_path):
    """DeepSpeed's ZeRO-3 leaf modules (here its leaf_module setting; also stage3_module_granularity_threshold, and
    the MoE blocks it makes leaves by default) gather their weights for backward only from tensors that require grad:
    with the base frozen, the first decoder layer's input has none and the first backward failed. One process, every
    weight partitioned; the losses are those of the same run without leaf modules."""
    config = json.loads(Path(ds_config("zero3.json")).read_text())
    config["zero_optimization"]["leaf_module"] = {"classes": ["LlamaDecoderLayer"]}
    leafy = tmp_path / "zero3_leaf.json"
    leafy.write_text(json.dumps(config))
    losses = {}
    for name, ds_file in (("leaf", str(leafy)), ("plain", ds_config("zero3.json"))):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_models["llama"], data_dir / "raft", tmp_path / name,
                              train={"epochs": 1, "verify_adapter": False})
        run([sys.executable, str(ROOT / "launch" / "train.py"), str(recipe), "--deepspeed", ds_file])
        start = next(r for r in records(tmp_path / name) if r["event"] == "start")
        losses[name] = (start["zero3_leaf_modules"], step_losses(tmp_path / name))
    layers = json.loads((tiny_models["llama"] / "config.json").read_text())["num_hidden_layers"]
    assert losses["leaf"][0] == layers and losses["plain"][0] == 0
    assert len(losses["leaf"][1]) > 1
    assert losses["leaf"][1] == pytest.approx(losses["plain"][1], abs=1e-6)

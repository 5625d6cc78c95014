"""ZeRO-3's release decisions answered from an index of the trace (peft_tuner.zero3_release) are DeepSpeed's own: on a
recorded trace of a LoRA model with every weight partitioned, for every position and several reuse distances."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import run

pytestmark = pytest.mark.slow  # a DeepSpeed engine in a subprocess

COMPARE = """
import inspect, json, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from peft_tuner import distributed as dist
from peft_tuner.zero3_release import TraceIndex, index_release_decisions
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

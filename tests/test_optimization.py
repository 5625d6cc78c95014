"""What the optimizer does with the recipe's settings, through the DeepSpeed engine the trainer builds (ZeRO-0 and
ZeRO-2, one process): the learning rate of every step under warmup and each schedule, AdamW's decoupled weight decay,
and gradient clipping (a step whose gradient norm exceeds train.max_grad_norm is scaled to it)."""
from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import ds_config, run, write_recipe

pytestmark = pytest.mark.slow  # a DeepSpeed engine in a subprocess

ENGINE_CASES = """
import json, sys, torch
from peft_tuner import distributed as dist
from peft_tuner.config import load_config
from peft_tuner.ds_config import read_deepspeed_file, resolve_deepspeed_config
from peft_tuner.engine import setup_engine
from peft_tuner.modeling import build_peft_model, load_base_model

class Recording(torch.optim.AdamW):
    '''The client AdamW, noting the norm of the gradients each step is given (after DeepSpeed's clipping).'''
    norms = []

    def step(self, closure=None):
        grads = [p.grad.float() for g in self.param_groups for p in g["params"] if p.grad is not None]
        Recording.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return super().step(closure)

torch.optim.AdamW = Recording  # the one setup_engine builds
dist.init_distributed()  # a group of one
recipe, zero0, zero2 = sys.argv[1:4]
ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33], [6, 10, 14, 18, 22, 26, 30, 34]])

def engine_for(overrides, ds_file, total_steps=8):
    cfg = load_config(recipe, overrides)
    ds = resolve_deepspeed_config(read_deepspeed_file(ds_file), cfg, 1, ds_file)
    torch.manual_seed(0)
    model = build_peft_model(load_base_model(cfg.model), cfg.peft, cfg.model, total_steps)
    return setup_engine(model, ds, cfg, total_steps), model

out = {}
for scheduler in ("linear", "cosine", "constant"):  # the rate each of 8 steps uses, with 2 steps of warmup
    engine, _ = engine_for([f"train.lr_scheduler={scheduler}", "train.warmup_ratio=0.25", "train.learning_rate=0.1"], zero0)
    rates = []
    for _ in range(8):
        rates.append(engine.get_lr()[0])
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    out[f"rates_{scheduler}"] = rates
for name, ds_file in (("zero0", zero0), ("zero2", zero2)):
    engine, model = engine_for(["train.weight_decay=0.5", "train.learning_rate=0.1", "train.lr_scheduler=constant"], ds_file)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    engine.backward(sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0)  # no gradient: decay alone
    engine.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    out[f"decay_{name}"] = max(float((after[n] - before[n] * (1 - 0.1 * 0.5)).abs().max()) for n in before)
    norms = {}
    for clip in (0.0, None):
        limit = 0.0 if clip == 0.0 else norms[0.0] / 10
        engine, _ = engine_for([f"train.max_grad_norm={limit}"], ds_file)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        norms[clip] = Recording.norms[-1]
        out[f"clip_{name}_{'off' if clip == 0.0 else 'on'}"] = (limit, Recording.norms[-1])
print("RESULT", json.dumps(out))
"""


@pytest.fixture(scope="module")
def engine_cases(tiny_models, data_dir, tmp_path_factory):
    recipe = write_recipe(tmp_path_factory.mktemp("optimization") / "recipe.yaml", tiny_models["llama"], data_dir / "raft",
                          tmp_path_factory.mktemp("unused"))
    proc = run([sys.executable, "-c", ENGINE_CASES, str(recipe), ds_config("zero0.json"), ds_config("zero2.json")],
               timeout=300)
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT")).split(" ", 1)[1])


def test_warmup_then_each_schedule_gives_the_rates_of_its_formula(engine_cases):
    """train.warmup_ratio=0.25 of 8 steps: 2 steps rising linearly from 0; then linear decay to 0, a cosine half-wave,
    or the constant peak."""
    peak, total, warmup = 0.1, 8, 2
    expected = {
        "linear": [peak * k / warmup if k < warmup else peak * (total - k) / (total - warmup) for k in range(total)],
        "cosine": [peak * k / warmup if k < warmup else
                   peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) for k in range(total)],
        "constant": [peak * k / warmup if k < warmup else peak for k in range(total)],
    }
    for scheduler, rates in expected.items():
        assert engine_cases[f"rates_{scheduler}"] == pytest.approx(rates, abs=1e-9), scheduler


def test_weight_decay_shrinks_the_weights_by_lr_times_decay_without_a_gradient(engine_cases):
    """AdamW's decoupled decay: with a zero gradient, a step multiplies each trainable weight by (1 - lr x decay)."""
    assert engine_cases["decay_zero0"] < 1e-7
    assert engine_cases["decay_zero2"] < 1e-7


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_a_gradient_above_max_grad_norm_is_scaled_to_it(engine_cases, stage):
    _, unclipped = engine_cases[f"clip_{stage}_off"]
    limit, clipped = engine_cases[f"clip_{stage}_on"]
    assert unclipped > 10 * limit * 0.999  # the limit is a tenth of the gradient's own norm
    assert clipped == pytest.approx(limit, rel=1e-3)

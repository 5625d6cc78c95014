"""Hardware decisions (peft_tuner.runtime): dtype `auto` and autocast follow the machine; the CPU tuning applies each of
its settings only when train.cpu_tuning asks for it, records it, and leaves what the user set alone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from peft_tuner import runtime
from peft_tuner.config import ConfigError, ModelConfig, PeftSettings, load_config
from peft_tuner.modeling import build_peft_model, load_base_model

RECIPE = str(ROOT / "configs" / "twitter_complaints_smollm2.yaml")


@pytest.fixture
def cpu_machine(monkeypatch):
    """No GPU, whatever this machine has; the CPU tuning of the test put back to off afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)  # put back as it was afterwards
    yield
    runtime.configure_cpu("off")


def machine_with(monkeypatch, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def test_eval_dtype_auto_is_bf16_only_where_the_machine_computes_it(monkeypatch, cpu_machine):
    """Emulated bf16 is slow (5x slower than fp32 for SmolLM2 scoring on an AVX2-only CPU): `auto` takes bf16 only where
    the GPU supports it or the CPU has AVX-512 BF16 / AMX, else model.dtype; an explicit dtype is kept as written."""
    cfg = load_config(RECIPE)
    assert cfg.eval.dtype == "auto" and cfg.model.dtype == "fp32"
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        machine_with(monkeypatch, avx512_bf16, amx)
        assert runtime.eval_dtype(cfg) == expected
        assert runtime.resolve_dtype("auto", "fp16") == (expected if expected == "bf16" else "fp16")  # distill.dtype
    assert runtime.eval_dtype(load_config(RECIPE, ["eval.dtype=bf16"])) == "bf16"
    assert runtime.eval_dtype(load_config(str(ROOT / "configs" / "wikitext2_lora.yaml"))) == "fp32"  # unset: model.dtype
    with pytest.raises(ConfigError, match="eval.dtype: 'bf8' is not one of fp32, bf16, fp16, auto"):
        load_config(RECIPE, ["eval.dtype=bf8"])


def test_train_autocast_auto_follows_the_machine_and_needs_fp32_weights(monkeypatch, cpu_machine):
    """train.autocast=auto computes the forward in bf16 only where the machine does so natively; autocast over weights
    already in bf16 / fp16 is refused, as is an unknown dtype."""
    cfg = load_config(RECIPE, ["train.autocast=auto"])
    for native, expected in ((False, None), (True, torch.bfloat16)):
        machine_with(monkeypatch, native)
        assert getattr(runtime.train_autocast(cfg), "fast_dtype", None) == expected
    assert runtime.train_autocast(load_config(RECIPE, ["train.autocast=fp16"])).fast_dtype == torch.float16
    assert getattr(runtime.train_autocast(load_config(RECIPE)), "fast_dtype", None) is None  # off by default
    with pytest.raises(ConfigError, match="train.autocast: the weights are already bf16"):
        load_config(RECIPE, ["train.autocast=bf16", "model.dtype=bf16"])
    with pytest.raises(ConfigError, match="train.autocast: 'bf8' is not one of bf16, fp16, auto"):
        load_config(RECIPE, ["train.autocast=bf8"])


def test_cpu_tuning_takes_auto_off_or_a_list_of_its_settings(monkeypatch, cpu_machine):
    assert runtime.parse_cpu_tuning("auto") == ("auto", set(runtime.SETTINGS))
    assert runtime.parse_cpu_tuning("off") == ("off", set())
    assert runtime.parse_cpu_tuning(["threads", "dropout"]) == ("threads,dropout", {"threads", "dropout"})
    assert runtime.parse_cpu_tuning(["auto", "-malloc"])[1] == set(runtime.SETTINGS) - {"malloc"}
    assert load_config(RECIPE, ["train.cpu_tuning=[auto, -malloc]"]).train.cpu_tuning == ["auto", "-malloc"]
    assert runtime.parse_cpu_tuning(False) == runtime.parse_cpu_tuning("off")  # YAML reads `off` as false
    listed = load_config(RECIPE, ["train.cpu_tuning=[threads, dropout]"]).train.cpu_tuning
    assert runtime.parse_cpu_tuning(listed)[1] == runtime.parse_cpu_tuning("threads,dropout")[1] == {"threads", "dropout"}
    with pytest.raises(ConfigError, match=r"train.cpu_tuning: \['dropouts'\] not among onednn_cache, malloc"):
        load_config(RECIPE, ["train.cpu_tuning=dropouts"])
    assert runtime.configure_cpu("off").record() == runtime.CpuTuning().record()  # nothing set
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.configure_cpu("auto").mode == "off (a GPU is used)" and not runtime.cpu_tuning_wants("dropout")
    assert runtime.threads_for_runs_at_once(2, 1) is None  # a GPU machine's children choose their own threads


def test_few_onednn_kernels_are_kept_unless_the_user_chose_or_tuning_is_off(monkeypatch, cpu_machine):
    """A padding-free bf16 run on the CPU builds a oneDNN kernel for nearly every step's length; the CPU tuning caps
    the cache before the first one, and leaves a capacity the user set alone."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    runtime.configure_cpu("off")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    assert runtime.configure_cpu("auto").onednn_cache == str(runtime.ONEDNN_CACHE_KERNELS) == "16"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    runtime.configure_cpu("auto")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "8")  # oneDNN's older name for it
    runtime.configure_cpu("auto")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ


def test_threads_are_shared_between_runs_started_side_by_side_unless_tuning_leaves_them_out(cpu_machine):
    cores = os.cpu_count() or 1
    assert runtime.threads_for_runs_at_once(1, 2) == max(1, cores // 2)
    assert runtime.threads_for_runs_at_once(2, 2, "auto") == max(1, cores // 4)
    assert runtime.threads_for_runs_at_once(1, 2, "off") is None
    assert runtime.threads_for_runs_at_once(1, 2, ["dropout"]) is None


BLOCK_AFTER_A_FREED_MAPPING = """
import ctypes, sys
from peft_tuner import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
runtime.configure_cpu(sys.argv[2])
set_here = runtime.map_gathered_weights_apart(int(sys.argv[1]))
assert (runtime.cpu_tuning().malloc == runtime.MMAP_THRESHOLD_BYTES) == set_here
libc.free(libc.malloc(8 << 20))  # by glibc's own rule, blocks up to 8 MB would now come from its heap
before = libc.mallinfo2().hblkhd
block = libc.malloc(2 << 20)  # a gathered weight's size
print(set_here, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize("stage,tuning,env,mapped", [
    (3, "auto", {}, True), (2, "auto", {}, False), (3, "off", {}, False), (3, "threads", {}, False),
    (3, "auto", {"MALLOC_ARENA_MAX": "2"}, False), (3, "auto", {"LD_PRELOAD": "/nowhere/libjemalloc.so.2"}, False)],
    ids=["zero3", "zero2", "zero3-tuning-off", "zero3-malloc-left-out", "zero3-malloc-tuned-by-the-user",
         "zero3-another-malloc-preloaded"])
def test_under_zero3_on_the_cpu_a_gathered_weight_gets_its_own_mapping(stage, tuning, env, mapped):
    proc = subprocess.run([sys.executable, "-c", BLOCK_AFTER_A_FREED_MAPPING, str(stage), tuning], capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    set_here, bytes_mapped = proc.stdout.split()
    assert set_here == str(mapped)
    assert (int(bytes_mapped) >= 2 << 20) == mapped, bytes_mapped  # its own mapping, given back to the system when freed


def test_cpu_dropout_drops_p_of_the_elements_keeps_the_mean_and_replaces_torch_dropout(tiny_models, cpu_machine):
    """CpuDropout: about p of the elements dropped in each of the four 16-bit fields of a draw, the rest scaled by
    1 / (1 - p) (gradient alike), the same mask for the same seed, nothing dropped in eval mode; use_fast_dropout swaps
    it in for every LoRA dropout of a peft model, leaves p = 0 (peft's Identity) alone, and swaps none with the
    CPU tuning off."""
    from peft_tuner.runtime import CpuDropout, use_fast_dropout

    for p in (0.1, 0.5):
        dropout = CpuDropout(p).train()
        x = torch.ones(1_000_000, requires_grad=True)
        torch.manual_seed(0)
        y = dropout(x)
        values = y.detach()
        dropped = (values == 0).float()
        assert abs(float(dropped.mean()) - p) < 0.002  # 6 standard deviations at 10^6 elements
        assert all(abs(float(share) - p) < 0.004 for share in dropped.view(-1, 4).mean(0))  # every field of a draw
        kept = values[values != 0]
        assert torch.equal(kept, torch.full_like(kept, 1 / (1 - dropout.p)))
        assert abs(float(values.mean()) - 1) < 0.005
        y.sum().backward()
        assert torch.equal(x.grad, values)
        torch.manual_seed(0)
        assert torch.equal(dropout(x).detach(), values)
        assert dropout.eval()(x) is x
    assert CpuDropout(0.1)(torch.ones(3, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="0 < p < 1"):
        CpuDropout(1.0)

    model_cfg = ModelConfig(name_or_path=str(tiny_models["llama"]))
    settings = PeftSettings(r=4, dropout=0.1, target_modules="all-linear")
    model = build_peft_model(load_base_model(model_cfg), settings, model_cfg, total_steps=1)
    lora_dropouts = [d for name, m in model.named_modules() if name.endswith("lora_dropout") for d in m.values()]
    assert lora_dropouts and all(type(d) is torch.nn.Dropout for d in lora_dropouts)
    runtime.configure_cpu("off")
    assert use_fast_dropout(model) == 0 and runtime.cpu_tuning().dropout == 0
    runtime.configure_cpu("auto")
    assert use_fast_dropout(model) == len(lora_dropouts) == runtime.cpu_tuning().dropout
    assert all(isinstance(m, CpuDropout) for name, m in model.named_modules() if name.endswith("lora_dropout.default"))
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    undropped = build_peft_model(load_base_model(model_cfg), PeftSettings(r=4, dropout=0.0), model_cfg, total_steps=1)
    assert use_fast_dropout(undropped) == 0

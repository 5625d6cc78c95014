"""Hardware decisions, made once per process: precision (bf16 where it is native, autocast) and the CPU tuning.

CPU tuning (`train.cpu_tuning`) is every setting this project makes only because it runs on a CPU, here and nowhere
else. `auto` (the default) applies those that fit the run on a machine without a GPU; `off` applies none (torch's,
oneDNN's and glibc's own defaults); a list names the ones to apply. Each setting is written in the run's start record
(`cpu_tuning`), and a value the user set in the environment is left alone. None changes a result beyond rounding, but
for dropout, whose masks come from another generator.

| name | what auto sets on the CPU | why |
|---|---|---|
| onednn_cache | oneDNN keeps 16 compiled kernels, not 1,024 | padding-free bf16 steps build one per length: memory grew without end |
| malloc | under ZeRO-3, malloc maps blocks of 1 MB and more apart | gathered weights freed every step fragmented the heap |
| threads | a node's cores shared between its processes | the deepspeed launcher sets no thread count: 2 x 2 threads on 2 cores |
| dropout | CpuDropout in place of torch's dropout | torch draws a Mersenne-twister number per element, serially |
| short_rows_fp32 | padding-free bf16 / fp16 rows of up to 256 tokens attend in fp32 | the CPU's bf16 attention backward is slow on short rows |
| eager_scoring | bf16 / fp16 rank classification through plain attention | faster than SDPA's kernel on short padded prompts |
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch

SETTINGS = ("onednn_cache", "malloc", "threads", "dropout", "short_rows_fp32", "eager_scoring")
ONEDNN_CACHE_KERNELS = 16  # oneDNN's primitive cache capacity on the CPU (its own default: 1,024)
MMAP_THRESHOLD_BYTES = 1 << 20  # malloc's M_MMAP_THRESHOLD: blocks this large get their own mapping
TRIM_THRESHOLD_BYTES = 64 << 20  # malloc's M_TRIM_THRESHOLD: the free top of the heap kept before it is given back
FP32_ATTENTION_UP_TO = 256  # tokens in a padding-free row (short_rows_fp32)


# ----------------------------------------------------------------------------------------------------------------------
# Precision


def native_bf16() -> bool:
    """A CUDA device that supports bf16, or (on the CPU) AVX-512 BF16 or AMX instructions."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(wanted: Optional[str], default: str) -> str:
    """A dtype setting: unset is `default`; `auto` is bf16 where this machine computes it natively, else `default`.
    Without native support bf16 is emulated and slow (SmolLM2 rank classification ran 5x slower in bf16 than in fp32
    on a CPU with AVX2 only)."""
    if wanted != "auto":
        return wanted or default
    return "bf16" if native_bf16() else default


def eval_dtype(cfg) -> str:
    """eval.dtype, `auto` resolved for this machine."""
    return resolve_dtype(cfg.eval.dtype, cfg.model.dtype)


def train_autocast_dtype(cfg) -> Optional[str]:
    """train.autocast with `auto` resolved for this machine: bf16 where it is computed natively, else none."""
    if cfg.train.autocast == "auto":
        return "bf16" if native_bf16() else None
    return cfg.train.autocast


def autocast_to(dtype: Optional[str]):
    """Autocast to `dtype` (bf16 / fp16) on this process's device; None: no autocast."""
    if not dtype:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def train_autocast(cfg):
    """The training forward under train.autocast (bf16 / fp16 compute, fp32 weights)."""
    return autocast_to(train_autocast_dtype(cfg))


def eval_autocast(cfg):
    """Evaluation in eval.dtype (bf16 / fp16) while the weights train in fp32: autocast, as evaluate does with a copy."""
    dtype = eval_dtype(cfg)
    return autocast_to(dtype if dtype in ("bf16", "fp16") and cfg.model.dtype == "fp32" else None)


# ----------------------------------------------------------------------------------------------------------------------
# CPU tuning


@dataclass
class CpuTuning:
    """What the CPU tuning set in this process (the start record's `cpu_tuning`); None / False: left alone."""
    mode: str = "off"
    onednn_cache: Optional[str] = None  # the primitive cache capacity in force, where this set it
    malloc: Optional[int] = None  # the mmap threshold in bytes, where this set it
    threads: Optional[int] = None  # this process's threads, where this chose them
    dropout: int = 0  # dropout modules replaced by CpuDropout
    short_rows_fp32: Optional[int] = None  # longest padding-free half-precision row attending in fp32
    eager_scoring: bool = False

    def record(self) -> dict:
        return asdict(self)


_tuning = CpuTuning()
_wanted: set[str] = set()


def parse_cpu_tuning(value: Union[str, list, None]) -> tuple[str, set[str]]:
    """(mode, the settings it asks for) of a train.cpu_tuning value: auto, off, or a list of SETTINGS in which `auto`
    stands for all of them and `-name` takes one out ([auto, -malloc]); a ValueError names an unknown one."""
    if value is True or value in (None, "auto"):  # YAML reads an unquoted on / yes / true as True
        return "auto", set(SETTINGS)
    if value is False or value in ("off", "none"):  # and off / no / false as False
        return "off", set()
    names = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]
    unknown = [n for n in names if n.removeprefix("-") not in (*SETTINGS, "auto")]
    if unknown:
        raise ValueError(f"{unknown} not among {', '.join(SETTINGS)} (or auto, off; -NAME takes one out of auto)")
    wanted = set(SETTINGS) if "auto" in names else set()
    wanted |= {n for n in names if n in SETTINGS}
    wanted -= {n[1:] for n in names if n.startswith("-")}
    return ",".join(names), wanted


def configure_cpu(value: Union[str, list, None] = "auto") -> CpuTuning:
    """Apply the process-wide CPU settings of train.cpu_tuning before any model loads (the oneDNN cache is read when
    its first kernel is built), on a machine without a GPU. The settings that depend on the run (malloc, threads,
    dropout) are applied by their own calls below. Returns what is in force."""
    global _tuning, _wanted
    mode, wanted = parse_cpu_tuning(value)
    on_cpu = not torch.cuda.is_available()
    _wanted = wanted if on_cpu else set()
    _tuning = CpuTuning(mode=mode if on_cpu else "off (a GPU is used)")
    if "onednn_cache" in _wanted and not any(k in os.environ for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")):
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(ONEDNN_CACHE_KERNELS)
    if "onednn_cache" in _wanted:
        _tuning.onednn_cache = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    _tuning.short_rows_fp32 = FP32_ATTENTION_UP_TO if "short_rows_fp32" in _wanted else None
    _tuning.eager_scoring = "eager_scoring" in _wanted
    return _tuning


def cpu_tuning() -> CpuTuning:
    return _tuning


def cpu_tuning_wants(name: str) -> bool:
    """Whether train.cpu_tuning asks for setting `name` on this machine."""
    return name in _wanted


def map_gathered_weights_apart(zero_stage: int) -> bool:
    """malloc: under ZeRO-3 on the CPU every layer's weights are gathered before its forward and backward and freed
    after, host blocks of 1 to 4 MB (SmolLM2-135M's) every step. glibc raises its mmap threshold each time a mapped
    block is freed, so those blocks soon come from its heap, which fragments and grows: peak memory per process rose
    from 1.7-1.8 to 2.4-2.5 GB over 2 epochs of the PEFT example's recipe (2 processes); with the threshold fixed at
    1 MB it stayed at 1.8 GB. The price is that activations of 1 MB and more are mapped afresh too: on WikiText-2
    blocks of 4 x 128 tokens a step took 7.80 s against 5.41 s (2.29 against 3.65 GB). Left alone where the user tunes
    malloc (MALLOC_* or GLIBC_TUNABLES) or preloads another, below ZeRO-3 and off glibc. Returns whether it was set."""
    env = os.environ
    tuned = any(k.startswith("MALLOC_") for k in env) or any("malloc" in env.get(k, "") for k in ("GLIBC_TUNABLES", "LD_PRELOAD"))
    if "malloc" not in _wanted or zero_stage != 3 or tuned or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    done = bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES) and libc.mallopt(-1, TRIM_THRESHOLD_BYTES))  # M_MMAP_, M_TRIM_
    _tuning.malloc = MMAP_THRESHOLD_BYTES if done else None
    return done


def share_cores(processes_on_this_node: int) -> Optional[int]:
    """threads: each process on a node takes its share of the cores torch would use alone, unless OMP_NUM_THREADS
    says otherwise (torchrun sets 1 for several processes; the deepspeed launcher sets nothing, and there 2 processes
    of 2 threads on 2 cores stepped 1.17-1.19x slower than with the cores shared). Returns the threads chosen."""
    if "threads" not in _wanted or "OMP_NUM_THREADS" in os.environ:
        return None
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, processes_on_this_node)))
    _tuning.threads = torch.get_num_threads()
    return _tuning.threads


def threads_for_runs_at_once(processes: int, together: int, value: Union[str, list, None] = "auto") -> Optional[int]:
    """threads, for training runs started as child processes (the demo's, the distillation's teachers): OMP_NUM_THREADS
    for each process of `together` runs of `processes` processes side by side, the cores shared out between them
    (small matrix products keep one thread busier than two: two SmolLM2 recipe runs on 2 cores took 1.43x the time of
    one, for twice the work, with 1 thread each). None, with a GPU or train.cpu_tuning `value` without threads: the
    children choose."""
    if "threads" not in parse_cpu_tuning(value)[1] or torch.cuda.is_available():
        return None
    return max(1, (os.cpu_count() or processes) // (processes * together))


def use_fast_dropout(model) -> int:
    """dropout: CpuDropout in place of every torch.nn.Dropout with 0 < p < 1 (LoRA's, and the base model's if it has
    any). Returns how many it replaced."""
    if "dropout" not in _wanted:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and not child.inplace and CpuDropout.fits(child.p):
                setattr(parent, name, CpuDropout(child.p))
                replaced += 1
    _tuning.dropout = replaced
    return replaced


class CpuDropout(torch.nn.Module):
    """Dropout whose mask is drawn 16 random bits an element, four elements to one 64-bit draw of torch's generator.
    torch's own dropout on the CPU draws a Bernoulli number per element from its serial Mersenne twister: on a
    160 x 1536 fp32 activation 1,274 us forward, against 400 us here (2 cores), and LoRA's dropout runs before every
    adapted layer (15% of a SmolLM2 step with LoRA on every linear layer). The drop probability is `p` rounded to a
    multiple of 1/65536 (0.1 becomes 0.10000610) and the kept elements are scaled by the inverse of the kept share, so
    the expected activation is unchanged, as nn.Dropout's."""

    @staticmethod
    def fits(p: float) -> bool:
        """p is at least 1/65536 from 0 and from 1."""
        return 0 < round(p * 65536) < 65536

    def __init__(self, p: float):
        super().__init__()
        dropped = round(p * 65536)
        if not self.fits(p):
            raise ValueError(f"CpuDropout: p={p} rounds to {dropped}/65536; it needs 0 < p < 1 (at least 1/65536 from each)")
        self.p = dropped / 65536
        self.threshold = dropped - 32768  # an element is dropped where its 16 bits, read as int16, fall below this
        self.scale = 65536 / (65536 - dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)  # all 64 bits
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"

"""Everything about processes: which launcher started us, the process group, rank helpers, the DeepSpeed config,
and gathering ZeRO-3 partitions. The only module (with trainer and checkpoint) that touches torch.distributed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import socket
from pathlib import Path
from typing import Optional

import torch

from peft_tuner.config import Config, ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")

# Used when no --deepspeed file is given: one loop, ZeRO off.
DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000_000,
}


def detect_launcher() -> str:
    env = os.environ
    if any(k.startswith("ACCELERATE_") for k in env) and "RANK" in env:
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "deepspeed"
    if any(k in env for k in MPI_RANK_VARIABLES):
        return "mpirun"
    return "python"


def expected_world_size() -> int:
    """The number of processes the launcher started, read from the environment before any process group exists."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import; with no CUDA device, ask for its CPU one (gloo) explicitly."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def remove_stale_build_locks(min_age_s: float = 60) -> list[str]:
    """DeepSpeed JIT-builds its CPU ops under a lock file (torch's FileBaton); a run killed during the build leaves the
    lock, and every later run would wait on it for ever, without a word. A lock is stale when it is older than
    min_age_s and no process works in its folder (a live build runs ninja there, start to end): those are removed and
    named. Returns their paths."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = [lock for pattern in ("*/lock", "*/*/lock") for lock in root.glob(pattern)
             if time.time() - lock.stat().st_mtime > min_age_s]
    if not locks:
        return []
    busy = _of_every_process("cwd", lambda cwd: {cwd.resolve(strict=True)})
    removed = []
    for lock in locks:
        if lock.parent.resolve() not in busy:
            with contextlib.suppress(FileNotFoundError):  # the other rank was quicker
                lock.unlink()
            print(f"peft-tuner: removed {lock}: a build of that op was killed midway and left it, and this run would have "
                  "waited on it for ever.", flush=True)
            removed.append(str(lock))
    return removed


def _of_every_process(entry: str, read) -> set:
    """The union of read(/proc/<pid>/<entry>) over the processes this user may read (another user's, and one that
    ended meanwhile, are skipped)."""
    found = set()
    for path in Path("/proc").glob(f"[0-9]*/{entry}"):
        with contextlib.suppress(OSError):
            found |= read(path)
    return found


def init_distributed() -> str:
    """Bring up the process group, whatever launched us; returns the launcher's name."""
    use_cpu_accelerator_if_no_gpu()
    remove_stale_build_locks()
    launcher = detect_launcher()
    # Both modules below write `group=...WORLD` as default arguments, read once, when they are first imported
    # (torch.distributed.nn.functional, which transformers imports through FSDP when it builds a model, and DeepSpeed's
    # TorchBackend). Imported after the process group exists, those defaults hold the group for ever:
    # destroy_process_group cannot free it, gloo's worker threads live on into interpreter shutdown, and one of them,
    # dropping its last finished work, asks for the GIL there and aborts the process ("terminate called without an
    # active exception", in a few runs out of a hundred). Imported first, the defaults are None.
    import deepspeed
    import torch.distributed.nn  # noqa: F401

    if launcher == "python" and not torch.distributed.is_initialized():
        # One process, no launcher: a group of one over an in-memory store. (A free TCP port, picked then bound, was
        # taken by another job in between when 15 single-process runs started at once.)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    if not torch.distributed.is_initialized():
        # mpirun: DeepSpeed discovers rank, size and the master address through mpi4py.
        deepspeed.init_distributed(auto_mpi_discovery=True, verbose=False,
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
        unlink_shared_memory_segment()
        free_orphaned_shared_memory()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return launcher


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's ops/csrc/cpu/comm/shm.cpp: {prefix}_{uid}_{addr}_{port}_{rank}


def unlink_shared_memory_segment() -> None:
    """DeepSpeed's CPU all-reduce (its shm_comm op, used when every rank is on one machine) gives each rank a 66 MB
    segment in /dev/shm, which is RAM, and never unlinks it: every multi-process CPU run left 132 MB behind, until the
    machine swapped. deepspeed.init_distributed returns once this rank has mapped every rank's segment; after a barrier
    all ranks have, so each unlinks its own name. The memory stays mapped for the run and is freed when its processes
    exit, however they exit. (Only the CPU accelerator builds that op, and only where LOCAL_SIZE, which the deepspeed
    launcher sets, equals the world size: the same on every rank, so all or none reach the barrier.)"""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(world_size()):
        return
    torch.distributed.barrier()
    name = f"{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank()}"
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / name).unlink()


def free_orphaned_shared_memory(min_age_s: float = 120) -> None:
    """Segments that earlier runs left (DeepSpeed before the unlink above, or a run killed during its start) and that no
    process maps: nothing can use them again, and they hold RAM. Rank 0 deletes this user's that are older than
    min_age_s (a rank maps its segment right after creating it) and says how much it freed."""
    if rank() != 0 or not SHM_DIR.is_dir():
        return
    import time

    old = {}
    for segment in SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"):
        with contextlib.suppress(FileNotFoundError):  # its rank unlinked it meanwhile
            if time.time() - (stat := segment.stat()).st_mtime > min_age_s:
                old[segment] = stat
    if not old:
        return
    # Another user's processes are not read: they cannot map ours (mode 0600).
    mapped = _of_every_process("maps", lambda maps: {line.split()[-1] for line in maps.read_text().splitlines()
                                                     if SHM_PREFIX in line})
    freed = []
    for segment, stat in old.items():
        if str(segment) not in mapped:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
                freed.append(stat.st_blocks * 512)
    if freed:
        print(f"peft-tuner: freed {sum(freed) / 2**30:.1f} GiB of memory: {len(freed)} segment(s) in {SHM_DIR} that earlier "
              f"DeepSpeed CPU runs left behind and no process uses", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_shared_folder(folder: Path) -> None:
    """Every rank must see what rank 0 writes in `folder` (output_dir): each rank writes its part of a checkpoint there
    and rank 0 moves the whole into place, so nodes that each have their own disk would leave checkpoints that cannot
    be resumed. Rank 0 writes a token, every rank reads it; all refuse together, naming the ranks that could not."""
    if world_size() == 1:
        return
    import uuid

    marker = Path(folder) / ".peft_tuner_shared_check"
    token = all_gather_objects(uuid.uuid4().hex if is_main() else None)[0]
    if is_main():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    barrier()
    try:
        sees = marker.read_text() == token
    except OSError:
        sees = False
    views = all_gather_objects((rank(), socket.gethostname(), sees))
    barrier()
    if is_main():
        marker.unlink()
    blind = [f"rank {r} on {host}" for r, host, ok in views if not ok]
    if blind:
        torch.distributed.destroy_process_group()  # every rank raises here, together
        raise ConfigError(f"output_dir: {folder} is not one folder for all ranks: {', '.join(blind)} cannot see what rank 0 "
                          f"wrote there. Every rank writes its part of each checkpoint into output_dir and rank 0 the adapter, "
                          f"so all nodes need it on one shared filesystem (NFS, Lustre, ...) under the same path")


def shutdown() -> None:
    """Leave the process group together (a rank that exits while another still works aborts the gloo group), and free
    every group while the interpreter is whole. A group lives as long as something references it, and its gloo threads
    with it: left to interpreter shutdown, one of them aborted the process now and then ("terminate called without an
    active exception"), after the run had saved everything. The references were DeepSpeed's: the engine, its ZeRO-3
    parameters (`ds_process_group`) and its own module globals, the engine kept alive by the autograd hooks ZeRO-3 puts
    on every parameter's gradient accumulator (a cycle through C++ that Python's collector cannot see): the trainer
    calls `engine.destroy()`, which removes them, and drops the engine before it leaves."""
    import gc

    gc.collect()  # the engine and its parameters, now a plain Python cycle
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's own references to the groups
        else:
            torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """End a launched process with `code`. If threads of a process group still run (ZeRO-3: DeepSpeed's engine and its
    partitioned parameters outlive the run and hold their groups past destroy_process_group, through references
    Python's collector cannot free), the interpreter's finalization is skipped, stdout and stderr flushed first: one
    such gloo thread, meeting finalization, aborted the process now and then (SIGABRT, "terminate called without an
    active exception") after the run had saved everything, and a scheduler records that job as failed."""
    import sys

    if process_group_threads():
        if os.environ.get("PEFT_TUNER_DEBUG_EXIT"):
            print(f"peft-tuner: {len(process_group_threads())} process-group thread(s) still running; exiting {code} "
                  "without interpreter finalization", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def process_group_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo process group (Linux; elsewhere none are seen)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            name = comm.read_text().strip()
            if name.startswith(("gloo", "pt_gloo")):
                names.append(name)
    return names


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device())
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def all_gather_objects(obj) -> list:
    if not torch.distributed.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def peak_memory_gb() -> float:
    """Peak accelerator memory where there is one, else this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def gathered(params: list, zero_stage: int):
    """Inside, every listed parameter holds its full tensor on every rank (a no-op below ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def partitioned_loading(ds_config: dict, enabled: bool):
    """Inside, `from_pretrained` loads weights straight into ZeRO-3 partitions (transformers' HfDeepSpeedConfig hook).
    The hook is dropped on leaving, so that later single-rank loads (the adapter check on rank 0) load plainly."""
    if not enabled:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    hook = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        del hook


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed config: a JSON file with "auto" values, filled from the recipe


def read_deepspeed_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (DS_CONFIG_DIR / p.name).is_file() and p.parent == Path("ds_configs"):
        p = DS_CONFIG_DIR / p.name
    if not p.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file; shipped ones are in {DS_CONFIG_DIR}: "
                          f"{', '.join(sorted(f.name for f in DS_CONFIG_DIR.glob('*.json')))}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: line {e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object")
    return raw


def deepspeed_source(cfg: Config) -> tuple[dict, str]:
    """The DeepSpeed config to use and where it came from: --deepspeed, accelerate's plugin, or ZeRO off."""
    if cfg.deepspeed:
        return read_deepspeed_file(cfg.deepspeed), cfg.deepspeed
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() != "none":
            return read_deepspeed_file(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]), env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        raw = copy.deepcopy(DEFAULT_DS_CONFIG)
        raw["zero_optimization"] = {"stage": stage}
        for kind in ("optimizer", "param"):
            where = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
            if where != "none":
                raw["zero_optimization"][f"offload_{kind}"] = {"device": where}
                raw["zero_force_ds_cpu_optimizer"] = False
        return raw, f"accelerate plugin (ZeRO-{stage})"
    return copy.deepcopy(DEFAULT_DS_CONFIG), "built-in (ZeRO off)"


def resolve_deepspeed_config(raw: dict, cfg: Config, n_processes: int, source: str = "deepspeed config") -> dict:
    """Fill "auto" values from the recipe; concrete values that contradict it are errors naming both."""
    ds = copy.deepcopy(raw)
    t = cfg.train
    filled = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "train_batch_size": t.batch_size * t.gradient_accumulation * n_processes,
        "gradient_clipping": t.max_grad_norm,
    }
    recipe_key = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.gradient_accumulation",
                  "train_batch_size": f"train.batch_size x train.gradient_accumulation x {n_processes} processes",
                  "gradient_clipping": "train.max_grad_norm"}
    problems = []
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            problems.append(f"{source}: {key}={ds[key]} contradicts the recipe's {recipe_key[key]}={value}; "
                            f"set it to \"auto\" or change the recipe")
    for precision in ("bf16", "fp16"):
        section = ds.setdefault(precision, {})
        wanted = cfg.model.dtype == precision
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
        elif section["enabled"] != wanted:
            problems.append(f"{source}: {precision}.enabled={section['enabled']} contradicts model.dtype={cfg.model.dtype}")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", t.learning_rate), ("weight_decay", t.weight_decay), ("betas", [0.9, 0.999]), ("eps", 1e-8)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    if "scheduler" in ds:
        problems.append(f"{source}: has a 'scheduler' section; remove it and set train.lr_scheduler / train.warmup_ratio instead")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]  # bucket sizes and the like: DeepSpeed's defaults
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        problems.append(f"{source}: zero_optimization.stage={zero.get('stage')} is not 0, 1, 2 or 3")
    if any(zero.get(f"offload_{k}", {}).get("device", "none") != "none" for k in ("optimizer", "param")):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # the client AdamW steps offloaded states on the CPU
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 1_000_000_000)
    leftover = [path for path in _auto_paths(ds)]
    if leftover:
        problems.append(f"{source}: no recipe value fills \"auto\" at {', '.join(leftover)}; give a number there")
    if problems:
        raise ConfigError("\n  - ".join(["the DeepSpeed config does not fit the recipe:"] + problems))
    return ds


def _auto_paths(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _auto_paths(v, f"{prefix}{k}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def check_method_fits_zero(method: str, stage: int) -> Optional[str]:
    """A PEFT method that cannot work under a ZeRO stage, as a message (None when it fits)."""
    if method == "adalora" and stage >= 2:
        return (f"peft.method=adalora needs every rank's full gradients to allocate its rank budget, which ZeRO-{stage} "
                f"partitions; use ds_configs/zero0.json or zero1.json, or peft.method=lora")
    return None

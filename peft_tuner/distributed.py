"""The process group, whatever launched us: which launcher it was, bringing the group up and down, rank helpers, and
ZeRO-3 gathering. With trainer, checkpoint and evaluate's job, the only code that touches torch.distributed; the
DeepSpeed JSON config is resolved in ds_config, what DeepSpeed leaves behind on a CPU machine is cleared in
cpu_cleanup, and what we change in DeepSpeed is in deepspeed_patches.
"""
from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
from pathlib import Path

import torch

from peft_tuner import runtime
from peft_tuner.config import ConfigError
from peft_tuner.cpu_cleanup import (free_orphaned_shared_memory, remove_stale_build_locks, unlink_shared_memory_segment,
                                    watch_build_locks)
from peft_tuner.deepspeed_patches import import_deepspeed

MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


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
    deepspeed = import_deepspeed()  # (deepspeed_patches)
    import torch.distributed.nn  # noqa: F401

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        watch_build_locks()

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
    elif runtime.cpu_tuning_wants("threads") and "OMP_NUM_THREADS" not in os.environ:
        hosts = all_gather_objects(socket.gethostname())
        runtime.share_cores(hosts.count(hosts[rank()]))
    return launcher


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
    what can be freed while the interpreter is whole: a group lives as long as something references it, and its gloo
    threads with it. The trainer calls `engine.destroy()` (it removes ZeRO-3's hooks) and drops the engine; leaving
    through deepspeed.comm also drops DeepSpeed's module-level references. After a ZeRO-3 run that is still not enough
    (6 gloo threads per rank measured afterwards: the engine and its parameters stay alive), so the launch entry points
    end such a process with exit_process."""
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
    lingering = process_group_threads()
    if lingering:
        if os.environ.get("PEFT_TUNER_DEBUG_EXIT"):
            print(f"peft-tuner: {len(lingering)} process-group thread(s) still running; exiting {code} "
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



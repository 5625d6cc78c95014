"""What DeepSpeed leaves behind on a CPU machine, cleared at the start of a multi-process run.

- Its CPU ops are JIT-built under a lock file (torch's FileBaton); a run killed during the build leaves the lock, and
  every later run waited on it for ever (torch.utils.cpp_extension never re-checks a lock's owner).
- Its CPU all-reduce (ops/csrc/cpu/comm/shm.cpp, `shm_initialize`) gives each rank a 66 MB /dev/shm segment and never
  unlinks it (`shared_close` is never called): every 2-process run kept 132 MB of RAM until the machine swapped.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

def remove_stale_build_locks(min_age_s: float = 60) -> list[str]:
    """DeepSpeed JIT-builds its CPU ops under a lock file (torch's FileBaton); a run killed during the build, or stopped
    by SIGTERM (before its handler was installed) while it checked an op's build, leaves the lock, and every later run
    would wait on it for ever, without a word. A lock is stale when it is older than min_age_s, no process has it open
    (FileBaton keeps it open from creating it to removing it) and no process works in its folder (a live build runs
    ninja there, start to end): those are removed and named. Returns their paths."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = [lock for pattern in ("*/lock", "*/*/lock") for lock in root.glob(pattern)
             if time.time() - lock.stat().st_mtime > min_age_s]
    if not locks:
        return []
    busy = _of_every_process("cwd", lambda cwd: {cwd.resolve(strict=True)})
    held = _of_every_process("fd", _open_files)
    removed = []
    for lock in locks:
        if lock.parent.resolve() not in busy and str(lock.resolve()) not in held:
            with contextlib.suppress(FileNotFoundError):  # the other rank was quicker
                lock.unlink()
            print(f"peft-tuner: removed {lock}: the run that held it died, and this run would have waited on it for "
                  "ever.", flush=True)
            removed.append(str(lock))
    return removed


def watch_build_locks(poll_s: float = 1.0, give_up_s: float = 900):
    """A waiter on a build lock never looks again, and DeepSpeed's CPU backend loads its shm op under one when it comes
    up, in every run. Until DeepSpeed's communication is up in this process (or give_up_s), a daemon thread removes
    stale locks every poll_s, those no process holds after 2 s (remove_stale_build_locks). Returns the thread."""
    import threading
    import time

    import deepspeed.comm.comm as ds_comm

    def watch():
        deadline = time.time() + give_up_s
        while getattr(ds_comm, "cdb", None) is None and time.time() < deadline:
            with contextlib.suppress(OSError):
                remove_stale_build_locks(min_age_s=2)
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name="peft-tuner build-lock watch", daemon=True)
    thread.start()
    return thread


def _open_files(fd_dir: Path) -> set[str]:
    """The paths a process has open (an fd closed meanwhile is skipped, not the whole process)."""
    found = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            found.add(os.readlink(fd))
    return found


def _of_every_process(entry: str, read) -> set:
    """The union of read(/proc/<pid>/<entry>) over the processes this user may read (another user's, and one that
    ended meanwhile, are skipped)."""
    found = set()
    for path in Path("/proc").glob(f"[0-9]*/{entry}"):
        with contextlib.suppress(OSError):
            found |= read(path)
    return found



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

    if get_accelerator().device_name() != "cpu" or os.environ.get("LOCAL_SIZE") != str(torch.distributed.get_world_size()):
        return
    torch.distributed.barrier()
    name = f"{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}"
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / name).unlink()


def free_orphaned_shared_memory(min_age_s: float = 120) -> None:
    """Segments that earlier runs left (DeepSpeed before the unlink above, or a run killed during its start) and that no
    process maps: nothing can use them again, and they hold RAM. Rank 0 deletes this user's that are older than
    min_age_s (a rank maps its segment right after creating it) and says how much it freed."""
    if (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0) or not SHM_DIR.is_dir():
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


"""glibc malloc settings for processes that move large tensors over gRPC.

Every step, a ps task and each worker allocate and free buffers the size of
the model (gRPC messages, protobuf copies, tensors fed and fetched). With
glibc's default settings, freed buffers of a few MiB go back to the kernel
(`munmap`, or `madvise` from a thread's arena) and the next one is faulted in
and zeroed page by page. A profile of the ps at 4 workers and 1e6 parameters
(`perf record`) spent 35-40% of its CPU in page faults, page clearing and
unmapping; see WORKSPACE_NOTES.md, "Memory allocation".

The settings below keep freed memory in the process instead: large blocks
come from the heap, not fresh mappings, and a heap is trimmed only past
`trim_threshold` of free space at its top. They cost resident memory, not
CPU: by glibc's rules up to about `trim_threshold` more per malloc arena.

They also cap the malloc arenas at `arena_max` (2). glibc gives each new
thread an arena of its own, up to 8 per core (glibc 2.36, this machine's), and
each arena grows to its own peak page by page while its threads allocate a
step's model-sized buffers.
With glibc's 16 on 2 cores, a local cluster at 1e7 parameters spent 1.6x the
CPU a step in its first fit (after 2 warm-up steps) that it spent later; with 2
its first fit ran like the later ones, which were no slower, and its peak
resident memory was 27% lower (`benchmarks/malloc_arenas.py`;
docs/performance.md, "The first fits"). Threads that share an arena
take turns at its lock (glibc's per-thread caches serve small blocks
without it); that was not measured on hosts with many cores. Two ways in:

* `malloc_env()`: glibc's environment variables, read when a process starts.
  `LocalCluster` (so `launch_local`) starts every task with them; on a real
  cluster, export them in each task's environment. This is the whole gain.
* `tune_malloc()`: the same settings through `mallopt` in a running process.
  `serve()` and `BackupWorkerStrategy` call it. It once gave a ps task the
  whole gain but a Keras worker only part of it: the cause is below.

TensorFlow undoes them: on Python 3.11 and later, the constructor of tf.data's
`GeneratorDatasetOp` calls `mallopt(M_MMAP_THRESHOLD, 128 KiB)`
(`tensorflow::data::ApplyPython311MemoryPatch`, TF 2.21; found with a
breakpoint on `mallopt` in a worker), and every distributed dataset's
iterator makes one (`MultiDeviceIterator`), for MultiWorkerMirroredStrategy
too. From the first `fit` on, every buffer past 128 KiB was mapped, faulted
in and unmapped again: at 1e7 parameters a worker spent a third of its CPU in
page faults. So `reapply()` applies the settings again, and the exchange
calls it every step (about 8 us).

`TF_BACKUP_TUNE_MALLOC=0` turns both off (glibc's defaults, e.g. to measure
the difference).
"""

import ctypes
import ctypes.util
import functools
import os
import platform

from absl import logging

ENV = "TF_BACKUP_TUNE_MALLOC"
MiB = 1 << 20
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_ENV = "MALLOC_ARENA_MAX"  # glibc's variable for the same
# glibc refuses an mmap threshold above half a thread arena's heap (64 MiB on 64-bit).
MAX_MMAP_THRESHOLD = 32 * MiB

_applied = None


def enabled() -> bool:
    """False when `TF_BACKUP_TUNE_MALLOC` is 0 (or false, no, off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def malloc_env(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 256 * MiB,
               top_pad: int = 32 * MiB, arena_max: int = 2) -> dict:
    """glibc's environment variables for these settings, for a process to be started.

    Empty when `TF_BACKUP_TUNE_MALLOC=0`. Variables already set in this
    process's environment are left out (the caller's own choice stays).
    """
    _check(mmap_threshold, trim_threshold, top_pad, arena_max)
    if not enabled():
        return {}
    env = {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold), "MALLOC_TRIM_THRESHOLD_": str(trim_threshold),
           "MALLOC_TOP_PAD_": str(top_pad), ARENA_ENV: str(arena_max)}
    return {k: v for k, v in env.items() if k not in os.environ}


def _check(mmap_threshold, trim_threshold, top_pad, arena_max) -> None:
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold),
                        ("top_pad", top_pad)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise ValueError(f"`{name}` must be an int of bytes in [0, 2**31). Received {name}={value!r}")
    if not isinstance(arena_max, int) or isinstance(arena_max, bool) or not 1 <= arena_max < 2**31:
        raise ValueError(f"`arena_max` must be an int in [1, 2**31). Received arena_max={arena_max!r}")
    if mmap_threshold > MAX_MMAP_THRESHOLD:
        raise ValueError(f"`mmap_threshold` must be at most {MAX_MMAP_THRESHOLD} (32 MiB): glibc refuses more. "
                         f"Received mmap_threshold={mmap_threshold}")


def tune_malloc(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 256 * MiB,
                top_pad: int = 32 * MiB, arena_max: int = 2) -> bool:
    """Makes glibc malloc keep freed memory in this running process (see the module doc).

    Args:
      mmap_threshold: allocations at least this large get a mapping of their
        own (returned to the kernel when freed). At most 32 MiB.
      trim_threshold: free memory at the top of a heap that is kept.
      top_pad: extra memory requested whenever a heap grows.
      arena_max: the most malloc arenas. In a running process it caps only
        the arenas made from now on, and only if glibc has not fixed its own
        cap yet, which it does for good once a process has more than 8 arenas
        (`arena_get2` in glibc's malloc/arena.c): the environment is the sure
        way. Not set where `MALLOC_ARENA_MAX` is in the environment (the
        caller's own choice).

    Returns:
      True if the settings are in effect; False where the C library is not
      glibc, or `TF_BACKUP_TUNE_MALLOC=0` is set.

    Raises:
      ValueError: a setting is not in [0, 2**31), `arena_max` is below 1, or
        `mmap_threshold` is above 32 MiB.
    """
    global _applied
    _check(mmap_threshold, trim_threshold, top_pad, arena_max)
    if not enabled():
        return False
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
    if ARENA_ENV not in os.environ:
        settings += ((M_ARENA_MAX, arena_max),)
    if _applied == settings:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not ok:
        logging.warning("tf_backup: glibc refused a malloc setting %s; its defaults stay.", settings)
        return False
    _applied = settings
    logging.info("tf_backup: malloc keeps freed memory (mmap threshold %d MiB, trim threshold %d MiB).",
                 mmap_threshold // MiB, trim_threshold // MiB)
    return True


def reapply() -> bool:
    """The thresholds `tune_malloc` last applied, applied again (after tf.data reset them; module doc).

    Not the arena cap: TensorFlow does not touch it, and glibc fixes its own cap for good anyway.
    Returns False, and does nothing, where `tune_malloc` applied none.
    """
    if _applied is None:
        return False
    libc = _glibc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in _applied
                                    if param != M_ARENA_MAX)


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library with `mallopt` (None: not glibc). Once: `find_library` may run `ldconfig`."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc

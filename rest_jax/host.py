"""Host memory settings for runs on XLA:CPU.

XLA:CPU allocates each execution's temporary buffer (~1.3 GB for a restv2_tiny training step at
batch 8) with posix_memalign from one of its worker threads. glibc serves an allocation that large
from a fresh mmap, unmaps it on free, and the next step faults every page in again: ~325,000 page
faults and ~1 s of kernel time per restv2_tiny training step on a 2-core machine. `reuse_freed_memory`
makes glibc keep and reuse that memory instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory rather than return it to the kernel; for CPU runs.

    One malloc arena for every thread (a worker thread's own arena cannot hold a buffer over 64 MB,
    so it would mmap it), no mmap for large blocks, no trimming: a buffer freed by one step is reused
    by the next without page faults. The process keeps its peak heap until it exits. Call it before
    the first computation (before jax starts its worker threads); it changes the whole process,
    which is why the package never calls it on import, only the CLIs that own their process.

    Returns:
      True where applied (Linux with glibc), False elsewhere (nothing changed).
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # musl and other C libraries without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 disables trimming altogether (mallopt(3)).
    return all(mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))

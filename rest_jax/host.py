"""Host memory for runs on XLA:CPU: transparent huge pages for glibc's large allocations.

XLA:CPU allocates each execution's temporary buffer afresh (~1 GB for a rest_small training step at
batch 8). glibc serves a block that large with mmap and unmaps it when it is freed, so every step
faults each 4 KiB page of it in again, and the kernel zeroes each one: ~230,000 minor faults and
~0.4 s of kernel time per rest_small training step on 2 cores, against ~48,000 for the official
PyTorch step. glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35+) makes malloc ask for transparent
huge pages (madvise) on the memory it maps, and a step then faults 2 MiB pages: ~1,000 faults.

The tunable is read when a process starts, so `reexec_with_huge_pages` restarts the current command
once with it set. Only the command-line entry points that own their process call it (train.py,
`python -m rest_jax.benchmark`); importing the package never changes the process. Notebook users can
start Jupyter with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for the same effect.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'REST_JAX_HUGE_PAGES'   # set to 0 to keep glibc's defaults
_THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None where unknown."""
    try:
        with open(path) as f:
            match = re.search(r'\[(\w+)\]', f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def _glibc_version() -> tuple[int, int] | None:
    try:
        name = os.confstr('CS_GNU_LIBC_VERSION') or ''   # 'glibc 2.36'; unset on musl
    except (AttributeError, ValueError, OSError):
        return None
    match = re.fullmatch(r'glibc (\d+)\.(\d+).*', name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def huge_pages_status() -> str:
    """What this process has, in words: whether glibc's large allocations use huge pages, and why."""
    mode, tunables, version = thp_mode(), os.environ.get('GLIBC_TUNABLES', ''), _glibc_version()
    if mode == 'always':
        return 'on (the kernel gives every large mapping huge pages)'
    if mode is None or mode == 'never':
        return f'off (transparent huge pages are {mode or "unavailable"} here)'
    if version is None or version < (2, 35):
        return f'off (needs glibc 2.35+ for {TUNABLE})'
    if re.search(rf'(^|:){re.escape(TUNABLE)}=1(:|$)', tunables):
        return f'on ({TUNABLE}=1, transparent huge pages on madvise)'
    return f'off (set GLIBC_TUNABLES={TUNABLE}=1, or leave {OPT_OUT} unset in our CLIs)'


def reexec_with_huge_pages() -> None:
    """Restart this process, same interpreter and command line, with `glibc.malloc.hugetlb=1` set.

    Call it first thing in a `__main__` block, before any output or work. It returns (changing
    nothing) where the restart cannot help or was already done: off glibc 2.35+ on Linux, where the
    kernel's transparent huge pages are 'always' (already on) or 'never' (unavailable), where
    GLIBC_TUNABLES already names the tunable (the restarted process, or the user's own choice), or
    where REST_JAX_HUGE_PAGES=0. Otherwise it does not return: the process image is replaced.
    """
    if os.environ.get(OPT_OUT) == '0' or not sys.platform.startswith('linux'):
        return
    version = _glibc_version()
    if version is None or version < (2, 35) or thp_mode() != 'madvise':
        return
    tunables = os.environ.get('GLIBC_TUNABLES', '')
    if TUNABLE in tunables:
        return
    env = dict(os.environ, GLIBC_TUNABLES=':'.join(filter(None, [tunables, f'{TUNABLE}=1'])))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)

"""Kernel forms measured on this host: for an op whose fastest exact form depends on the CPU, time the
candidates once on this machine and remember the winner.

Which of two exact forms XLA:CPU runs faster changes between machine kinds (a convolution's kernel
gradient: XLA's own on one AVX-512 kind, patches times a matmul on another; docs/performance.md), so
no rule measured on one kind holds on the next. `choose` times each candidate of an op at its shape on
this host, the first time the op is traced there, and keeps the result in a JSON file keyed by the
host (CPU vendor, family, model, ISA, core count, jax version) and the op's shape: later traces, in
this process or the next, read it. The candidates compute the same sums of the same products, so a
choice changes the result by float rounding at most.

    REST_JAX_CPU_TUNE=off    use the fallback rule instead (cpu_isa), measure nothing
    REST_JAX_CACHE_DIR=DIR   where the file lives (default $XDG_CACHE_HOME/rest_jax or ~/.cache/rest_jax)

Measuring happens while a model is traced (in a helper thread, outside the trace), costs a few
seconds per distinct shape on the first run, and nothing after. With several processes (a multi-host
run) every process must compile the same program, so there the fallback rule decides.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import jax

from rest_jax.ops import cpu_isa, dispatch

TUNE_ENV = 'REST_JAX_CPU_TUNE'
CACHE_ENV = 'REST_JAX_CACHE_DIR'
FILE_NAME = 'cpu_forms.json'

_LOCK = threading.Lock()
_CHOSEN: dict[str, dict] = {}   # this process's decisions, op key -> {'choice', 'ms', 'source'}
_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar('rest_jax_cpu_forms_recorded', default=None)


def enabled() -> bool:
    """Whether forms are measured on this host (REST_JAX_CPU_TUNE, default on; off in multi-process runs)."""
    value = os.environ.get(TUNE_ENV, 'on').strip().lower()
    if value not in ('on', 'off', '1', '0', 'true', 'false'):
        raise ValueError(f'{TUNE_ENV} must be on or off, got {value!r}')
    return value in ('on', '1', 'true') and jax.process_count() == 1


def cache_path() -> Path:
    """The JSON file of measured choices: $REST_JAX_CACHE_DIR, else $XDG_CACHE_HOME/rest_jax, else ~/.cache/rest_jax."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'rest_jax'
    return Path(base) / FILE_NAME


def host_key() -> str:
    """What a measurement is valid for: 'GenuineIntel 6/167 avx512, 2 CPUs, jax 0.10.2'."""
    cpu = cpu_isa.host_cpu()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return f"{cpu['vendor']} {cpu['family']}/{cpu['model']} {cpu['isa']}, {cpus} CPUs, jax {jax.__version__}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f'rest_jax: ignoring unreadable kernel-form cache {path} ({e}); it will be rewritten', file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, key: str, entry: dict) -> None:
    """Add one entry to the file, atomically (another process may be writing it too)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data.setdefault(host_key(), {})[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:   # a read-only home: measure again next time
        print(f'rest_jax: could not save the kernel-form cache {path} ({e})', file=sys.stderr)


def choose(key: str, candidates: dict[str, Callable[[], Callable[[], object]]], fallback: str,
           shapes: tuple = ()) -> str:
    """The fastest of `candidates` for the op `key` on this host.

    Args:
      key: the op and everything its speed depends on (kind, shapes, dtype, pass).
      candidates: name -> a function that builds the candidate and returns a call running it once
        (compiled and with its inputs ready; the call must wait for its result).
      fallback: the choice when measuring is off.
      shapes: the op's operand shapes. Where one has a symbolic dimension (`jax.export`'s shape
        polymorphism, e.g. an artifact for any batch size) nothing can be timed: the fallback.

    Returns:
      A name from `candidates`: the cached winner, else the one measured fastest now (then cached).
    """
    if not enabled() or not all(isinstance(d, int) for shape in shapes for d in shape):
        _record(key, {'choice': fallback, 'source': 'rule'})
        return fallback
    with _LOCK:
        if key not in _CHOSEN:
            if not dispatch.TIMING.get():   # e.g. a model's initialisation: the file's choice, else the rule
                entry = _read(cache_path()).get(host_key(), {}).get(key)
                return entry['choice'] if isinstance(entry, dict) and entry.get('choice') in candidates else fallback
            _decide(key, candidates)
        _record(key, _CHOSEN[key])
        return _CHOSEN[key]['choice']


def _decide(key: str, candidates: dict[str, Callable[[], Callable[[], object]]]) -> None:
    """Fill _CHOSEN[key] from the file, else by measuring (then saved)."""
    entry = _read(cache_path()).get(host_key(), {}).get(key)
    if isinstance(entry, dict) and entry.get('choice') in candidates:
        _CHOSEN[key] = {**entry, 'source': 'cache'}
        return
    # Outside any trace: the caller is usually inside jax.jit's tracing, where arrays are staged.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ms = pool.submit(_measure_all, candidates).result()
    choice = min(ms, key=ms.get)
    entry = {'choice': choice, 'ms': ms, 'measured': time.strftime('%Y-%m-%d')}
    _write(cache_path(), key, entry)
    _CHOSEN[key] = {**entry, 'source': 'measured'}


def _record(key: str, entry: dict) -> None:
    recorded = _RECORDING.get()
    if recorded is not None:
        recorded[key] = dict(entry)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, dict]]:
    """Collect the choices made inside (op key -> {'choice', 'source' ('measured', 'cache' or 'rule'),
    'ms' where measured}): which forms a program traced inside took."""
    recorded: dict[str, dict] = {}
    token = _RECORDING.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDING.reset(token)


def _measure_all(candidates: dict[str, Callable[[], Callable[[], object]]]) -> dict[str, float]:
    calls = {name: build() for name, build in candidates.items()}   # compile them all first
    for call in calls.values():
        call()                                                      # and warm up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(5):                                              # interleaved rounds, median
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}


def decisions() -> dict[str, dict]:
    """The choices this process made so far: op key -> {'choice', 'ms', 'source' ('cache' | 'measured')}."""
    with _LOCK:
        return {k: dict(v) for k, v in _CHOSEN.items()}

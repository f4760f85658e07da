"""Progress on the console, WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

TensorBoard goes through tensorboardX: a small, pure-Python event writer that needs neither
tensorflow nor torch, so logging works in runs (and tests) that never import tensorflow.
Only process 0 writes; the others are silent. A workdir may be a gs:// path: both files are then
written through etils.epath (tf.io.gfile underneath, imported only when such a path is used).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

from etils import epath
import jax


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h else f'{rest // 60}:{rest % 60:02d}'


def _is_remote(path: str) -> bool:
    return '://' in str(path)


class _RewrittenFile:
    """Appends to a file on an object store (GCS objects cannot be appended to): the whole content
    is kept and written again at each flush. Logs of scalars stay small (well under a megabyte for a
    300-epoch run logged every 100 steps), so the rewrite costs less than a step."""

    def __init__(self, path: str, binary: bool = False):
        self._path = epath.Path(path)
        self._binary = binary
        existing = self._path.read_bytes() if self._path.exists() else b''  # a resumed run appends
        self._buffer = io.BytesIO(existing)
        self._buffer.seek(0, io.SEEK_END)

    def write(self, data) -> None:
        self._buffer.write(data if self._binary else data.encode())

    def flush(self) -> None:
        self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _RewrittenEventFiles:
    """tensorboardX writer factory for gs:// logdirs through epath (tensorboardX's own needs the
    google-cloud-storage package)."""

    def open(self, path):
        return _RewrittenFile(path, binary=True)

    def directory_check(self, path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _open_append(path: str):
    if _is_remote(path):
        return _RewrittenFile(path)
    return open(path, 'a')


class MetricWriter:
    """write(step, scalars) merges scalars of the same step into one record; a new step flushes it."""

    def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._pending: dict[str, Any] | None = None
        self._tb = None
        self._file = None
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._file = _open_append(os.path.join(workdir, 'metrics.jsonl'))
            if tensorboard:
                from tensorboardX import SummaryWriter
                if _is_remote(workdir):
                    from tensorboardX import record_writer
                    scheme = str(workdir).split('://')[0]
                    record_writer.register_writer_factory(scheme, _RewrittenEventFiles())
                self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._pending is not None and self._pending['step'] != step:
            self.flush()
        if self._pending is None:
            self._pending = {'step': int(step)}
        self._pending.update({k: float(v) for k, v in scalars.items()})
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), int(step))

    def flush(self) -> None:
        if self.enabled and self._pending is not None:
            self._file.write(json.dumps(self._pending) + '\n')
            self._file.flush()
            self._pending = None
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def log(message: str) -> None:
    """One console line from process 0, flushed at once (progress must show in pipes and CI logs)."""
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)


class Progress:
    """Images/s and ETA from the wall clock between log points (compilation excluded after the first)."""

    def __init__(self, start_step: int, total_steps: int, images_per_step: int):
        self.total_steps, self.images_per_step = total_steps, images_per_step
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._first = True

    def line(self, step: int, loss: float, lr: float) -> tuple[str, float]:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        elapsed = max(now - self._last_time, 1e-9)
        rate = steps * self.images_per_step / elapsed
        self._last_step, self._last_time = step, now
        width = len(str(self.total_steps))
        head = f'step {step:>{width}}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3e}  '
        if self._first:  # the first step includes compilation: its rate says nothing about the run
            self._first = False
            return head + f'(first step, compilation included: {elapsed:.1f} s)', rate
        eta = (self.total_steps - step) * self.images_per_step / max(rate, 1e-9)
        return head + f'{rate:,.0f} img/s  ETA {_format_eta(eta)}', rate

    def reset(self, step: int) -> None:
        """Restart the clock (after an evaluation or a checkpoint, which are not training time)."""
        self._last_step, self._last_time = step, time.perf_counter()


def parameter_table(rows: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in rows)
    width = max(len(name) for name, _ in rows)
    lines = [f'{"module":<{width}}  {"params":>12}']
    lines += [f'{name:<{width}}  {n:>12,}' for name, n in rows]
    lines.append(f'{"total":<{width}}  {total:>12,}')
    return '\n'.join(lines)

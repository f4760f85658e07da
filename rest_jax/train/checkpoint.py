"""Saving and restoring a training workdir's checkpoints (Orbax CheckpointManager), and preemption.

WORKDIR/checkpoints/N/ holds the TrainState at update N ('state'), with best-checkpoint metrics beside
it; the workdir's model spec (rest_jax.json) and loading it back belong to rest_jax.pretrained.

Orbax writes each step into a temporary directory and renames it when complete, so a process killed
at any moment (SIGKILL included) leaves only complete checkpoints behind; the newest one is resumed.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax

class Checkpoints:
    """Asynchronous saves, keeping the newest `keep` checkpoints plus the best by `metric` (max)."""

    def __init__(self, workdir: str, keep: int, metric: str = 'top1'):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies
        self._ocp = ocp
        keep_policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=max(int(keep), 1)),
            policies.BestN(get_metric_fn=lambda m: m[metric], n=1, keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(preservation_policy=keep_policy, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True, create=True)
        root = workdir if '://' in str(workdir) else os.path.abspath(workdir)   # Orbax writes gs:// itself
        self.directory = os.path.join(root, 'checkpoints')
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state',))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
        """Start saving (returns once the arrays are copied off the devices; the write goes on in the
        background, so the caller may donate `state` to the next step)."""
        self.manager.save(step, args=self._ocp.args.Composite(state=self._ocp.args.StandardSave(state)),
                          metrics=metrics, force=True)

    def restore(self, target: Any, step: int | None = None) -> Any:
        """The state at `step` (default: newest), laid out as `target` says: a tree of ShapeDtypeStructs
        with shardings, so a checkpoint of any mesh restores onto any other."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target)))
        return restored['state']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class Preemption:
    """SIGTERM -> `requested` becomes true at the next step boundary on every process.

    One process: our own handler. Several: JAX's coordination service already listens for SIGTERM on
    every host and `reached_preemption_sync_point` makes all hosts stop at the same step.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._flag = True

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        return multihost_utils.reached_preemption_sync_point(step)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

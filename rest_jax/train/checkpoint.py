"""Checkpoints of a training workdir (Orbax CheckpointManager), preemption, and loading them back.

WORKDIR/
  rest_jax.json    the model spec {"format": "rest_jax.workdir/1", "model", "config", "preprocessing"}
  config.json      the full training config
  checkpoints/N/   Orbax: 'state' (TrainState) at update N; best-checkpoint metrics beside it

Orbax writes each step into a temporary directory and renames it when complete, so a process killed
at any moment (SIGKILL included) leaves only complete checkpoints behind; the newest one is resumed.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax

WORKDIR_FORMAT = 'rest_jax.workdir/1'
METADATA = 'rest_jax.json'


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
        self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
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


def write_metadata(workdir: str, model_name: str, overrides: dict[str, Any], preprocessing: dict[str, Any],
                   config_json: str) -> None:
    """The model spec and the config, written once by process 0 (atomically: tmp file + rename)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    meta = {'format': WORKDIR_FORMAT, 'model': model_name, 'config': overrides, 'preprocessing': preprocessing}
    for name, text in ((METADATA, json.dumps(meta, indent=2) + '\n'), ('config.json', config_json)):
        tmp = os.path.join(workdir, f'.{name}.tmp')
        with open(tmp, 'w') as file:
            file.write(text)
        os.replace(tmp, os.path.join(workdir, name))


def read_metadata(workdir: str) -> dict[str, Any] | None:
    """The workdir's model spec, or None if `workdir` is not a training workdir."""
    path = os.path.join(workdir, METADATA)
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        meta = json.load(file)
    return meta if meta.get('format') == WORKDIR_FORMAT else None


def load_workdir(workdir: str, ema: bool = False):
    """(model, variables) from a training workdir's newest checkpoint; `rest_jax.load_pretrained`
    calls this for workdirs. ema=True gives the EMA parameters and statistics."""
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from rest_jax.models.registry import create_model
    meta = read_metadata(workdir)
    if meta is None:
        raise ValueError(f'{workdir} is not a rest_jax training workdir (no {METADATA} of format {WORKDIR_FORMAT})')
    directory = os.path.join(workdir, 'checkpoints')
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=('state',))
    try:
        step = manager.latest_step()  # the newest complete (committed) checkpoint
    finally:
        manager.close()
    if step is None:
        raise ValueError(f'{workdir} has no complete checkpoint yet')
    path = os.path.join(directory, str(step), 'state')
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        # Partial restore of the saved TrainState: only the weights, onto one device, whatever mesh saved them.
        tree = checkpointer.metadata(path).item_metadata.tree
        key = 'ema' if ema else None
        wanted = tree[key] if key else {'params': tree['params'], 'batch_stats': tree['batch_stats']}
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=device),
                              wanted)
        full = {key: target} if key else target
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), full)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(full, restore_args=restore_args,
                                                                          partial_restore=True))
    finally:
        checkpointer.close()
    restored = {'state': restored}
    variables = restored['state']['ema'] if key else restored['state']
    model = create_model(meta['model'], **meta['config'])
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)

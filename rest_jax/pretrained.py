"""The checkpoint directories rest_jax reads and writes, and the preprocessing their models expect.

Two formats, each a directory with `rest_jax.json` (METADATA) beside the weights:

  converted   {"format": "rest_jax.converted/1", "model", "config" (create_model overrides),
              "preprocessing", "source", "num_params"} and variables/, an Orbax checkpoint of
              {'params', 'batch_stats'}. Written by the converter (python -m rest_jax.convert).
  workdir     {"format": "rest_jax.workdir/1", "model", "config", "preprocessing"}, config.json and
              checkpoints/N/state (Orbax TrainState). Written by train.py.

`load_pretrained` reads either. Paths may be local or any filesystem etils.epath knows (gs://...).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from rest_jax.models import registry

FORMAT = 'rest_jax.converted/1'
WORKDIR_FORMAT = 'rest_jax.workdir/1'
METADATA = 'rest_jax.json'


# --- metadata --------------------------------------------------------------------------------------

def read_metadata(path: str | os.PathLike, format: str | None = None) -> dict[str, Any] | None:
    """The `rest_jax.json` of a checkpoint directory, or None where there is none (or, with `format`,
    where it is of another format)."""
    file = epath.Path(path) / METADATA
    if not file.is_file():
        return None
    meta = json.loads(file.read_text())
    return meta if format is None or meta.get('format') == format else None


def write_metadata(directory: str | os.PathLike, meta: Mapping[str, Any], extra: Mapping[str, str] = ()) -> None:
    """Write `rest_jax.json` (and `extra` {file name: text}) into `directory` (local or gs://), each file
    atomically (locally a temporary file, then a rename), so a reader never sees half a file."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in [(METADATA, json.dumps(dict(meta), indent=2) + '\n'), *dict(extra).items()]:
        if '://' in str(directory):   # an object store: an object appears whole when its write completes
            (directory / name).write_text(text)
            continue
        tmp = directory / f'.{name}.tmp'
        tmp.write_text(text)
        tmp.rename(directory / name)


def write_workdir_metadata(workdir: str | os.PathLike, model_name: str, overrides: Mapping[str, Any],
                           preprocessing: Mapping[str, Any], config_json: str) -> None:
    """A training workdir's model spec and config, written once by process 0."""
    if jax.process_index() != 0:
        return
    meta = {'format': WORKDIR_FORMAT, 'model': model_name, 'config': dict(overrides),
            'preprocessing': dict(preprocessing)}
    write_metadata(workdir, meta, {'config.json': config_json})


# --- converted directories -------------------------------------------------------------------------

def abstract_variables(model) -> dict:
    """Shapes and dtypes of `model`'s variables (jax.ShapeDtypeStruct leaves), computed without FLOPs."""
    # Parameter shapes do not depend on the input size; eval_shape costs a trace, no FLOPs.
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def write_converted(dst: str | os.PathLike, variables: Mapping[str, Any], meta: Mapping[str, Any],
                    force: bool = False) -> None:
    """Write a converted directory at `dst` (local path) atomically: it is built in a temporary directory
    beside it and renamed into place, so a failure leaves nothing at `dst`; an existing `dst` is replaced
    only with `force`."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not force:
        raise ValueError(f'{dst} exists; pass --force to overwrite')
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(dst)}.tmp-')
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is for the build, not for the result
        import orbax.checkpoint as ocp  # imported late: only writing and loading need it
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(os.path.join(tmp, 'variables'), dict(variables))
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        write_metadata(tmp, meta)
        if os.path.lexists(dst):  # force: move the old one aside, so dst is never half-written
            old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(dst)}.old-')
            os.replace(dst, os.path.join(old, 'old'))
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_converted(path: epath.Path, meta: Mapping[str, Any]):
    import orbax.checkpoint as ocp
    model = registry.create_model(meta['model'], **meta['config'])
    target = abstract_variables(model)
    target = {'params': target.get('params', {}), 'batch_stats': target.get('batch_stats', {})}
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(path / 'variables', target)
    finally:
        checkpointer.close()
    return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), restored)


# --- training workdirs -----------------------------------------------------------------------------

def load_workdir(workdir: str | os.PathLike, ema: bool = False):
    """(model, variables) from a training workdir's newest complete checkpoint; ema=True gives the EMA
    parameters and statistics. `load_pretrained` calls this for workdirs."""
    import orbax.checkpoint as ocp
    workdir = epath.Path(workdir)
    meta = read_metadata(workdir, WORKDIR_FORMAT)
    if meta is None:
        raise ValueError(f'{workdir} is not a rest_jax training workdir (no {METADATA} of format {WORKDIR_FORMAT})')
    directory = workdir / 'checkpoints'
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=('state',))
    try:
        step = manager.latest_step()  # the newest complete (committed) checkpoint
    finally:
        manager.close()
    if step is None:
        raise ValueError(f'{workdir} has no complete checkpoint yet')
    path = directory / str(step) / 'state'
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
    variables = restored[key] if key else restored
    model = registry.create_model(meta['model'], **meta['config'])
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)


# --- either ----------------------------------------------------------------------------------------

def load_pretrained(path: str | os.PathLike, ema: bool = False):
    """Load a converted checkpoint (`python -m rest_jax.convert`) or a training workdir.

    Args:
      path: a converted directory, or a `train.py` workdir (its newest complete checkpoint is read).
      ema: workdirs only: the EMA parameters and statistics instead of the plain ones. A converted
        directory holds one set of weights, so True raises there (convert with --ema instead).

    Returns:
      (model, variables): the configured model and {'params', 'batch_stats'} as float32 jax arrays
      on the default device, ready for `model.apply(variables, images)`. The model carries the
      checkpoint's preprocessing (`preprocessing_of(model)`).

    Raises:
      ValueError: `path` is neither, a workdir without a checkpoint, or ema=True on a converted directory.
    """
    path = epath.Path(os.path.abspath(os.fspath(path)) if '://' not in os.fspath(path) else os.fspath(path))
    meta = read_metadata(path)
    if meta is None:
        raise ValueError(f'{path} is not a rest_jax checkpoint (no {METADATA})')
    if meta.get('format') == WORKDIR_FORMAT:
        model, variables = load_workdir(path, ema=ema)
    elif meta.get('format') == FORMAT:
        if ema:
            raise ValueError(f'{path} holds one set of weights; convert with --ema instead')
        model, variables = _load_converted(path, meta)
    else:
        raise ValueError(f'{path}: unknown format {meta.get("format")!r} (expected {FORMAT!r} or {WORKDIR_FORMAT!r})')
    remember_preprocessing(model, meta['preprocessing'])
    return model, variables


# --- the preprocessing a model expects -------------------------------------------------------------

# Preprocessing metadata of models returned by load_pretrained, keyed by object identity (equal
# models of different checkpoints, e.g. a 224 and a 384 fine-tune, must not share it).
_RECORDED: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def remember_preprocessing(model: Any, preprocessing: Mapping[str, Any]) -> None:
    """Attach a checkpoint's preprocessing metadata to `model`, for `preprocessing_of(model)`."""
    key = id(model)
    _RECORDED[key] = (weakref.ref(model, lambda _: _RECORDED.pop(key, None)), dict(preprocessing))


def preprocessing_of(model: Any) -> dict[str, Any]:
    """The eval preprocessing for `model`.

    Args:
      model: a model from `load_pretrained` (its checkpoint's metadata), any ResT/ResTV2 module (its
        family's registered defaults), a variant name, a `ModelInfo`, or a preprocessing dict
        (`rest_jax.json`'s 'preprocessing').

    Returns:
      dict with input_size, crop_pct, interpolation, mean, std, num_classes.
    """
    if isinstance(model, Mapping):
        missing = {'input_size', 'crop_pct', 'mean', 'std'} - set(model)
        if missing:
            raise ValueError(f'preprocessing dict lacks {sorted(missing)}; pass a model, a variant name or '
                             "rest_jax.json's 'preprocessing'")
        return {'interpolation': 'bicubic', 'num_classes': None, **model}
    if isinstance(model, str):
        return registry.model_info(model).preprocessing()
    if isinstance(model, registry.ModelInfo):
        return model.preprocessing()
    recorded = _RECORDED.get(id(model))
    if recorded is not None and recorded[0]() is model:
        return dict(recorded[1])
    for name in registry.list_models():
        info = registry.model_info(name)
        if type(model) is info.cls:
            return {**info.preprocessing(), 'num_classes': getattr(model, 'num_classes', info.num_classes)}
    raise ValueError(f'cannot tell the preprocessing of {type(model).__name__}; pass a variant name, a '
                     'ModelInfo or a preprocessing dict instead')

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

import contextlib
import dataclasses
import json
import logging
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


def save_pretrained(directory: str | os.PathLike, model: Any, variables: Mapping[str, Any],
                    preprocessing: Any = None, force: bool = False) -> dict[str, Any]:
    """Write `model` and `variables` as a converted directory (the converter's format, metadata included).

    The result loads with `load_pretrained`, exports with `python -m rest_jax export` and predicts with
    `python -m rest_jax predict`, like a converted official checkpoint.

    Args:
      directory: where to write (a local path); built beside it and renamed into place.
      model: a ResT/ResTV2 module (from create_model, load_pretrained or reset_classifier). A
        features-only model is saved as its whole model (it needs the head's and norm's variables).
      variables: its {'params', 'batch_stats'}; floating arrays are stored as float32.
      preprocessing: the eval preprocessing to record (a dict, a PretrainedCfg, a variant name);
        default: `preprocessing_of(model)` (the loaded checkpoint's, or the variant's defaults).
      force: replace an existing `directory`.

    Returns:
      The metadata written to `directory/rest_jax.json`.

    Raises:
      ValueError: `directory` exists without force, a model that is no registered family, or variables
        that do not fit the model (missing, unexpected and mis-shaped entries are listed).
    """
    name, config = model_spec(model)
    full = registry.create_model(name, **config)
    variables = {'params': dict(variables.get('params', {})), 'batch_stats': dict(variables.get('batch_stats', {}))}
    expected = dict(jax.tree_util.tree_flatten_with_path(abstract_variables(full))[0])
    given = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    problems = [f'missing {jax.tree_util.keystr(k)}' for k in expected if k not in given]
    problems += [f'unexpected {jax.tree_util.keystr(k)}' for k in given if k not in expected]
    problems += [f'{jax.tree_util.keystr(k)} is {tuple(np.shape(v))}, the model needs {expected[k].shape}'
                 for k, v in given.items() if k in expected and tuple(np.shape(v)) != expected[k].shape]
    if problems:
        more = f' (+{len(problems) - 4} more)' if len(problems) > 4 else ''
        raise ValueError(f'the variables do not fit {name} {config or ""}: {"; ".join(problems[:4])}{more}; '
                         'pass the whole model\'s variables (e.g. from load_pretrained or model.init)')
    variables = jax.tree.map(lambda x: np.asarray(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                             else np.asarray(x), variables)
    prep = preprocessing_of(model if preprocessing is None else preprocessing)
    prep['num_classes'] = full.num_classes
    meta = {'format': FORMAT, 'model': name, 'config': config, 'preprocessing': prep,
            'source': {'entry': 'save_pretrained', 'path': None, 'sha256': None},
            'num_params': int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables['params'])))}
    write_converted(directory, variables, meta, force=force)
    return meta


def model_spec(model: Any) -> tuple[str, dict[str, Any]]:
    """(variant name, create_model overrides) that rebuild `model`'s architecture: the registered variant
    of its family with the fewest differences. Run-time settings (dtype, impl, remat, ...) are left out."""
    best = None
    for name in registry.list_models():
        info = registry.model_info(name)
        if not isinstance(model, info.cls):
            continue
        fields = [f for f in registry.model_args(info.cls) if f not in RUNTIME_ARGS]
        defaults = registry.create_model(name)
        config = {f: _jsonable(getattr(model, f)) for f in fields
                  if _jsonable(getattr(model, f)) != _jsonable(getattr(defaults, f))}
        if best is None or len(config) < len(best[1]):
            best = (name, config)
    if best is None:
        raise ValueError(f'cannot save a {type(model).__name__}: expected a ResT or ResTV2 model from rest_jax.create_model')
    return best


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _head_only(module, pooled: jax.Array) -> jax.Array:
    return module.head(pooled)


def reset_classifier(model: Any, variables: Mapping[str, Any], num_classes: int,
                     key: jax.Array | int = 0) -> tuple[Any, dict[str, Any]]:
    """A fresh classifier head for `num_classes` on loaded variables (timm's `reset_classifier`).

    Args:
      model: a ResT/ResTV2 module (e.g. from load_pretrained).
      variables: its {'params', 'batch_stats'}.
      num_classes: classes of the new head; 0 removes the head (the model then gives pooled features).
      key: a jax.random key or an int seed. The head is the one `new_model.init(key, images)` would
        create (Linen derives each module's parameters from the key and the module's path), so it is
        deterministic and independent of the input size.

    Returns:
      (new_model, new_variables): the model with `num_classes` set, and the variables with the new head;
      every other array is the same object as in `variables`. The model keeps the checkpoint's
      preprocessing (`preprocessing_of`), with the new num_classes.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
        raise ValueError(f'num_classes must be an integer >= 0, got {num_classes!r}')
    new_model = model.clone(num_classes=int(num_classes))
    params = {k: v for k, v in variables['params'].items() if k != 'head'}
    if num_classes:
        key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
        pooled = jnp.zeros((1, model.embed_dims[-1]), jnp.float32)
        params['head'] = new_model.init(key, pooled, method=_head_only)['params']['head']
    recorded = _RECORDED.get(id(model))
    if recorded is not None and recorded[0]() is model:
        remember_preprocessing(new_model, {**recorded[1], 'num_classes': int(num_classes)})
    return new_model, {**variables, 'params': params}


# --- training workdirs -----------------------------------------------------------------------------

# What Orbax logs, as warnings, whenever a checkpoint is read without writing (the step's metadata file
# sits beside `state`, not in it): nothing for a reader to act on.
_READ_ONLY_NOTICES = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only',
                      'Metadata file does not exist')


@contextlib.contextmanager
def _without_read_only_notices():
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_READ_ONLY_NOTICES)
    logger = logging.getLogger('absl')
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@_without_read_only_notices()
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

# create_model arguments that change how a loaded model runs, never which variables it has.
RUNTIME_ARGS = ('dtype', 'impl', 'conv_impl', 'remat', 'drop_path_rate', 'features_only', 'out_indices', 'feature_norm')


def load_pretrained(path: str | os.PathLike, ema: bool = False, **kwargs: Any):
    """Load a converted checkpoint (`python -m rest_jax.convert`), a `save_pretrained` directory or a
    training workdir.

    Args:
      path: a converted directory, or a `train.py` workdir (its newest complete checkpoint is read).
      ema: workdirs only: the EMA parameters and statistics instead of the plain ones. A converted
        directory holds one set of weights, so True raises there (convert with --ema instead).
      **kwargs: create_model arguments that leave the variables as they are: `features_only`,
        `out_indices`, `feature_norm` (the backbone form; its unused head is ignored by `apply`),
        `dtype`, `impl`, `remat`, `drop_path_rate`. For another head use `reset_classifier`.

    Returns:
      (model, variables): the configured model and {'params', 'batch_stats'} as float32 jax arrays
      on the default device, ready for `model.apply(variables, images)`. The model carries the
      checkpoint's preprocessing (`preprocessing_of(model)`).

    Raises:
      ValueError: `path` is neither, a workdir without a checkpoint, ema=True on a converted directory,
        or an argument that would change the variables.
    """
    unknown = sorted(set(kwargs) - set(RUNTIME_ARGS))
    if unknown:
        raise ValueError(f'load_pretrained takes only {", ".join(RUNTIME_ARGS)} as model arguments, got '
                         f'{", ".join(unknown)}; for another number of classes use rest_jax.reset_classifier')
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
    if kwargs:
        model = registry.create_model(meta['model'], **{**meta['config'], **kwargs})
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
        family's registered defaults), a variant name, a `ModelInfo`, a `PretrainedCfg`, or a
        preprocessing dict (`rest_jax.json`'s 'preprocessing').

    Returns:
      dict with input_size, crop_pct, interpolation, mean, std, num_classes.
    """
    if isinstance(model, PretrainedCfg):
        return model.preprocessing()
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
        if isinstance(model, info.cls):   # the class or its features-only form
            return {**info.preprocessing(), 'num_classes': getattr(model, 'num_classes', info.num_classes)}
    raise ValueError(f'cannot tell the preprocessing of {type(model).__name__}; pass a variant name, a '
                     'ModelInfo or a preprocessing dict instead')


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """A checkpoint's eval preprocessing under timm's names (timm's `pretrained_cfg` / data config).

    `input_size` is (channels, height, width) as in timm. Below 384 the official eval resizes the
    shorter side to int(size / crop_pct) and center-crops (timm's crop_mode 'center'); at 384 and above
    it warps the whole image to the square (timm's crop_mode 'squash' with crop_pct 1.0), so a timm
    transform built from these fields (`timm.data.create_transform(**cfg.to_dict())`) matches
    `rest_jax.preprocess`.
    """
    architecture: str | None            # the variant name
    input_size: tuple[int, int, int]    # (3, height, width)
    crop_pct: float
    crop_mode: str                      # 'center' or 'squash'
    interpolation: str                  # 'bicubic' for every official checkpoint
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def preprocessing(self) -> dict[str, Any]:
        """The same in rest_jax.json's 'preprocessing' form (what `preprocess` reads)."""
        return dict(input_size=self.input_size[1], crop_pct=self.crop_pct, interpolation=self.interpolation,
                    mean=list(self.mean), std=list(self.std), num_classes=self.num_classes)


def pretrained_cfg(source: Any) -> PretrainedCfg:
    """The eval preprocessing of a checkpoint or model, as one object with timm's names.

    Args:
      source: a checkpoint directory (converted, saved or a training workdir), a model (from
        load_pretrained: its checkpoint's; from create_model: the variant's), a variant name, a
        ModelInfo or a preprocessing dict.

    Returns:
      A PretrainedCfg (input_size, crop_pct, crop_mode, interpolation, mean, std, num_classes, architecture).
    """
    if isinstance(source, PretrainedCfg):
        return source
    architecture = None
    if isinstance(source, (str, os.PathLike)) and read_metadata(source) is not None:
        meta = read_metadata(source)
        architecture, source = meta.get('model'), meta['preprocessing']
    elif isinstance(source, (str, os.PathLike)):
        if source not in registry.list_models():
            raise ValueError(f'{source} is neither a rest_jax checkpoint directory (no {METADATA}) nor a variant '
                             f'name ({", ".join(registry.list_models())})')
        architecture = source
    elif isinstance(source, registry.ModelInfo):
        architecture = source.name
    elif not isinstance(source, Mapping):
        architecture = model_spec(source)[0]
    prep = preprocessing_of(source)
    size = int(prep['input_size'])
    squash = size >= 384   # rest_jax.inference warps at this size, as the official eval does
    return PretrainedCfg(architecture=architecture, input_size=(3, size, size),
                         crop_pct=1.0 if squash else float(prep['crop_pct']), crop_mode='squash' if squash else 'center',
                         interpolation=prep.get('interpolation', 'bicubic'), mean=tuple(prep['mean']),
                         std=tuple(prep['std']), num_classes=prep.get('num_classes'))

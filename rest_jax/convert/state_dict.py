"""Official PyTorch state_dict <-> Flax variables: a rename plus a transpose, checked strictly.

Flax module names follow the official attribute paths, with a numeric path component joined to the
one before it (`stage1.0.attn.up.0.weight` -> `stage1_0/attn/up_0/kernel`). Leaves map as:

  Linear weight (out, in)         -> kernel (in, out)
  Conv2d weight (out, in/g, h, w) -> kernel (h, w, in/g, out)
  Norm weight / bias              -> scale / bias
  BatchNorm running_mean / var    -> batch_stats mean / var  (num_batches_tracked is dropped)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from rest_jax.pretrained import abstract_variables

_PREFIXES = ('module.',)
_IGNORED_SUFFIXES = ('num_batches_tracked',)
_MAX_LISTED = 8


def _flax_path(key: str) -> tuple[tuple[str, ...], str]:
    """'stage1.0.attn.up.0.weight' -> (('stage1_0', 'attn', 'up_0'), 'weight')."""
    parts: list[str] = []
    for part in key.split('.'):
        if part.isdigit() and parts:
            parts[-1] = f'{parts[-1]}_{part}'
        else:
            parts.append(part)
    return tuple(parts[:-1]), parts[-1]


def _torch_layout(array: np.ndarray) -> np.ndarray:
    """A Flax kernel in PyTorch's layout (inverse of the transposes applied on the way in)."""
    if array.ndim == 2:
        return array.T
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def _from_torch(array: np.ndarray, ndim: int) -> np.ndarray:
    if ndim == 2:
        return array.T
    if ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _target(module: tuple[str, ...], leaf: str, flat: Mapping[tuple[str, ...], Any]):
    """The (collection, path) a torch leaf fills, or None if the model has no such variable."""
    names = {'weight': ('kernel', 'scale'), 'bias': ('bias',), 'running_mean': ('mean',),
             'running_var': ('var',)}.get(leaf, ())
    for name in names:
        for col in ('params', 'batch_stats'):
            path = (col,) + module + (name,)
            if path in flat:
                return path
    return None


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DistributedDataParallel's 'module.' prefix (if every key has it)."""
    out = dict(state_dict)
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def variables_from_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> dict:
    """Flax variables of `model` filled from an official PyTorch state_dict.

    Args:
      model: a model from `create_model`, configured like the checkpoint (variant, num_classes).
      state_dict: official key -> array (numpy, or anything `np.asarray` takes), as in the 'model'
        entry of an official checkpoint. 'module.' prefixes and `num_batches_tracked` are accepted.

    Returns:
      {'params': ..., 'batch_stats': ...} as nested dicts of float32 jax arrays.

    Raises:
      ValueError: listing every missing key, unexpected key and shape mismatch (in PyTorch's
        names and layouts), so that a wrong variant or num_classes shows at once.
    """
    flat = traverse_util.flatten_dict(abstract_variables(model))
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, value in strip_prefixes(state_dict).items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        path = _target(*_flax_path(key), flat)
        if path is None:
            unexpected.append(key)
            continue
        array = np.asarray(value)
        want = flat[path]
        want_torch = tuple(_torch_layout(np.empty(want.shape, np.uint8)).shape)
        if array.shape != want_torch:
            mismatched.append(f'{key}: checkpoint {tuple(array.shape)} vs model {want_torch}')
            filled[path] = None  # present, but reported as mis-shaped rather than missing
            continue
        filled[path] = jnp.asarray(_from_torch(array, array.ndim), dtype=want.dtype)
    missing = [_torch_name(p) for p in flat if p not in filled]
    filled = {p: v for p, v in filled.items() if v is not None}
    problems = []
    for label, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', mismatched)):
        if items:
            shown = ', '.join(items[:_MAX_LISTED]) + (f' (+{len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else '')
            problems.append(f'{len(items)} {label}: {shown}')
    if problems:
        raise ValueError(f'state_dict does not fit {type(model).__name__}: ' + '; '.join(problems)
                         + '. Check the variant (--model) and num_classes.')
    return traverse_util.unflatten_dict(filled)


# The official nn.ModuleList / nn.Sequential containers, whose indices Flax joins with '_'.
_INDEXED = re.compile(r'^(stage[1-4]|proj|up)_(\d+)$')


def _torch_name(path: tuple[str, ...]) -> str:
    """('params', 'stage1_0', 'attn', 'up_0', 'kernel') -> 'stage1.0.attn.up.0.weight'."""
    _, *module, leaf = path
    leaf = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}.get(leaf, leaf)
    return '.'.join([_INDEXED.sub(r'\1.\2', p) for p in module] + [leaf])


def state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse mapping: Flax variables -> official state_dict (without num_batches_tracked)."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        out[_torch_name(path)] = _torch_layout(np.asarray(value))
    return out

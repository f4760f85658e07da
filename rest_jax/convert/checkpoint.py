"""Official `.pth` checkpoint -> a converted directory (rest_jax.pretrained's format): which state_dict,
which architecture, then the strict mapping of rest_jax.convert.state_dict."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from rest_jax.convert.pth import load_pth
from rest_jax import pretrained
from rest_jax.convert.state_dict import strip_prefixes, variables_from_state_dict
from rest_jax.models.registry import create_model, list_models, model_info

_BASE = {'v1': 'rest_lite', 'v2': 'restv2_tiny'}
_STAGES = range(1, 5)


# --- which state_dict ----------------------------------------------------------------------------

def _select_state_dict(ckpt: Any, ema: bool, name: str) -> tuple[dict[str, np.ndarray], str]:
    """(state_dict, entry) picked from a loaded checkpoint; see `convert_checkpoint`."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f'{name}: holds a {type(ckpt).__name__}, not a dict with a state_dict')
    bare = bool(ckpt) and all(isinstance(v, np.ndarray) for v in ckpt.values())
    keys = [str(k) for k in ckpt]
    entries = ('a bare state_dict' if bare else f'entries: {", ".join(keys[:8]) or "none"}'
               + (f' (+{len(keys) - 8} more)' if len(keys) > 8 else ''))
    if ema:
        if not isinstance(ckpt.get('model_ema'), Mapping):
            raise ValueError(f"{name}: no 'model_ema' entry ({entries}); drop --ema")
        entry = 'model_ema'
    elif isinstance(ckpt.get('model'), Mapping):
        entry = 'model'
    elif isinstance(ckpt.get('state_dict'), Mapping):
        entry = 'state_dict'
    elif bare:
        entry = 'bare'
    else:
        raise ValueError(f"{name}: no 'model' or 'state_dict' entry and not a bare state_dict ({entries})")
    state_dict = ckpt if entry == 'bare' else ckpt[entry]
    return strip_prefixes({str(k): v for k, v in state_dict.items()}), entry


# --- which architecture --------------------------------------------------------------------------

def _family(state_dict: Mapping[str, Any]) -> str:
    if any(k.startswith(('patch_embed_2.', 'stem.conv1.')) for k in state_dict):
        return 'v1'
    if any(k.startswith(('patch_2.', 'stem.proj.0.')) for k in state_dict):
        return 'v2'
    raise ValueError('not a ResT state_dict (no patch_embed_2./stem.conv1. or patch_2./stem.proj.0. keys)')


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _shape_arch(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(family, arch read from shapes); v2's num_heads (and v1's without transform_conv) left out."""
    family = _family(state_dict)
    shape = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    patch = 'patch_embed_{}.pos.pa_conv.weight' if family == 'v1' else 'patch_{}.pos.pa_conv.weight'
    try:
        dims = tuple(shape['stem.pos.pa_conv.weight' if i == 1 else patch.format(i)][0] for i in _STAGES)
    except KeyError as e:
        raise ValueError(f'incomplete ResT state_dict: no {e.args[0]}') from None
    depths = tuple(len({m.group(1) for k in shape if (m := re.match(rf'stage{i}\.(\d+)\.', k))}) for i in _STAGES)
    if 0 in depths:
        raise ValueError(f'incomplete ResT state_dict: no blocks in stage{depths.index(0) + 1} (depths {list(depths)})')
    # The key/value reduction is a depthwise conv with kernel sr + 1 (absent when sr == 1).
    srs = tuple(shape[f'stage{i}.0.attn.sr.weight'][-1] - 1 if f'stage{i}.0.attn.sr.weight' in shape else 1
                for i in _STAGES)
    arch: dict[str, Any] = dict(embed_dims=dims, depths=depths, sr_ratios=srs)
    if family == 'v1':
        arch['mlp_ratios'] = tuple(_number(shape[f'stage{i}.0.mlp.fc1.weight'][0] / d) if f'stage{i}.0.mlp.fc1.weight' in shape
                                   else 4 for i, d in zip(_STAGES, dims))
        arch['qkv_bias'] = any(k.endswith('.attn.q.bias') for k in shape)
        transform = {i: shape[f'stage{i}.0.attn.transform_conv.weight'][0] for i in _STAGES
                     if f'stage{i}.0.attn.transform_conv.weight' in shape}
        arch['apply_transform'] = bool(transform)
        if transform:  # the official code skips the transform for single-head stages
            arch['num_heads'] = tuple(transform.get(i, 1) for i in _STAGES)
    arch['num_classes'] = shape['head.weight'][0] if 'head.weight' in shape else 0
    return family, arch


def _full_arch(name: str) -> dict[str, Any]:
    """Every constructor argument of a registered variant (class defaults + registered arch)."""
    info = model_info(name)
    defaults = {f.name: f.default for f in dataclasses.fields(info.cls) if f.default is not dataclasses.MISSING}
    return {**defaults, **info.arch}


def _family_names(family: str) -> list[str]:
    return [n for n in list_models() if n.startswith('restv2_') == (family == 'v2')]


def _resolve_heads(family: str, arch: dict[str, Any]) -> None:
    """Fill num_heads from registered variants of the same widths when shapes cannot show it."""
    if 'num_heads' in arch:
        return
    heads = {_full_arch(n)['num_heads'] for n in _family_names(family)
             if tuple(_full_arch(n)['embed_dims']) == arch['embed_dims']}
    if len(heads) == 1:
        arch['num_heads'] = heads.pop()


def recognize_variant(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered variant an official state_dict belongs to, read from its keys and shapes.

    Args:
      state_dict: official key -> array (a 'module.' prefix is accepted).

    Returns:
      (name, overrides): `create_model(name, **overrides)` fits the state_dict. overrides is {} for
      a registered variant with 1000 classes, {'num_classes': n} for another head size.

    Raises:
      ValueError: not a ResT state_dict, or a layout that matches no registered variant (the
        message gives the family, embed_dims and depths; see `convert_checkpoint` for that case).
    """
    family, arch = _shape_arch(strip_prefixes(state_dict))
    _resolve_heads(family, arch)
    overrides = {} if arch['num_classes'] == 1000 else {'num_classes': arch['num_classes']}
    seen = {k: v for k, v in arch.items() if k != 'num_classes'}
    matches = [n for n in _family_names(family)
               if all(_same(_full_arch(n).get(k), v) for k, v in seen.items())]
    if len(matches) == 1:
        return matches[0], overrides
    heads = arch.get('num_heads')
    how = (f'--arch num_heads={",".join(map(str, heads))}' if heads else
           '--arch num_heads=a,b,c,d (the heads per stage, which these shapes do not show)')
    raise ValueError(f'layout matches no registered variant ({family}, embed_dims={list(arch["embed_dims"])}, '
                     f'depths={list(arch["depths"])}); to convert it as its shapes read, pass {how}')


def _same(a: Any, b: Any) -> bool:
    return (tuple(a) == tuple(b)) if isinstance(a, (tuple, list)) else a == b


def _choose_model(state_dict: Mapping[str, Any], model: str | None,
                  arch: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(name, overrides) to build (see `convert_checkpoint`).

    --model pins the variant: only num_classes is read from the head, and --arch adds overrides; a
    checkpoint of another variant then fails the strict load, which names the mismatching keys.
    Without --model, the layout read from the shapes is used: a registered variant if one matches,
    else (only when --arch is given, so that a custom layout is a deliberate choice) that layout.
    """
    arch = dict(arch or {})
    if model is not None:
        overrides = dict(arch)
        head = strip_prefixes(state_dict).get('head.weight')
        classes = 0 if head is None else int(np.shape(head)[0])
        if 'num_classes' not in overrides and classes != model_info(model).num_classes:
            overrides['num_classes'] = classes
        return model, overrides
    try:
        name, overrides = recognize_variant(state_dict)
        if not arch:
            return name, overrides
    except ValueError:
        if not arch:
            raise
    family, seen = _shape_arch(strip_prefixes(state_dict))
    seen.update(arch)  # the user's word wins; the strict load then checks it against the shapes
    _resolve_heads(family, seen)
    if 'num_heads' not in seen:
        raise ValueError(f'num_heads cannot be read from a {family} state_dict with embed_dims '
                         f'{list(seen["embed_dims"])}; pass --arch num_heads=a,b,c,d')
    name = _BASE[family]
    full = _full_arch(name)
    return name, {k: v for k, v in seen.items() if k not in full or not _same(full[k], v)}


def parse_arch(items: list[str] | None) -> dict[str, Any]:
    """['num_heads=1,2,4,8', 'qkv_bias=true'] -> {'num_heads': (1, 2, 4, 8), 'qkv_bias': True}."""
    def scalar(text: str) -> Any:
        if text.lower() in ('true', 'false'):
            return text.lower() == 'true'
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'--arch takes KEY=VALUE, got {item!r}')
        out[key] = tuple(scalar(v) for v in value.split(',')) if ',' in value else scalar(value)
    return out


# --- convert and load ----------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, model: str | None = None,
                       ema: bool = False, force: bool = False,
                       arch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Convert an official PyTorch checkpoint into a directory that `load_pretrained` reads.

    Args:
      src: the `.pth` file (read without torch; pickled code is refused).
      dst: the output directory; written atomically (nothing is left there on failure).
      model: registered variant to build. None: recognised from the shapes, which must match a
        registered variant unless `arch` is given (then the family's base variant plus the shapes).
        Given: the variant plus every shape-derived difference (widths, depths, heads, head size).
      ema: convert the 'model_ema' entry instead of 'model'.
      force: replace an existing `dst`.
      arch: create_model overrides (e.g. {'num_heads': (1, 2, 4, 8)}); they win over the shapes.

    Returns:
      The metadata written to `dst/rest_jax.json`.

    Raises:
      FileNotFoundError, CheckpointError (a ValueError): unreadable or unsafe `src`.
      ValueError: a state_dict that does not fit, a missing entry, or `dst` exists without force.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not force:
        raise ValueError(f'{dst} exists; pass --force to overwrite')
    ckpt = load_pth(src)
    state_dict, entry = _select_state_dict(ckpt, ema, os.path.basename(src))
    try:
        name, overrides = _choose_model(state_dict, model, arch)
    except ValueError as e:
        raise ValueError(f'{os.path.basename(src)}: {e}') from None
    net = create_model(name, **overrides)
    variables = variables_from_state_dict(net, state_dict)
    variables = {'params': variables.get('params', {}), 'batch_stats': variables.get('batch_stats', {})}
    preprocessing = model_info(name).preprocessing()
    preprocessing['num_classes'] = overrides.get('num_classes', preprocessing['num_classes'])
    meta = {'format': pretrained.FORMAT, 'model': name, 'config': {k: _jsonable(v) for k, v in overrides.items()},
            'preprocessing': preprocessing,
            'source': {'path': os.path.basename(src), 'sha256': _sha256(src), 'entry': entry},
            'num_params': int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables['params'])))}
    pretrained.write_converted(dst, variables, meta, force=force)
    return meta

"""Model registry: variant name -> model class, architecture and preprocessing metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn

from rest_jax import ops
from rest_jax.models.backbone import (FeatureInfo, check_feature_norm, check_out_indices, features_class,
                                      remat_policy)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A registered variant: how to build it and how its official weights expect to be fed."""
    name: str
    cls: type[nn.Module]
    arch: dict[str, Any]           # the official hyperparameters (constructor arguments)
    top1: float                    # official ImageNet-1k top-1 at 224, for the README table
    gflops: float                  # official GFLOPs at 224 (multiply-adds), as published
    input_size: int = 224
    crop_pct: float = 0.875        # eval: resize the shorter side to int(input_size / crop_pct)
    interpolation: str = 'bicubic'
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000

    def preprocessing(self) -> dict[str, Any]:
        """The metadata a checkpoint carries so that inference can reproduce the official eval."""
        return dict(input_size=self.input_size, crop_pct=self.crop_pct,
                    interpolation=self.interpolation, mean=list(self.mean), std=list(self.std),
                    num_classes=self.num_classes)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> None:
    if info.name in _REGISTRY:
        raise ValueError(f'model {info.name!r} is registered twice')
    _REGISTRY[info.name] = info


def list_models() -> list[str]:
    """The registered variant names, in registration order (v1 lite..large, then v2 tiny..large)."""
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry of `name`; ValueError naming the valid names if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f'unknown model {name!r}; valid names: {", ".join(_REGISTRY)}') from None


def model_args(cls: type[nn.Module]) -> list[str]:
    """The constructor arguments a model class accepts (its dataclass fields)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ('parent', 'name')]


def create_model(name: str, *, features_only: bool = False, out_indices: Sequence[int] | None = None,
                 feature_norm: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered variant.

    Args:
      name: one of `list_models()`.
      features_only: build the backbone form (timm's `features_only`): the module returns a list of
        stage outputs (NHWC) instead of logits, has the same parameter names (the head and, without
        `feature_norm`, the final norm unused), and carries `feature_info`.
      out_indices: with features_only, the stages to return: 0..3 = strides 4, 8, 16, 32 (default all;
        negative indices count from the end). Stages after the last one chosen are not computed.
      feature_norm: with features_only, apply the model's final norm to stage 3's output. ResT has no
        per-stage norms, so stages 0..2 are returned as their blocks leave them either way; requires
        3 in out_indices.
      **kwargs: overrides of the variant's arguments, e.g. `num_classes` (0: no head, `__call__` gives
        the pooled features), `drop_path_rate`, `dtype` (computation dtype; parameters stay float32),
        `impl` (kernel forms: 'auto' | 'xla' | 'cpu' | 'tpu', see rest_jax.ops; `conv_impl` is its former name),
        `remat` ('none', 'block' or a jax.checkpoint_policies name: recompute blocks in the backward
        pass), or the architecture itself (`embed_dims`, `depths`, `num_heads`, `sr_ratios`, ...).

    Returns:
      An unbound flax.linen Module; `model.init(rng, images)` gives {'params', 'batch_stats'}.

    Raises:
      ValueError: unknown name, unknown argument, or an inconsistent architecture or stage choice.
    """
    info = model_info(name)
    valid = model_args(info.cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        valid = [*valid, 'features_only', 'out_indices', 'feature_norm']
        raise ValueError(f'unknown argument(s) {", ".join(unknown)} for {name}; valid: {", ".join(valid)}')
    args = {**info.arch, **kwargs}
    if 'remat' in args:
        remat_policy(args['remat'])   # a bad name fails here, not at the first call
    for key in ('impl', 'conv_impl'):   # a bad name fails here, not at the first call
        if args.get(key) is not None:
            args[key] = ops.canonical(args[key])
    for key in ('embed_dims', 'num_heads', 'depths', 'sr_ratios', 'mlp_ratios'):
        if key in args:
            args[key] = tuple(args[key])
            if len(args[key]) != 4:
                raise ValueError(f'{key} must have 4 entries (one per stage), got {args[key]}')
    for dim, heads in zip(args.get('embed_dims', ()), args.get('num_heads', ())):
        if heads < 1 or dim % heads:
            raise ValueError(f'embed_dims {args["embed_dims"]} must be divisible by num_heads {args["num_heads"]}')
    if not features_only:
        if out_indices is not None or feature_norm:
            raise ValueError('out_indices and feature_norm select stage outputs: pass features_only=True too')
        return info.cls(**args)
    out_indices = check_out_indices((0, 1, 2, 3) if out_indices is None else out_indices)
    check_feature_norm(out_indices, feature_norm)
    return features_class(info.cls)(**args, out_indices=out_indices, feature_norm=bool(feature_norm))


def feature_info(model: str | nn.Module, out_indices: Sequence[int] | None = None, **kwargs: Any) -> FeatureInfo:
    """Channels and reduction (stride) of the stage outputs, timm's `feature_info`.

    Args:
      model: a variant name (then `kwargs` are create_model overrides, e.g. `embed_dims`) or a model.
      out_indices: the stages to describe (default: those the model returns, all four for a classifier).

    Returns:
      A FeatureInfo: `.channels()`, `.reduction()`, `.module_name()` (lists over the stages, or one
      value with an index), `.out_indices`, `.get_dicts()`.
    """
    if isinstance(model, str):
        model = create_model(model, **kwargs)
    elif kwargs:
        raise ValueError(f'create_model overrides ({", ".join(kwargs)}) go with a variant name, not a model')
    info = model.feature_info
    if out_indices is None:
        return info
    return dataclasses.replace(info, out_indices=check_out_indices(out_indices))

"""rest_jax: ResT and ResTv2 vision backbones in JAX/Flax, numerically identical to the official code."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = '0.1.0'

# The public API: name -> the module that defines it. Each is imported on first use (PEP 562), so that
# `import rest_jax` stays cheap and a serving process can run an exported model (`load_exported`) with
# jax alone: flax, orbax and Pillow are imported only by the parts that need them.
_API = {
    'create_model': 'rest_jax.models', 'list_models': 'rest_jax.models', 'model_info': 'rest_jax.models',
    'ModelInfo': 'rest_jax.models', 'feature_info': 'rest_jax.models', 'FeatureInfo': 'rest_jax.models',
    'load_pretrained': 'rest_jax.pretrained', 'save_pretrained': 'rest_jax.pretrained',
    'reset_classifier': 'rest_jax.pretrained', 'pretrained_cfg': 'rest_jax.pretrained',
    'PretrainedCfg': 'rest_jax.pretrained', 'preprocessing_of': 'rest_jax.pretrained',
    'state_dict_from_variables': 'rest_jax.convert', 'variables_from_state_dict': 'rest_jax.convert',
    'Prediction': 'rest_jax.inference', 'imagenet_class_names': 'rest_jax.inference',
    'predict': 'rest_jax.inference', 'preprocess': 'rest_jax.inference',
    'export_model': 'rest_jax.export', 'save_exported': 'rest_jax.export', 'load_exported': 'rest_jax.export',
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif not name.startswith('_') and importlib.util.find_spec(f'{__name__}.{name}') is not None:
        value = importlib.import_module(f'{__name__}.{name}')   # a subpackage: rest_jax.ops, rest_jax.models, ...
    else:
        raise AttributeError(f"module 'rest_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from rest_jax.convert import state_dict_from_variables, variables_from_state_dict
    from rest_jax.export import export_model, load_exported, save_exported
    from rest_jax.inference import Prediction, imagenet_class_names, predict, preprocess
    from rest_jax.models import FeatureInfo, ModelInfo, create_model, feature_info, list_models, model_info
    from rest_jax.pretrained import (PretrainedCfg, load_pretrained, preprocessing_of, pretrained_cfg,
                                     reset_classifier, save_pretrained)

"""The ResT model families and their registry."""

from rest_jax.models.registry import ModelInfo, create_model, list_models, model_info
from rest_jax.models.rest import ResT
from rest_jax.models.rest_v2 import ResTV2

__all__ = ['ModelInfo', 'ResT', 'ResTV2', 'create_model', 'list_models', 'model_info']

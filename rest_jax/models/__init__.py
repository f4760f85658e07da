"""The ResT model families and their registry."""

from rest_jax.models.backbone import Backbone, FeatureInfo
from rest_jax.models.registry import ModelInfo, create_model, feature_info, list_models, model_info
from rest_jax.models.rest import ResT
from rest_jax.models.rest_v2 import ResTV2

__all__ = ['Backbone', 'FeatureInfo', 'ModelInfo', 'ResT', 'ResTV2', 'create_model', 'feature_info', 'list_models',
           'model_info']

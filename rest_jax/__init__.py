"""rest_jax: ResT and ResTv2 vision backbones in JAX/Flax, numerically identical to the official code."""

from rest_jax.convert import state_dict_from_variables, variables_from_state_dict
from rest_jax.inference import Prediction, imagenet_class_names, predict, preprocess
from rest_jax.models import ModelInfo, create_model, list_models, model_info
from rest_jax.pretrained import load_pretrained, preprocessing_of

__version__ = '0.1.0'

__all__ = ['ModelInfo', 'Prediction', 'create_model', 'imagenet_class_names', 'list_models', 'load_pretrained',
           'model_info', 'predict', 'preprocess', 'preprocessing_of', 'state_dict_from_variables', 'variables_from_state_dict']

"""Official PyTorch checkpoints -> Flax variables (no torch needed)."""

from rest_jax.convert.checkpoint import convert_checkpoint, recognize_variant
from rest_jax.convert.pth import load_pth
from rest_jax.convert.state_dict import state_dict_from_variables, variables_from_state_dict

__all__ = ['convert_checkpoint', 'load_pth', 'recognize_variant', 'state_dict_from_variables',
           'variables_from_state_dict']

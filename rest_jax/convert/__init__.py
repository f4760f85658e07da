"""Official PyTorch checkpoints -> Flax variables (no torch needed)."""

from rest_jax.convert.state_dict import state_dict_from_variables, variables_from_state_dict

__all__ = ['state_dict_from_variables', 'variables_from_state_dict']

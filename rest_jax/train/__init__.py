"""Training: train state, sharded step, optimizer, checkpoints, metrics and the run() loop."""

from rest_jax.train.loop import DoesNotFit, NonFiniteLoss, run

__all__ = ['DoesNotFit', 'NonFiniteLoss', 'run']

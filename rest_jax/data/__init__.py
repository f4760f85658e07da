"""Input pipelines: TFDS builders and tf.data pipelines, exactly resumable, for many hosts.

Tensorflow is imported here and only here (``import rest_jax`` never loads it), and it is told
at once that it may not use any GPU: the accelerators belong to JAX.
"""

import tensorflow as tf

tf.config.set_visible_devices([], 'GPU')

from rest_jax.data.datasets import DatasetInfo, dataset_info, get_builder, prepare  # noqa: E402
from rest_jax.data.pipeline import eval_iterator, make_global, train_iterator  # noqa: E402

__all__ = ['DatasetInfo', 'dataset_info', 'eval_iterator', 'get_builder', 'make_global',
           'prepare', 'train_iterator']

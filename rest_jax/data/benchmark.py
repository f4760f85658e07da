"""Input-pipeline throughput: images/s, and per CPU core, of the train and eval pipelines.

    python -m rest_jax.data.benchmark --config configs/restv2_t.py [--config.x=y ...] [--json]

By default it reads a synthetic image folder of ImageNet-sized JPEGs (crops of the two photos
that scikit-learn ships, 300-500 px a side), so it needs no dataset; --nosynthetic reads
config.dataset instead. The batch size is --batch (config.batch_size is sized for a pod).

Besides images/s (wall clock) it prints CPU milliseconds per image and images per CPU-second
(process CPU time, all tf.data threads): on a machine shared with other work, wall-clock rates
per core fall with the load while CPU time per image hardly moves; images per CPU-second is what
one core would give with the machine to itself.
"""

import contextlib
import json
import os
import resource
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file', lock_config=True)
_JSON = flags.DEFINE_bool('json', False, 'print one JSON object instead of text')
_SYNTHETIC = flags.DEFINE_bool('synthetic', True, 'read a synthetic JPEG folder, not config.dataset')
_BATCH = flags.DEFINE_integer('batch', 64, 'batch size of the measured pipelines')
_STEPS = flags.DEFINE_integer('steps', 20, 'batches timed per pipeline (after warm-up batches)')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'batches read before timing')


def make_photo_folder(root, num_classes=4, train_per_class=48, val_per_class=24, seed=0):
  """Writes root/{train,val}/<class>/*.jpg: random crops of scikit-learn's sample photos."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images  # two 427 x 640 RGB photos
  rng = np.random.default_rng(seed)
  for split, count in (('train', train_per_class), ('val', val_per_class)):
    for c in range(num_classes):
      os.makedirs(f'{root}/{split}/class{c}', exist_ok=True)
      for k in range(count):
        photo = photos[(c + k) % 2]
        h, w = rng.integers(300, 427), rng.integers(300, 500)
        top, left = rng.integers(0, 428 - h), rng.integers(0, 641 - w)
        crop = photo[top:top + h, left:left + w]
        if rng.random() < 0.5:
          crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(f'{root}/{split}/class{c}/{k}.jpg',
                                                         quality=90)


def _cpu_seconds():
  """CPU time of this process so far, all threads (tf.data's included), user + system."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _rate(iterator, batch, steps, warmup):
  """(images/s of wall time, CPU milliseconds per image) over ``steps`` batches.

  CPU time per image hardly depends on what else runs on the machine; wall time does. Both count
  the work done in the window, prefetching of later batches included (steady state).
  """
  for _ in range(warmup):
    next(iterator)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    next(iterator)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  return steps * batch / wall, 1000 * cpu / (steps * batch)


def measure(config, steps, warmup):
  """{train, eval} -> (images/s, CPU ms per image) of the pipelines of ``config`` on this host."""
  from rest_jax import data  # pylint: disable=g-import-not-at-top
  train = iter(data.pipeline.train_dataset(config, process_index=0, process_count=1))
  rates = {'train': _rate(train, config.batch_size * config.update_freq, steps, warmup)}
  del train

  evaluation = iter(data.pipeline.eval_dataset(config, process_index=0, process_count=1).repeat())
  rates['eval'] = _rate(evaluation, config.batch_size, steps, warmup)
  return rates


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config configs/restv2_t.py')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # TFDS logs every file it prepares and reads at INFO; -v 0 shows them
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # the synthetic folder's preparation: bars, not figures
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    with config.unlocked():
      config.batch_size, config.update_freq = _BATCH.value, 1
      if _SYNTHETIC.value:
        make_photo_folder(f'{tmp}/photos')
        os.environ['TFDS_DATA_DIR'] = f'{tmp}/tfds'
        config.dataset, config.data_dir = 'image_folder', f'{tmp}/photos'
        config.data.train_split, config.data.eval_split = 'train', 'val'
        config.model.num_classes = 4
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints as it prepares the folder: stdout is the figures
      rates = measure(config, _STEPS.value, _WARMUP.value)
  result = {
      'dataset': config.dataset, 'image_size': config.image_size, 'batch': config.batch_size,
      'randaug': config.data.randaug, 'reprob': config.data.reprob, 'cpu_cores': cores,
      'load_average': round(os.getloadavg()[0], 2),
  }
  for name, (rate, cpu_ms) in rates.items():
    result.update({
        f'{name}_images_per_sec': round(rate, 1),
        f'{name}_images_per_sec_per_core': round(rate / cores, 1),
        # The per-core figure without contention: 1000 / (CPU ms per image).
        f'{name}_cpu_ms_per_image': round(cpu_ms, 2),
        f'{name}_images_per_cpu_second': round(1000 / cpu_ms, 1),
    })
  if _JSON.value:
    print(json.dumps(result))
  else:
    for key, value in result.items():
      print(f'{key:32s} {value}')


if __name__ == '__main__':
  # configs/*.py import `configs.common`: the checkout's root on the path, as train.py's directory is on
  # its own, so that the command runs from any directory.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  app.run(main)

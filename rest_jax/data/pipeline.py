"""Train and eval pipelines (tf.data) over many hosts; the train stream resumes exactly.

Why resumption needs no iterator state: the stream is indexed, not iterated. Example slot q of
the run (q = step * global_batch + row) holds example ``index_shuffle(q mod N)`` of the
permutation seeded by (seed, epoch = q div N), read from the ArrayRecord files by that index;
its augmentation draws from a stateless seed made of (seed, q), and the Mixup/CutMix draws of a
host's batch from (seed, step, host). Everything a step yields is thus a function of
(config, step, process_index, process_count) alone: starting at step s rebuilds exactly what an
uninterrupted run would yield from s on. Each epoch visits every example once (a full shuffle,
so config.data.shuffle_buffer is not needed), and the hosts read disjoint rows of each global
batch.
"""

import atexit
import weakref

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rest_jax.data import augment
from rest_jax.data import datasets
from rest_jax.data import mixup

# Distinct first seed words for the three random streams drawn from config.seed.
_SHUFFLE, _AUGMENT, _MIX = 0, 1, 2

# Iterators still open at interpreter exit: their prefetch threads wait in tf.numpy_function for
# the GIL, and tearing them down during finalization deadlocks the exit. They are closed (which
# frees the tf.data iterator) by an atexit hook, while the interpreter is still whole.
_OPEN = weakref.WeakSet()


@atexit.register
def _close_open_iterators():
    for iterator in list(_OPEN):
        iterator.close()


def _closed_at_exit(iterator):
    _OPEN.add(iterator)
    return iterator


def _processes(process_index, process_count):
    if process_count is None:
        process_count = jax.process_count()
    if process_index is None:
        process_index = jax.process_index()
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
    return process_index, process_count


def _local_rows(batch_size, process_count, what):
    if batch_size % process_count:
        raise ValueError(f'{what} {batch_size} must be a multiple of the number of processes '
                         f'({process_count}): each host reads an equal share of every batch')
    return batch_size // process_count


def _stream_seed(config, stream, value):
    return tf.stack([tf.constant(config.seed * 3 + stream, tf.int64), tf.cast(value, tf.int64)])


def _reader(builder, split, rows):
    """tf function: int64 indices [rows] -> serialized examples [rows], by random access."""
    try:
        source = builder.as_data_source(split,
                                        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except (KeyError, ValueError) as e:
        raise ValueError(f'{builder.name} has no split {split!r}; it has '
                         f'{sorted(builder.info.splits)}') from e

    # ArrayRecord reads a batch of keys in parallel; any other Sequence is read key by key.
    getitems = getattr(source, '__getitems__', lambda keys: [source[k] for k in keys])

    def read(indices):
        return np.array(getitems(indices.tolist()), dtype=object)

    def read_tf(indices):
        records = tf.numpy_function(read, [indices], tf.string, stateful=False)
        return tf.ensure_shape(records, [rows])

    return read_tf, len(source)


def _parser(builder):
    features = builder.info.features
    skip = {'image': tfds.decode.SkipDecoding()}

    def parse(record):
        example = features.deserialize_example(record, decoders=skip)
        return example['image'], tf.cast(example['label'], tf.int32)

    return parse


def _map(ds, fn, parallel):
    # The functions hold no Python control flow on tensors: autograph would only cost tracing time.
    return ds.map(tf.autograph.experimental.do_not_convert(fn), num_parallel_calls=parallel)


def _options(config):
    options = tf.data.Options()
    options.deterministic = True
    if config.data.num_workers > 0:
        options.threading.private_threadpool_size = config.data.num_workers
    return options


def _parallel(config):
    return config.data.num_workers if config.data.num_workers > 0 else tf.data.AUTOTUNE


def train_indices(config, n, step, process_index, process_count):
    """Slots and example indices [L] that host ``process_index`` reads at ``step`` (tf int64).

    Slot q = step * global rows + host offset + row; epoch q // n visits the examples in the
    order of a stateless permutation seeded by (seed, epoch).
    """
    rows = config.batch_size * config.update_freq // process_count
    step = tf.cast(step, tf.int64)
    slots = step * rows * process_count + process_index * rows + tf.range(rows, dtype=tf.int64)
    epoch = slots // n
    # The raw op: tf.random.experimental.index_shuffle mangles a batch of [n, 2] seeds.
    seed = tf.stack([tf.fill([rows], tf.constant(config.seed * 3 + _SHUFFLE, tf.int64)), epoch,
                     tf.zeros([rows], tf.int64)], axis=1)
    index = tf.raw_ops.RandomIndexShuffle(index=slots % n, seed=seed,
                                          max_index=tf.fill([rows], tf.constant(n - 1, tf.int64)))
    return slots, index


def train_dataset(config, *, start_step=0, process_index=None, process_count=None):
    """The train stream as a tf.data.Dataset of {'image', 'label'} host-local batches.

    See train_iterator for the arguments and the layout.
    """
    p, count = _processes(process_index, process_count)
    groups = config.update_freq
    rows = _local_rows(config.batch_size, count, 'config.batch_size') * groups
    builder = datasets.prepare(config)
    read, n = _reader(builder, config.data.train_split, rows)
    parse = _parser(builder)
    num_classes = config.model.num_classes
    if builder.info.features['label'].num_classes != num_classes:
        raise ValueError(f'config.model.num_classes={num_classes} but {builder.name} has '
                         f'{builder.info.features["label"].num_classes} classes')
    data, size = config.data, config.image_size

    def load_step(step):
        slots, index = train_indices(config, n, step, p, count)
        return {'record': read(index), 'slot': slots, 'step': tf.fill([rows], step)}

    def load_example(element):
        jpeg, label = parse(element['record'])
        image = augment.train_transform(jpeg, _stream_seed(config, _AUGMENT, element['slot']),
                                        data, size)
        return {'image': image, 'label': label, 'step': element['step']}

    def mix(batch):
        seed = _stream_seed(config, _MIX, batch['step'][0] * count + p)
        images, targets, _ = mixup.mix_batch(
            batch['image'], batch['label'], seed, num_classes=num_classes, groups=groups,
            mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob,
            switch_prob=data.mixup_switch_prob, smoothing=data.label_smoothing)
        return {'image': images, 'label': targets}

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    ds = _map(ds, load_step, 2)  # reads of the next steps overlap decoding
    ds = ds.unbatch()
    ds = _map(ds, load_example, _parallel(config))
    ds = ds.batch(rows, drop_remainder=True)
    ds = _map(ds, mix, 2)
    return ds.prefetch(2).with_options(_options(config))


def train_iterator(config, *, start_step=0, process_index=None, process_count=None):
    """Host-local train batches for steps start_step, start_step + 1, ... (infinite).

    Args:
      config: the run's ConfigDict (dataset, data_dir, image_size, batch_size, update_freq, seed,
        model.num_classes, data.*).
      start_step: the first optimizer step to yield; resuming there yields exactly what an
        uninterrupted run yields from that step on.
      process_index, process_count: this host and the number of hosts (default: JAX's).

    Returns:
      An iterator of
      {'image': float32 [L, S, S, 3] normalized, 'label': float32 [L, num_classes] soft targets}
      with L = batch_size * update_freq // process_count; row r belongs to micro-batch
      r % update_freq, and Mixup/CutMix mixes within each micro-batch's rows of this host.
    """
    dataset = train_dataset(config, start_step=start_step, process_index=process_index,
                            process_count=process_count)
    return _closed_at_exit(_numpy_batches(dataset))


def eval_dataset(config, *, process_index=None, process_count=None):
    """One pass over config.data.eval_split as {'image', 'label', 'mask'} host-local batches."""
    p, count = _processes(process_index, process_count)
    rows = _local_rows(config.batch_size, count, 'config.batch_size')
    builder = datasets.prepare(config)
    read, n = _reader(builder, config.data.eval_split, rows)
    parse = _parser(builder)
    num_batches = -(-n // config.batch_size)

    def load_batch(k):
        # Global batch k holds examples [k * B, (k + 1) * B); this host takes its rows of it, and
        # rows past the end repeat example 0 with mask False, so that every host runs the same
        # number of batches and each example counts once.
        slots = k * config.batch_size + p * rows + tf.range(rows, dtype=tf.int64)
        mask = slots < n
        return {'record': read(tf.where(mask, slots, 0)), 'mask': mask}

    def load_example(element):
        jpeg, label = parse(element['record'])
        image = augment.eval_transform(jpeg, config.data, config.image_size)
        return {'image': image, 'label': tf.where(element['mask'], label, 0), 'mask': element['mask']}

    ds = _map(tf.data.Dataset.range(num_batches), load_batch, 2).unbatch()
    ds = _map(ds, load_example, _parallel(config))
    ds = ds.batch(rows, drop_remainder=True)
    return ds.prefetch(2).with_options(_options(config))


def eval_iterator(config, *, process_index=None, process_count=None):
    """One pass over the eval split, padded so that every host yields the same number of batches.

    Args:
      config: the run's ConfigDict.
      process_index, process_count: this host and the number of hosts (default: JAX's).

    Returns:
      An iterator of
      {'image': float32 [L, S, S, 3], 'label': int32 [L], 'mask': bool [L]}, L = batch_size //
      process_count; each real example appears exactly once over all hosts with mask True.
    """
    dataset = eval_dataset(config, process_index=process_index, process_count=process_count)
    return _closed_at_exit(_numpy_batches(dataset))


def _numpy_batches(dataset):
    yield from dataset.as_numpy_iterator()


def make_global(batch, sharding):
    """Host-local batches -> global jax.Arrays, batch axis 0 split over ``sharding``'s data axes.

    Args:
      batch: dict of numpy arrays, each [L, ...] with this host's rows.
      sharding: a NamedSharding whose PartitionSpec shards axis 0 (e.g. P('data')).

    Returns:
      dict of jax.Arrays [L * process_count, ...].
    """
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

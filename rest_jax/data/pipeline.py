"""Train and eval pipelines (tf.data) over many hosts; the train stream resumes exactly.

Why resumption needs no iterator state: the stream is indexed, not iterated. Example slot q of
the run (q = step * global_batch + row) holds example ``index_shuffle(q mod N)`` of the
permutation seeded by (seed, epoch = q div N), read from the ArrayRecord files by that index (with
repeated augmentation, a function of (step, row) laid out as DeiT's RASampler: see train_indices);
its augmentation draws from a stateless seed made of (seed, q), and the Mixup/CutMix draw of each
group of config.data.mixup_group_size images from (seed, step, the group's global index).
Everything a step yields is thus a function of (config, step, process_index, process_count) alone,
and the concatenated hosts yield what one host would: starting at step s rebuilds exactly what an
uninterrupted run would yield from s on. Each epoch visits every example once (a full shuffle, so
config.data.shuffle_buffer is not needed; with repeated augmentation x k, N / k of them k times),
and the hosts read disjoint rows of each global batch.
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


def image_dtype(config) -> tf.DType:
    """The dtype images leave the pipeline in: the model's computation dtype (config.dtype, default
    float32). The model casts its input to that dtype first thing, and tf.cast rounds to nearest even as
    XLA's convert does, so bfloat16 changes no value the model sees; it halves the bytes each batch
    takes on the host, over the host-to-device link and in the chip's memory."""
    name = str(config.get('dtype', 'float32'))
    try:
        dtype = tf.as_dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not dtype.is_floating:
        raise ValueError(f"config.dtype must name a float dtype ('bfloat16' or 'float32'), got {name!r}")
    return dtype


def _options(config):
    options = tf.data.Options()
    options.deterministic = True
    if config.data.num_workers > 0:
        options.threading.private_threadpool_size = config.data.num_workers
    return options


def _parallel(config):
    return config.data.num_workers if config.data.num_workers > 0 else tf.data.AUTOTUNE


def group_size(config):
    """Images per Mixup/CutMix draw and per repeated-augmentation replica: config.data.mixup_group_size,
    or the whole micro-batch when that is smaller (a one-host run of a small batch)."""
    size = min(config.data.mixup_group_size, config.batch_size)
    if size < 1 or config.batch_size % size:
        raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of '
                         f'config.data.mixup_group_size={config.data.mixup_group_size} (the images of one '
                         'official GPU batch)')
    return size


def train_indices(config, n, step, process_index, process_count):
    """Slots and example indices [L] that host ``process_index`` reads at ``step`` (tf int64).

    Slot q = step * global rows + host offset + row (it seeds the augmentation). Without repeated
    augmentation, epoch q // n visits the examples in the order of a stateless permutation seeded by
    (seed, epoch), at q mod n. With config.data.repeated_aug = k > 1 it is DeiT's RASampler, which
    v1's main.py trains with: an epoch is n // (global rows) updates, each using the next global
    rows of the permutation with every entry repeated k times, and the sampler's replicas (here the
    groups of group_size images of each micro-batch) take every R-th position of it (R replicas), so
    the k copies of an image land in different groups and get different augmentations.
    """
    rows = config.batch_size * config.update_freq // process_count
    total = rows * process_count
    step = tf.cast(step, tf.int64)
    local = process_index * rows + tf.range(rows, dtype=tf.int64)  # global rows of this update
    slots = step * total + local
    repeats = config.data.repeated_aug
    if repeats > 1:
        g, batch, micro = group_size(config), config.batch_size, config.update_freq
        replicas = batch // g
        m, u = local % micro, local // micro  # micro-batch m, its row u: row u % g of replica u // g
        steps_per_epoch = max(n // total, 1)
        epoch = step // steps_per_epoch
        position = (step - epoch * steps_per_epoch) * total + m * batch + (u % g) * replicas + u // g
        order = (position // repeats) % n
        epoch = tf.fill([rows], epoch)
    else:
        epoch, order = slots // n, slots % n
    # The raw op: tf.random.experimental.index_shuffle mangles a batch of [n, 2] seeds.
    seed = tf.stack([tf.fill([rows], tf.constant(config.seed * 3 + _SHUFFLE, tf.int64)), epoch,
                     tf.zeros([rows], tf.int64)], axis=1)
    index = tf.raw_ops.RandomIndexShuffle(index=order, seed=seed,
                                          max_index=tf.fill([rows], tf.constant(n - 1, tf.int64)))
    return slots, index


def mix_groups(config, process_index, process_count):
    """(rows mixed together, the global group index of each such unit, groups per update) for Mixup/CutMix.

    Group k of micro-batch m holds its rows [k g, (k + 1) g); its global index is m * (batch_size / g)
    + k, so its draw (mix or not, mixup or cutmix, lam, box) is a function of (seed, step, global
    index), whichever host holds it. When a host holds whole groups, each pairs row i with row
    g - 1 - i as timm does, and the stream equals a one-host run's bit for bit. When a group spans
    several hosts (more hosts than groups per micro-batch, e.g. 2048 images on 16 hosts), each host
    holds a slice of it: the slice takes the group's draw and pairs its rows within the slice. Every
    image is still mixed with another image of its group of g, with the group's lam and kind, so the
    per-image mixing statistics are those of the official per-GPU batches; only which image of the
    (shuffled) group is the partner differs from a one-host run.
    """
    g = group_size(config)
    host_rows = config.batch_size // process_count
    per_micro, micro = config.batch_size // g, config.update_freq
    if host_rows % g == 0:
        blocks = host_rows // g
        ids = [m * per_micro + process_index * blocks + a for a in range(blocks) for m in range(micro)]
        return g, ids, per_micro * micro
    if g % host_rows:
        raise ValueError(f'each host holds {host_rows} images of a micro-batch (config.batch_size='
                         f'{config.batch_size} over {process_count} hosts): config.data.mixup_group_size='
                         f'{config.data.mixup_group_size} must be a multiple or a divisor of {host_rows}')
    group = process_index * host_rows // g    # the group this host's slice belongs to
    return host_rows, [m * per_micro + group for m in range(micro)], per_micro * micro


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
    data, size, dtype = config.data, config.image_size, image_dtype(config)

    def load_step(step):
        slots, index = train_indices(config, n, step, p, count)
        return {'record': read(index), 'slot': slots, 'step': tf.fill([rows], step)}

    def load_example(element):
        jpeg, label = parse(element['record'])
        image = augment.train_transform(jpeg, _stream_seed(config, _AUGMENT, element['slot']),
                                        data, size)
        return {'image': image, 'label': label, 'step': element['step']}

    mixing = (data.mixup > 0 or data.cutmix > 0) and data.mixup_prob > 0
    g, group_ids, total_groups = mix_groups(config, p, count) if mixing else (None, None, None)

    def mix(batch):
        seed = _stream_seed(config, _MIX, batch['step'][0])
        images, targets, _ = mixup.mix_batch(
            batch['image'], batch['label'], seed, num_classes=num_classes, micro_batches=groups,
            group_size=g, group_ids=group_ids, total_groups=total_groups,
            mixup_alpha=data.mixup if mixing else 0.0, cutmix_alpha=data.cutmix if mixing else 0.0,
            prob=data.mixup_prob,
            switch_prob=data.mixup_switch_prob, smoothing=data.label_smoothing)
        return {'image': tf.cast(images, dtype), 'label': targets}

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
      {'image': [L, S, S, 3] normalized, in image_dtype(config), 'label': float32 [L, num_classes]
      soft targets}
      with L = batch_size * update_freq // process_count; row r belongs to micro-batch
      r % update_freq, and Mixup/CutMix mixes within groups of config.data.mixup_group_size
      consecutive rows of a micro-batch (see mix_groups).
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
    dtype = image_dtype(config)

    def load_batch(k):
        # Global batch k holds examples [k * B, (k + 1) * B); this host takes its rows of it, and
        # rows past the end repeat example 0 with mask False, so that every host runs the same
        # number of batches and each example counts once.
        slots = k * config.batch_size + p * rows + tf.range(rows, dtype=tf.int64)
        mask = slots < n
        return {'record': read(tf.where(mask, slots, 0)), 'mask': mask}

    def load_example(element):
        jpeg, label = parse(element['record'])
        image = tf.cast(augment.eval_transform(jpeg, config.data, config.image_size), dtype)
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
      {'image': [L, S, S, 3] in image_dtype(config), 'label': int32 [L], 'mask': bool [L]}, L = batch_size //
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

"""rest_jax.data pipelines and builders: digits, image folders, a tiny real-layout ImageNet, mocks.

Determinism, exact resumption, disjoint host shards and exactly-once evaluation are checked on
the built-in digits; the real TFDS imagenet2012 builder prepares tiny tars made here.
"""

import io
import tarfile
from unittest import mock

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
import ml_collections  # noqa: E402
from PIL import Image  # noqa: E402

from rest_jax import data  # noqa: E402
from rest_jax.data import datasets, pipeline  # noqa: E402


def make_config(data_dir, **overrides):
    c = ml_collections.ConfigDict()
    c.dataset, c.data_dir, c.image_size, c.batch_size, c.update_freq, c.seed = (
        'digits', str(data_dir), 32, 8, 1, 0)
    c.model = ml_collections.ConfigDict(dict(num_classes=10))
    c.data = ml_collections.ConfigDict(dict(
        train_split='train', eval_split='test', crop_pct=0.875, interpolation='bicubic',
        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, randaug='rand-m9-mstd0.5-inc1',
        reprob=0.25, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_group_size=256,
        repeated_aug=0,
        label_smoothing=0.1, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        shuffle_buffer=16384, num_workers=0))
    for key, value in overrides.items():
        c[key] = value
    return c


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _photo_jpeg(rng, size=(40, 48), fmt='JPEG'):
    from sklearn.datasets import load_sample_images
    photo = load_sample_images().images[int(rng.integers(2))]
    top, left = rng.integers(0, 300), rng.integers(0, 500)
    buffer = io.BytesIO()
    Image.fromarray(photo[top:top + size[0], left:left + size[1]]).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp('tfds'))
    return config, data.dataset_info(config)


def test_digits_are_the_sklearn_digits(digits):
    config, info = digits
    assert info == data.DatasetInfo(num_classes=10, num_train=1433, num_eval=364)
    source = data.prepare(config).as_data_source('test')
    image, label = source[0]['image'], source[0]['label']
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.max() > 200
    assert 0 <= label < 10


@pytest.mark.parametrize('recipe', [{}, {'repeated_aug': 3, 'mixup_group_size': 4}], ids=['v2', 'v1'])
def test_train_stream_is_deterministic_and_resumes_exactly(digits, recipe):
    config = make_config(digits[0].data_dir)
    config.data.update(recipe)
    first = take(data.train_iterator(config, process_index=0, process_count=1), 5)
    again = take(data.train_iterator(config, process_index=0, process_count=1), 5)
    resumed = take(data.train_iterator(config, start_step=3, process_index=0, process_count=1), 2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    for a, b in zip(first[3:], resumed):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    assert first[0]['image'].shape == (8, 32, 32, 3) and first[0]['label'].shape == (8, 10)
    np.testing.assert_allclose(first[0]['label'].sum(1), 1.0, atol=1e-5)
    assert not np.array_equal(first[0]['image'], first[1]['image'])


def test_hosts_read_disjoint_shards_covering_the_split(digits):
    config, info = digits
    n, per_step = info.num_train, config.batch_size
    steps = -(-n // per_step)
    seen = {0: [], 1: []}
    for p in (0, 1):
        for step in range(steps):
            slots, index = pipeline.train_indices(config, n, step, p, 2)
            seen[p] += [i for s, i in zip(slots.numpy(), index.numpy()) if s < n]  # epoch 0
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(n))
    # The next epoch is another order of the same examples.
    _, index = pipeline.train_indices(config, n, steps + 1, 0, 2)
    assert set(index.numpy()) <= set(range(n))


def test_hosts_split_the_global_batch(digits):
    """Augmentation depends on the example's slot only: two hosts see the rows of one host."""
    config = make_config(digits[0].data_dir, batch_size=4, update_freq=2)
    config.data.mixup = config.data.cutmix = 0.0
    whole = next(data.train_iterator(config, start_step=2, process_index=0, process_count=1))
    halves = [next(data.train_iterator(config, start_step=2, process_index=p, process_count=2))
              for p in (0, 1)]
    assert whole['image'].shape == (8, 32, 32, 3) and halves[0]['image'].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), whole['image'])
    np.testing.assert_array_equal(np.concatenate([h['label'] for h in halves]), whole['label'])


def _shuffle(config, n, epoch, positions):
    """The stateless permutation of an epoch (what torch.randperm is to the official samplers)."""
    k = len(positions)
    seed = tf.stack([tf.fill([k], tf.constant(config.seed * 3, tf.int64)), tf.fill([k], tf.constant(epoch, tf.int64)),
                     tf.zeros([k], tf.int64)], axis=1)
    return tf.raw_ops.RandomIndexShuffle(index=tf.constant(positions, tf.int64), seed=seed,
                                         max_index=tf.fill([k], tf.constant(n - 1, tf.int64))).numpy()


def _rasampler_epoch(perm, repeats, replicas, per_replica):
    """DeiT's RASampler (v1's samplers.py) with a DataLoader(batch_size=per_replica, drop_last=True)
    on each replica: batches[t][r] is what replica r trains on at step t of the epoch."""
    n = len(perm)
    num_samples = int(np.ceil(n * repeats / replicas))
    total_size = num_samples * replicas
    indices = [int(i) for i in perm for _ in range(repeats)]
    indices += indices[:total_size - len(indices)]
    selected = int(np.floor(n // per_replica * per_replica / replicas))  # the official 256 is per_replica
    ranks = [indices[r:total_size:replicas][:selected] for r in range(replicas)]
    return [[rank[t * per_replica:(t + 1) * per_replica] for rank in ranks] for t in range(selected // per_replica)]


def test_repeated_augmentation_is_deits_rasampler(digits):
    """Each group of 4 images of a 16-image batch is a replica of the RASampler (4 'GPUs' x 4)."""
    config, info = digits
    config = make_config(config.data_dir, batch_size=16)
    config.data.update(repeated_aug=3, mixup_group_size=4)
    n = info.num_train
    epoch_steps = n // 16
    for epoch in (0, 1):
        reference = _rasampler_epoch(_shuffle(config, n, epoch, range(n)), 3, 4, 4)
        assert len(reference) == epoch_steps  # the sampler's epoch length is the train loop's
        for t in (0, 1, 40, epoch_steps - 1):
            _, index = pipeline.train_indices(config, n, epoch * epoch_steps + t, 0, 1)
            np.testing.assert_array_equal(index.numpy().reshape(4, 4), reference[t])
    seen = np.concatenate([pipeline.train_indices(config, n, t, 0, 1)[1].numpy() for t in range(epoch_steps)])
    counts = np.bincount(np.bincount(seen, minlength=n))
    assert counts[3] == len(seen) // 3 and counts[1:3].sum() <= 1  # about n / 3 images, 3 times each
    for t in range(epoch_steps):  # the copies of an image sit in different groups (replicas)
        groups = pipeline.train_indices(config, n, t, 0, 1)[1].numpy().reshape(4, 4)
        assert all(len(set(g)) == 4 for g in groups)


@pytest.mark.parametrize('batch, update_freq, hosts', [(16, 1, 2), (16, 1, 4), (8, 2, 2)])
def test_hosts_split_the_repeated_augmentation_sampler(digits, batch, update_freq, hosts):
    config = make_config(digits[0].data_dir, batch_size=batch, update_freq=update_freq)
    config.data.update(repeated_aug=3, mixup_group_size=4)
    n = digits[1].num_train
    for step in (0, 7, 200):
        slots, index = pipeline.train_indices(config, n, step, 0, 1)
        parts = [pipeline.train_indices(config, n, step, p, hosts) for p in range(hosts)]
        np.testing.assert_array_equal(np.concatenate([s.numpy() for s, _ in parts]), slots.numpy())
        np.testing.assert_array_equal(np.concatenate([i.numpy() for _, i in parts]), index.numpy())


@pytest.mark.parametrize('batch, update_freq, hosts', [(16, 1, 4), (8, 2, 2)])
def test_hosts_mix_each_group_as_one_host_does(digits, batch, update_freq, hosts):
    """Mixup/CutMix draws once per group of mixup_group_size images, whichever host holds it."""
    config = make_config(digits[0].data_dir, batch_size=batch, update_freq=update_freq)
    config.data.mixup_group_size = 4
    whole = take(data.train_iterator(config, start_step=5, process_index=0, process_count=1), 2)
    parts = [take(data.train_iterator(config, start_step=5, process_index=p, process_count=hosts), 2)
             for p in range(hosts)]
    for step in range(2):
        for key in ('image', 'label'):
            np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), whole[step][key])
    # Each group of 4 draws on its own: the targets of its rows mix two labels with one lam.
    soft = whole[0]['label'] - 0.01  # smoothing 0.1 over 10 classes
    kept = np.sort(soft, axis=1)[:, -1]
    assert len(set(np.round(kept, 4))) > 1


def test_mixup_groups_spanning_hosts_keep_their_draw(digits):
    """A group of 8 over hosts of 4 images: each host's slice takes its group's draw (the one-host
    run's lam for those rows) and mixes within the slice; a group size that neither divides nor is a
    multiple of the host's rows is refused in one line."""
    from rest_jax.data import mixup
    config = make_config(digits[0].data_dir, batch_size=16, update_freq=2)
    config.data.mixup_group_size = 8
    whole = pipeline.mix_groups(config, 0, 1)
    assert whole == (8, [0, 2, 1, 3], 4)
    parts = [pipeline.mix_groups(config, p, 4) for p in range(4)]
    assert parts == [(4, [0, 2], 4), (4, [0, 2], 4), (4, [1, 3], 4), (4, [1, 3], 4)]
    images = tf.random.stateless_uniform([8, 6, 6, 3], [1, 2])   # host 2's rows: 4 per micro-batch, 2 micro-batches
    labels = tf.range(8) % 10
    seed = tf.constant([7, 9], tf.int64)
    _, _, draws = mixup.mix_batch(tf.zeros([32, 6, 6, 3]), tf.zeros([32], tf.int32), seed, num_classes=10,
                                  micro_batches=2, group_size=8,
                                  group_ids=list(range(4)), total_groups=4, mixup_alpha=0.8, cutmix_alpha=0.0)
    x, y, info = mixup.mix_batch(images, labels, seed, num_classes=10, micro_batches=2, group_size=4,
                                 group_ids=parts[2][1], total_groups=4, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = info['lam'].numpy()
    np.testing.assert_array_equal(lam, draws['lam'].numpy()[[1, 3]])
    rows = images.numpy().reshape(4, 2, 6, 6, 3)   # row i of micro-batch m is rows[i, m]
    for m in range(2):
        expected = lam[m] * rows[:, m] + (1 - lam[m]) * rows[::-1, m]
        np.testing.assert_allclose(x.numpy().reshape(4, 2, 6, 6, 3)[:, m], expected, rtol=1e-6, atol=1e-6)
    odd = make_config(digits[0].data_dir, batch_size=24)
    odd.data.mixup_group_size = 8
    with pytest.raises(ValueError, match='must be a multiple or a divisor of 12'):
        pipeline.mix_groups(odd, 0, 2)
    config.data.mixup_group_size = 3
    with pytest.raises(ValueError, match='multiple of config.data.mixup_group_size'):
        data.train_iterator(config, process_index=0, process_count=1)
    config.data.mixup_group_size = 8
    batches = [take(data.train_iterator(config, start_step=3, process_index=p, process_count=4), 1)[0]
               for p in range(4)]
    for batch in batches:
        assert batch['image'].shape[0] == 8 and np.allclose(batch['label'].sum(-1), 1.0, atol=1e-5)


def test_eval_counts_every_example_once(digits):
    config = make_config(digits[0].data_dir, batch_size=48)  # 364 = 7 * 48 + 28
    expected = sorted(int(x['label']) for x in data.prepare(config).as_data_source('test'))
    per_host = [list(data.eval_iterator(config, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(per_host[0]) == len(per_host[1]) == 8
    labels = [int(l) for host in per_host for b in host for l, m in zip(b['label'], b['mask']) if m]
    assert sorted(labels) == expected
    batch = per_host[1][-1]
    assert batch['image'].shape == (24, 32, 32, 3) and batch['mask'].dtype == bool
    assert batch['label'].dtype == np.int32 and batch['mask'].sum() == 4  # rows 360..383 of 364


def test_images_arrive_in_the_computation_dtype(digits):
    """config.dtype='bfloat16': the train and eval images are bfloat16, bit for bit the float32 stream
    cast as the model's first op (XLA's convert) would; labels stay as they were; a non-float dtype is
    refused in one line."""
    import jax.numpy as jnp
    wide = make_config(digits[0].data_dir, dtype='float32')
    narrow = make_config(digits[0].data_dir, dtype='bfloat16')
    for stream in (lambda c: data.train_iterator(c, process_index=0, process_count=1),
                   lambda c: data.eval_iterator(c, process_index=0, process_count=1)):
        for a, b in zip(take(stream(wide), 2), take(stream(narrow), 2)):
            assert a['image'].dtype == np.float32 and b['image'].dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(jnp.asarray(a['image']).astype(jnp.bfloat16)).view(np.uint16),
                                          b['image'].view(np.uint16))
            np.testing.assert_array_equal(a['label'], b['label'])
    with pytest.raises(ValueError, match="config.dtype must name a float dtype"):
        data.train_iterator(make_config(digits[0].data_dir, dtype='int8'), process_index=0, process_count=1)


def test_make_global_single_host():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()), ('data',))
    batch = {'image': np.ones((len(jax.devices()) * 2, 4, 4, 3), np.float32),
             'label': np.arange(len(jax.devices()) * 2, dtype=np.int32)}
    out = data.make_global(batch, NamedSharding(mesh, PartitionSpec('data')))
    assert out['image'].shape == batch['image'].shape
    np.testing.assert_array_equal(np.asarray(out['label']), batch['label'])


def test_mock_data_imagenet(tmp_path):
    """tfds.testing.mock_data with the real imagenet2012 features; records served by index."""
    rng = np.random.default_rng(2)

    def records(builder, split, **kwargs):
        del split, kwargs  # TFDS's own data-source mock cannot serve raw records (4.9.10)
        features = builder.info.features
        return [features.serialize_example({
            'image': rng.integers(0, 256, (20 + k, 30, 3), dtype=np.uint8), 'label': k,
            'file_name': f'{k}.JPEG'}) for k in range(12)]

    config = make_config(tmp_path, dataset='imagenet2012', batch_size=4)
    config.model.num_classes = 1000
    config.data.eval_split = 'validation'
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=records), \
         mock.patch.object(datasets, '_check_imagenet_tars'):
        batch = next(data.train_iterator(config, process_index=0, process_count=1))
        evaluation = list(data.eval_iterator(config, process_index=0, process_count=1))
    assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].shape == (4, 1000)
    assert len(evaluation) == 3 and evaluation[0]['image'].shape == (4, 32, 32, 3)
    assert sorted(l for b in evaluation for l in b['label']) == list(range(12))


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp('tfds_default')
        patch.setenv('TFDS_DATA_DIR', str(directory))
        yield directory


def _image_folder(root, corrupt=False):
    rng = np.random.default_rng(0)
    for split, count in (('train', 3), ('val', 2)):
        for name in ('cat', 'dog'):
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                (root / split / name / f'{k}.jpg').write_bytes(_photo_jpeg(rng))
    (root / 'train' / 'dog' / 'extra.png').write_bytes(_photo_jpeg(rng, fmt='PNG'))
    if corrupt:
        (root / 'train' / 'cat' / 'broken.jpg').write_bytes(_photo_jpeg(rng)[:300])
    return root


def test_image_folder(tfds_dir, tmp_path):
    del tfds_dir
    root = _image_folder(tmp_path / 'photos')
    config = make_config(root, dataset='image_folder')
    config.model.num_classes = 2
    config.data.eval_split = 'val'
    assert data.dataset_info(config) == data.DatasetInfo(num_classes=2, num_train=7, num_eval=4)
    labels = [l for b in data.eval_iterator(config, process_index=0, process_count=1)
              for l, m in zip(b['label'], b['mask']) if m]
    assert sorted(labels) == [0, 0, 1, 1]  # class ids follow the sorted folder names
    assert next(data.train_iterator(config, process_index=0, process_count=1))['image'].shape == (
        8, 32, 32, 3)


def test_corrupt_image_is_reported_at_preparation(tfds_dir, tmp_path):
    del tfds_dir
    root = _image_folder(tmp_path / 'photos', corrupt=True)
    config = make_config(root, dataset='image_folder')
    with pytest.raises(ValueError, match=r'cannot be decoded.*train/cat/broken\.jpg'):
        data.prepare(config)
    assert not datasets.get_builder(config).is_prepared()  # nothing half-written


def _tiny_imagenet(data_dir):
    """The manual-download layout: a train tar of per-class tars, a val tar of numbered JPEGs."""
    manual = data_dir / 'downloads' / 'manual'
    manual.mkdir(parents=True)
    rng = np.random.default_rng(1)
    synsets = ['n01440764', 'n01443537', 'n01484850']
    with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as train:
        for synset in synsets:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode='w') as class_tar:
                for k in range(4):
                    _add(class_tar, f'{synset}_{1000 + k}.JPEG', _photo_jpeg(rng))
            _add(train, f'{synset}.tar', inner.getvalue())
    with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as val:
        for k in range(1, 6):  # the builder labels val files by their sorted position
            _add(val, f'ILSVRC2012_val_{k:08d}.JPEG', _photo_jpeg(rng))
    return synsets


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_tiny_imagenet_through_the_real_builder(tmp_path):
    synsets = _tiny_imagenet(tmp_path)
    config = make_config(tmp_path, dataset='imagenet2012', batch_size=4)
    config.model.num_classes = 1000
    config.data.eval_split = 'validation'
    assert data.dataset_info(config) == data.DatasetInfo(num_classes=1000, num_train=12, num_eval=5)
    names = tfds.builder('imagenet2012', data_dir=str(tmp_path)).info.features['label'].names
    val_synsets = (tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
                   .read_text().split()[:5])
    labels = [int(l) for b in data.eval_iterator(config, process_index=0, process_count=1)
              for l, m in zip(b['label'], b['mask']) if m]
    assert sorted(labels) == sorted(names.index(s) for s in val_synsets)
    batch = next(data.train_iterator(config, process_index=0, process_count=1))
    assert batch['image'].shape == (4, 32, 32, 3)
    assert set(np.argmax(batch['label'], 1)) <= {names.index(s) for s in synsets}


def test_missing_imagenet_tar_says_where_it_goes(tmp_path):
    (tmp_path / 'ILSVRC2012_img_train.tar').write_bytes(b'')
    config = make_config(tmp_path, dataset='imagenet2012')
    with pytest.raises(FileNotFoundError) as error:
        data.prepare(config)
    message = str(error.value)
    assert f'{tmp_path}/downloads/manual/ILSVRC2012_img_train.tar' in message
    assert f'it is at {tmp_path}/ILSVRC2012_img_train.tar: move it' in message
    assert f'{tmp_path}/downloads/manual/ILSVRC2012_img_val.tar' in message


def test_open_iterators_do_not_hang_the_exit(digits):
    # A script that leaves iterators open at module level (as notebooks and quick scripts do) must
    # exit: their prefetch threads wait in tf.numpy_function for the GIL during finalization.
    import subprocess
    import sys
    from pathlib import Path
    config, _ = digits
    tests = Path(__file__).parent
    script = (f'import sys; sys.path[:0] = [{str(tests.parent)!r}, {str(tests)!r}]\n'
              'from test_data_pipeline import make_config\n'
              'from rest_jax import data\n'
              f'config = make_config({config.data_dir!r})\n'
              'train, evaluation = data.train_iterator(config), data.eval_iterator(config)\n'
              'next(train); next(evaluation)\n'
              'print("ok")\n')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_pipeline_benchmark_prints_its_figures(tmp_path):
    """`python -m rest_jax.data.benchmark`, from another directory: the recipe's pipelines on a synthetic
    JPEG folder, one JSON object of positive rates, and no progress bars from preparing that folder."""
    import json
    import subprocess
    import sys
    from conftest import REPO
    run = subprocess.run([sys.executable, '-m', 'rest_jax.data.benchmark', f'--config={REPO}/configs/restv2_t.py',
                          '--batch=8', '--steps=2', '--warmup=1', '--json'], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result['dataset'] == 'image_folder' and result['batch'] == 8 and result['image_size'] == 224
    for split in ('train', 'eval'):
        assert result[f'{split}_images_per_sec'] > 0 and result[f'{split}_images_per_cpu_second'] > 0
    assert '%|' not in run.stderr and ' examples/s' not in run.stderr

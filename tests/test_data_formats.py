"""Datasets that TFDS prepared elsewhere: a TFRecord imagenet2012 converted once by
``python -m rest_jax.data.convert`` (in place, into another directory, onto gs://), versions, and
gs:// workdirs for metrics.jsonl and TensorBoard; train.py on 8 devices trains on the converted copy.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from conftest import convert_golden, subprocess_env  # noqa: E402
from fake_gcs import fake_gcs  # noqa: E402
from test_data_pipeline import _tiny_imagenet, make_config  # noqa: E402
import test_train_loop as train_loop  # noqa: E402

from rest_jax import data  # noqa: E402
from rest_jax.data import convert, datasets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VERSION = '5.1.0'


def _imagenet_config(data_dir, **overrides):
    config = make_config(data_dir, dataset='imagenet2012', batch_size=4, **overrides)
    config.model.num_classes = 1000
    config.data.eval_split = 'validation'
    return config


@pytest.fixture(scope='module')
def tfrecord_imagenet(tmp_path_factory):
    """The tiny tars, prepared by TFDS in its default format, as a team's copy is."""
    data_dir = tmp_path_factory.mktemp('tfrecord')
    _tiny_imagenet(data_dir)
    tfds.builder('imagenet2012', data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(data_dir / 'downloads' / 'manual')))
    shutil.rmtree(data_dir / 'downloads')  # the copy alone, as on a bucket
    return data_dir


def _copy(source, destination):
    shutil.copytree(source, destination)
    return destination


def _files(data_dir):
    return sorted(p.name for p in (Path(data_dir) / 'imagenet2012' / VERSION).iterdir())


def _train_batches(data_dir, steps=3):
    iterator = data.train_iterator(_imagenet_config(data_dir), process_index=0, process_count=1)
    return [next(iterator) for _ in range(steps)]


def test_tfrecord_copy_names_the_conversion_command(tfrecord_imagenet):
    with pytest.raises(ValueError) as error:
        data.prepare(_imagenet_config(tfrecord_imagenet))
    message = str(error.value)
    assert '\n' not in message and 'as tfrecord' in message
    assert (f'`python -m rest_jax.data.convert --dataset=imagenet2012 --data_dir={tfrecord_imagenet}`'
            in message)
    assert not any('array_record' in name for name in _files(tfrecord_imagenet))  # nothing written


def test_conversion_in_place_keeps_the_tfrecord_copy_and_its_order(tfrecord_imagenet, tmp_path):
    data_dir = _copy(tfrecord_imagenet, tmp_path / 'tfds')
    assert convert.convert('imagenet2012', str(data_dir), workers=2, log=lambda _: None) == str(data_dir)
    names = _files(data_dir)
    assert {'imagenet2012-train.tfrecord-00000-of-00001', 'imagenet2012-train.array_record-00000-of-00001',
            'imagenet2012-validation.array_record-00000-of-00001'} <= set(names)
    # tfds.load users keep their TFRecord copy; the ArrayRecord one is listed as an alternative.
    info = json.loads((data_dir / 'imagenet2012' / VERSION / 'dataset_info.json').read_text())
    assert info['fileFormat'] == 'tfrecord' and info['alternativeFileFormats'] == ['array_record']
    builder = data.prepare(_imagenet_config(data_dir))
    by_index = builder.as_data_source('train', deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    in_sequence = tf.data.TFRecordDataset(
        str(data_dir / 'imagenet2012' / VERSION / 'imagenet2012-train.tfrecord-00000-of-00001'))
    assert [by_index[i] for i in range(len(by_index))] == [r.numpy() for r in in_sequence]
    messages = []
    convert.convert('imagenet2012', str(data_dir), log=messages.append)
    assert messages == [f'{data_dir}/imagenet2012/{VERSION} already holds imagenet2012 as ArrayRecord: '
                        'nothing to do']


def test_conversion_onto_gcs_gives_the_same_stream(tfrecord_imagenet, tmp_path):
    """--out_dir=gs://...: each shard is written locally, then copied up; metadata goes through epath."""
    source = _copy(tfrecord_imagenet, tmp_path / 'read_only')
    with fake_gcs(tmp_path / 'gcs'):
        convert.convert('imagenet2012', str(source), out_dir='gs://bucket/tfds', log=lambda _: None)
        remote = datasets.get_builder(_imagenet_config('gs://bucket/tfds'))
        assert remote.is_prepared() and str(remote.data_dir) == f'gs://bucket/tfds/imagenet2012/{VERSION}'
        assert datasets.file_formats(remote) == ['array_record']
    bucket = tmp_path / 'gcs' / 'bucket' / 'tfds'  # what the fake bucket holds
    assert not any('tfrecord' in name for name in _files(bucket))
    assert 'label.labels.txt' in _files(bucket) and _files(source) == _files(tfrecord_imagenet)
    in_place = convert.convert('imagenet2012', str(_copy(tfrecord_imagenet, tmp_path / 'in_place')),
                               log=lambda _: None)
    for a, b in zip(_train_batches(bucket), _train_batches(in_place)):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])


def _move_version(data_dir, version):
    directory = Path(data_dir) / 'imagenet2012'
    (directory / VERSION).rename(directory / version)
    info_path = directory / version / 'dataset_info.json'
    info = json.loads(info_path.read_text())
    info['version'] = version
    info_path.write_text(json.dumps(info))


def test_older_supported_version_is_used(tfrecord_imagenet, tmp_path):
    data_dir = _copy(tfrecord_imagenet, tmp_path / 'tfds')
    convert.convert('imagenet2012', str(data_dir), log=lambda _: None)
    _move_version(data_dir, '5.0.0')
    builder = data.prepare(_imagenet_config(data_dir))
    assert str(builder.version) == '5.0.0'
    assert data.dataset_info(_imagenet_config(data_dir)).num_train == 12


def test_unreadable_version_is_a_one_line_error(tfrecord_imagenet, tmp_path):
    data_dir = _copy(tfrecord_imagenet, tmp_path / 'tfds')
    _move_version(data_dir, '2.0.1')
    with pytest.raises(ValueError) as error:
        data.prepare(_imagenet_config(data_dir))
    message = str(error.value)
    assert '\n' not in message
    assert message.startswith(f'{data_dir}/imagenet2012 holds imagenet2012 version(s) 2.0.1, which '
                              f'tensorflow-datasets {tfds.__version__} cannot read (it reads 5.1.0, 5.0.0)')


def test_tfrecord_image_folder_copy_is_converted(tmp_path, monkeypatch):
    from test_data_pipeline import _image_folder
    monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
    root = _image_folder(tmp_path / 'photos')
    config = make_config(root, dataset='image_folder')
    config.model.num_classes, config.data.eval_split = 2, 'val'
    datasets.get_builder(config).download_and_prepare(file_format='tfrecord')
    with pytest.raises(ValueError, match=f'--dataset=image_folder --data_dir={root}`'):
        data.prepare(config)
    copy = tmp_path / 'tfds' / 'image_folder'
    before = sorted(p.relative_to(copy) for p in copy.rglob('*'))
    # A separate copy: the images stay config.data_dir; the converted copy is read from TFDS_DATA_DIR.
    lines = []
    assert convert.convert('image_folder', str(root), out_dir=str(tmp_path / 'mine'), log=lines.append) == str(root)
    assert lines[-1].endswith(f'train with TFDS_DATA_DIR={tmp_path / "mine"} --config.data_dir={root}')
    assert sorted(p.relative_to(copy) for p in copy.rglob('*')) == before   # the TFRecord copy untouched
    monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'mine'))
    assert data.dataset_info(config) == data.DatasetInfo(num_classes=2, num_train=7, num_eval=4)
    monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
    convert.convert('image_folder', str(root), log=lines.append)   # in place
    assert lines[-1].endswith(f'train with --config.data_dir={root}')
    assert data.dataset_info(config) == data.DatasetInfo(num_classes=2, num_train=7, num_eval=4)


def test_metrics_and_tensorboard_on_gcs(tmp_path):
    from rest_jax.train import metrics
    with fake_gcs(tmp_path):
        writer = metrics.MetricWriter('gs://bucket/run', total_steps=3)
        writer.write(1, {'loss': 2.5})
        writer.write(2, {'loss': 2.0})
        writer.close()
        writer = metrics.MetricWriter('gs://bucket/run', total_steps=3)  # a resumed run appends
        writer.write(3, {'loss': 1.5, 'top1': 0.25})
        writer.close()
    run = tmp_path / 'bucket' / 'run'
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert records == [{'step': 1, 'loss': 2.5}, {'step': 2, 'loss': 2.0},
                       {'step': 3, 'loss': 1.5, 'top1': 0.25}]
    scalars = {}
    for events in (run / 'tensorboard').iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                scalars[(event.step, value.tag)] = value.simple_value
    assert scalars == {(1, 'loss'): 2.5, (2, 'loss'): 2.0, (3, 'loss'): 1.5, (3, 'top1'): 0.25}


IMAGENET = ['--config.dataset=imagenet2012', '--config.model.num_classes=1000',
            '--config.data.eval_split=validation', '--config.batch_size=8', '--config.total_steps=4',
            '--config.eval_every_steps=4']


@pytest.fixture(scope='module')
def env8():
    """test_train_loop's environment, with 8 devices."""
    return subprocess_env(8)


def test_train_py_fine_tunes_on_a_converted_tfrecord_copy(env8, tfrecord_imagenet, tmp_path):
    """train.py names the conversion command, the command converts, and train.py then fine-tunes the
    10-class golden checkpoint (its head re-initialised for 1000 classes) on the converted copy over 8
    devices, evaluating every validation image. (Resuming after kill -9 is bit-identical on the same
    reader and loop: tests/test_train_loop.py.)"""
    data_dir = _copy(tfrecord_imagenet, tmp_path / 'tfds')
    proc = subprocess.run(train_loop._command(tmp_path / 'refused', data_dir, *train_loop.TINY, *IMAGENET),
                          env=env8, capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith('error: ') and 'rest_jax.data.convert' in last, last
    command = last.split('`')[1].split()
    assert command[:3] == ['python', '-m', 'rest_jax.data.convert']
    done = subprocess.run([sys.executable, *command[1:]], env=env8, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0 and 'holds imagenet2012 as ArrayRecord' in done.stdout, done.stderr[-2000:]

    workdir, golden = tmp_path / 'run', convert_golden(tmp_path / 'golden')
    out = train_loop._train(env8, workdir, data_dir, *IMAGENET, f'--config.init_from={golden}',
                            '--config.model.embed_dims=None', '--config.model.depths=None')
    assert '8 cpu device(s)' in out and 'imagenet2012: 12 train / 5 eval images, 1000 classes' in out
    assert 'head re-initialised for 1000 classes' in out
    metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m['loss']) for m in metrics)
    assert metrics[-1]['eval_count'] == 5 and 0 <= metrics[-1]['top1'] <= metrics[-1]['top5'] <= 1
    assert (workdir / 'checkpoints' / '4').is_dir()


def test_workdir_metadata_on_gcs(tmp_path):
    """A gs:// workdir's model spec and config are written and read through etils.epath."""
    from rest_jax import pretrained
    with fake_gcs(tmp_path):
        assert pretrained.read_metadata('gs://bucket/run') is None
        pretrained.write_workdir_metadata('gs://bucket/run', 'restv2_tiny', {'num_classes': 10},
                                          {'input_size': 224, 'crop_pct': 1.0}, '{"seed": 0}\n')
        meta = pretrained.read_metadata('gs://bucket/run', pretrained.WORKDIR_FORMAT)
    assert meta == {'format': pretrained.WORKDIR_FORMAT, 'model': 'restv2_tiny', 'config': {'num_classes': 10},
                    'preprocessing': {'input_size': 224, 'crop_pct': 1.0}}
    assert (tmp_path / 'bucket' / 'run' / 'config.json').read_text() == '{"seed": 0}\n'
    assert sorted(p.name for p in (tmp_path / 'bucket' / 'run').iterdir()) == ['config.json', 'rest_jax.json']

"""Converts a dataset that TFDS prepared as TFRecord into ArrayRecord, once, with TFDS's converter.

    python -m rest_jax.data.convert --dataset=imagenet2012 --data_dir=gs://BUCKET/tensorflow_datasets
    python -m rest_jax.data.convert --dataset=imagenet2012 --data_dir=gs://TEAM/tfds --out_dir=gs://MINE/tfds
    python -m rest_jax.data.convert --dataset=image_folder --data_dir=/data/photos   # its TFDS copy

In place (the default), the ArrayRecord shards go beside the TFRecord ones and dataset_info.json
lists ArrayRecord as an alternative format (TFDS's own convention): tfds.load keeps reading the
TFRecord files, training reads the ArrayRecord ones by index. --out_dir writes a separate ArrayRecord
copy instead (for a bucket you may only read); train with --config.data_dir=OUT_DIR. Each shard is
converted record by record, in order, so example i is the same example in both copies. A stopped
conversion resumes: shards already written are skipped.

array_record 0.8.6 reads gs:// but cannot write it, so for a gs:// destination each shard is
written to a local temporary file and copied up (one shard at a time per worker: the local disk
holds --workers shards, not the dataset).
"""

import concurrent.futures
import dataclasses
import os
import sys
import tempfile
import types

from absl import app
from absl import flags
from etils import epath
import ml_collections

_DATASET = flags.DEFINE_enum('dataset', 'imagenet2012', ['imagenet2012', 'image_folder', 'digits'],
                             'config.dataset of the copy to convert')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'config.data_dir: the TFDS data dir (imagenet2012, '
                                'digits; default $TFDS_DATA_DIR) or the image folder root')
_OUT_DIR = flags.DEFINE_string('out_dir', '', 'TFDS data dir for a separate ArrayRecord copy '
                               '(default: in place, beside the TFRecord files)')
_WORKERS = flags.DEFINE_integer('workers', 8, 'shards converted at once (threads)')


def _tfds_converter():
    """TFDS's converter module (tensorflow_datasets/scripts/cli/convert_format_utils.py).

    TFDS 4.9.10 defines a Beam DoFn at import time, so the module cannot be imported without
    apache-beam, a large dependency that only its Beam mode uses. That mode is never used here: a
    stand-in module with a ``DoFn`` base class lets the import succeed when Beam is absent.
    """
    try:
        import apache_beam  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        sys.modules['apache_beam'] = types.ModuleType('apache_beam')
        sys.modules['apache_beam'].DoFn = object
    from tensorflow_datasets.scripts.cli import convert_format_utils  # pylint: disable=g-import-not-at-top
    return convert_format_utils


def _convert_shard(shard, staging):
    """Converts one shard; a remote destination is written locally first, then copied up."""
    out = epath.Path(shard.out_path)
    if staging is None:
        shard.convert()
        return
    local = epath.Path(staging) / out.name
    dataclasses.replace(shard, out_path=local).convert()
    # A GCS object appears only once its upload completes: a stopped copy leaves no partial shard.
    local.copy(out, overwrite=True)
    local.unlink()


def convert(dataset: str, data_dir: str, out_dir: str = '', workers: int = 8, log=print) -> str:
    """Converts the prepared copy of ``dataset`` to ArrayRecord (a no-op if it already is).

    Args:
      dataset: config.dataset ('imagenet2012', 'image_folder' or 'digits').
      data_dir: config.data_dir: the TFDS data dir holding the copy (local or gs://; '' =
        $TFDS_DATA_DIR), or for image_folder the image folder root (its copy is in $TFDS_DATA_DIR).
      out_dir: a TFDS data dir for a separate ArrayRecord copy; '' converts in place.
      workers: shards converted at once.
      log: called with one line of progress at a time.

    Returns:
      The config.data_dir to train with: out_dir if given, else data_dir; for image_folder always
      data_dir (the images), with $TFDS_DATA_DIR=out_dir where out_dir is given.

    Raises:
      ValueError: nothing is prepared there, or the conversion left a split incomplete.
    """
    from rest_jax.data import datasets  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import dataset_info as dataset_info_lib  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
    config = ml_collections.ConfigDict({'dataset': dataset, 'data_dir': data_dir})
    builder = datasets.get_builder(config)
    if not builder.is_prepared():
        raise ValueError(f'no prepared {dataset} in {builder.data_dir}: nothing to convert (train '
                         'prepares it from its sources, as ArrayRecord)')
    src = epath.Path(builder.data_dir)
    dst = epath.Path(out_dir) / builder.info.full_name if out_dir else src
    formats = datasets.file_formats(builder)
    if datasets.FILE_FORMAT in formats and dst == src:
        log(f'{src} already holds {builder.name} as ArrayRecord: nothing to do')
        return data_dir
    converter = _tfds_converter()
    info = dataset_info_lib.read_proto_from_builder_dir(src)
    target = file_adapters.FileFormat.ARRAY_RECORD
    options = converter.ConvertConfig(out_file_format=target, fail_on_error=True,
                                      num_workers=workers).with_in_file_format(info.file_format)
    if dst != src:
        dst.mkdir(parents=True, exist_ok=True)
        shard_infix = f'.{info.file_format}-'
        for path in src.iterdir():  # dataset_info.json, features.json, label names, ...
            if shard_infix not in path.name and not (dst / path.name).exists():
                path.copy(dst / path.name)
    shards = converter.get_all_shard_instructions(info, in_path=src, out_path=dst,
                                                  convert_config=options)
    log(f'converting {len(shards)} shard(s) of {src} ({info.file_format}) to ArrayRecord in {dst}')
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        staging = tmp if datasets._is_remote(dst) else None  # pylint: disable=protected-access
        for done, _ in enumerate(pool.map(lambda s: _convert_shard(s, staging), shards), 1):
            if done % 64 == 0 or done == len(shards):
                log(f'{done}/{len(shards)} shards')
    if dst == src:
        # TFDS's metadata step: checks every split's shard count, then lists the new format.
        converter.convert_metadata(in_dir=src, info=info, out_path=dst, convert_config=options,
                                   num_converted_shards=len(shards))
    else:
        _check_shards(info, dst)
        info.file_format = target.value
        del info.alternative_file_formats[:]
        dataset_info_lib.write_dataset_info_proto(info, dataset_info_dir=dst)
    if dataset == 'image_folder':
        # config.data_dir names the images; their TFDS copy is found in $TFDS_DATA_DIR.
        converted = datasets.opened_in(config, out_dir) if out_dir else datasets.get_builder(config)
        train_with = (f'TFDS_DATA_DIR={out_dir} ' if out_dir else '') + f'--config.data_dir={data_dir}'
    else:
        converted = datasets.get_builder(ml_collections.ConfigDict({'dataset': dataset,
                                                                   'data_dir': out_dir or data_dir}))
        train_with = f'--config.data_dir={out_dir or data_dir or os.environ.get("TFDS_DATA_DIR", "")}'
    if datasets.FILE_FORMAT not in datasets.file_formats(converted):
        raise ValueError(f'the conversion of {src} did not complete; run the command again')
    log(f'{dst} holds {builder.name} as ArrayRecord; train with {train_with}')
    return data_dir if dataset == 'image_folder' else out_dir or data_dir


def _check_shards(info, dst):
    """Raises ValueError naming a split whose ArrayRecord shards are not all in ``dst``."""
    for split in info.splits:
        found = len(list(dst.glob(f'{info.name}-{split.name}.array_record-*-of-*')))
        if found != len(split.shard_lengths):
            raise ValueError(f'{dst}: {found} of {len(split.shard_lengths)} ArrayRecord shards of '
                             f'split {split.name}; run the command again to convert the others')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    from rest_jax import data  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  # TF off the GPUs
    try:
        convert(_DATASET.value, _DATA_DIR.value, _OUT_DIR.value, _WORKERS.value)
    except ValueError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    app.run(main)

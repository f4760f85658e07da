"""The datasets behind ``config.dataset``, read by index from ArrayRecord files that TFDS prepared.

* ``imagenet2012``: the real TFDS builder, from the manual-download tars, or a copy that TFDS
  already prepared (a team's ``TFDS_DATA_DIR=gs://...``).
* ``image_folder``: ``<root>/<split>/<class>/<image>`` (the official repo's layout), checked image
  by image while it is prepared.
* ``digits``: the 1,797 handwritten digits that scikit-learn ships: real images, no network.

Why ArrayRecord: it reads any record by its index, so the training stream can be a pure function
of (seed, step) (see pipeline.py). A copy prepared as TFRecord (TFDS's default) reads only in
sequence: it is converted once, beside itself or into another directory, by
``python -m rest_jax.data.convert`` (convert.py). array_record >= 0.8.3 reads ``gs://`` paths, so a
prepared copy on GCS is read there by every host; it cannot write them, so a dataset prepared here
from sources on ``gs://`` goes to the local TFDS directory ($TFDS_DATA_DIR or
~/tensorflow_datasets).
"""

import dataclasses
import hashlib
import io
import os

from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

FILE_FORMAT = 'array_record'
CONVERT = 'python -m rest_jax.data.convert'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
DATASETS = ('imagenet2012', 'image_folder', 'digits')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train: int
    num_eval: int


class SklearnDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's 8x8 handwritten digits as 32x32 RGB JPEGs, split 80/20 per class, fixed."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release.'}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description='The 1,797 handwritten digits (UCI optdigits test set) that scikit-learn '
                        'ships, 17 grey levels upscaled bilinearly to 32x32 RGB.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(32, 32, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the images come with scikit-learn
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
        digits = load_digits()
        ink = digits.images[..., None].astype(np.float32) * (255 / 16)  # 0..16 grey levels
        images = tf.image.resize(ink, (32, 32), method='bilinear').numpy()
        images = np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8), 3, axis=-1)
        labels = digits.target
        # Every fifth image of each class (in scikit-learn's order) is held out: stratified, fixed.
        test = np.zeros(len(labels), bool)
        for digit in range(10):
            test[np.flatnonzero(labels == digit)[::5]] = True
        return {
            'train': self._generate_examples(images, labels, np.flatnonzero(~test)),
            'test': self._generate_examples(images, labels, np.flatnonzero(test)),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {'image': images[i], 'label': int(labels[i])}


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images in ``<root>/<split>/<class>/...``; class ids follow the sorted class names of 'train'.

    Every file is decoded while the dataset is prepared; files that cannot be read are all named in
    one error and nothing is written, so a bad file never surfaces in the middle of a training run.
    Files in other formats (PNG, CMYK JPEG, ...) are re-encoded as JPEG (quality 95). The prepared
    copy is keyed by the root and the list of file names: adding or renaming files prepares anew.
    """

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release.'}

    def __init__(self, *, root: str, **kwargs):
        self._root = str(root).rstrip('/')
        self._files, self._classes = _list_image_folder(self._root)
        listing = '\n'.join([self._root] + [f'{s}/{p}' for s in sorted(self._files)
                                            for p, _ in self._files[s]])
        digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
        super().__init__(config=tfds.core.BuilderConfig(name=f'files_{digest}'), **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f'Image folder {self._root}.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=self._classes),
                'file_name': tfds.features.Text(),  # relative to the split folder
            }),
            supervised_keys=('image', 'label'),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._files}

    def _generate_examples(self, split):
        unreadable = []
        for relative, label in self._files[split]:
            path = f'{self._root}/{split}/{relative}'
            with tf.io.gfile.GFile(path, 'rb') as f:
                jpeg = _checked_jpeg(f.read())
            if jpeg is None:
                unreadable.append(path)
                continue
            yield relative, {'image': jpeg, 'label': label, 'file_name': relative}
        if unreadable:
            listed = ', '.join(unreadable[:20]) + (' ...' if len(unreadable) > 20 else '')
            raise ValueError(f'{len(unreadable)} image file(s) in {self._root}/{split} cannot be '
                             f'decoded (corrupt, truncated or not an image): {listed}. Remove or '
                             'replace them and run again; nothing was written.')


def _list_image_folder(root):
    """Returns ({split: [(path relative to the split, class id)]}, class names)."""
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f'image folder {root} does not exist: config.data_dir must hold '
                                'train/<class>/*.jpg and val/<class>/*.jpg')
    splits = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(root)
                    if not d.startswith(('.', '_')) and tf.io.gfile.isdir(f'{root}/{d}'))
    per_split = {}
    for split in splits:
        classes = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(f'{root}/{split}')
                         if tf.io.gfile.isdir(f'{root}/{split}/{d}'))
        files = {}
        for name in classes:
            base = f'{root}/{split}/{name}'
            found = []
            for directory, _, names in tf.io.gfile.walk(base):
                prefix = directory.rstrip('/')[len(base):].lstrip('/')
                found += [f'{prefix}/{n}'.lstrip('/') for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
            files[name] = sorted(found)
        per_split[split] = files
    if 'train' not in per_split or not per_split['train']:
        raise FileNotFoundError(f'{root}/train/<class>/ holds no images: config.data_dir must hold '
                                'train/<class>/*.jpg and val/<class>/*.jpg')
    classes = sorted(per_split['train'])
    listing = {}
    for split, files in per_split.items():
        unknown = sorted(set(files) - set(classes))
        if unknown:
            raise ValueError(f'{root}/{split} has classes that train/ lacks: {unknown[:10]}; every '
                             'split must use the class folders of train/')
        listing[split] = [(f'{name}/{f}', classes.index(name)) for name in sorted(files)
                          for f in files[name]]
        if not listing[split]:
            raise FileNotFoundError(f'{root}/{split} holds no image files ({", ".join(IMAGE_EXTENSIONS)})')
    return listing, classes


def _checked_jpeg(data: bytes) -> bytes | None:
    """The image as JPEG bytes that tf.io.decode_jpeg reads, or None when it cannot be decoded."""
    if data[:3] == b'\xff\xd8\xff':
        try:
            tf.io.decode_jpeg(data, channels=3)
            return data
        except tf.errors.InvalidArgumentError:
            pass  # truncated, or a colour model TF does not decode (CMYK): PIL decides below
    try:
        from PIL import Image  # pylint: disable=g-import-not-at-top
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert('RGB')  # decodes the whole file: truncation raises here
        buffer = io.BytesIO()
        rgb.save(buffer, format='JPEG', quality=95)
        tf.io.decode_jpeg(buffer.getvalue(), channels=3)
        return buffer.getvalue()
    except Exception:  # pylint: disable=broad-except  # any failure means "unreadable": reported
        return None


def _is_remote(path) -> bool:
    return '://' in str(path)


def _local_default() -> str:
    """The local TFDS directory: $TFDS_DATA_DIR when it is local, else ~/tensorflow_datasets."""
    env = os.environ.get('TFDS_DATA_DIR')
    return os.path.expanduser(env if env and not _is_remote(env) else '~/tensorflow_datasets')


def _data_dirs(config) -> list[str]:
    """TFDS data dirs that may hold the prepared copy, in order; the last is where it is prepared.

    imagenet2012 and digits live in config.data_dir (default: $TFDS_DATA_DIR); an image folder's
    copy in $TFDS_DATA_DIR. A remote one is read where it is, but a copy prepared here goes to the
    local TFDS directory, since ArrayRecord cannot write gs://.
    """
    given = None if config.dataset == 'image_folder' else (config.data_dir or None)
    first = given or os.environ.get('TFDS_DATA_DIR') or _local_default()
    if not _is_remote(first):
        first = os.path.expanduser(str(first))
        return [first]
    return [first, _local_default()]


def _make_builder(config, data_dir, version=None):
    """The builder in ``data_dir``; its file format is the prepared copy's (TFRecord if none)."""
    kwargs = {'data_dir': data_dir}
    if version is not None:
        kwargs['version'] = version
    if config.dataset == 'imagenet2012':
        return tfds.builder('imagenet2012', **kwargs)
    if config.dataset == 'digits':
        return SklearnDigits(**kwargs)
    return ImageFolder(root=str(config.data_dir), **kwargs)


def _prepared_versions(builder) -> list[str]:
    """Versions of ``builder``'s dataset (and config) prepared in its data dir."""
    parent = epath.Path(builder.data_dir).parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir()
                  if p.name[:1].isdigit() and (p / 'dataset_info.json').exists())


def _readable_version(config, builder, data_dir):
    """The builder of another prepared version that this TFDS reads, None if none is prepared.

    Raises:
      ValueError: only versions that this TFDS cannot read are prepared.
    """
    found = _prepared_versions(builder)
    if not found:
        return None
    known = [str(builder.canonical_version)] + [str(v) for v in builder.SUPPORTED_VERSIONS]
    usable = [v for v in known if v in found]  # the newest first
    if usable:
        return _make_builder(config, data_dir, version=usable[0])
    raise ValueError(
        f'{epath.Path(builder.data_dir).parent} holds {builder.name} version(s) {", ".join(found)}, '
        f'which tensorflow-datasets {tfds.__version__} cannot read (it reads {", ".join(known)}): '
        f'install the tensorflow-datasets release that prepared it, or point config.data_dir at '
        f'an empty directory to prepare version {builder.canonical_version} there')


def _check_imagenet_tars(data_dir):
    """Raises a FileNotFoundError that says which tar goes where, when one is missing."""
    root = epath.Path(data_dir)
    manual = root / 'downloads' / 'manual'
    problems = []
    for name in IMAGENET_TARS:
        if (manual / name).exists():
            continue
        misplaced = [p for p in (root / name, root / 'downloads' / name, manual / name.lower(),
                                 epath.Path(os.getcwd()) / name) if p.exists()]
        hint = f' (it is at {misplaced[0]}: move it)' if misplaced else ''
        problems.append(f'{name} must be at {manual / name}{hint}')
    if problems:
        raise FileNotFoundError(
            'ImageNet 2012 is prepared from the two manual-download tars of image-net.org: '
            + '; '.join(problems) + '. Keep ILSVRC2012_img_train.tar whole (one tar per class '
            'inside); do not extract either tar.')


def _with_alternative_formats(builder):
    """``builder`` with the alternative file formats of its dataset_info.json.

    TFDS 4.9.10 restores them into the info's proto but not into the list that
    ``available_file_formats()`` and ``as_data_source`` read, for builders defined in code: the
    ArrayRecord shards that its converter adds beside TFRecord ones would go unseen.
    """
    listed = builder.info.alternative_file_formats
    for value in builder.info.as_proto.alternative_file_formats:
        file_format = tfds.core.FileFormat.from_value(value)
        if file_format not in listed:
            listed.append(file_format)
    return builder


def get_builder(config):
    """The TFDS builder of ``config.dataset``: its prepared copy if there is one (see ``prepare``)."""
    name = config.dataset
    if name not in DATASETS:
        raise ValueError(f'config.dataset={name!r} is not one of {DATASETS}')
    if name == 'image_folder' and not config.data_dir:
        raise ValueError('config.data_dir must name the image folder (train/<class>/*.jpg, '
                         'val/<class>/*.jpg) when config.dataset is image_folder')
    for data_dir in _data_dirs(config):
        builder = _make_builder(config, data_dir)
        if not builder.is_prepared():
            builder = _readable_version(config, builder, data_dir) or builder
        if builder.is_prepared():
            return _with_alternative_formats(builder)
    return builder  # not prepared: in the last directory, where it is prepared


def opened_in(config, data_dir):
    """The builder of ``config.dataset``'s copy in the TFDS data dir ``data_dir``, as `get_builder` opens it."""
    return _with_alternative_formats(_make_builder(config, data_dir))


def convert_command(config, data_dir=None) -> str:
    """The command that converts the prepared copy of ``config.dataset`` to ArrayRecord in place."""
    if config.dataset == 'image_folder':
        return f'{CONVERT} --dataset=image_folder --data_dir={config.data_dir}'
    return f'{CONVERT} --dataset={config.dataset} --data_dir={data_dir or config.data_dir}'


def file_formats(builder) -> list[str]:
    """The file formats of ``builder``'s prepared copy (its own, then the alternatives)."""
    return [str(getattr(f, 'value', f)) for f in builder.info.available_file_formats()]


def prepare(config):
    """Prepares ``config.dataset`` once (a no-op when it is ready) and returns its builder.

    A copy in ``config.data_dir`` (or ``$TFDS_DATA_DIR``) is used as it is when it holds ArrayRecord
    files, local or on gs://. On many hosts, prepare once on storage every host reads (gs://
    included) or on each host's disk.

    Args:
      config: the run's ConfigDict (dataset, data_dir).

    Returns:
      The prepared tfds.core.DatasetBuilder.

    Raises:
      ValueError: the copy holds only formats that cannot be read by index (the message names the
        conversion command), or a version this TFDS cannot read.
      FileNotFoundError: imagenet2012 is not prepared and its tars are not in place.
    """
    builder = get_builder(config)
    if not builder.is_prepared():
        _download_and_prepare(builder, config)
        return builder
    formats = file_formats(builder)
    if FILE_FORMAT not in formats:
        root = str(builder.data_dir)[:-len(builder.info.full_name) - 1]  # the TFDS data_dir
        raise ValueError(f'{builder.data_dir} holds {builder.name} as {"/".join(formats)}, which '
                         f'is read in sequence only; training reads examples by index: convert it '
                         f'once to ArrayRecord with `{convert_command(config, root)}` (the '
                         f'{formats[0]} files stay; --out_dir=DIR writes a separate copy instead)')
    return builder


def _download_and_prepare(builder, config):
    download_config = None
    if config.dataset == 'imagenet2012':
        if not config.data_dir:
            raise ValueError('config.data_dir must hold downloads/manual/ILSVRC2012_img_{train,val}.tar '
                             'for imagenet2012')
        _check_imagenet_tars(config.data_dir)
        manual = str(epath.Path(config.data_dir) / 'downloads' / 'manual')
        download_config = tfds.download.DownloadConfig(manual_dir=manual)
    builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)


def dataset_info(config) -> DatasetInfo:
    """Number of classes and of train / eval examples of ``config.dataset`` (prepares it if needed).

    Args:
      config: the run's ConfigDict (dataset, data_dir, data.train_split, data.eval_split).

    Returns:
      DatasetInfo(num_classes, num_train, num_eval).
    """
    builder = prepare(config)
    splits = builder.info.splits
    for split in (config.data.train_split, config.data.eval_split):
        if split not in splits:
            raise ValueError(f'{builder.name} has no split {split!r}; it has {sorted(splits)}')
    return DatasetInfo(num_classes=builder.info.features['label'].num_classes,
                       num_train=splits[config.data.train_split].num_examples,
                       num_eval=splits[config.data.eval_split].num_examples)

"""The datasets behind ``config.dataset``, all prepared by TFDS builders into ArrayRecord files.

* ``imagenet2012``: the real TFDS builder, from the manual-download tars.
* ``image_folder``: ``<root>/<split>/<class>/<image>`` (the official repo's layout), checked image
  by image while it is prepared.
* ``digits``: the 1,797 handwritten digits that scikit-learn ships: real images, no network.

Why ArrayRecord: it reads any record by its index, so the training stream can be a pure function
of (seed, step) (see pipeline.py). The open-source ArrayRecord reader opens local paths only
(google/array_record#120), so when ``config.data_dir`` is a ``gs://`` path the sources are read
from there and the prepared files go to the local TFDS directory ($TFDS_DATA_DIR or
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


def _local_data_dir(data_dir):
    """data_dir for the prepared ArrayRecord files: a local path ($TFDS_DATA_DIR or TFDS's default
    when data_dir is empty or on gs://)."""
    if not data_dir or str(data_dir).startswith('gs://'):
        return os.environ.get('TFDS_DATA_DIR') or None
    return os.path.expanduser(str(data_dir))


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


def get_builder(config):
    """The TFDS builder of ``config.dataset`` (not necessarily prepared; see ``prepare``)."""
    name = config.dataset
    local = _local_data_dir(config.data_dir)
    if name == 'imagenet2012':
        return tfds.builder('imagenet2012', data_dir=local, file_format=FILE_FORMAT)
    if name == 'digits':
        return SklearnDigits(data_dir=local, file_format=FILE_FORMAT)
    if name == 'image_folder':
        if not config.data_dir:
            raise ValueError('config.data_dir must name the image folder (train/<class>/*.jpg, '
                             'val/<class>/*.jpg) when config.dataset is image_folder')
        return ImageFolder(root=str(config.data_dir), data_dir=_local_data_dir(None),
                           file_format=FILE_FORMAT)
    raise ValueError(f'config.dataset={name!r} is not one of {DATASETS}')


def prepare(config):
    """Prepares ``config.dataset`` once (a no-op when it is ready) and returns its builder.

    On many hosts, run it on each host before training (the ArrayRecord files must be local), or
    prepare once on a shared file system.
    """
    builder = get_builder(config)
    if not builder.is_prepared():
        _download_and_prepare(builder, config)
        return builder
    formats = [str(getattr(f, 'value', f)) for f in builder.info.available_file_formats()]
    if FILE_FORMAT not in formats:
        raise ValueError(f'{builder.data_dir} holds {builder.name} as {formats}, which cannot be '
                         f'read by index; delete it (or pick another data_dir) so that it is '
                         f'prepared as {FILE_FORMAT}')
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
    builder.download_and_prepare(download_config=download_config)


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

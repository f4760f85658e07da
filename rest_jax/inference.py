"""Inference for notebooks: the official evaluation transform, a jitted top-k predict, class names.

Needs Pillow (the official eval resizes with PIL's bicubic filter; reproducing it exactly means using
PIL), never tensorflow or torch.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import sys
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rest_jax.pretrained import preprocessing_of, remember_preprocessing  # noqa: F401 (also here)

_PIL_FILTERS = {'bicubic': 'BICUBIC', 'bilinear': 'BILINEAR', 'nearest': 'NEAREST', 'lanczos': 'LANCZOS'}
_WARP_FROM = 384  # the official eval warps straight to a square at this size and above (no crop)


def _to_pil(image: Any, index: int):
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert('RGB')  # what the official loader does (palette, gray, RGBA -> RGB)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f'image {index}: expected uint8 pixels (0-255) or a PIL image, got dtype {array.dtype}; '
                         'convert with (x * 255).round().astype(np.uint8) if it is a [0, 1] float image')
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array, 'L').convert('RGB')
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return Image.fromarray(array, 'RGBA' if array.shape[-1] == 4 else 'RGB').convert('RGB')
    raise ValueError(f'image {index}: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {array.shape}')


def _eval_transform(image, size: int, crop_pct: float, resample) -> np.ndarray:
    """torchvision's Resize(shorter side) + CenterCrop as the official eval composes them, on PIL."""
    width, height = image.size
    if size >= _WARP_FROM:
        return np.asarray(image.resize((size, size), resample))
    short = int(size / crop_pct)
    # torchvision: the long side is int(short * long / short_old), truncated.
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    top = int(round((new_h - size) / 2.0))  # torchvision's CenterCrop offsets (Python's round)
    left = int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def preprocess(images: Any, model: Any, *, input_size: int | None = None,
               crop_pct: float | None = None) -> np.ndarray:
    """The official evaluation transform: images -> a normalized NHWC float32 batch.

    Resizes the shorter side to int(input_size / crop_pct) with PIL's bicubic filter and center-crops
    input_size x input_size (torchvision's Resize + CenterCrop, as the official code composes them); at
    384 and above warps straight to a square, like the official code. Then [0, 1] scaling and the
    ImageNet mean/std.

    Args:
      images: a PIL image, an HxWxC uint8 array, a sequence of those, or an NxHxWxC uint8 array.
        Grayscale and RGBA are converted to RGB like the official loader.
      model: a model from `load_pretrained` (uses its checkpoint's metadata), a ResT/ResTV2 module,
        a variant name, a `ModelInfo` or a preprocessing dict; see `preprocessing_of`.
      input_size: overrides the output size (e.g. 384 for a 384 fine-tune).
      crop_pct: overrides the crop fraction.

    Returns:
      float32 numpy array (N, input_size, input_size, 3).
    """
    from PIL import Image
    prep = preprocessing_of(model)
    size = int(input_size or prep['input_size'])
    crop_pct = float(crop_pct or prep['crop_pct'])
    if size < 32:
        raise ValueError(f'input_size must be at least 32, got {size}')
    if not 0 < crop_pct <= 1:
        raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
    interpolation = prep.get('interpolation', 'bicubic')
    if interpolation not in _PIL_FILTERS:
        raise ValueError(f'unknown interpolation {interpolation!r}; use one of {sorted(_PIL_FILTERS)}')
    resample = getattr(Image.Resampling, _PIL_FILTERS[interpolation])
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]
    if isinstance(images, (str, bytes)) or not isinstance(images, (Sequence, np.ndarray)):
        raise ValueError(f'expected PIL images or uint8 arrays, got {type(images).__name__}; open files with '
                         'PIL.Image.open(path) first')
    if len(images) == 0:
        raise ValueError('no images given')
    batch = np.stack([_eval_transform(_to_pil(image, i), size, crop_pct, resample)
                      for i, image in enumerate(images)])
    mean = np.asarray(prep['mean'], np.float32)
    std = np.asarray(prep['std'], np.float32)
    return (batch.astype(np.float32) / 255.0 - mean) / std


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard (sorted WordNet id) order.

    Shipped in rest_jax/assets/imagenet1k_classes.tsv (synset, then its WordNet lemmas), taken from
    timm's `data/_info` files (Apache-2.0); index i is the official models' logit i.
    """
    text = importlib.resources.files('rest_jax').joinpath('assets/imagenet1k_classes.tsv').read_text('utf-8')
    names = tuple(line.split('\t', 1)[1] for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f'imagenet1k_classes.tsv has {len(names)} classes, expected 1000; reinstall rest_jax')
    return names


class Prediction(NamedTuple):
    """Top-k predictions for a batch."""
    classes: np.ndarray           # (N, k) int32 class indices, most probable first
    probs: np.ndarray             # (N, k) float32 softmax probabilities
    names: list[list[str]]        # (N, k) class names


@functools.lru_cache(maxsize=16)
def _probabilities_fn(model: Any):
    # Modules are hashable dataclasses: one jitted function per model, which jax.jit compiles once
    # per input shape and dtype. The top-k selection runs on the host, so any top_k reuses it.
    def probabilities(variables, x):
        return jax.nn.softmax(model.apply(variables, x).astype(jnp.float32), axis=-1)
    return jax.jit(probabilities)


def predict(model: Any, variables: Any, x: Any, top_k: int = 5,
            class_names: Sequence[str] | None = None) -> Prediction:
    """Top-k classes of a preprocessed batch, jitted once per input shape.

    Args:
      model: the Flax model (e.g. from `load_pretrained`).
      variables: its {'params', 'batch_stats'}.
      x: (N, H, W, 3) float batch from `preprocess`.
      top_k: how many classes per image.
      class_names: names of the model's classes; default: the ImageNet-1k names for a 1000-class head,
        else the class indices as strings.

    Returns:
      Prediction(classes, probs, names), numpy arrays and lists.
    """
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f'expected a (batch, height, width, 3) batch, got shape {x.shape}; '
                         'use rest_jax.preprocess(images, model) to make one')
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f'expected a normalized float batch, got {x.dtype}; '
                         'use rest_jax.preprocess(images, model) to make one')
    num_classes = getattr(model, 'num_classes', None)
    if num_classes == 0:
        raise ValueError('the model has no classifier head (num_classes=0)')
    if num_classes is not None and not 1 <= top_k <= num_classes:
        raise ValueError(f'top_k must be between 1 and {num_classes}, got {top_k}')
    if class_names is None:
        class_names = imagenet_class_names() if num_classes == 1000 else None
    elif num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class_names given for a {num_classes}-class model')
    probs = np.asarray(jax.device_get(_probabilities_fn(model)(variables, x)), np.float32)
    classes = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k].astype(np.int32)
    names = [[class_names[c] if class_names is not None else str(c) for c in row] for row in classes.tolist()]
    return Prediction(classes, np.take_along_axis(probs, classes, axis=-1), names)


# --- command line -------------------------------------------------------------------------------

def _open(path: str):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert('RGB')
    except FileNotFoundError:
        raise ValueError(f'{path}: no such file') from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f'{path}: not a readable image ({" ".join(str(e).split())})') from None


def main(argv: list[str] | None = None) -> int:
    """`python -m rest_jax predict --checkpoint DIR img.jpg ...`: the top-k classes of each image."""
    parser = argparse.ArgumentParser(
        prog='python -m rest_jax predict',
        description='Classify images with a converted or trained rest_jax checkpoint, using the '
                    "official evaluation transform from the checkpoint's metadata.")
    parser.add_argument('images', nargs='+', help='image files (anything Pillow reads)')
    parser.add_argument('--checkpoint', required=True,
                        help='a directory from python -m rest_jax.convert or a training workdir')
    parser.add_argument('--ema', action='store_true', help="a training workdir's EMA weights")
    parser.add_argument('--top-k', type=int, default=5, help='classes per image (default 5)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    parser.add_argument('--json', action='store_true', help='one JSON object per image instead of text')
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1 or args.batch_size < 1:
            raise ValueError('--top-k and --batch-size must be positive')
        from rest_jax.pretrained import load_pretrained
        images = [_open(path) for path in args.images]  # all readable before the (slow) model load
        model, variables = load_pretrained(args.checkpoint, ema=args.ema)
        for start in range(0, len(images), args.batch_size):
            chunk = images[start:start + args.batch_size]
            x = preprocess(chunk, model)
            top = predict(model, variables, x, top_k=args.top_k)
            for j, path in enumerate(args.images[start:start + args.batch_size]):
                rows = list(zip(top.classes[j].tolist(), top.probs[j].tolist(), top.names[j]))
                if args.json:
                    print(json.dumps({'image': path, 'top': [{'class': c, 'prob': round(p, 6), 'name': n}
                                                             for c, p, n in rows]}))
                else:
                    print(path)
                    for rank, (c, p, n) in enumerate(rows, 1):
                        print(f'  {rank}. {p:7.2%}  {n} ({c})')
    except (ValueError, OSError) as e:
        print(f'error: {" ".join(str(e).split()) or type(e).__name__}', file=sys.stderr)
        return 1
    return 0

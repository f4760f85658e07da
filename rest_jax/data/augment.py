"""Per-image transforms of the official recipe (timm's create_transform), in TF ops.

Every random choice is a stateless draw from an explicit seed, so an image's augmentation is a
pure function of (seed, image); the pipeline derives that seed from (config.seed, position of the
example in the stream). Images travel as float32 holding integers 0..255 until they are
normalized, and every op rounds back to integers as PIL does after each transform.

Deviations from timm, all small: TF has no bicubic affine warp, so RandAugment's rotate / shear /
translate use bilinear (timm: bicubic); TF's antialiased bicubic resize stands in for PIL's
(about 0.15 levels of 255 apart on average; tests/test_data_augment.py measures it).

Speed: TF's CPU kernels are several times slower when an elementwise op broadcasts (a [3] vector
over an image) and tf.where is slow even without broadcasting, so per-channel constants are
expanded to the image's shape, masks select by arithmetic, random choices take tf.cond, and work
is limited to the pixels kept (random erasing draws noise for its box only; the eval resize
computes the center crop only, from the decoded window it reads). These forms give the plain
ones' pixels bit for bit, but for the eval resize (about 1 pixel in 10^4 moves by one level).
"""

import math
import re

import tensorflow as tf

RANDAUG_INCREASING = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                      'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                      'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
                      'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
RANDAUG_DEFAULT = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                   'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
                   'ShearY', 'TranslateXRel', 'TranslateYRel')
_LEVEL_DENOM = 10.0  # timm: magnitudes are on a 0..10 scale
# libjpeg's accurate integer DCT: TF then decodes bit-identically to PIL (its default differs by
# about one level on average).
_DCT = 'INTEGER_ACCURATE'


def _split(seed, n):
    return tf.random.experimental.stateless_split(seed, n)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval)


def _randint(seed, high):
    """Uniform integer in [0, high] (both ends, like Python's random.randint)."""
    return tf.random.stateless_uniform((), seed, minval=0, maxval=high + 1, dtype=tf.int32)


def _per_channel(values, image):
    """``values`` [3] broadcast to the image's full shape.

    TF's elementwise ops are several times slower when they broadcast a [3] vector across an
    image than on two tensors of one shape (and tf.where slower still), so per-channel constants
    are expanded once; with a static shape, grappler folds this into a constant.
    """
    return tf.broadcast_to(tf.cast(values, image.dtype), tf.shape(image))


def _select(mask, a, b):
    """tf.where(mask, a, b) for integer-valued floats, as arithmetic: exact, and ~8x cheaper."""
    return b + tf.cast(mask, b.dtype) * (a - b)


def to_pixels(image):
    """Rounds and clips to integer pixel values, as PIL does after every transform."""
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def resize(image, size_hw):
    """PIL-like bicubic resize (TF's Keys cubic, a=-0.5, antialiased when shrinking)."""
    return to_pixels(tf.image.resize(image, size_hw, method='bicubic', antialias=True))


# -- random resized crop, flip ---------------------------------------------------------------------

def random_crop_window(shape_hw, seed, scale, ratio, attempts=10):
    """timm's RandomResizedCropAndInterpolation.get_params: [top, left, height, width], int32.

    Ten candidate boxes of random area fraction (``scale``) and log-uniform aspect (``ratio``);
    the first that fits wins, else a center crop clamped to ``ratio``.
    """
    height = tf.cast(shape_hw[0], tf.float32)
    width = tf.cast(shape_hw[1], tf.float32)
    s = _split(seed, 4)
    area = height * width * _uniform(s[0], [attempts], scale[0], scale[1])
    aspect = tf.exp(_uniform(s[1], [attempts], math.log(ratio[0]), math.log(ratio[1])))
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w <= width) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    in_ratio = width / height
    lo, hi = min(ratio), max(ratio)
    fallback_w = tf.where(in_ratio > hi, tf.round(height * hi), width)
    fallback_h = tf.where(in_ratio < lo, tf.round(width / lo), height)
    found = tf.reduce_any(fits)
    h = tf.cast(tf.where(found, h[first], fallback_h), tf.int32)
    w = tf.cast(tf.where(found, w[first], fallback_w), tf.int32)
    ih, iw = tf.cast(shape_hw[0], tf.int32), tf.cast(shape_hw[1], tf.int32)
    top = tf.where(found, _randint(s[2], ih - h), (ih - h) // 2)
    left = tf.where(found, _randint(s[3], iw - w), (iw - w) // 2)
    return tf.stack([top, left, h, w])


def decode_random_crop(jpeg, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random resized crop with the fused decode-and-crop: only the window is decoded."""
    window = random_crop_window(tf.image.extract_jpeg_shape(jpeg), seed, scale, ratio)
    crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3, dct_method=_DCT)
    crop = tf.cast(crop, tf.float32)
    return resize(crop, (size, size))


def random_flip(image, seed, prob=0.5):
    return tf.cond(_uniform(seed) < prob, lambda: tf.reverse(image, axis=[1]), lambda: image)


# -- RandAugment (timm's rand_augment_transform) ---------------------------------------------------

def parse_randaug(spec):
    """'rand-m9-mstd0.5-inc1' -> dict(magnitude, num_layers, magnitude_std, magnitude_max, ops)."""
    parts = spec.split('-')
    if parts[0] != 'rand':
        raise ValueError(f'config.data.randaug={spec!r}: only timm RandAugment strings '
                         "('rand-m9-mstd0.5-inc1', '' for none) are supported")
    out = dict(magnitude=10.0, num_layers=2, magnitude_std=0.0, magnitude_max=_LEVEL_DENOM,
               ops=RANDAUG_DEFAULT)
    for part in parts[1:]:
        match = re.fullmatch(r'([a-z]+)(\d.*)', part)
        if not match:
            raise ValueError(f'config.data.randaug={spec!r}: cannot read section {part!r}')
        key, value = match.groups()
        if key == 'm':
            out['magnitude'] = float(int(value))
        elif key == 'n':
            out['num_layers'] = int(value)
        elif key == 'mstd':
            out['magnitude_std'] = float(value) if float(value) <= 100 else math.inf
        elif key == 'mmax':
            out['magnitude_max'] = float(int(value))
        elif key == 'inc':
            out['ops'] = RANDAUG_INCREASING if int(value) else RANDAUG_DEFAULT
        else:  # 'w' (weighted op choice) is not part of the ResT recipe
            raise ValueError(f'config.data.randaug={spec!r}: section {part!r} is not supported '
                             '(m, n, mstd, mmax, inc are)')
    return out


def _gray(image):
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, fixed point), as float."""
    rgb = tf.cast(image, tf.int32)
    luma = tf.bitwise.right_shift(
        rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000, 16)
    return tf.cast(luma, tf.float32)[..., None]


def _blend(degenerate, image, factor):
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped, truncated."""
    return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _smooth(image):
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, sum 13); the one-pixel border is left as is.

    Shifted sums rather than a convolution (10x cheaper on CPU): the integer sums are exact, and
    sum / 13 never lies within float error of a rounding tie, so this equals the float kernel.
    """
    rows = image[:, :-2] + image[:, 1:-1] + image[:, 2:]
    box = rows[:-2] + rows[1:-1] + rows[2:]
    inner = to_pixels((box + 4.0 * image[1:-1, 1:-1]) / 13.0)
    middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], axis=1)
    return tf.concat([image[:1], middle, image[-1:]], axis=0)


def _autocontrast(image):
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
    # A flat channel keeps its values: scale 1, offset 0 is the identity on integers.
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    lo = tf.where(hi > lo, lo, 0.0)
    pixels = tf.cast(image, tf.float64)
    out = tf.floor(pixels * _per_channel(scale, pixels) - _per_channel(lo * scale, pixels))
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.float32)


def _equalize(image):
    """PIL's ImageOps.equalize, channel by channel."""
    pixels = tf.cast(image, tf.int32)
    offsets = _per_channel(tf.range(3) * 256, pixels)
    hist = tf.reshape(tf.math.bincount(tf.reshape(pixels + offsets, [-1]), minlength=768,
                                       maxlength=768), [3, 256])
    last = tf.reduce_max(pixels, axis=[0, 1])
    last_count = tf.reduce_sum(tf.where(tf.range(256)[None] == last[:, None], hist, 0), axis=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255
    lut = (step[:, None] // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // tf.maximum(step, 1)[:, None]
    # One grey level or step 0: the channel is unchanged, as in PIL.
    lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), tf.range(256)[None])
    return tf.gather(tf.reshape(tf.cast(lut, tf.float32), [-1]), pixels + offsets)


def _affine(image, matrix, fill):
    """PIL's Image.transform(AFFINE): output pixel (x, y) samples input (ax+by+c, dx+ey+f).

    PIL measures at pixel centres, TF at pixel corners, hence the half-pixel shift. TF's fill is
    one scalar and the fill colour differs per channel; bilinear sampling is linear, so warping
    (image - fill) with fill 0 and adding fill back gives the per-channel fill exactly.
    """
    a, b, c, d, e, f = matrix
    transform = tf.stack([a, b, 0.5 * (a + b - 1.0) + c, d, e, 0.5 * (d + e - 1.0) + f, 0.0, 0.0])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    fill = _per_channel(fill, image)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=(image - fill)[None], transforms=tf.cast(transform, tf.float32)[None],
        output_shape=tf.stack([height, width]), fill_value=0.0, interpolation='BILINEAR',
        fill_mode='CONSTANT')[0]
    return to_pixels(warped + fill)


def _rotate(image, degrees, fill):
    """PIL's Image.rotate: counter-clockwise about the image centre."""
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    angle = -degrees * math.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    return _affine(image, matrix, fill)


def _op(name, image, level, sign, fill):
    """Applies RandAugment op ``name`` at magnitude ``level`` (0..10) with sign +-1."""
    frac = level / _LEVEL_DENOM
    one, zero = tf.constant(1.0), tf.constant(0.0)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    if name == 'AutoContrast':
        return _autocontrast(image)
    if name == 'Equalize':
        return _equalize(image)
    if name == 'Invert':
        return 255.0 - image
    if name == 'Rotate':
        return _rotate(image, frac * 30.0 * sign, fill)
    if name.startswith('Posterize'):
        bits = tf.cast(tf.floor(frac * 4.0), tf.int32)
        bits = 4 - bits if name == 'PosterizeIncreasing' else bits
        shift = tf.clip_by_value(8 - bits, 0, 8)
        pixels = tf.bitwise.right_shift(tf.cast(image, tf.int32), shift)
        return tf.cast(tf.bitwise.left_shift(pixels, shift), tf.float32)
    if name.startswith('Solarize') and name != 'SolarizeAdd':
        threshold = tf.floor(frac * 256.0)
        threshold = 256.0 - threshold if name == 'SolarizeIncreasing' else threshold
        return _select(image >= threshold, 255.0 - image, image)
    if name == 'SolarizeAdd':
        return _select(image < 128.0, tf.minimum(255.0, image + tf.floor(frac * 110.0)), image)
    if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        factor = frac * 1.8 + 0.1
    else:
        factor = tf.maximum(0.1, 1.0 + sign * frac * 0.9)
    if name.startswith('Color'):
        return _blend(tf.tile(_gray(image), [1, 1, 3]), image, factor)
    if name.startswith('Contrast'):
        return _blend(tf.floor(tf.reduce_mean(_gray(image)) + 0.5), image, factor)
    if name.startswith('Brightness'):
        return _blend(zero, image, factor)
    if name.startswith('Sharpness'):
        return _blend(_smooth(image), image, factor)
    if name == 'ShearX':
        return _affine(image, (one, frac * 0.3 * sign, zero, zero, one, zero), fill)
    if name == 'ShearY':
        return _affine(image, (one, zero, zero, frac * 0.3 * sign, one, zero), fill)
    if name == 'TranslateXRel':
        return _affine(image, (one, zero, frac * 0.45 * sign * width, zero, one, zero), fill)
    if name == 'TranslateYRel':
        return _affine(image, (one, zero, zero, zero, one, frac * 0.45 * sign * height), fill)
    raise ValueError(f'unknown RandAugment op {name}')


def apply_op(name, image, level, sign=1.0, fill=(128, 128, 128)):
    """One RandAugment op on an integer-valued float image [H, W, 3] (for tests and callers)."""
    return _op(name, image, tf.constant(level, tf.float32), tf.constant(sign, tf.float32),
               tf.constant(fill, tf.float32))


def rand_augment(image, seed, spec, fill):
    """timm's RandAugment: ``num_layers`` ops drawn with replacement, each applied with p=0.5.

    Each applied op draws its magnitude from N(m, mstd) clipped to [0, mmax] and flips the sign
    of signed arguments with p=0.5, as timm's AugmentOp does.
    """
    params = parse_randaug(spec) if isinstance(spec, str) else spec
    ops = params['ops']
    fill = tf.constant(fill, tf.float32)
    for layer_seed in tf.unstack(_split(seed, params['num_layers'])):
        s = _split(layer_seed, 4)
        index = tf.random.stateless_uniform((), s[0], 0, len(ops), dtype=tf.int32)
        apply = _uniform(s[1]) <= 0.5
        std = params['magnitude_std']
        if std == math.inf:
            level = _uniform(s[2], maxval=params['magnitude'])
        else:
            level = params['magnitude'] + std * tf.random.stateless_normal((), s[2])
        level = tf.clip_by_value(level, 0.0, params['magnitude_max'])
        sign = tf.where(_uniform(s[3]) > 0.5, -1.0, 1.0)
        branches = [lambda name=name, x=image: _op(name, x, level, sign, fill) for name in ops]
        image = tf.cond(apply, lambda x=image, b=branches: tf.switch_case(index, b), lambda x=image: x)
        image = tf.ensure_shape(image, [None, None, 3])
    return image


# -- normalization, random erasing -----------------------------------------------------------------

def normalize(image, mean, std):
    """Pixels 0..255 -> (x / 255 - mean) / std (mean and std in [0, 1] units)."""
    return (image / 255.0 - _per_channel(mean, image)) / _per_channel(std, image)


def random_erasing(image, seed, prob=0.25, area=(0.02, 1 / 3), min_aspect=0.3, attempts=10):
    """timm's RandomErasing, mode 'pixel', one box: per-pixel N(0, 1) noise on the normalized image."""
    s = _split(seed, 6)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    target = h_f * w_f * _uniform(s[1], [attempts], area[0], area[1])
    aspect = tf.exp(_uniform(s[2], [attempts], math.log(min_aspect), math.log(1 / min_aspect)))
    h = tf.round(tf.sqrt(target * aspect))
    w = tf.round(tf.sqrt(target / aspect))
    fits = (w < w_f) & (h < h_f)
    first = tf.argmax(tf.cast(fits, tf.int32))
    h, w = tf.cast(h[first], tf.int32), tf.cast(w[first], tf.int32)

    def erase():
        # Noise for the box only, pasted by slicing: drawing a whole image of noise and selecting
        # with a mask costs about 5x more.
        top = _randint(s[3], height - h)
        left = _randint(s[4], width - w)
        noise = tf.random.stateless_normal(tf.stack([h, w, tf.shape(image)[2]]), s[5])
        band = image[top:top + h]
        band = tf.concat([band[:, :left], noise, band[:, left + w:]], axis=1)
        return tf.concat([image[:top], band, image[top + h:]], axis=0)

    return tf.cond((_uniform(s[0]) <= prob) & tf.reduce_any(fits), erase, lambda: image)


# -- the two transforms ----------------------------------------------------------------------------

def fill_color(mean):
    """timm's img_mean for RandAugment's fill: the mean pixel, rounded."""
    return tuple(min(255, round(255 * m)) for m in mean)


def train_transform(jpeg, seed, data, size):
    """Train transform of one JPEG: RRC (fused decode) -> flip -> RandAugment -> normalize -> erase.

    Args:
      jpeg: scalar string tensor, the encoded image.
      seed: int tensor [2], the example's own stateless seed.
      data: config.data (scale, ratio, hflip, randaug, reprob, mean, std).
      size: output side.

    Returns:
      float32 [size, size, 3], normalized.
    """
    s = _split(seed, 4)
    image = decode_random_crop(jpeg, s[0], size, tuple(data.scale), tuple(data.ratio))
    if data.hflip > 0:
        image = random_flip(image, s[1], data.hflip)
    if data.randaug:
        image = rand_augment(image, s[2], parse_randaug(data.randaug), fill_color(data.mean))
    image = normalize(image, data.mean, data.std)
    if data.reprob > 0:
        image = random_erasing(image, s[3], data.reprob)
    return tf.ensure_shape(image, [size, size, 3])


def eval_transform(jpeg, data, size):
    """The official eval transform: resize the shorter side to int(size / crop_pct), bicubic, then
    center crop; at size >= 384 a warp straight to size x size, as the official code does."""
    if size >= 384:
        image = tf.cast(tf.io.decode_jpeg(jpeg, channels=3, dct_method=_DCT), tf.float32)
        return tf.ensure_shape(normalize(resize(image, (size, size)), data.mean, data.std),
                               [size, size, 3])
    short = int(size / data.crop_pct)
    shape = tf.image.extract_jpeg_shape(jpeg)
    height, width = shape[0], shape[1]
    # torchvision's Resize(int): the long side becomes int(short * long / short_side).
    new_hw = tf.stack([tf.where(height <= width, short, short * height // width),
                       tf.where(height <= width, short * width // height, short)])
    offset = tf.round(tf.cast(new_hw - size, tf.float32) / 2.0)  # the center crop's top, left
    # Only the crop's pixels are computed, from only the source pixels they read: the resize's
    # sample positions and kernel shifted by the offsets (float rounding of the positions moves
    # about one pixel in 10^4 by one level) rather than resizing the whole image, then cropping.
    in_hw = tf.cast(shape[:2], tf.float32)
    scale = tf.cast(new_hw, tf.float32) / in_hw
    # Keys cubic reaches 2 pixels, widened by 1 / scale when shrinking (antialiasing); + 1 spare.
    reach = 2.0 * tf.maximum(1.0 / scale, 1.0) + 1.0
    start = tf.maximum(tf.floor((offset + 0.5) / scale - 0.5 - reach), 0.0)
    end = tf.minimum(tf.math.ceil((offset + size - 0.5) / scale - 0.5 + reach) + 1.0, in_hw)
    window = tf.cast(tf.concat([start, end - start], axis=0), tf.int32)
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3, dct_method=_DCT)
    image = tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(image, tf.float32)[None], size=tf.constant([size, size]), scale=scale,
        translation=start * scale - offset, kernel_type='keyscubic', antialias=True)[0]
    return tf.ensure_shape(normalize(to_pixels(image), data.mean, data.std), [size, size, 3])

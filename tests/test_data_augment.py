"""rest_jax.data.augment: each op against PIL (what timm calls), eagerly and inside a tf.function."""

import io

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from rest_jax.data import augment  # noqa: E402

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


@pytest.fixture(scope='module')
def photo():
    from sklearn.datasets import load_sample_images
    return np.ascontiguousarray(load_sample_images().images[1][100:164, 200:280])  # 64 x 80 RGB


@pytest.fixture(scope='module')
def jpeg():
    from sklearn.datasets import load_sample_images
    buffer = io.BytesIO()
    Image.fromarray(load_sample_images().images[0][:375, :500]).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


def _both(fn, *args):
    """fn's result run eagerly and traced in a graph (as tf.data runs it); they must agree."""
    eager = fn(*args).numpy()
    graph = tf.function(fn)(*args).numpy()
    np.testing.assert_allclose(eager, graph, atol=1e-5)  # exact but for float fusion in the graph
    return eager


def _pil_lut(image, lut):
    return np.asarray(Image.fromarray(image).point(lut * 3))


PIL_REFERENCE = {
    # name, level, sign -> PIL transform of timm's op at that magnitude
    ('AutoContrast', 0, 1): lambda im: ImageOps.autocontrast(im),
    ('Equalize', 0, 1): lambda im: ImageOps.equalize(im),
    ('Invert', 0, 1): lambda im: ImageOps.invert(im),
    ('PosterizeIncreasing', 9, 1): lambda im: ImageOps.posterize(im, 1),   # 4 - int(3.6)
    ('SolarizeIncreasing', 9, 1): lambda im: ImageOps.solarize(im, 256 - 230),
    ('ColorIncreasing', 9, -1): lambda im: ImageEnhance.Color(im).enhance(1 - 0.81),
    ('ContrastIncreasing', 9, 1): lambda im: ImageEnhance.Contrast(im).enhance(1.81),
    ('BrightnessIncreasing', 9, -1): lambda im: ImageEnhance.Brightness(im).enhance(1 - 0.81),
    ('SharpnessIncreasing', 9, 1): lambda im: ImageEnhance.Sharpness(im).enhance(1.81),
}


@pytest.mark.parametrize('name,level,sign', list(PIL_REFERENCE))
def test_pixel_ops_match_pil(photo, name, level, sign):
    ours = _both(lambda x: augment.apply_op(name, x, float(level), float(sign), FILL),
                 tf.constant(photo, tf.float32))
    theirs = np.asarray(PIL_REFERENCE[(name, level, sign)](Image.fromarray(photo)), np.float32)
    assert np.abs(ours - theirs).max() <= 1, name  # PIL's fixed-point rounding: at most 1 level


def test_solarize_add_matches_timm_lut(photo):
    ours = _both(lambda x: augment.apply_op('SolarizeAdd', x, 9.0), tf.constant(photo, tf.float32))
    lut = [min(255, i + 99) if i < 128 else i for i in range(256)]  # int(0.9 * 110) = 99
    np.testing.assert_array_equal(ours, _pil_lut(photo, lut))


AFFINE = {
    'Rotate': lambda im: im.rotate(-27.0, resample=Image.BILINEAR, fillcolor=FILL),
    'ShearX': lambda im: im.transform(im.size, Image.AFFINE, (1, -0.27, 0, 0, 1, 0),
                                      resample=Image.BILINEAR, fillcolor=FILL),
    'ShearY': lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, -0.27, 1, 0),
                                      resample=Image.BILINEAR, fillcolor=FILL),
    'TranslateXRel': lambda im: im.transform(im.size, Image.AFFINE, (1, 0, -0.405 * 80, 0, 1, 0),
                                             resample=Image.BILINEAR, fillcolor=FILL),
    'TranslateYRel': lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -0.405 * 64),
                                             resample=Image.BILINEAR, fillcolor=FILL),
}


@pytest.mark.parametrize('name', list(AFFINE))
def test_geometric_ops_match_pil_bilinear(photo, name):
    """Same geometry and fill as PIL's affine warps (timm's; TF has bilinear, timm uses bicubic)."""
    ours = _both(lambda x: augment.apply_op(name, x, 9.0, -1.0, FILL), tf.constant(photo, tf.float32))
    theirs = np.asarray(AFFINE[name](Image.fromarray(photo)), np.float32)
    diff = np.abs(ours - theirs)
    # Interior pixels agree to rounding; PIL blends the fill differently on the one-pixel rim.
    assert np.mean(diff) < 1.0 and np.mean(diff <= 1) > 0.97, (name, diff.mean())


def test_parse_randaug():
    params = augment.parse_randaug('rand-m9-mstd0.5-inc1')
    assert (params['magnitude'], params['num_layers'], params['magnitude_std']) == (9.0, 2, 0.5)
    assert params['ops'] == augment.RANDAUG_INCREASING and len(params['ops']) == 15
    with pytest.raises(ValueError, match='not supported'):
        augment.parse_randaug('rand-m9-w0')


def test_rand_augment_is_a_function_of_the_seed(photo):
    params = augment.parse_randaug('rand-m9-mstd0.5-inc1')
    image = tf.constant(photo, tf.float32)
    run = lambda s: augment.rand_augment(image, tf.constant([7, s], tf.int64), params, FILL)
    outs = [_both(run, 0)] + [run(s).numpy() for s in range(1, 12)]
    np.testing.assert_array_equal(outs[0], run(0).numpy())
    changed = [not np.array_equal(o, photo) for o in outs]
    assert 3 <= sum(changed) <= 12  # each of 2 ops applies with p=0.5: 3/4 of images change
    assert all(o.min() >= 0 and o.max() <= 255 and np.array_equal(o, np.round(o)) for o in outs)


def test_random_crop_window_follows_timm():
    shape = tf.constant([300, 400])
    windows = np.stack([augment.random_crop_window(shape, tf.constant([1, s], tf.int64),
                                                   (0.08, 1.0), (3 / 4, 4 / 3)).numpy()
                        for s in range(200)])
    top, left, h, w = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
    area = h * w / (300 * 400)
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert ((w / h > 0.7) & (w / h < 1.4)).all()
    assert len({tuple(x) for x in windows}) > 190
    # No candidate fits a 10 x 400 strip: the center crop clamped to the widest ratio.
    fallback = augment.random_crop_window(tf.constant([10, 400]), tf.constant([0, 0], tf.int64),
                                          (0.9, 1.0), (3 / 4, 4 / 3)).numpy()
    np.testing.assert_array_equal(fallback, [0, 193, 10, 13])


def test_decode_random_crop_and_flip(jpeg):
    seed = tf.constant([3, 4], tf.int64)
    crop = _both(lambda j: augment.decode_random_crop(j, seed, 48), tf.constant(jpeg))
    assert crop.shape == (48, 48, 3) and crop.std() > 10
    flipped = _both(lambda x: augment.random_flip(x, tf.constant([0, 1], tf.int64), 1.0),
                    tf.constant(crop))
    np.testing.assert_array_equal(flipped, crop[:, ::-1])


def test_random_erasing_box_and_probability():
    image = tf.zeros([40, 50, 3])
    fractions = []
    for s in range(40):
        erase = lambda x, s=s: augment.random_erasing(x, tf.constant([5, s], tf.int64), 1.0)
        out = _both(erase, image) if s == 0 else erase(image).numpy()
        erased = np.any(out != 0, axis=-1)
        fractions.append(erased.mean())
        rows, cols = np.nonzero(erased)
        assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one box
    assert min(fractions) >= 0.015 and max(fractions) <= 0.36
    applied = [np.any(augment.random_erasing(image, tf.constant([6, s], tf.int64), 0.25).numpy())
               for s in range(200)]
    assert 0.18 < np.mean(applied) < 0.32


def _pil_eval(data, size, crop_pct):
    image = Image.open(io.BytesIO(data)).convert('RGB')
    if size >= 384:
        return np.asarray(image.resize((size, size), Image.BICUBIC), np.float32)
    short = int(size / crop_pct)
    w, h = image.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize(new, Image.BICUBIC)
    top, left = int(round((new[1] - size) / 2)), int(round((new[0] - size) / 2))
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32)


@pytest.mark.parametrize('size,portrait,crop_pct', [(224, False, 0.875), (224, True, 0.875), (224, False, 1.0),
                                                   (224, True, 1.0), (384, False, 1.0)])
def test_eval_transform_matches_pil(jpeg, size, portrait, crop_pct):
    """The official eval transform (PIL bicubic resize + center crop, or a warp at >= 384): v1's crop
    0.875 (Resize(int(256 / 224 * size))) and v2's 1.0 (main.py's default --crop_pct)."""

    class Data:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    Data.crop_pct = crop_pct
    if portrait:  # the crop window (decoded alone) then runs along the other axis
        from sklearn.datasets import load_sample_images
        buffer = io.BytesIO()
        Image.fromarray(load_sample_images().images[1][:420, 100:390]).save(buffer, 'JPEG', quality=90)
        jpeg = buffer.getvalue()
    ours = _both(lambda j: augment.eval_transform(j, Data, size), tf.constant(jpeg))
    pixels = (ours * np.array(Data.std) + np.array(Data.mean)) * 255
    diff = np.abs(pixels - _pil_eval(jpeg, size, Data.crop_pct))
    # Decoding is bit-identical to PIL; TF's and PIL's antialiased bicubic differ by about 0.15
    # levels of 255 on average (measured: 0.14-0.15, at most 5-8 levels on sharp edges).
    assert diff.mean() < 0.3 and np.percentile(diff, 99) <= 2, (diff.mean(), diff.max())

"""rest_jax.inference: the official eval transform, predict, class names, the predict CLI, the notebook."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import rest_jax
from rest_jax import inference
from rest_jax.convert import convert_checkpoint
from rest_jax.convert.state_dict import abstract_variables
from conftest import REPO, golden_path, relative_error, run_main

# The golden v2 model's head counts are not visible in its shapes (tests/conftest.py REDUCED).
GOLDEN_HEADS = {'num_heads': [1, 2, 4, 8]}
IMAGENET = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}


def noise_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def resizes(monkeypatch):
    """Record the sizes PIL is asked to resize to (what torchvision's Resize would compute)."""
    calls = []
    original = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        calls.append(tuple(size))
        return original(self, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, 'resize', resize)
    return calls


@pytest.mark.parametrize('hw, size, crop_pct, resized', [
    ((375, 500), 224, 0.875, (341, 256)),   # landscape: short side 256, long int(256 * 500 / 375)
    ((500, 375), 224, 0.9, (248, 330)),     # portrait at v1's 0.9: short int(224 / 0.9) = 248
    ((257, 999), 224, 0.875, (995, 256)),   # long side truncated, not rounded (995.1)
    ((300, 300), 320, 0.875, (365, 365)),
])
def test_resize_shorter_side_then_center_crop(resizes, hw, size, crop_pct, resized):
    image = noise_image(*hw)
    x = inference.preprocess(image, {'input_size': size, 'crop_pct': crop_pct, **IMAGENET})
    assert x.shape == (1, size, size, 3) and x.dtype == np.float32
    assert resizes == [resized]
    # The crop is torchvision's CenterCrop of PIL's bicubic resize: offsets int(round((n - size) / 2)).
    pil = Image.fromarray(image).resize(resized, Image.Resampling.BICUBIC)
    left, top = int(round((resized[0] - size) / 2)), int(round((resized[1] - size) / 2))
    expected = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255
    np.testing.assert_allclose(x[0] * IMAGENET['std'] + np.array(IMAGENET['mean']), expected, atol=1e-6)


def test_center_crop_offset_rounds_half_to_even(resizes):
    # 341 - 224 = 117 -> offset round(58.5) = 58 (Python's round, as torchvision uses), not 59.
    image = np.zeros((375, 500, 3), np.uint8)
    image[:, :, 0] = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)[None, :]  # column stripes
    x = inference.preprocess(image, {'input_size': 224, 'crop_pct': 0.875, **IMAGENET})
    pil = np.asarray(Image.fromarray(image).resize((341, 256), Image.Resampling.BICUBIC), np.float32) / 255
    red = x[0, :, :, 0] * IMAGENET['std'][0] + IMAGENET['mean'][0]
    np.testing.assert_allclose(red, pil[16:240, 58:282, 0], atol=1e-6)
    assert np.abs(red - pil[16:240, 59:283, 0]).max() > 0.01


def test_at_384_the_image_is_warped_to_a_square(resizes):
    x = inference.preprocess(noise_image(450, 600), {'input_size': 384, 'crop_pct': 0.875, **IMAGENET})
    assert x.shape == (1, 384, 384, 3) and resizes == [(384, 384)]


def test_constant_image_normalizes_to_mean_std():
    x = inference.preprocess(np.full((50, 70, 3), 128, np.uint8), 'restv2_tiny', input_size=32)
    np.testing.assert_allclose(x[0, 5, 5], (128 / 255 - np.array(IMAGENET['mean'])) / IMAGENET['std'], rtol=1e-6)


def test_input_forms_agree():
    rgb = noise_image(60, 80)
    as_array = inference.preprocess(rgb, 'rest_lite', input_size=48)
    as_pil = inference.preprocess(Image.fromarray(rgb), 'rest_lite', input_size=48)
    as_list = inference.preprocess([rgb, Image.fromarray(rgb)], 'rest_lite', input_size=48)
    as_batch = inference.preprocess(np.stack([rgb, rgb]), 'rest_lite', input_size=48)
    np.testing.assert_array_equal(as_array, as_pil)
    np.testing.assert_array_equal(as_list, as_batch)
    assert as_list.shape == (2, 48, 48, 3)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(inference.preprocess(gray, 'rest_lite', input_size=48),
                                  inference.preprocess(np.repeat(gray[..., None], 3, -1), 'rest_lite', input_size=48))
    rgba = np.concatenate([rgb, np.full((60, 80, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(inference.preprocess(rgba, 'rest_lite', input_size=48), as_array)


def test_preprocessing_follows_the_model():
    assert inference.preprocessing_of(rest_jax.create_model('rest_small'))['crop_pct'] == 0.875
    assert inference.preprocessing_of(rest_jax.create_model('restv2_base'))['crop_pct'] == 1.0
    assert inference.preprocessing_of(rest_jax.create_model('restv2_tiny', num_classes=10))['num_classes'] == 10
    model = rest_jax.create_model('restv2_tiny')
    twin = rest_jax.create_model('restv2_tiny')  # equal as a dataclass, but not the fine-tuned one
    inference.remember_preprocessing(model, {**rest_jax.model_info('restv2_tiny').preprocessing(), 'input_size': 384})
    assert inference.preprocess(noise_image(40, 40), model).shape == (1, 384, 384, 3)
    assert inference.preprocess(noise_image(40, 40), twin).shape == (1, 224, 224, 3)


def official_eval_resize(name, hw, input_size):
    """The (width, height) the official eval transform resizes an image of `hw` to.

    v2 release, datasets.py build_transform with main.py's --crop_pct default 1.0: at >= 384 a warp to
    (input_size, input_size), else Resize(int(input_size / crop_pct)); v1 release, datasets.py:
    Resize(int((256 / 224) * input_size)). torchvision's Resize(int) sets the shorter side and
    truncates the longer one; CenterCrop(input_size) follows.
    """
    height, width = hw
    if name.startswith('restv2'):
        if input_size >= 384:
            return input_size, input_size
        size = int(input_size / 1.0)
    else:
        size = int((256 / 224) * input_size)
    return (size, int(size * height / width)) if width <= height else (int(size * width / height), size)


@pytest.mark.parametrize('name', rest_jax.list_models())
def test_registered_preprocessing_is_the_official_eval(resizes, name):
    """preprocess(images, variant) resizes and crops as the official evaluation of that family did."""
    sizes = [224] + ([288, 384, 448] if name.startswith('restv2') else [])
    for hw in ((375, 500), (500, 333)):
        image = noise_image(*hw)
        for size in sizes:
            resizes.clear()
            x = inference.preprocess(image, name, input_size=size)
            new_w, new_h = official_eval_resize(name, hw, size)
            assert resizes == ([(new_w, new_h)] if (new_w, new_h) != hw[::-1] else [])
            pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
            expected = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255
            np.testing.assert_allclose(x[0] * IMAGENET['std'] + np.array(IMAGENET['mean']), expected, atol=1e-6)


@pytest.mark.parametrize('images, model, fragment', [
    (np.zeros((40, 40, 3), np.float32), 'restv2_tiny', 'expected uint8'),
    (np.zeros((40, 40, 5), np.uint8), 'restv2_tiny', 'HxWx3'),
    ([], 'restv2_tiny', 'no images'),
    ('cat.jpg', 'restv2_tiny', 'PIL.Image.open'),
    (np.zeros((40, 40, 3), np.uint8), 'resnet50', 'unknown model'),
    (np.zeros((40, 40, 3), np.uint8), {'input_size': 224}, 'lacks'),
])
def test_preprocess_bad_input(images, model, fragment):
    with pytest.raises(ValueError, match=fragment):
        inference.preprocess(images, model)


def test_imagenet_class_names():
    names = rest_jax.imagenet_class_names()
    assert len(names) == 1000
    assert names[134] == names[517] == 'crane'  # the bird and the machine: WordNet's one homonym pair here
    assert len(set(names)) == 999
    # Spot checks of the standard index order (sorted WordNet ids).
    assert names[0].startswith('tench') and names[1].startswith('goldfish')
    assert names[207] == 'golden retriever' and names[281].startswith('tabby')
    assert names[999].startswith('toilet tissue')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp('predict') / 'v2_reduced'
    convert_checkpoint(golden_path('v2_reduced.pth'), dst, arch=GOLDEN_HEADS)
    return dst


def test_predict_matches_golden_logits(converted):
    golden = np.load(golden_path('v2_reduced.npz'))
    model, variables = rest_jax.load_pretrained(converted)
    top = rest_jax.predict(model, variables, golden['input_224'], top_k=3)
    logits = golden['logits_224'].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.argsort(-probs, axis=-1)[:, :3]
    np.testing.assert_array_equal(top.classes, expected)
    assert relative_error(top.probs, np.take_along_axis(probs, expected, -1)) < 1e-4
    assert top.names == [[str(c) for c in row] for row in expected]  # 10 classes: no ImageNet names
    named = rest_jax.predict(model, variables, golden['input_224'], top_k=2, class_names=list('abcdefghij'))
    assert named.names == [['abcdefghij'[c] for c in row] for row in expected[:, :2]]
    with pytest.raises(ValueError, match='top_k'):
        rest_jax.predict(model, variables, golden['input_224'], top_k=11)
    with pytest.raises(ValueError, match='preprocess'):
        rest_jax.predict(model, variables, np.zeros((1, 224, 224, 3), np.uint8))
    with pytest.raises(ValueError, match='3 class_names'):
        rest_jax.predict(model, variables, golden['input_224'], class_names=['a', 'b', 'c'])


def test_predict_uses_imagenet_names_for_1000_classes():
    model = rest_jax.create_model('restv2_tiny', embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8],
                                  depths=[1, 1, 1, 1])
    rng = np.random.default_rng(0)  # random weights without model.init, whose compile is slow
    variables = jax.tree_util.tree_map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(a.dtype),
                                       abstract_variables(model))
    variables['batch_stats'] = jax.tree_util.tree_map(abs, variables['batch_stats'])  # variances > 0
    top = rest_jax.predict(model, variables, np.zeros((2, 32, 32, 3), np.float32), top_k=5)
    assert top.classes.shape == (2, 5) and top.probs.shape == (2, 5)
    assert np.all(np.diff(top.probs, axis=-1) <= 0)
    assert top.names[0][0] == rest_jax.imagenet_class_names()[top.classes[0, 0]]


def test_cli_modules_leave_predict_callable(converted):
    """The command line lives in rest_jax.inference and rest_jax.__main__: importing them leaves
    `rest_jax.predict` the function."""
    import rest_jax.__main__, rest_jax.inference  # noqa: F401,E401
    golden = np.load(golden_path('v2_reduced.npz'))
    model, variables = rest_jax.load_pretrained(converted)
    top = rest_jax.predict(model, variables, golden['input_224'], top_k=1)
    assert top.classes.shape == (2, 1)


def run_predict(*args, module=('rest_jax', 'predict')):
    return subprocess.run([sys.executable, '-m', *module, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_predict_cli(converted, tmp_path, capsys):
    paths = []
    for i, hw in enumerate([(240, 320), (300, 200)]):
        paths.append(tmp_path / f'img{i}.png')
        Image.fromarray(noise_image(*hw, seed=i)).save(paths[-1])
    result = run_predict('--checkpoint', converted, '--top-k', '3', '--json', *paths)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    model, variables = rest_jax.load_pretrained(converted)
    x = rest_jax.preprocess([Image.open(p) for p in paths], model)
    top = rest_jax.predict(model, variables, x, top_k=3)
    assert [r['image'] for r in rows] == [str(p) for p in paths]
    for row, classes, probs in zip(rows, top.classes, top.probs):
        assert [t['class'] for t in row['top']] == classes.tolist()
        np.testing.assert_allclose([t['prob'] for t in row['top']], probs, atol=2e-6)
    text = run_predict('--checkpoint', converted, *paths, module=('rest_jax.predict',)).stdout.splitlines()  # the former path
    assert text[0] == str(paths[0]) and text[6] == str(paths[1]) and len(text) == 12  # each path, then its top 5
    assert text[1].split()[-1] == f'({top.classes[0, 0]})'

    (tmp_path / 'notes.txt').write_text('not an image')
    for args, fragment in [(['--checkpoint', converted, tmp_path / 'missing.jpg'], 'no such file'),
                           (['--checkpoint', converted, tmp_path / 'notes.txt'], 'not a readable image'),
                           (['--checkpoint', tmp_path, paths[0]], 'not a rest_jax checkpoint')]:
        bad = run_main(inference.main, capsys, *args)  # in this process: the two runs above were real ones
        assert bad.returncode == 1 and bad.stdout == ''
        assert bad.stderr.startswith('error: ') and fragment in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_notebook_runs(tmp_path, monkeypatch):
    """examples/inference.ipynb, cell by cell, on the golden checkpoint (so it never rots)."""
    notebook = json.loads((REPO / 'examples' / 'inference.ipynb').read_text())
    cells = [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code']
    assert cells, 'the notebook has no code cells'
    monkeypatch.setenv('REST_JAX_PTH', str(golden_path('v2_reduced.pth')))
    monkeypatch.setenv('REST_JAX_OUT', str(tmp_path / 'converted'))
    monkeypatch.chdir(tmp_path)
    shown = []
    namespace = {'display': shown.append}  # Jupyter's builtin display(), recorded
    for i, source in enumerate(cells):
        assert '!' not in [line.strip()[:1] for line in source.splitlines()], f'cell {i} uses shell magic'
        exec(compile(source, f'inference.ipynb cell {i}', 'exec'), namespace)
        if i == 0:  # the golden checkpoint is a reduced layout: give its head counts, as the notebook says to
            assert namespace['MODEL'] is None and namespace['ARCH'] == {}
            namespace.update(ARCH=GOLDEN_HEADS)
    assert shown and all(isinstance(s, Image.Image) for s in shown)
    model, variables = rest_jax.load_pretrained(tmp_path / 'converted')
    expected = rest_jax.predict(model, variables, rest_jax.preprocess(namespace['images'], model), top_k=5)
    np.testing.assert_array_equal(namespace['top'].classes, expected.classes)

"""rest_jax.pretrained: save_pretrained round trips like a converted checkpoint; pretrained_cfg under timm's
names; load_pretrained's run-time arguments."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

import rest_jax
from conftest import REDUCED, convert_golden, golden_path
from rest_jax import pretrained

STEM = 'v2_reduced'


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    return convert_golden(tmp_path_factory.mktemp('pretrained') / STEM, STEM)


def _same_arrays(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_save_pretrained_round_trips(converted, tmp_path):
    """A model changed in a notebook (a new head) saves as the converter's format and loads back the same;
    predict gives the same answers for both."""
    model, variables = rest_jax.load_pretrained(converted)
    model3, variables3 = rest_jax.reset_classifier(model, variables, 3, key=1)
    meta = rest_jax.save_pretrained(tmp_path / 'mine', model3, variables3)
    written = json.loads((tmp_path / 'mine' / 'rest_jax.json').read_text())
    assert written == meta and meta['format'] == pretrained.FORMAT and meta['model'] == 'restv2_tiny'
    # The converter's overrides (the reduced widths and depths) and the new head size.
    assert meta['config'] == {**pretrained.read_metadata(converted)['config'], 'num_classes': 3}
    assert meta['preprocessing'] == {**pretrained.read_metadata(converted)['preprocessing'], 'num_classes': 3}
    loaded_model, loaded = rest_jax.load_pretrained(tmp_path / 'mine')
    assert loaded_model == model3 and _same_arrays(loaded, variables3)
    assert rest_jax.preprocessing_of(loaded_model) == meta['preprocessing']
    x = np.load(golden_path(f'{STEM}.npz'))['input_224']
    a, b = (rest_jax.predict(m, v, x, top_k=3) for m, v in ((model3, variables3), (loaded_model, loaded)))
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_save_pretrained_of_create_model_and_features_model(tmp_path, converted):
    """A variant as registered saves with no overrides; a backbone form saves its whole model."""
    model = rest_jax.create_model('restv2_tiny', dtype='bfloat16', impl='xla')   # run-time settings are not saved
    assert pretrained.model_spec(model) == ('restv2_tiny', {})
    backbone, variables = rest_jax.load_pretrained(converted, features_only=True, out_indices=(1, 2, 3))
    meta = rest_jax.save_pretrained(tmp_path / 'backbone', backbone, variables, preprocessing='rest_lite')
    assert meta['preprocessing']['crop_pct'] == 0.875   # the given preprocessing (the model's family has 1.0) ...
    # ... with this model's head size
    assert meta['preprocessing']['num_classes'] == 10
    again, loaded = rest_jax.load_pretrained(tmp_path / 'backbone')
    assert type(again) is rest_jax.models.ResTV2 and _same_arrays(loaded, variables)


def test_save_pretrained_bad_input(tmp_path, converted):
    model, variables = rest_jax.load_pretrained(converted)
    backbone = rest_jax.create_model('restv2_tiny', **REDUCED[STEM][1], features_only=True, out_indices=(0, 1))
    partial = jax.eval_shape(backbone.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"do not fit .* missing \['params'\]\['head'\]\['bias'\].*more\)"):
        rest_jax.save_pretrained(tmp_path / 'a', backbone, partial)
    with pytest.raises(ValueError, match=r"\['params'\]\['head'\]\['kernel'\] is \(128, 10\), the model needs \(128, 4\)"):
        rest_jax.save_pretrained(tmp_path / 'a', model.clone(num_classes=4), variables)
    rest_jax.save_pretrained(tmp_path / 'a', model, variables)
    with pytest.raises(ValueError, match='exists; pass --force'):
        rest_jax.save_pretrained(tmp_path / 'a', model, variables)
    rest_jax.save_pretrained(tmp_path / 'a', model, variables, force=True)
    with pytest.raises(ValueError, match='expected a ResT or ResTV2 model'):
        rest_jax.save_pretrained(tmp_path / 'b', object(), variables)
    assert not (tmp_path / 'b').exists()


def test_pretrained_cfg(converted):
    cfg = rest_jax.pretrained_cfg('restv2_tiny')
    assert cfg.to_dict() == dict(architecture='restv2_tiny', input_size=(3, 224, 224), crop_pct=1.0,
                                 crop_mode='center', interpolation='bicubic', mean=(0.485, 0.456, 0.406),
                                 std=(0.229, 0.224, 0.225), num_classes=1000)
    assert rest_jax.pretrained_cfg('rest_lite').crop_pct == 0.875
    from_dir = rest_jax.pretrained_cfg(converted)
    model, _ = rest_jax.load_pretrained(converted)
    assert from_dir == rest_jax.pretrained_cfg(model) and from_dir.num_classes == 10
    assert from_dir.preprocessing() == rest_jax.preprocessing_of(model)
    assert rest_jax.pretrained_cfg(rest_jax.create_model('rest_base', num_classes=5)).num_classes == 5
    # At 384 the official eval warps the whole image to the square: timm's 'squash' without a crop.
    big = rest_jax.pretrained_cfg({**rest_jax.preprocessing_of('restv2_tiny'), 'input_size': 384})
    assert (big.input_size, big.crop_mode, big.crop_pct) == ((3, 384, 384), 'squash', 1.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), np.uint8))
    np.testing.assert_array_equal(rest_jax.preprocess(image, big), rest_jax.preprocess(image, 'restv2_tiny', input_size=384))
    with pytest.raises(ValueError, match='neither a rest_jax checkpoint directory'):
        rest_jax.pretrained_cfg('no_such_thing')


def test_load_pretrained_runtime_arguments(converted):
    backbone, variables = rest_jax.load_pretrained(converted, features_only=True, out_indices=(2, 3), impl='xla')
    assert backbone.out_indices == (2, 3) and backbone.impl == 'xla'
    assert rest_jax.preprocessing_of(backbone) == pretrained.read_metadata(converted)['preprocessing']
    with pytest.raises(ValueError, match='reset_classifier'):
        rest_jax.load_pretrained(converted, num_classes=3)

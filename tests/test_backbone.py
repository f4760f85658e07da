"""The backbone API: stage outputs (features_only, out_indices, feature_norm, feature_info), pre-logits
features, and a fresh head on loaded weights (reset_classifier), against the official outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rest_jax
from conftest import REDUCED, golden_path, relative_error
from rest_jax.convert.pth import load_pth

TOL = 1e-4
STEM = 'v2_reduced'


@pytest.fixture(scope='module')
def golden():
    """The v2_reduced model, its official weights as variables, and the official outputs."""
    name, arch = REDUCED[STEM]
    model = rest_jax.create_model(name, **arch)
    variables = rest_jax.variables_from_state_dict(model, load_pth(golden_path(f'{STEM}.pth'))['model'])
    return model, variables, np.load(golden_path(f'{STEM}.npz'))


def _layer_norm(x, params, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(params['scale']) + np.asarray(params['bias'])


def test_features_only_equal_official_stage_outputs(golden):
    model, variables, gold = golden
    name, arch = REDUCED[STEM]
    every = rest_jax.create_model(name, **arch, features_only=True)
    chosen = rest_jax.create_model(name, **arch, features_only=True, out_indices=(1, -1), feature_norm=True)
    with jax.default_matmul_precision('float32'):
        # Full variables (head included) apply as they are: Linen ignores the variables a module leaves unused.
        feats, normed = jax.jit(lambda v, x: (every.apply(v, x), chosen.apply(v, x)))(variables, gold['input_224'])
    assert len(feats) == 4 and len(normed) == 2
    for i, f in enumerate(feats):
        assert relative_error(f, gold[f'stage{i + 1}_224']) < TOL, i
    # feature_norm: stage 1 as the blocks leave it; stage 3 through the final (pretrained) norm.
    assert relative_error(normed[0], gold['stage2_224']) < TOL
    assert relative_error(normed[1], _layer_norm(gold['stage4_224'], variables['params']['norm'])) < TOL
    assert chosen.out_indices == (1, 3)


def test_features_only_computes_only_the_stages_it_returns(golden):
    model, variables, gold = golden
    name, arch = REDUCED[STEM]
    early = rest_jax.create_model(name, **arch, features_only=True, out_indices=(0, 1))
    shapes = jax.eval_shape(early.init, jax.random.key(0), jnp.zeros((1, 64, 96, 3)))
    assert not {'patch_3', 'patch_4', 'stage3_0', 'stage4_0', 'norm', 'head'} & set(shapes['params'])
    out = jax.eval_shape(early.apply, variables, jnp.zeros((1, 64, 96, 3)))
    assert [o.shape for o in out] == [(1, 16, 24, 16), (1, 8, 12, 32)]


@pytest.mark.parametrize('name', rest_jax.list_models())
def test_feature_info(name):
    model = rest_jax.create_model(name)
    info = rest_jax.feature_info(name)
    assert info.channels() == list(model.embed_dims) and info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ['stage1', 'stage2', 'stage3', 'stage4'] and len(info) == 4
    backbone = rest_jax.create_model(name, features_only=True, out_indices=(1, 2, 3))
    assert backbone.feature_info.channels() == list(model.embed_dims[1:]) == rest_jax.feature_info(backbone).channels()
    assert backbone.feature_info.reduction() == [8, 16, 32] and backbone.feature_info.reduction(-1) == 32
    assert rest_jax.feature_info(name, out_indices=(2,)).get_dicts() == [
        dict(num_chs=model.embed_dims[2], reduction=16, module='stage3', index=2)]


@pytest.mark.parametrize('stem', list(REDUCED))
def test_feature_info_is_what_the_stages_give(stem):
    """Channels and strides as the stage outputs have them (at a size that is a multiple of 32)."""
    name, arch = REDUCED[stem]
    model = rest_jax.create_model(name, **arch, features_only=True)
    x = jnp.zeros((1, 160, 224, 3))
    feats = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)
    info = rest_jax.feature_info(name, **arch)
    assert [(160 // f.shape[1], 224 // f.shape[2], f.shape[-1]) for f in feats] == \
        [(r, r, c) for r, c in zip(info.reduction(), info.channels())]


@pytest.mark.parametrize('kwargs, fragment', [
    (dict(features_only=True, out_indices=(4,)), 'stage indices in 0..3'),
    (dict(features_only=True, out_indices=(2, 1)), 'distinct, increasing'),
    (dict(features_only=True, out_indices=()), 'distinct, increasing'),
    (dict(features_only=True, out_indices=(0, 1), feature_norm=True), 'leaves out'),
    (dict(out_indices=(1, 2)), 'features_only=True'),
    (dict(feature_norm=True), 'features_only=True'),
])
def test_stage_choice_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        rest_jax.create_model('restv2_tiny', **kwargs)


def test_pre_logits_and_forward_head(golden):
    """Pooled features are the final norm then the mean over positions; the head maps them to the logits."""
    model, variables, gold = golden
    with jax.default_matmul_precision('float32'):
        pooled = jax.jit(lambda v, x: model.apply(v, x, pre_logits=True))(variables, gold['input_224'])
        from_stage = model.apply(variables, [gold['stage4_224']], method=model.forward_head, pre_logits=True)
    expected = _layer_norm(gold['stage4_224'], variables['params']['norm']).mean(axis=(1, 2))
    assert pooled.shape == (2, model.embed_dims[-1]) and pooled.dtype == jnp.float32
    assert relative_error(pooled, expected) < TOL and relative_error(from_stage, expected) < TOL
    head = variables['params']['head']
    assert relative_error(np.asarray(pooled) @ np.asarray(head['kernel']) + np.asarray(head['bias']),
                          gold['logits_224']) < TOL


def test_reset_classifier(golden):
    model, variables, _ = golden
    new_model, new = rest_jax.reset_classifier(model, variables, 7, key=jax.random.key(3))
    assert new_model.num_classes == 7 and model.num_classes == 10
    assert new['params']['head']['kernel'].shape == (model.embed_dims[-1], 7)
    assert np.all(np.asarray(new['params']['head']['bias']) == 0) and float(jnp.std(new['params']['head']['kernel'])) > 0
    # Everything but the head: the very same arrays.
    for key, value in variables['params'].items():
        if key != 'head':
            assert new['params'][key] is value, key
    assert new['batch_stats'] is variables['batch_stats']
    # Deterministic from the key, and another key gives another head; an int seed is a key.
    again = rest_jax.reset_classifier(model, variables, 7, key=jax.random.key(3))[1]['params']['head']
    other = rest_jax.reset_classifier(model, variables, 7, key=4)[1]['params']['head']
    seed = rest_jax.reset_classifier(model, variables, 7, key=3)[1]['params']['head']
    np.testing.assert_array_equal(again['kernel'], new['params']['head']['kernel'])
    np.testing.assert_array_equal(seed['kernel'], new['params']['head']['kernel'])
    assert not np.array_equal(other['kernel'], new['params']['head']['kernel'])
    headless_model, headless = rest_jax.reset_classifier(model, variables, 0)
    assert headless_model.num_classes == 0 and 'head' not in headless['params']
    with pytest.raises(ValueError, match='num_classes must be an integer >= 0'):
        rest_jax.reset_classifier(model, variables, -1)


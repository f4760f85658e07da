"""rest_jax.data.mixup: Beta-distributed coefficients, CutMix boxes that match them, mixed labels."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
from scipy import stats  # noqa: E402  (scikit-learn's dependency)

from rest_jax.data import mixup  # noqa: E402

C = 5


def _batch(rows, groups, size=16):
    """Row r is the constant image r + 1, label r % C: each pixel tells which row it came from."""
    n = rows * groups
    images = tf.constant(np.arange(1, n + 1, dtype=np.float32)[:, None, None, None]
                         * np.ones([1, size, size, 3], np.float32))
    return images, tf.constant(np.arange(n) % C)


@pytest.mark.parametrize('alpha', [0.8, 1.0])
def test_beta_samples_follow_beta(alpha):
    lam = mixup.sample_beta(tf.constant([0, 2], tf.int64), alpha, [4000]).numpy()
    assert stats.kstest(lam, 'beta', args=(alpha, alpha)).pvalue > 0.01


def test_mixup_coefficient_is_beta_and_labels_follow():
    groups = 2000
    images, labels = _batch(2, groups, size=2)
    x, y, info = mixup.mix_batch(images, labels, tf.constant([3, 4], tf.int64), num_classes=C,
                                 micro_batches=groups, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1)
    lam = info['lam'].numpy()
    assert not info['use_cutmix'].numpy().any()
    assert stats.kstest(lam, 'beta', args=(0.8, 0.8)).pvalue > 0.01
    # Rows r (group r % groups) pair with the other row of their group: 2 rows per group here.
    first = np.arange(groups)
    second = first + groups
    value = images.numpy()[:, 0, 0, 0]
    np.testing.assert_allclose(x.numpy()[first, 0, 0, 0],
                               lam * value[first] + (1 - lam) * value[second], rtol=1e-5)
    smooth = mixup.smooth_one_hot(labels, C, 0.1).numpy()
    np.testing.assert_allclose(y.numpy()[first], lam[:, None] * smooth[first]
                               + (1 - lam[:, None]) * smooth[second], atol=1e-6)
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, atol=1e-5)


def test_cutmix_box_area_matches_coefficient_and_labels():
    groups, size = 400, 20
    images, labels = _batch(2, groups, size=size)
    x, y, info = mixup.mix_batch(images, labels, tf.constant([5, 6], tf.int64), num_classes=C,
                                 micro_batches=groups, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0)
    lam = info['lam'].numpy()
    assert info['use_cutmix'].numpy().all()
    x = x.numpy()[..., 0]
    value = images.numpy()[:, 0, 0, 0]
    for g in range(groups):
        pasted = x[g] == value[g + groups]
        assert np.all(pasted | (x[g] == value[g]))
        assert abs(pasted.mean() - (1 - lam[g])) < 1e-6  # the box's share is exactly 1 - lam
        if pasted.any():
            rows, cols = np.nonzero(pasted)
            assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a box
        onehot = np.eye(C)
        np.testing.assert_allclose(y.numpy()[g], lam[g] * onehot[labels.numpy()[g]]
                                   + (1 - lam[g]) * onehot[labels.numpy()[g + groups]], atol=1e-6)
    # Boxes clipped at the border paste less than 1 - Beta draw: the corrected lam is larger.
    assert 0.5 < lam.mean() < 0.8 and (lam > 0).all() and (lam <= 1).all()


def test_switch_probability_and_off_switches():
    groups = 1000
    images, labels = _batch(2, groups, size=2)
    seed = tf.constant([7, 8], tf.int64)
    _, _, info = mixup.mix_batch(images, labels, seed, num_classes=C, micro_batches=groups)
    assert 0.45 < info['use_cutmix'].numpy().mean() < 0.55
    x, y, info = mixup.mix_batch(images, labels, seed, num_classes=C, micro_batches=groups, prob=0.0)
    np.testing.assert_array_equal(x.numpy(), images.numpy())
    np.testing.assert_allclose(y.numpy(), mixup.smooth_one_hot(labels, C, 0.1).numpy())
    x, y, _ = mixup.mix_batch(images, labels, seed, num_classes=C, micro_batches=groups, mixup_alpha=0.0,
                              cutmix_alpha=0.0, smoothing=0.0)
    np.testing.assert_array_equal(y.numpy(), np.eye(C)[labels.numpy()])


def test_graph_equals_eager():
    images, labels = _batch(4, 2)
    seed = tf.constant([9, 10], tf.int64)
    run = lambda im: mixup.mix_batch(im, labels, seed, num_classes=C, micro_batches=2)[:2]
    for a, b in zip(run(images), tf.function(run)(images)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


@pytest.mark.parametrize('layout', [(1, 4, 1), (1, 4, 3), (3, 4, 2)])
def test_looped_mixing_equals_vectorized(layout):
    """The per-group form (used up to a few groups) gives the vectorized form's pixels."""
    rng = np.random.default_rng(0)
    blocks, size, micro = layout
    groups = blocks * micro
    images = tf.constant(rng.normal(size=[blocks * size * micro, 12, 10, 3]).astype(np.float32))
    kinds = set()
    for s in range(6):
        box = tuple(tf.constant(rng.integers(lo, lo + 7, groups), tf.int32) for lo in (0, 6, 0, 5))
        lam = tf.constant(rng.choice([0.3, 0.7, 1.0], groups), tf.float32)
        use_cutmix = tf.constant(rng.random(groups) < 0.5)
        kinds.update(zip(use_cutmix.numpy(), lam.numpy() < 1))
        looped = mixup._mix_looped(images, layout, lam, use_cutmix, box)
        np.testing.assert_array_equal(looped, mixup._mix_vectorized(images, layout, lam, use_cutmix, box))
    assert len(kinds) >= 3  # cutmix, mixup and unmixed groups were all seen


@pytest.mark.parametrize('blocks, micro', [(3, 1), (2, 2), (5, 2)])
def test_each_group_of_rows_mixes_on_its_own(blocks, micro):
    """Row r = (a g + i) U + m is row i of group a U + m; it pairs with row g-1-i of that group."""
    size = 4
    images, labels = _batch(blocks * size, micro, size=2)
    x, y, info = mixup.mix_batch(images, labels, tf.constant([11, 12], tf.int64), num_classes=C,
                                 micro_batches=micro, group_size=size, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = info['lam'].numpy()
    assert lam.shape == (blocks * micro,) and len(set(lam.round(6))) == blocks * micro  # a draw each
    value = images.numpy()[:, 0, 0, 0]
    smooth = mixup.smooth_one_hot(labels, C, 0.1).numpy()
    for r in range(len(value)):
        a, i, m = r // (size * micro), (r // micro) % size, r % micro
        partner = (a * size + size - 1 - i) * micro + m
        c = a * micro + m
        np.testing.assert_allclose(x.numpy()[r, 0, 0, 0], lam[c] * value[r] + (1 - lam[c]) * value[partner],
                                   rtol=1e-5)
        np.testing.assert_allclose(y.numpy()[r], lam[c] * smooth[r] + (1 - lam[c]) * smooth[partner], atol=1e-6)


def test_a_group_draws_by_its_global_index():
    """Groups handed to several calls (hosts) by global index mix exactly as in one call."""
    rng = np.random.default_rng(1)
    images = tf.constant(rng.normal(size=[24, 8, 8, 3]).astype(np.float32))
    labels = tf.constant(rng.integers(0, C, 24))
    seed = tf.constant([13, 14], tf.int64)
    whole = mixup.mix_batch(images, labels, seed, num_classes=C, group_size=4)
    parts = [mixup.mix_batch(images[k:k + 8], labels[k:k + 8], seed, num_classes=C, group_size=4,
                             group_ids=[k // 4, k // 4 + 1], total_groups=6) for k in (0, 8, 16)]
    for out in (0, 1):
        np.testing.assert_array_equal(np.concatenate([p[out].numpy() for p in parts]), whole[out].numpy())
    assert set(np.concatenate([p[2]['use_cutmix'].numpy() for p in parts])) == {True, False}

"""rest_jax.train.optimizer: the v2 per-update and v1 per-epoch schedules against the official rules,
and the linear scaling of the lrs from the batch a run actually uses."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from rest_jax.train import optimizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import common  # noqa: E402

IMAGENET_TRAIN = 1281167


def timm_cosine_lr(t, base, *, warmup_lr, min_lr, warmup_t, t_initial):
    """timm 0.4.x CosineLRScheduler._get_lr as create_scheduler builds it (t_mul 1, cycle_limit 1,
    warmup_prefix False)."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    cycle = t // t_initial
    if cycle < 1:
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (t - t_initial * cycle) / t_initial))
    return min_lr


def official_v1_lr(epoch, total_batch):
    """The lr v1's main.py trains epoch `epoch` with: its defaults (lr 5e-4, warmup_lr 1e-6, min_lr 1e-5,
    each x total batch / 512; 5 warmup epochs; 300 epochs), a CosineLRScheduler that sets warmup_lr when
    built and lr_scheduler.step(epoch) after each epoch, so epoch e >= 1 runs at the rate of t = e - 1."""
    scale = total_batch / 512.0
    return timm_cosine_lr(max(epoch - 1, 0), 5e-4 * scale, warmup_lr=1e-6 * scale, min_lr=1e-5 * scale,
                          warmup_t=5, t_initial=300)


def official_v2_schedule(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """utils.cosine_scheduler of the v2 release (ConvNeXt's): one value per iteration."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize('batch', [2048, 1024])
def test_v1_schedule_is_timms_cosine_stepped_per_epoch(batch):
    config = common.v1_config('rest_lite')
    config.batch_size = batch  # --config.batch_size=...: lr, warmup_lr and min_lr follow it
    per_epoch = IMAGENET_TRAIN // batch
    lr = optimizer.schedule(config, per_epoch, config.num_epochs * per_epoch)
    for epoch in (0, 1, 2, 5, 6, 150, 284, 299):
        first, last = epoch * per_epoch, (epoch + 1) * per_epoch - 1
        np.testing.assert_allclose(float(lr(first)), official_v1_lr(epoch, batch), rtol=1e-6)
        assert float(lr(last)) == float(lr(first))  # constant through the epoch
    if batch == 2048:  # the official figures at 8 x 256 images
        for epoch, value in ((0, 4.0e-6), (1, 4.0e-6), (5, 1.6e-3), (6, 2.0e-3), (284, 5.55e-5)):
            np.testing.assert_allclose(float(lr(epoch * per_epoch)), value, rtol=2e-3)


def test_v1_lrs_scale_at_run_time_v2_floors_do_not():
    v1 = common.v1_config('rest_small')
    v1.batch_size, v1.update_freq = 512, 2
    assert optimizer.peak_lr(v1) == pytest.approx(1e-3)
    assert optimizer.warmup_and_min_lr(v1) == pytest.approx((2e-6, 2e-5))
    v2 = common.v2_config('restv2_tiny')
    v2.batch_size = 1024
    assert optimizer.peak_lr(v2) == pytest.approx(6e-4)
    assert optimizer.warmup_and_min_lr(v2) == (0.0, 1e-6)


@pytest.mark.parametrize('name, per_epoch', [('restv2_t', IMAGENET_TRAIN // 2048), ('restv2_t_384', IMAGENET_TRAIN // 512)])
def test_v2_schedule_is_the_official_per_iteration_cosine(name, per_epoch):
    import importlib
    import jax.numpy as jnp
    config = importlib.import_module(f'configs.{name}').get_config()
    total = config.num_epochs * per_epoch
    ours = np.asarray(optimizer.schedule(config, per_epoch, total)(jnp.arange(total)), np.float64)
    peak = optimizer.peak_lr(config)
    official = official_v2_schedule(peak, config.min_lr, config.num_epochs, per_epoch, config.warmup_epochs,
                                    config.warmup_lr)
    # The official warmup is np.linspace(0, peak, W): it reaches the peak one iteration sooner.
    warmup = config.warmup_epochs * per_epoch
    allowed = peak / warmup if warmup else 0.0
    assert np.abs(ours - official).max() <= allowed + peak * 1e-6


def test_unknown_schedule_is_refused():
    config = common.v2_config('restv2_tiny')
    config.lr_schedule = 'linear'
    with pytest.raises(ValueError, match='lr_schedule'):
        optimizer.schedule(config, 10, 100)

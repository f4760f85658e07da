"""configs/: each variant file carries its family's official recipe and evaluates as its weights were."""

import importlib
import sys
from pathlib import Path

import pytest

import rest_jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import common  # noqa: E402

V1 = ['rest_lite', 'rest_s', 'rest_b', 'rest_l']
V2 = ['restv2_t', 'restv2_s', 'restv2_b', 'restv2_l']
V2_384 = [f'{name}_384' for name in V2]


def load(name):
    return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', V1)
def test_v1_configs_train_as_the_v1_release(name):
    c = load(name)
    assert (c.lr, c.warmup_lr, c.min_lr, c.lr_base_batch, c.scale_warmup_min_lr) == (5e-4, 1e-6, 1e-5, 512, True)
    assert (c.lr_schedule, c.warmup_epochs, c.cooldown_epochs, c.num_epochs) == ('epoch', 5, 0, 300)
    assert (c.data.repeated_aug, c.data.mixup_group_size, c.batch_size) == (3, 256, 2048)
    assert (c.ema_decay, c.grad_clip, c.weight_decay) == (0.0, 5.0, 0.05)
    assert c.data.crop_pct == 0.875  # Resize(int(256 / 224 * size)): int(224 / 0.875) is the same at every size
    assert all(int(256 / 224 * s) == int(s / 0.875) for s in range(32, 1025))


@pytest.mark.parametrize('name', V2)
def test_v2_configs_train_as_the_v2_release(name):
    c = load(name)
    assert (c.lr, c.warmup_lr, c.min_lr, c.lr_base_batch, c.scale_warmup_min_lr) == (1.5e-4, 0.0, 1e-6, 256, False)
    assert (c.lr_schedule, c.warmup_epochs, c.cooldown_epochs, c.num_epochs) == ('step', 50, 0, 300)
    assert (c.data.repeated_aug, c.data.mixup_group_size, c.batch_size, c.ema_decay) == (0, 256, 2048, 0.9999)
    assert c.data.crop_pct == 1.0  # main.py's --crop_pct default: resize to 224, center crop 224


@pytest.mark.parametrize('name', V2_384)
def test_384_configs_fine_tune_from_raw_weights(name):
    c = load(name)
    assert c.image_size == 384 and c.init_from is None and not c.init_from_ema and c.ema_decay == 0.0
    doc = importlib.import_module(f'configs.{name}').__doc__
    command = doc.split('\n\n')[1]
    assert 'init_from_ema' not in command and '--config.init_from_ema=True' in doc  # offered, not the default


@pytest.mark.parametrize('name', V1 + V2 + V2_384)
def test_train_eval_crop_is_the_registered_one(name):
    """Evaluation during training and of converted official weights use the same transform."""
    c = load(name)
    assert c.data.crop_pct == rest_jax.model_info(c.model.name).crop_pct


def test_every_variant_has_a_drop_path_rate():
    assert set(common.DROP_PATH) == set(rest_jax.list_models())

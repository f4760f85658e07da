"""The official optimizer: AdamW with a linear-warmup + cosine schedule (per update for v2, per epoch for
v1), no decay on 1-D parameters, global-norm clipping. Steps count optimizer updates (one update =
update_freq micro-steps)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

_SCHEDULES = ('step', 'epoch')


def _scaled(config, value: float) -> float:
    """The linear scaling rule, applied at run time: value x global batch x update_freq / lr_base_batch."""
    return value * config.batch_size * config.update_freq / config.lr_base_batch


def peak_lr(config) -> float:
    """config.lr is per config.lr_base_batch images of one update."""
    return _scaled(config, config.lr)


def warmup_and_min_lr(config) -> tuple[float, float]:
    """(warmup_lr, min_lr): absolute (v2's main.py), or scaled like lr (v1's main.py)."""
    if config.scale_warmup_min_lr:
        return _scaled(config, config.warmup_lr), _scaled(config, config.min_lr)
    return config.warmup_lr, config.min_lr


def schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Per-update lr for config.lr_schedule.

    'step' (v2): the official ConvNeXt-style cosine_scheduler of v2's utils.py, per iteration: linear
    warmup_lr -> peak over warmup_epochs, cosine peak -> min_lr, then min_lr for the cooldown.

    'epoch' (v1): timm's CosineLRScheduler (t_in_epochs, t_initial = the run's epochs less the
    cooldown, cycle_limit 1) as v1's main.py drives it: lr_scheduler.step(epoch) runs after each
    epoch, so epoch e trains at the rate of t = e - 1 (epoch 0 at warmup_lr, set when the scheduler
    is built), constant within the epoch. Rate of t: warmup_lr + t x (peak - warmup_lr) / warmup_epochs
    for t < warmup_epochs; else min_lr + (peak - min_lr)(1 + cos(pi t / t_initial)) / 2 (the warmup is
    not a prefix: the cosine counts from epoch 0); min_lr from t_initial on.
    """
    if config.lr_schedule not in _SCHEDULES:
        raise ValueError(f'config.lr_schedule={config.lr_schedule!r}: use one of {_SCHEDULES}')
    peak = peak_lr(config)
    warmup_lr, min_lr = warmup_and_min_lr(config)
    if config.lr_schedule == 'epoch':
        return _epoch_schedule(config, peak, warmup_lr, min_lr, steps_per_epoch, total_steps)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total_steps)
    cooldown = min(int(config.cooldown_epochs * steps_per_epoch), total_steps - warmup)
    decay = max(total_steps - warmup - cooldown, 1)

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = warmup_lr + (peak - warmup_lr) * step / max(warmup, 1)
        t = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = min_lr + 0.5 * (peak - min_lr) * (1 + jnp.cos(jnp.pi * t))
        return jnp.where(step < warmup, ramp, cosine)

    return lr


def _epoch_schedule(config, peak, warmup_lr, min_lr, steps_per_epoch, total_steps):
    epochs = math.ceil(total_steps / steps_per_epoch)
    t_initial = max(epochs - int(config.cooldown_epochs), 1)
    warmup_t = config.warmup_epochs

    def lr(step):
        epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
        t = jnp.maximum(epoch - 1, 0).astype(jnp.float32)
        ramp = warmup_lr + t * (peak - warmup_lr) / max(warmup_t, 1e-12)
        cosine = min_lr + 0.5 * (peak - min_lr) * (1 + jnp.cos(jnp.pi * t / t_initial))
        return jnp.where(t < warmup_t, ramp, jnp.where(t < t_initial, cosine, min_lr))

    return lr


def decay_mask(params):
    """Weight decay on >= 2-D kernels only: the official optim_factory skips biases and every 1-D
    parameter (norm scales, BatchNorm), which is the ndim rule."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, steps_per_epoch: int, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                            optax.Schedule]:
    """(tx, lr schedule) for the config's recipe."""
    lr = schedule(config, steps_per_epoch, total_steps)
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts), lr

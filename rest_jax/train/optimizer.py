"""The official optimizer: AdamW with a linear-warmup + cosine schedule, no decay on 1-D parameters,
global-norm clipping. Everything is per optimizer update (one update = update_freq micro-steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def peak_lr(config) -> float:
    """config.lr is per 256 images (official linear scaling rule: lr x global batch / 256)."""
    return config.lr * config.batch_size * config.update_freq / 256


def schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Per-update lr: linear warmup_lr -> peak, cosine peak -> min_lr, then min_lr for the cooldown.

    The official schedulers step per iteration (ConvNeXt-style cosine_scheduler in v2's utils.py,
    timm's per-update cosine for v1), so the warmup and the cosine are in updates, not epochs.
    """
    peak = peak_lr(config)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total_steps)
    cooldown = min(int(config.cooldown_epochs * steps_per_epoch), total_steps - warmup)
    decay = max(total_steps - warmup - cooldown, 1)

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        ramp = config.warmup_lr + (peak - config.warmup_lr) * step / max(warmup, 1)
        t = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = config.min_lr + 0.5 * (peak - config.min_lr) * (1 + jnp.cos(jnp.pi * t))
        return jnp.where(step < warmup, ramp, cosine)

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

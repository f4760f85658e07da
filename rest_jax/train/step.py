"""The jitted train step (gradient accumulation, EMA, non-finite guard) and the eval step."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from rest_jax.train import sharding
from rest_jax.train.state import TrainState


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy against soft targets (smoothed / mixed labels), in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(targets.astype(jnp.float32) * logp).sum(-1).mean()


def make_train_step(model, tx: optax.GradientTransformation, lr_fn: optax.Schedule, *, update_freq: int,
                    ema_decay: float, seed: int, batch_sharding=None) -> Callable:
    """train_step(state, batch) -> (state, metrics); jit it with the state donated.

    batch: {'image' [N, S, S, 3], 'label' [N, classes] soft targets}, N = global batch x update_freq.
    Micro-batch i is rows i, i + update_freq, i + 2 * update_freq, ... (the data contract's layout):
    reshaping to [N / update_freq, update_freq] keeps the leading axis sharded over every device, so
    all devices work on every micro-batch.

    One call is one optimizer update: gradients of the update_freq micro-batches are averaged (float32)
    and applied once; `state.step` counts updates. BatchNorm statistics are taken over the whole global
    micro-batch (jit over the mesh reduces across devices), and the running statistics advance once
    per micro-batch, as in the official loop. The official runs used per-GPU statistics (plain BN
    under DDP), so large-batch runs here see slightly different normalisation noise.

    Randomness (drop path) comes from fold_in(fold_in(key(seed), step), micro-batch): a pure function of
    the step, which is what makes a resumed run bit-identical to an uninterrupted one.

    A non-finite loss leaves the state as it was (no update, no EMA) and reports metrics['finite'] = 0;
    the loop stops on it, so no checkpoint ever holds a poisoned state.
    """
    def loss_fn(params, batch_stats, images, labels, rng):
        variables = {'params': params, 'batch_stats': batch_stats}
        logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                      rngs={'dropout': rng})
        return soft_cross_entropy(logits, labels), updates.get('batch_stats', batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def micro(i, batch_stats):
            def pick(x):
                x = x.reshape(x.shape[0] // update_freq, update_freq, *x.shape[1:])
                x = lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)
                return x if batch_sharding is None else lax.with_sharding_constraint(x, batch_sharding)
            (loss, batch_stats), grads = grad_fn(state.params, batch_stats, pick(batch['image']),
                                                 pick(batch['label']), jax.random.fold_in(rng, i))
            return loss, batch_stats, grads

        if update_freq == 1:
            loss, batch_stats, grads = micro(0, state.batch_stats)
        else:
            def body(carry, i):
                batch_stats, grad_sum, loss_sum = carry
                loss, batch_stats, grads = micro(i, batch_stats)
                return (batch_stats, jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (batch_stats, grads, loss), _ = lax.scan(body, (state.batch_stats, zeros, jnp.zeros((), jnp.float32)),
                                                     jnp.arange(update_freq))
            grads = jax.tree.map(lambda g: g / update_freq, grads)
            loss = loss / update_freq

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = {'params': params, 'batch_stats': batch_stats}
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema, new)
        candidate = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, ema=ema)
        # The global L2 norm (optax.global_norm, deprecated in optax 0.2.8; optax.tree.norm is newer than 0.2.4).
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), candidate, state)
        metrics = {'loss': loss, 'lr': lr_fn(candidate.step - 1), 'grad_norm': grad_norm, 'finite': finite}
        return state, metrics

    return train_step


def jit_train_step(model, tx: optax.GradientTransformation, lr_fn: optax.Schedule, config, mesh,
                   shardings: Any) -> Callable:
    """The train step jitted over `mesh` exactly as train.py runs it (and as rest_jax.deviceless compiles it).

    Args:
      model, tx, lr_fn: the model and the optimizer with its schedule (rest_jax.train.optimizer).
      config: the run's config (update_freq, ema_decay, seed).
      mesh: the ('data', 'fsdp') device mesh.
      shardings: the train state's NamedShardings (state.create_state or abstract_state).

    Returns:
      jitted train_step(state, batch) -> (state, metrics): the state donated and kept in `shardings`,
      the batch split over every device, the metrics replicated.
    """
    batch = sharding.batch_sharding(mesh)
    step = make_train_step(model, tx, lr_fn, update_freq=config.update_freq, ema_decay=config.ema_decay,
                           seed=config.seed, batch_sharding=batch)
    return jax.jit(sharding.traced_in(mesh, step), in_shardings=(shardings, batch), out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def out_of_memory(error: BaseException) -> str | None:
    """XLA's one-line reason when `error` is its RESOURCE_EXHAUSTED (a program or a buffer larger than
    the device's memory, at compile or at run time), else None."""
    text = str(error)
    if not isinstance(error, jax.errors.JaxRuntimeError) or 'RESOURCE_EXHAUSTED:' not in text:
        return None
    return text.split('RESOURCE_EXHAUSTED:', 1)[1].strip().split('\n')[0].rstrip('.')


def make_eval_step(model) -> Callable:
    """eval_step(variables, batch) -> {'correct1', 'correct5', 'count', 'loss_sum'} summed over the
    global batch; rows with mask False (padding) count for nothing."""
    def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = model.apply(variables, batch['image'], train=False).astype(jnp.float32)
        labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
        top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]
        hit = top5 == labels[:, None]
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        return {'correct1': (hit[:, 0] * mask).sum(), 'correct5': (hit.any(-1) * mask).sum(),
                'count': mask.sum(), 'loss_sum': (loss * mask).sum()}
    return eval_step

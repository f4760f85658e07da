"""The train state (everything a bit-identical resume needs) and its creation, already sharded."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rest_jax.train import sharding


@flax.struct.dataclass
class TrainState:
    """Parameters, BatchNorm statistics, optimizer state and their EMA; `step` counts optimizer updates."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any  # {'params', 'batch_stats'}: timm's ModelEma averages the BatchNorm buffers too

    def variables(self, ema: bool = False) -> dict[str, Any]:
        """{'params', 'batch_stats'} ready for model.apply (ema=True: the EMA weights)."""
        return dict(self.ema) if ema else {'params': self.params, 'batch_stats': self.batch_stats}


def init_fn(model, tx: optax.GradientTransformation, image_size: int, seed: int) -> Callable[[], TrainState]:
    """A function of no arguments building the initial state (for eval_shape and a sharded jit)."""
    def init() -> TrainState:
        variables = model.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3), jnp.float32))
        params, stats = variables['params'], variables.get('batch_stats', {})
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                          opt_state=tx.init(params), ema={'params': params, 'batch_stats': stats})
    return init


def create_state(model, tx, image_size: int, seed: int, mesh,
                 variables: dict[str, Any] | None = None) -> tuple[TrainState, Any]:
    """(state, shardings): the initial state, created directly in its sharded layout.

    `jax.eval_shape` gives the shapes without computing anything, `state_shardings` the layout, and
    the jitted init writes each shard on its device: no full copy on one device first. `variables`
    (fine-tuning) replace the random parameters and statistics; the optimizer starts fresh.
    """
    init = init_fn(model, tx, image_size, seed)
    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh)
    if variables is None:
        return jax.jit(init, out_shardings=shardings)(), shardings

    def from_variables(params, stats):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                          opt_state=tx.init(params), ema={'params': params, 'batch_stats': stats})

    def place(value, target):
        # Each process writes its own shards from its host copy (every process loaded the same weights):
        # the loaded arrays sit on one device, which a jit over the whole mesh would refuse.
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])
    params = jax.tree.map(place, variables['params'], shardings.params)
    stats = jax.tree.map(place, variables.get('batch_stats', {}), shardings.batch_stats)
    state = jax.jit(from_variables, out_shardings=shardings)(params, stats)
    return state, shardings


def abstract_state(model, tx, image_size: int, seed: int, mesh) -> Any:
    """The state's ShapeDtypeStructs carrying their target shardings: the restore target on any mesh."""
    abstract = jax.eval_shape(init_fn(model, tx, image_size, seed))
    shardings = sharding.state_shardings(abstract, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def count_by_stage(params: Any) -> list[tuple[str, int]]:
    """[(group, parameter count)] in model order: stem, stage1, patch_2, stage2, ..., norm, head."""
    rows: dict[str, int] = {}
    for name, tree in params.items():
        group = name.rsplit('_', 1)[0] if name.startswith('stage') else name  # stage3_11 -> stage3
        rows[group] = rows.get(group, 0) + sum(int(x.size) for x in jax.tree.leaves(tree))

    def position(group: str) -> tuple[int, str]:
        digits = ''.join(c for c in group if c.isdigit())
        stage = int(digits) if digits else (0 if group == 'stem' else 9)
        return (2 * stage + group.startswith('stage'), group)
    return sorted(rows.items(), key=lambda item: position(item[0]))

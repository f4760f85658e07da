"""The skeleton both families share: four times (patch embedding -> blocks), then norm, average pool, head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from rest_jax import ops


class Backbone(nn.Module):
    """Base class of ResT and ResTV2.

    A subclass defines, in setup, `stage1`..`stage4` (lists of blocks), `norm`, `head` (when
    num_classes > 0) and `embeddings()`: its four patch embeddings in order. It has the fields
    `dtype`, `num_classes`, `impl` (kernel forms: 'auto' | 'xla' | 'cpu', see rest_jax.ops) and
    `conv_impl` (the setting's former name; when given it wins) and `remat` (see `rematerialized`).
    """

    def embeddings(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def kernel_forms(self):
        """The context in which this model's ops run (rest_jax.ops.kernel_forms of its setting)."""
        return ops.kernel_forms(self.impl if self.conv_impl is None else self.conv_impl)

    def rematerialized(self, block: type[nn.Module]) -> type[nn.Module]:
        """`block`, or `block` under `nn.remat` with the policy `self.remat` names.

        'none' keeps every activation the backward pass needs; 'block' keeps only each block's input and
        recomputes the rest in the backward pass (the least memory, ~1/3 more FLOPs); the name of a
        `jax.checkpoint_policies` member (e.g. 'dots_with_no_batch_dims_saveable': keep the matmul
        outputs, recompute the cheap elementwise work) trades in between. Parameters are unchanged.
        """
        policy = remat_policy(self.remat)
        if policy is None:
            return block
        return nn.remat(block, policy=policy, static_argnums=(2,))   # (self, x, train): train is static

    def forward_features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """The outputs of the four stages (strides 4, 8, 16, 32), NHWC, before any norm."""
        check_input(x)
        x = x.astype(self.dtype)
        feats = []
        with self.kernel_forms():
            for embed, stage in zip(self.embeddings(), (self.stage1, self.stage2, self.stage3, self.stage4)):
                x = embed(ops.block_fence(x), train)
                for blk in stage:
                    x = blk(ops.block_fence(x), train)
                feats.append(x)
        return feats

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (float32), or the pooled features when num_classes == 0."""
        with self.kernel_forms():
            x = self.norm(self.forward_features(x, train)[-1])
        x = x.astype(jnp.float32).mean(axis=(1, 2))
        return self.head(x) if self.num_classes > 0 else x


# 'none', 'block', and the jax.checkpoint_policies that are policies themselves (not policy factories).
REMAT = ('none', 'block', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable', 'everything_saveable')


def remat_policy(name: str):
    """The jax.checkpoint policy `name` (one of REMAT) stands for: None for 'none'; ValueError otherwise."""
    if name not in REMAT:
        raise ValueError(f"remat must be one of {', '.join(REMAT)}, got {name!r}")
    if name == 'none':
        return None
    return getattr(jax.checkpoint_policies, 'nothing_saveable' if name == 'block' else name)


def check_input(x: jax.Array) -> None:
    """Reject inputs the models cannot take, with a message that says what to pass instead."""
    if x.ndim != 4:
        raise ValueError(f'expected images as (batch, height, width, channels) NHWC, got shape {x.shape}')
    if min(x.shape[1:3]) < 32:
        raise ValueError(f'images must be at least 32x32 (four stride-2 stages), got {x.shape[1]}x{x.shape[2]}')

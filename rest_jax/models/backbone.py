"""The skeleton both families share: four times (patch embedding -> blocks), then norm, average pool, head."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from rest_jax import ops


class Backbone(nn.Module):
    """Base class of ResT and ResTV2.

    A subclass defines, in setup, `stage1`..`stage4` (lists of blocks), `norm`, `head` (when
    num_classes > 0) and `embeddings()`: its four patch embeddings in order. It has the fields
    `embed_dims`, `dtype`, `num_classes`, `impl` (kernel forms: 'auto' | 'xla' | 'cpu' | 'tpu', see
    rest_jax.ops) and `conv_impl` (the setting's former name; when given it wins) and `remat` (see
    `rematerialized`). Its methods follow timm's names: `forward_features` (the four stage outputs),
    `forward_head` (norm, pool, head; `pre_logits=True` stops before the head), `feature_info`.
    """

    def embeddings(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def kernel_forms(self):
        """The context in which this model's ops run (rest_jax.ops.kernel_forms of its setting). While
        the model is initialised, whose output only gives shapes, no CPU form is timed on the host."""
        return ops.kernel_forms(self.impl if self.conv_impl is None else self.conv_impl,
                                timing=not self.is_initializing())

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
        return self.forward_stages(x, train, 4)

    def forward_stages(self, x: jax.Array, train: bool = False, count: int = 4) -> list[jax.Array]:
        """The outputs of the first `count` stages, NHWC, before any norm (later stages are not computed)."""
        check_input(x)
        x = x.astype(self.dtype)
        feats = []
        stages = (self.stage1, self.stage2, self.stage3, self.stage4)
        with self.kernel_forms():
            for embed, stage in list(zip(self.embeddings(), stages))[:count]:
                x = embed(ops.block_fence(x), train)
                for blk in stage:
                    x = blk(ops.block_fence(x), train)
                feats.append(x)
        return feats

    def forward_head(self, x: jax.Array | Sequence[jax.Array], pre_logits: bool = False) -> jax.Array:
        """The final norm, global average pooling and the head (timm's `forward_head`).

        Args:
          x: the last stage's output (B, H, W, C), or the list `forward_features` returns.
          pre_logits: return the pooled, normed features (B, C) instead of the logits.

        Returns:
          Logits (B, num_classes), float32; the pooled features (B, C), float32, when `pre_logits` or
          when num_classes == 0.
        """
        x = x[-1] if isinstance(x, (list, tuple)) else x
        with self.kernel_forms():
            x = self.norm(x)
        x = x.astype(jnp.float32).mean(axis=(1, 2))
        return x if pre_logits or self.num_classes == 0 else self.head(x)

    def __call__(self, x: jax.Array, train: bool = False, pre_logits: bool = False) -> jax.Array:
        """Logits (float32); the pooled features with `pre_logits` or when num_classes == 0."""
        return self.forward_head(self.forward_features(x, train), pre_logits)

    @property
    def feature_info(self) -> FeatureInfo:
        """Channels and strides of the stage outputs (of the selected ones, for a features-only model)."""
        return FeatureInfo(tuple(self.embed_dims), getattr(self, 'out_indices', STAGES))


STAGES = (0, 1, 2, 3)
REDUCTIONS = (4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """The stage outputs a model returns: channels and reduction (stride) of each, timm's interface.

    `channels()` / `reduction()` / `module_name()` list them for the selected stages (`out_indices`);
    with an index they give one. `get_dicts()` gives timm's list of {'num_chs', 'reduction', 'module',
    'index'}.
    """
    stage_channels: tuple[int, ...]     # channels of all four stages (the model's embed_dims)
    out_indices: tuple[int, ...] = STAGES  # the stages returned, 0..3 = strides 4, 8, 16, 32

    def _pick(self, values: Sequence[Any], idx: int | None):
        chosen = [values[i] for i in self.out_indices]
        return chosen if idx is None else chosen[idx]

    def channels(self, idx: int | None = None):
        """Channels of each returned stage (a list), or of the `idx`-th returned one (an int)."""
        return self._pick(self.stage_channels, idx)

    def reduction(self, idx: int | None = None):
        """Stride of each returned stage relative to the input (4, 8, 16, 32): a list, or one int."""
        return self._pick(REDUCTIONS, idx)

    def module_name(self, idx: int | None = None):
        """Name of the stage (the official attribute: 'stage1'..'stage4'): a list, or one str."""
        return self._pick([f'stage{i + 1}' for i in STAGES], idx)

    def get_dicts(self) -> list[dict[str, Any]]:
        return [dict(num_chs=self.stage_channels[i], reduction=REDUCTIONS[i], module=f'stage{i + 1}', index=i)
                for i in self.out_indices]

    def __len__(self) -> int:
        return len(self.out_indices)


def check_out_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    """`out_indices` as a tuple of distinct stages in 0..3, increasing (negative ones count from the end);
    ValueError otherwise."""
    try:
        chosen = tuple(STAGES[i] for i in out_indices)
    except (IndexError, TypeError):
        raise ValueError(f'out_indices must be stage indices in 0..3 (strides 4, 8, 16, 32), got {out_indices!r}') from None
    if not chosen or list(chosen) != sorted(set(chosen)):
        raise ValueError(f'out_indices must be distinct, increasing stage indices in 0..3, got {out_indices!r}')
    return chosen


def check_feature_norm(out_indices: Sequence[int], feature_norm: bool) -> None:
    """feature_norm=True needs stage 3 among the outputs: the final norm exists only there."""
    if feature_norm and 3 not in out_indices:
        raise ValueError(f'feature_norm=True applies the final norm to stage 3 (stride 32), which out_indices '
                         f'{tuple(out_indices)} leaves out; add 3 or drop feature_norm (ResT has no other norm)')


@functools.cache
def features_class(cls: type[Backbone]) -> type[Backbone]:
    """The features-only form of a model class: the same parameters, `__call__` gives stage outputs.

    Its fields `out_indices` and `feature_norm` pick the stages and whether the final norm is applied.
    ResT has one norm, after the last stage (no per-stage norms, unlike e.g. Swin in timm), so
    `feature_norm=True` normalises the stage-3 (stride-32) output only, with the pretrained `norm`;
    the earlier stages are always returned as the blocks leave them.
    """
    class Features(cls):
        out_indices: tuple[int, ...] = STAGES  # stages returned, 0..3 = strides 4, 8, 16, 32
        feature_norm: bool = False             # the final norm on stage 3's output (ResT has no other)

        def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
            """The chosen stage outputs, NHWC, in `out_indices` order; stages after the last are not run."""
            check_feature_norm(self.out_indices, self.feature_norm)
            feats = self.forward_stages(x, train, self.out_indices[-1] + 1)
            if self.feature_norm:
                with self.kernel_forms():
                    feats[3] = self.norm(feats[3])
            return [feats[i] for i in self.out_indices]

    Features.__name__ = Features.__qualname__ = f'{cls.__name__}Features'
    Features.__module__ = cls.__module__
    return Features


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

"""Building blocks shared by ResT v1 and ResTv2: parameters in PyTorch's layouts, arithmetic in rest_jax.ops.

Every module works on NHWC tensors. Parameters are float32; `dtype` is the computation dtype. Where
Flax's defaults differ from PyTorch's, the PyTorch choice is made here or in the op: exact (erf)
GELU, explicit symmetric padding, two-pass LayerNorm variance, BatchNorm that updates its running
variance with the unbiased estimate as `torch.nn.BatchNorm2d` does. The kernel form of each op
(portable or CPU) is chosen in rest_jax.ops, from the model's `impl`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from rest_jax import ops

Dtype = Any

# The official code initialises every conv and linear weight with trunc_normal_(std=0.02), biases
# with 0 and norm weights with 1.
weight_init = nn.initializers.truncated_normal(stddev=0.02)


def dense(features: int, *, use_bias: bool = True, dtype: Dtype, name: str) -> Dense:
    """`nn.Linear(C, features)` (`Dense`)."""
    return Dense(features, use_bias=use_bias, dtype=dtype, name=name)


class Dense(nn.Module):
    """`nn.Linear(C, features)`: Flax's nn.Dense (parameters 'kernel' (C, features) and 'bias', the same
    arithmetic) with the official initialisation."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, bias_apart: bool = False) -> jax.Array | tuple[jax.Array, jax.Array | None]:
        """x @ kernel + bias over x's last axis, in `dtype`; with `bias_apart`, (x @ kernel, the bias or
        None) for an op that adds the bias itself."""
        kernel = self.param('kernel', weight_init, (x.shape[-1], self.features))
        bias = (self.param('bias', nn.initializers.zeros_init(), (self.features,)).astype(self.dtype)
                if self.use_bias else None)
        y = ops.dense(x.astype(self.dtype), kernel.astype(self.dtype))
        if bias_apart:
            return y, bias
        return y if bias is None else y + bias


class Conv(nn.Module):
    """`nn.Conv2d(C, features, k, stride, pad)`; parameters as Flax's nn.Conv ('kernel' (k, k, C, features), 'bias')."""
    features: int
    kernel_size: int
    stride: int = 1
    pad: int = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, bias_apart: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The convolution of x; with `bias_apart`, (the convolution without its bias, the bias) for an op
        that adds the bias itself."""
        k = self.kernel_size
        kernel = self.param('kernel', weight_init, (k, k, x.shape[-1], self.features))
        y = ops.conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.pad)
        bias = self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype) if self.use_bias else None
        if bias_apart:
            return y, bias
        return y if bias is None else y + bias


class DepthwiseConv(nn.Module):
    """`nn.Conv2d(C, features, k, stride, pad, groups=C)`; parameters laid out as Flax's nn.Conv."""
    features: int      # C * channel multiplier
    kernel_size: int
    stride: int = 1
    pad: int = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', weight_init, (k, k, 1, self.features))
        y = ops.depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.pad)
        if self.use_bias:
            y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class DepthwiseUpsample(nn.Module):
    """`nn.Conv2d(C, C * r * r, 3, padding=1, groups=C)` then `nn.PixelShuffle(r)`: ResTv2's upsample branch.

    Parameters as a `DepthwiseConv(C * r * r, 3, 1, 1)`.
    """
    ratio: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, norm: tuple | None = None, add: jax.Array | None = None) -> jax.Array:
        """`norm` (a `LayerNormParams`' scale and bias, and eps): that LayerNorm of the branch; `add`
        (B, H, W, C): add + the branch cropped to H x W. One op, which a kernel form may fuse."""
        c, r = x.shape[-1], self.ratio
        kernel = self.param('kernel', weight_init, (3, 3, 1, c * r * r)).astype(self.dtype)
        bias = self.param('bias', nn.initializers.zeros, (c * r * r,)).astype(self.dtype)
        return ops.upsample(x.astype(self.dtype), kernel, bias, r, norm, add)


class DepthwiseConvParams(nn.Module):
    """The parameters of a `DepthwiseConv(features, 3)` ('kernel', 'bias'), for an op that applies the
    conv itself."""
    features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return (self.param('kernel', weight_init, (3, 3, 1, self.features)),
                self.param('bias', nn.initializers.zeros, (self.features,)))


class PA(nn.Module):
    """Pixel attention, ResT's position encoding: x * sigmoid(dwconv3x3(x)); the conv's parameters as a
    `DepthwiseConv` named 'pa_conv'."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, norm: tuple | None = None, x_bias: jax.Array | None = None) -> jax.Array:
        """`norm` (a `LayerNormParams`' scale and bias, and eps): then that LayerNorm, in one op that a
        kernel form may fuse; `x_bias`: PA of x + x_bias (the bias of the convolution before it, which
        the op adds itself: `Conv(..., bias_apart=True)`)."""
        kernel, bias = DepthwiseConvParams(x.shape[-1], name='pa_conv')()
        return ops.pixel_attention(x, kernel.astype(self.dtype), bias.astype(self.dtype), norm, x_bias)


class LayerNorm(nn.Module):
    """`nn.LayerNorm(C, eps)` over the last axis; parameters as Flax's nn.LayerNorm ('scale', 'bias').

    Statistics in float32 with the two-pass variance PyTorch uses; output in `dtype`.
    """
    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = _layer_norm_params(self, x.shape[-1])
        return ops.layer_norm(x, scale, bias, self.epsilon, self.dtype)


class LayerNormParams(nn.Module):
    """The parameters of `LayerNorm` ('scale', 'bias'), for an op that applies the norm itself."""

    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        return _layer_norm_params(self, features)


def _layer_norm_params(module: nn.Module, features: int) -> tuple[jax.Array, jax.Array]:
    return (module.param('scale', nn.initializers.ones, (features,)),
            module.param('bias', nn.initializers.zeros, (features,)))


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` over the last axis, exactly.

    Flax's nn.BatchNorm updates the running variance with the biased batch variance; PyTorch uses
    the unbiased one (n / (n - 1)). Keeping PyTorch's rule means converted checkpoints keep training
    as they would have. `momentum` is PyTorch's (weight of the new batch): 0.1 equals Flax's 0.9.
    Under jit over a data-parallel mesh the batch mean is taken over the global batch.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if train:
            # Both moments in one pass over x, shifted by the running mean (a constant here) so that
            # the difference of squares does not cancel: on a TPU XLA fuses the two sums into the
            # convolution that produced x instead of reading x again for the variance.
            shift = lax.stop_gradient(ra_mean.value)
            xs = x.astype(jnp.float32) - shift
            m1, m2 = xs.mean(axes), jnp.square(xs).mean(axes)
            mean, var = shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * lax.rsqrt(var + self.epsilon)
        return ((x.astype(jnp.float32) - mean) * mul + bias).astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath): drop the residual branch, rescale the rest."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LinearParams(nn.Module):
    """The parameters of `dense` ('kernel' (C, F), 'bias' (F,)), for an op that applies them itself."""
    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return (self.param('kernel', weight_init, (in_features, self.features)),
                self.param('bias', nn.initializers.zeros_init(), (self.features,)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (PyTorch's nn.GELU() is the erf form; Flax defaults to tanh).

    `norm` (a `LayerNormParams`' scale and bias, and eps): the MLP on that LayerNorm of x, as one op
    (a pre-norm block's `mlp(norm2(x))`, which a kernel form may fuse)."""
    hidden_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, norm: tuple | None = None) -> jax.Array:
        c = x.shape[-1]
        w1, b1 = LinearParams(self.hidden_features, name='fc1')(c)
        w2, b2 = LinearParams(c, name='fc2')(self.hidden_features)
        return ops.mlp(x, w1, b1, w2, b2, self.dtype, norm)


def stochastic_depth_rates(rate: float, depths) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 to `rate`, as torch.linspace in the official code."""
    n = sum(depths)
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]

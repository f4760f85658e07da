"""The array ops of the ResT models, each run in the kernel form chosen for the target platform.

One function per op; each dispatches to its form in `portable` (the reference, run on GPUs), `cpu`
(the same arithmetic in the shapes XLA:CPU runs fastest) or `tpu` (the portable forms, but for those that
move fewer HBM bytes on a TPU in another form: Pallas kernels for EMSA's attention, the narrow MLPs,
ResTv2's upsample branch with its LayerNorm and pixel attention with the LayerNorm after it), as
`dispatch` resolves it:

    with rest_jax.ops.kernel_forms('auto'):   # the models do this with their `impl` field
        y = rest_jax.ops.depthwise_conv(x, kernel, stride=8, pad=4)

No Flax modules here: rest_jax.models holds the parameters and calls these.
"""

from __future__ import annotations

import jax

from rest_jax.ops import cpu, portable, tpu
from rest_jax.ops.dispatch import ALIASES, IMPLS, active, canonical, kernel_forms, resolve, target_platform
from rest_jax.ops.portable import conv_output_size

_FORMS = {'xla': portable, 'cpu': cpu, 'tpu': tpu}

__all__ = ['ALIASES', 'IMPLS', 'active', 'attention', 'block_fence', 'canonical', 'conv', 'conv_output_size',
           'dense', 'depthwise_conv', 'gelu', 'kernel_forms', 'layer_norm', 'mlp', 'pa_fence', 'pixel_attention',
           'pixel_shuffle', 'resolve', 'target_platform', 'upsample']


def _forms():
    return _FORMS[active()]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, scale: float,
              q_bias: jax.Array | None = None) -> jax.Array:
    """Softmax attention per head: q (B, H, W, C) over keys and values (B, M, C), logits times `scale`;
    with `q_bias` (C,), of q + q_bias (the query projection's bias: one op, so that a form can sum its
    gradient in the same pass that writes q's)."""
    return _forms().attention(q, k, v, heads, scale, q_bias)


def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """Dense convolution, x (B, H, W, C) * kernel (kh, kw, C, O), symmetric zero padding `pad`."""
    return _forms().conv(x, kernel, stride, pad)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A linear layer's product: x (..., C) @ kernel (C, O) over x's last axis."""
    return _forms().dense(x, kernel)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """Depthwise convolution, kernel (kh, kw, 1, C * m) in PyTorch's grouped order (see portable)."""
    return _forms().depthwise_conv(x, kernel, stride, pad)


def upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int, norm: tuple | None = None,
             add: jax.Array | None = None) -> jax.Array:
    """ResTv2's upsample branch: depthwise 3x3 to C * r * r channels, bias, PixelShuffle(r); with `norm`
    (scale, bias, eps), then a LayerNorm over C in x's dtype; with `add` (B, H, W, C), add + the branch
    cropped to H x W (one op, so that a form can fuse the three)."""
    return _forms().upsample(x, kernel, bias, ratio, norm, add)


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, dtype,
        norm: tuple | None = None) -> jax.Array:
    """fc1 (w1 (C, F), b1), exact GELU, fc2 (w2 (F, C), b2) over x's last axis, computed in `dtype`; with
    `norm` (scale, bias, eps), on `layer_norm(x, scale, bias, eps, dtype)` (one op, so that a form can
    fuse the norm into the MLP)."""
    return _forms().mlp(x, w1, b1, w2, b2, dtype, norm)


def pixel_attention(x: jax.Array, kernel: jax.Array, bias: jax.Array, norm: tuple | None = None,
                    x_bias: jax.Array | None = None) -> jax.Array:
    """Pixel attention: x * sigmoid(depthwise 3x3 conv of x + bias), kernel (3, 3, 1, C) and bias (C,) in
    the compute dtype; with `norm` (scale, bias, eps), then a LayerNorm over C (one op, so that a form
    can fuse the norm); with `x_bias` (C,), of x + x_bias (the bias of the convolution before it, so that
    a form can sum its gradient in the same pass that writes x's)."""
    return _forms().pixel_attention(x, kernel, bias, norm, x_bias)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """`torch.nn.PixelShuffle(r)` on NHWC."""
    return _forms().pixel_shuffle(x, r)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
    """LayerNorm over the last axis, float32 statistics with the two-pass variance, output in `dtype`."""
    return _forms().layer_norm(x, scale, bias, eps, dtype)


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's exact (erf) GELU, computed in float32."""
    return _forms().gelu(x)


def block_fence(x: jax.Array) -> jax.Array:
    """The residual stream at a block boundary: the identity (CPU: its gradient is materialised once)."""
    return _forms().block_fence(x)


def pa_fence(x: jax.Array) -> jax.Array:
    """Pixel attention's output: the identity (CPU: a fusion boundary)."""
    return _forms().pa_fence(x)

"""The portable kernel forms: one XLA operation per op where XLA has one. The reference every other
form is tested against, and the forms GPUs run (TPUs run them too, but for the one in `tpu`).

Array functions on NHWC tensors; kernels in Flax's layouts ((kh, kw, C_in, C_out) dense, (kh, kw, 1,
C * m) depthwise). Numerics are PyTorch's: explicit symmetric padding (never 'SAME', which is
asymmetric for strided convs), the two-pass LayerNorm variance, the erf form of GELU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis (PyTorch's and XLA's rule, no dilation)."""
    return (size + 2 * pad - kernel) // stride + 1


def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """A dense convolution, x (B, H, W, C) * kernel (kh, kw, C, O), zero-padded by `pad` on every side."""
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """Depthwise convolution (groups = input channels) with an optional channel multiplier.

    Args:
      x: (B, H, W, C) input.
      kernel: (kh, kw, 1, C * m) in Flax's grouped layout; output channel c * m + t is input
        channel c filtered by kernel[..., 0, c * m + t], the order of PyTorch's `groups=C` conv.
      stride, pad: the stride and the symmetric zero padding of both spatial dimensions.

    Returns:
      (B, H', W', C * m).
    """
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=_NHWC, feature_group_count=x.shape[-1])


def upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int, norm: tuple | None = None,
             add: jax.Array | None = None) -> jax.Array:
    """ResTv2's upsample branch: depthwise 3x3 conv (pad 1) to C * r * r channels, bias, PixelShuffle(r).

    kernel (3, 3, 1, C * r * r) and bias (C * r * r,) as `nn.Conv2d(C, C * r * r, 3, padding=1, groups=C)`.
    With `norm` (scale, bias, eps): then `layer_norm` over C, in x's dtype (the branch's `up_norm`). With
    `add` (B, H, W, C): add + the branch's first H rows and W columns (EMSA's attention output + its
    branch, cropped to the token grid).
    """
    return finish_upsample(pixel_shuffle(depthwise_conv(x, kernel, 1, 1) + bias, ratio), norm, add, layer_norm)


def finish_upsample(y: jax.Array, norm: tuple | None, add: jax.Array | None, norm_form) -> jax.Array:
    """The upsample branch's output y with `upsample`'s `norm` (by `norm_form`, a `layer_norm`) and `add`."""
    y = y if norm is None else norm_form(y, *norm, y.dtype)
    return y if add is None else add + y[:, :add.shape[1], :add.shape[2]]


def pixel_attention(x: jax.Array, kernel: jax.Array, bias: jax.Array, norm: tuple | None = None,
                    x_bias: jax.Array | None = None) -> jax.Array:
    """Pixel attention, ResT's position encoding: x * sigmoid(depthwise 3x3 conv (pad 1) of x + bias), in
    kernel's dtype; with `norm` (scale, bias, eps), then `layer_norm` over C in the output's dtype (the
    LayerNorm after ResTv2's stem and patch embeddings); with `x_bias` (C,), of x + x_bias (the bias of
    the convolution before it). kernel (3, 3, 1, C), bias (C,)."""
    return compose_pixel_attention(x, kernel, bias, norm, x_bias, depthwise_conv, pa_fence, layer_norm)


def compose_pixel_attention(x, kernel, bias, norm, x_bias, depthwise_form, fence_form, norm_form) -> jax.Array:
    """`pixel_attention` from a form's depthwise conv, PA fence and LayerNorm."""
    x = add_bias(x, x_bias)
    out = fence_form(x * jax.nn.sigmoid(depthwise_form(x.astype(kernel.dtype), kernel, 1, 1) + bias))
    return out if norm is None else norm_form(out, *norm, out.dtype)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """`torch.nn.PixelShuffle(r)` on NHWC: input channel c * r * r + i * r + j -> pixel (i, j) of c."""
    if r == 1:
        return x
    b, h, w, cr = x.shape
    c = cr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


def add_bias(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x + bias (x itself where bias is None): the bias an op takes from the layer before it, added as
    one XLA op on x as that layer gave it, which XLA fuses into the layer."""
    return x if bias is None else x + bias


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, scale: float,
              q_bias: jax.Array | None = None) -> jax.Array:
    """Softmax attention of every query over reduced keys and values, per head.

    Args:
      q: (B, H, W, C) queries; channel c belongs to head c // (C / heads), the official (heads, head_dim) order.
      k, v: (B, M, C) keys and values (EMSA's reduced token grid, M = H W / r^2).
      heads: the number of heads; scale: the logits' factor (head_dim^-0.5 unless set).
      q_bias: (C,) or None: the queries are q + q_bias (the query projection's bias).

    Returns:
      (B, H, W, C) in q's dtype: logits and softmax in float32, the probabilities cast to q's dtype for
      the product with v.
    """
    q = add_bias(q, q_bias)
    b, h, w, c = q.shape
    m, hd = k.shape[1], c // heads
    logits = jnp.einsum('bnhd,bmhd->bhnm', q.reshape(b, h * w, heads, hd), k.reshape(b, m, heads, hd),
                        preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum('bhnm,bmhd->bnhd', probs, v.reshape(b, m, heads, hd)).reshape(b, h, w, c)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., C) @ kernel (C, O) over x's last axis: a linear layer's product (Flax's nn.Dense arithmetic)."""
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, dtype,
        norm: tuple | None = None) -> jax.Array:
    """fc1 (w1 (C, F), b1), exact GELU, fc2 (w2 (F, C), b2) over the last axis of x, in `dtype`: Flax's
    Dense arithmetic (operands cast to `dtype`, the product then the bias) and `gelu`. With `norm`
    (scale, bias, eps), on `layer_norm(x, scale, bias, eps, dtype)` (a pre-norm block's second half)."""
    if norm is not None:
        x = layer_norm(x, *norm, dtype)
    x, w1, b1, w2, b2 = (a.astype(dtype) for a in (x, w1, b1, w2, b2))
    with jax.named_scope('fc1'):
        h = dense(x, w1) + b1
    h = gelu(h)
    with jax.named_scope('fc2'):
        return dense(h, w2) + b2


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
    """LayerNorm over the last axis: statistics in float32, two-pass variance (PyTorch's), output in `dtype`.

    The arithmetic of Flax's `nn.LayerNorm(use_fast_variance=False)`, whose parameters it takes.
    """
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    mul = lax.rsqrt(var + eps) * scale
    return ((x - mean) * mul + bias).astype(dtype)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's nn.GELU(): x * Phi(x), the erf form, with PyTorch's formula 0.5 x (1 + erf(x / sqrt 2)).

    Computed in float32 whatever the input dtype, as PyTorch does for bfloat16 (in bfloat16, 1 + erf(x)
    cancels to nothing below x ~ -1.5). Differentiated by hand: the forward pass computes only the
    output and keeps x; the backward pass evaluates Phi(x) + x * phi(x) in one pass (autodiff keeps
    erf and the density from the forward pass: three passes over the MLP's hidden activations, two
    stored). Phi comes from erf, not erfc (Flax's nn.gelu(approximate=False) uses erfc, which XLA:CPU
    runs as a slow rational approximation); the cost is an absolute error of ~6e-8 in Phi's lower
    tail, the error PyTorch's own kernel has.
    """
    return gelu_float32(x.astype(jnp.float32)).astype(x.dtype)


def gelu_float32(x: jax.Array) -> jax.Array:
    """`gelu`'s formula on float32 x (the TPU kernels apply it inside theirs)."""
    return 0.5 * x * (1 + lax.erf(x * 0.7071067811865476))


def gelu_slope(x: jax.Array) -> jax.Array:
    """GELU's derivative Phi(x) + x phi(x) on float32 x."""
    cdf = 0.5 + 0.5 * lax.erf(x * 0.7071067811865476)          # Phi(x)
    pdf = jnp.exp(-0.5 * x * x) * 0.3989422804014327           # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    return cdf + x * pdf


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    return ((g.astype(jnp.float32) * gelu_slope(x.astype(jnp.float32))).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def block_fence(x: jax.Array) -> jax.Array:
    """The residual stream between blocks: the identity (the CPU form fences its gradient)."""
    return x


def pa_fence(x: jax.Array) -> jax.Array:
    """Pixel attention's output: the identity (the CPU form puts a fusion boundary here)."""
    return x

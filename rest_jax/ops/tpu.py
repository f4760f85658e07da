"""The TPU kernel forms: the portable forms, except where the TPU compiler moves fewer HBM bytes with
another exact form of the same op.

Each function here equals its namesake in `portable` (the same sums of the same products, up to float
rounding; tests/test_ops.py checks values and gradients). The figures behind each choice are XLA's own
estimates for a TPU program compiled without a TPU (`python -m rest_jax deviceless`); docs/tpu.md has
them. GPUs keep the portable forms: these were never measured there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from rest_jax.ops import pallas_lowering, portable, tpu_attention, tpu_mlp, tpu_pa, tpu_upsample
from rest_jax.ops.portable import block_fence, conv, dense, depthwise_conv, gelu, layer_norm, pa_fence, pixel_shuffle

__all__ = ['attention', 'block_fence', 'conv', 'dense', 'depthwise_conv', 'gelu', 'layer_norm', 'mlp', 'pa_fence',
           'pixel_attention', 'pixel_shuffle', 'upsample']


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, scale: float,
              q_bias: jax.Array | None = None) -> jax.Array:
    """`portable.attention` as Pallas kernels that keep the logits in VMEM (`tpu_attention`); the
    portable form where a block of queries and its logits would not fit there, and where the batch may
    be split over devices with no mesh in context to split the kernels by (XLA's partitioner cannot
    split a Pallas call: a `jax.jit` over several chips outside `jax.set_mesh`)."""
    b, h, w, c = q.shape
    if (not pallas_lowering.splittable() or tpu_attention.plan(pallas_lowering.local_batch(b), h * w, c, k.shape[1],
                                                              q.dtype.itemsize) is None):
        return portable.attention(q, k, v, heads, scale, q_bias)
    return tpu_attention.attention(q, k, v, heads, scale, q_bias)


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, dtype,
        norm: tuple | None = None) -> jax.Array:
    """`portable.mlp`, differentiated, as Pallas kernels that keep the norm's output and the hidden
    activations in VMEM (`tpu_mlp`) where the channels are few (at most 128, or 192 with the norm and
    128 images per device: `tpu_mlp.fits`); the portable form for wider MLPs, and where the batch may
    be split over devices with no mesh in context (as `attention`)."""
    if (not pallas_lowering.splittable()
            or not tpu_mlp.fits(*w1.shape, pallas_lowering.local_batch(x.shape[0]), norm is not None)):
        return portable.mlp(x, w1, b1, w2, b2, dtype, norm)
    return tpu_mlp.mlp(x, w1, b1, w2, b2, dtype, norm)


# Ratios whose upsample branch runs as a transposed conv. Measured for one ResTv2 block at 224 (7 x 7
# reduced values), training step on 4 chips, XLA's estimate: r = 8: 4.58 -> 4.00 ms, r = 4: 2.99 -> 2.81
# ms; r = 2: 1.99 -> 2.06 ms, so r = 2 keeps the portable form, behind a barrier (`upsample`; docs/tpu.md:
# a per-phase form, tried).
TRANSPOSED_RATIOS = (4, 8)


def pixel_attention(x: jax.Array, kernel: jax.Array, bias: jax.Array, norm: tuple | None = None,
                    x_bias: jax.Array | None = None) -> jax.Array:
    """Pixel attention and its LayerNorm (`norm`) as Pallas kernels that read x once and write the
    output once (`tpu_pa`), where a block of images and rows fits VMEM and the batch can be split (as
    `attention`); the portable form elsewhere."""
    b, h, w, c = x.shape
    if (pallas_lowering.splittable() and x.dtype == kernel.dtype and kernel.shape[:2] == (3, 3)
            and tpu_pa.plan(pallas_lowering.local_batch(b), h, w, c, x.dtype.itemsize)):
        return tpu_pa.pixel_attention(x, kernel, bias, norm, x_bias)
    return portable.pixel_attention(x, kernel, bias, norm, x_bias)


def upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int, norm: tuple | None = None,
             add: jax.Array | None = None) -> jax.Array:
    """ResTv2's upsample branch with its LayerNorm (`norm`) and the sum with `add` as Pallas kernels
    that write only that sum (`tpu_upsample`), where a block of images fits VMEM, the batch can be split
    (as `attention`) and nothing is cropped. Elsewhere, and without `norm`: `_upsample`, then the
    portable LayerNorm and sum."""
    b, h, w, c = x.shape
    if (norm is not None and pallas_lowering.splittable()
            and (add is None or (add.shape[1:3] == (h * ratio, w * ratio) and add.dtype == x.dtype))
            and tpu_upsample.images_per_step(pallas_lowering.local_batch(b), h, w, c, ratio, x.dtype.itemsize)):
        return tpu_upsample.upsample_norm(x, kernel, bias, ratio, norm, add)
    return portable.finish_upsample(_upsample(x, kernel, bias, ratio), norm, add, layer_norm)


def _upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int) -> jax.Array:
    """ResTv2's upsample branch at ratios 4 and 8 as one transposed depthwise convolution, written
    straight into the (B, H * r, W * r, C) layout; other ratios as the portable form, and where that
    shuffles pixels (ratio 2) behind an optimisation barrier, so that it shuffles in the compute dtype.

    At ratio 2 XLA would otherwise fuse the float32 conversion of the LayerNorm that follows
    (`up_norm`) into the branch and copy the shuffled pixels in float32, twice the bytes of the
    bfloat16 copy. Training step, XLA's estimates: restv2_tiny at 128 images per v5p chip 397 -> 390 MB
    per image, 24.81 -> 24.44 ms; restv2_large at 32 per chip on v5p:4x4x4, fsdp 8, 45.9 -> 43.8 GB,
    22.02 -> 21.12 ms; restv2_tiny inference at 256 per chip 87 -> 79 MB per image, 12.57 -> 11.69 ms.

    Output pixel (h r + i, w r + j) of channel c is sum over (dy, dx) of kernel[dy, dx, c r r + i r + j]
    x[h + dy - 1, w + dx - 1, c]: a convolution of x dilated by r (r - 1 zeros between pixels) with a
    3r x 3r kernel whose tap (dy r + r - 1 - i, dx r + r - 1 - j) is that weight. The portable form (a
    grouped conv to C r r channels, then PixelShuffle's transpose) makes the TPU compiler copy the
    [B, h, w, C r r] array into the shuffled layout and back, in float32 once the LayerNorm after it
    is fused. The kernel's gradient is an einsum over the batch (a custom VJP): autodiff's form, a
    batch-grouped convolution, makes XLA's partitioner all-gather the whole batch's gradient on every chip.
    """
    if ratio in TRANSPOSED_RATIOS:
        return _transposed_upsample(x, kernel, bias, ratio)
    out = portable.upsample(x, kernel, bias, ratio)
    return lax.optimization_barrier(out) if ratio > 1 else out


def _taps(kernel: jax.Array, c: int, r: int) -> jax.Array:
    """(3, 3, 1, C r r) in PyTorch's grouped order -> the (3r, 3r, 1, C) kernel of the transposed conv."""
    taps = kernel.reshape(3, 3, c, r, r)[:, :, :, ::-1, ::-1]                     # [dy, dx, c, r-1-i, r-1-j]
    return taps.transpose(0, 3, 1, 4, 2).reshape(3 * r, 3 * r, 1, c)          # [dy r + r-1-i, dx r + r-1-j, 1, c]


def _dilated_conv(x: jax.Array, taps: jax.Array, r: int) -> jax.Array:
    return lax.conv_general_dilated(x, taps, (1, 1), ((2 * r - 1, 2 * r - 1),) * 2, lhs_dilation=(r, r),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _transposed_upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, r: int) -> jax.Array:
    (h, w), c = x.shape[1:3], x.shape[-1]
    return _dilated_conv(x, _taps(kernel, c, r), r) + jnp.tile(bias.reshape(c, r, r).transpose(1, 2, 0), (h, w, 1))


def _transposed_upsample_fwd(x, kernel, bias, r):
    return _transposed_upsample(x, kernel, bias, r), (x, kernel)


def _transposed_upsample_bwd(r, residuals, g):
    x, kernel = residuals
    b, h, w, c = x.shape
    dx = jax.vjp(lambda x: _dilated_conv(x, _taps(kernel, c, r), r), x)[1](g)[0]   # a strided conv over g
    g6 = g.reshape(b, h, r, w, r, c)                                                # pixel (h r + i, w r + j)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = jnp.stack([xp[:, dy:dy + h, dx_:dx_ + w] for dy in range(3) for dx_ in range(3)], axis=3)
    dk = jnp.einsum('bhiwjc,bhwkc->kcij', g6, windows, preferred_element_type=jnp.float32)
    db = jnp.sum(g6, axis=(0, 1, 3), dtype=jnp.float32).transpose(2, 0, 1)
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype), db.reshape(-1).astype(kernel.dtype)


_transposed_upsample.defvjp(_transposed_upsample_fwd, _transposed_upsample_bwd)

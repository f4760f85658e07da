"""Building blocks shared by ResT v1 and ResTv2, with PyTorch's numerics.

Every module works on NHWC tensors. Parameters are float32 (`param_dtype`); `dtype` is the
computation dtype. Where Flax's defaults differ from PyTorch's, the PyTorch choice is made here:
exact (erf) GELU, explicit symmetric padding, two-pass variance, BatchNorm that updates its running
variance with the unbiased estimate as `torch.nn.BatchNorm2d` does.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

Dtype = Any

# The official code initialises every conv and linear weight with trunc_normal_(std=0.02), biases
# with 0 and norm weights with 1.
weight_init = nn.initializers.truncated_normal(stddev=0.02)


class Conv(nn.Module):
    """`nn.Conv2d(C, features, k, stride, pad)`: PyTorch's explicit symmetric padding (never 'SAME').

    Parameters as Flax's nn.Conv ('kernel' (k, k, C, features), 'bias'); see `dense_conv` for `impl`.
    """
    features: int
    kernel_size: int
    stride: int = 1
    pad: int = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    impl: str = 'auto'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', weight_init, (k, k, x.shape[-1], self.features))
        impl = resolve_conv_impl(self.impl)
        y = dense_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.pad, impl)
        if self.use_bias:
            y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


def dense_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int, impl: str) -> jax.Array:
    """A dense convolution, x (B, H, W, C) * kernel (kh, kw, C, O), in the form fastest for `impl`.

    'lax' is one `conv_general_dilated`. 'shift' (XLA:CPU) keeps the arithmetic and changes the form:
    a 1x1 conv is a matmul (~2x faster than XLA:CPU's conv); a strided conv runs forward as the conv
    (or, on few input channels, as patches times a matmul: 3x faster for the RGB stem) and is
    differentiated in the form `strided_conv_gradient_form` picks for the shape and the host's ISA
    (mostly the patches-times-matmul form, whose gradient is ~1.5-5x faster than the conv's on AVX2).
    """
    kh, kw, _, _ = kernel.shape
    if impl == 'lax':
        return _lax_conv(x, kernel, stride, pad)
    if impl != 'shift':
        raise ValueError(f"conv_impl must be 'lax', 'shift' or 'auto', got {impl!r}")
    if kh == kw == 1 and stride == 1 and pad == 0:
        return jnp.einsum('bhwc,co->bhwo', x, kernel[0, 0])
    if stride > 1:
        return _strided_conv(x, kernel, stride, pad)
    return _lax_conv(x, kernel, stride, pad)


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _patches_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The conv as (B * H' * W', kh * kw * C) patches times the (kh * kw * C, O) kernel."""
    kh, kw, c, o = kernel.shape
    b, h, w, _ = x.shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    patches = jnp.concatenate([
        lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                  (1, stride, stride, 1))
        for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum('bhwk,ko->bhwo', patches, kernel.reshape(kh * kw * c, o))


def _differentiated_as(form: Callable, grad_form: Callable, *, forward_too: bool) -> Callable:
    """`form(x, kernel, stride, pad)` with its derivative taken through `grad_form`: the same function,
    written in the form XLA:CPU differentiates faster. With `forward_too`, the forward pass under
    differentiation takes `grad_form` as well (inference keeps `form`)."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def f(x, kernel, stride, pad):
        return form(x, kernel, stride, pad)

    def fwd(x, kernel, stride, pad):
        return (grad_form if forward_too else form)(x, kernel, stride, pad), (x, kernel)

    def bwd(stride, pad, residuals, g):
        x, kernel = residuals
        return jax.vjp(lambda x, kernel: grad_form(x, kernel, stride, pad), x, kernel)[1](g)

    f.defvjp(fwd, bwd)
    return f


def _strided_conv_forward(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    # Patches times a matmul where XLA:CPU's conv is weakest: few input channels (the RGB stem, ~3x)
    # and small outputs (the 28 -> 14 and 14 -> 7 embeddings at 224, 1.3-1.6x; their patch matrices
    # are small). At 56 -> 28 with 96+ channels the conv is as fast or faster.
    ho = (x.shape[1] + 2 * pad - kernel.shape[0]) // stride + 1
    wo = (x.shape[2] + 2 * pad - kernel.shape[1]) // stride + 1
    if x.shape[-1] <= 4 or ho * wo <= 14 * 14:
        return _patches_conv(x, kernel, stride, pad)
    return _lax_conv(x, kernel, stride, pad)


_strided_conv_patches_grad = _differentiated_as(_strided_conv_forward, _patches_conv, forward_too=False)
_strided_conv_lax_grad = _differentiated_as(_strided_conv_forward, _lax_conv, forward_too=False)


def _strided_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    ho = (x.shape[1] + 2 * pad - kernel.shape[0]) // stride + 1
    wo = (x.shape[2] + 2 * pad - kernel.shape[1]) // stride + 1
    if strided_conv_gradient_form(x.shape[-1], ho, wo, host_has_avx512()) == 'lax':
        return _strided_conv_lax_grad(x, kernel, stride, pad)
    return _strided_conv_patches_grad(x, kernel, stride, pad)


def strided_conv_gradient_form(channels: int, ho: int, wo: int, avx512: bool) -> str:
    """Which form XLA:CPU differentiates a strided conv faster in: 'patches' (times a matmul) or 'lax'.

    Measured per ISA (ms per gradient at batch 8). With AVX2 (a Zen 3 machine) the patches form won
    everywhere, by 1.5-5x (the 3 -> 48 stem: 15.8 vs 75.9; 48 -> 96 at 112 -> 56: 93.6 vs 199). With
    AVX-512 (Zen 5) XLA's own convolution gradient is far faster and wins where the input has few
    channels: the RGB stem (training steps 1-2% faster) and v1's 32 -> 64 stem conv at 112 -> 56 (17.6 vs
    31.3 ms; rest_lite and rest_small steps 3-5% faster). With more channels at that size (48 -> 96,
    64 -> 128) the two were level in isolation, but the lax gradient made a restv2_tiny step 12% slower,
    and from 56 -> 28 down the patches form wins (14 -> 7 with 384 channels: 10.3 vs 16.2).
    """
    if avx512 and (channels <= 4 or (channels <= 32 and ho * wo >= 56 * 56)):
        return 'lax'
    return 'patches'


@functools.cache
def host_has_avx512() -> bool:
    """Whether this host's CPU has AVX-512 (Linux's /proc/cpuinfo; False where it cannot tell)."""
    try:
        with open('/proc/cpuinfo') as f:
            return 'avx512f' in f.read().split()
    except OSError:
        return False


def dense(features: int, *, use_bias: bool = True, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=weight_init, name=name)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None, impl: str = 'auto') -> nn.Module:
    """LayerNorm over channels; statistics in float32 with the two-pass variance PyTorch uses.

    'lax' is Flax's nn.LayerNorm; 'shift' (XLA:CPU) is `LayerNorm`, the same parameters ('scale',
    'bias') and the same arithmetic with a hand-written gradient.
    """
    if resolve_conv_impl(impl) == 'shift':
        return LayerNorm(eps, dtype, name=name)
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class LayerNorm(nn.Module):
    """`nn.LayerNorm(C, eps)` over the last axis, for XLA:CPU; parameters as Flax's nn.LayerNorm.

    Statistics and output are computed in float32 and the output cast to `dtype`. See
    `_layer_norm_f32` for why the gradient is written by hand.
    """
    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        return _layer_norm_f32(x.astype(jnp.float32), scale, bias, self.epsilon).astype(self.dtype)


def _row_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """Mean and 1 / sqrt(var + eps) over the last axis (kept as a size-1 axis), two-pass.

    The variance is the corrected two-pass sum(d^2) - sum(d)^2 / n with d = x - mean: as exact as
    PyTorch's, and both sums come out of one variadic reduce.
    """
    n = x.shape[-1]
    mean = jnp.sum(x, -1, keepdims=True) / n
    d = x - mean
    s1, s2 = _sums([d, d * d], (x.ndim - 1,))
    var = (s2 - s1 * s1 / n) / n
    return mean, lax.rsqrt(var + eps)[..., None]


# LayerNorm differentiated by hand. Autodiff of the textbook form keeps the centred input and the
# broadcast statistics for the backward pass, and XLA:CPU materialises each full-size broadcast as a
# YNNPACK operand (~50 'wrapped_broadcast' copies in a restv2_tiny step). Here the backward pass keeps
# x and the per-row statistics and forms dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat)), with
# g' = g * scale, from two variadic reduces. In a restv2_tiny training step the LayerNorm fusions went
# from ~230 to under 70 ms (profile) and the step ~10% faster (alternating runs).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    return _layer_norm_f32_fwd(x, scale, bias, eps)[0]


def _layer_norm_f32_fwd(x, scale, bias, eps):
    mean, rstd = _row_stats(x, eps)
    return (x - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _layer_norm_f32_bwd(eps, residuals, g):
    x, mean, rstd, scale = residuals
    n = x.shape[-1]
    xhat = (x - mean) * rstd
    gs = g * scale
    s_g, s_gx = _sums([gs, gs * xhat], (x.ndim - 1,))
    dx = rstd * (gs - s_g[..., None] / n - xhat * (s_gx[..., None] / n))
    dscale, dbias = _sums([g * xhat, g], tuple(range(x.ndim - 1)))
    return dx, dscale, dbias


_layer_norm_f32.defvjp(_layer_norm_f32_fwd, _layer_norm_f32_bwd)


def resolve_conv_impl(impl: str) -> str:
    """The form `impl` names here: 'auto' is 'shift' on CPU (where XLA's grouped convolutions are ~30x
    slower) and 'lax' elsewhere; 'lax' and 'shift' name themselves."""
    if impl == 'auto':
        return 'shift' if jax.default_backend() == 'cpu' else 'lax'
    return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int, impl: str) -> jax.Array:
    """Depthwise convolution (groups = input channels) with an optional channel multiplier.

    Args:
      x: (B, H, W, C) input.
      kernel: (kh, kw, 1, C * m) in Flax's grouped layout; output channel c * m + t is input
        channel c filtered by kernel[..., 0, c * m + t], the order of PyTorch's `groups=C` conv.
      stride, pad: the stride and the symmetric zero padding of both spatial dimensions.
      impl: 'lax' (one grouped `conv_general_dilated`) or 'shift' (a sum of strided slices times
        per-channel weights: the same arithmetic, much faster on XLA:CPU).

    Returns:
      (B, H', W', C * m).
    """
    kh, kw, _, out = kernel.shape
    b, h, w, c = x.shape
    if impl == 'lax':
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
    if impl != 'shift':
        raise ValueError(f"conv_impl must be 'lax', 'shift' or 'auto', got {impl!r}")
    if stride > 1 and kh == kw == stride + 1 and out == c:
        return _strided_depthwise(x, kernel[:, :, 0], stride, pad)
    if stride == 1 and out == c:
        return _depthwise_stride1(x, kernel[:, :, 0], pad)
    return _shifted_depthwise(x, kernel, stride, pad)


def _shifted_depthwise(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The 'shift' form: a sum of kh * kw strided slices times per-channel weights."""
    kh, kw, _, out = kernel.shape
    b, h, w, c = x.shape
    mult = out // c
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = kernel.reshape(kh, kw, c, mult)
    if mult > 1:
        xp = xp[..., None]
    acc = None
    for i in range(kh):
        for j in range(kw):
            start = (0, i, j, 0) + ((0,) if mult > 1 else ())
            limit = (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1) + xp.shape[3:]
            step = (1, stride, stride, 1) + ((1,) if mult > 1 else ())
            term = lax.slice(xp, start, limit, step) * (taps[i, j] if mult > 1 else taps[i, j, :, 0])
            acc = term if acc is None else acc + term
    return acc.reshape(b, ho, wo, out)


def _windows(x: jax.Array, kh: int, kw: int, pad: int, ho: int, wo: int) -> list[jax.Array]:
    """The kh * kw stride-1 windows (B, ho, wo, C) of x zero-padded by `pad`, tap (i, j) at i * kw + j."""
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return [xp[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)]


def _sums(terms: list[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """Each of `terms` summed over `axes`, in one variadic reduce.

    XLA:CPU hands single-operand sums to YNNPACK, which takes its operands materialised: every shifted
    slice or broadcast inside a product like `g * x[shifted]` becomes a full-size copy. A variadic
    reduce stays in XLA's own fusion: the products are formed in registers and all the sums come out
    of one pass over the inputs.
    """
    zero = jnp.zeros((), terms[0].dtype)
    return list(lax.reduce(tuple(terms), (zero,) * len(terms),
                           lambda a, b: tuple(u + v for u, v in zip(a, b)), axes))


# A stride-1 depthwise conv (PA's gate, ResTv2's r = 1 upsample) differentiated by hand: autodiff keeps
# the kh * kw shifted inputs for the kernel gradient and XLA:CPU materialises each of them; here the
# kernel gradient is one variadic reduce over (g, x) and the input gradient the same conv of g with
# the flipped kernel. ~3.5x faster gradient for PA at 8x56x56x96.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_stride1(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
    return _shifted_depthwise(x, kernel[:, :, None], 1, pad)


def _depthwise_stride1_fwd(x, kernel, pad):
    return _depthwise_stride1(x, kernel, pad), (x, kernel)


def _depthwise_stride1_bwd(pad, residuals, g):
    x, kernel = residuals
    kh, kw, c = kernel.shape
    _, ho, wo, _ = g.shape
    h, w = x.shape[1:3]
    dkernel = _sums([g * win for win in _windows(x, kh, kw, pad, ho, wo)], (0, 1, 2))
    # x[y] feeds out[y - i + pad] through tap i: a conv of g with the flipped kernel, padded kh-1-pad.
    gp = jnp.pad(g, ((0, 0), (kh - 1 - pad, h - ho + pad), (kw - 1 - pad, w - wo + pad), (0, 0)))
    dx = _shifted_depthwise(gp, kernel[::-1, ::-1, None], 1, 0)
    return dx, jnp.stack(dkernel).reshape(kh, kw, c)


_depthwise_stride1.defvjp(_depthwise_stride1_fwd, _depthwise_stride1_bwd)


def _blocked_depthwise(x: jax.Array, kernel: jax.Array, s: int, pad: int) -> jax.Array:
    """Depthwise conv with kernel (s + 1, s + 1, C) and stride s as a block reduction.

    Cut the padded input into s x s blocks, one per output pixel. Output (i, j) sees block (i, j)
    through the kernel's top-left s x s taps, plus the first row of block (i + 1, j), the first column
    of block (i, j + 1) and the corner of block (i + 1, j + 1) through the last row, column and corner.
    Four multiply-reduces over the blocks replace (s + 1)^2 strided slices.
    """
    b, h, w, c = x.shape
    ho, wo = (h + 2 * pad - s - 1) // s + 1, (w + 2 * pad - s - 1) // s + 1
    rows, cols = (ho + 1) * s, (wo + 1) * s   # every tap of every output lies inside these
    xp = jnp.pad(x, ((0, 0), (pad, max(rows - h - pad, 0)), (pad, max(cols - w - pad, 0)), (0, 0)))
    blocks = xp[:, :rows, :cols].reshape(b, ho + 1, s, wo + 1, s, c)
    # Multiply-reduce, not einsum: XLA:CPU would make the per-channel contraction a batched matmul
    # with the channels as batch, ~20x slower than this fused elementwise form.
    body = (blocks[:, :ho, :, :wo] * kernel[:s, None, :s]).sum((2, 4))
    below = (blocks[:, 1:, 0, :wo] * kernel[s, :s]).sum(3)
    right = (blocks[:, :ho, :, 1:, 0] * kernel[:s, None, s]).sum(2)
    return body + below + right + blocks[:, 1:, 0, 1:, 0] * kernel[s, s]


# EMSA's reduction `sr` (kernel s + 1, stride s; s = 8 in stage 1) runs forward as (s + 1)^2 shifted
# slices, the fastest form on XLA:CPU, but the gradient of those 81 slices is slow to compile and
# ~20x slower to run than the gradient of the block reduction above. So inference takes the slices,
# and under differentiation both passes take the block form: the same function, exactly. (The forward
# pass too: XLA fused the slices' form into the full-resolution input gradient of the LayerNorm that
# follows and recomputed all (s + 1)^2 taps per input pixel, ~0.25 s of a restv2_tiny training step
# at 224; reductions are never duplicated into their consumers.)
_strided_depthwise = _differentiated_as(
    lambda x, kernel, stride, pad: _shifted_depthwise(x, kernel[:, :, None], stride, pad),
    _blocked_depthwise, forward_too=True)


class DepthwiseConv(nn.Module):
    """`nn.Conv2d(C, features, k, stride, pad, groups=C)`; parameters laid out as Flax's nn.Conv."""
    features: int      # C * channel multiplier
    kernel_size: int
    stride: int = 1
    pad: int = 0
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    impl: str = 'auto'  # 'auto' | 'lax' | 'shift', see depthwise_conv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param('kernel', weight_init, (k, k, 1, self.features))
        impl = resolve_conv_impl(self.impl)
        y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.pad, impl)
        if self.use_bias:
            y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class PA(nn.Module):
    """Pixel attention, ResT's position encoding: x * sigmoid(dwconv3x3(x))."""
    dtype: Dtype = jnp.float32
    conv_impl: str = 'auto'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        impl = resolve_conv_impl(self.conv_impl)
        gate = DepthwiseConv(x.shape[-1], 3, 1, 1, dtype=self.dtype, impl=impl, name='pa_conv')(x)
        y = x * nn.sigmoid(gate)
        return fusion_fence(y) if impl == 'shift' else y


def fusion_fence(x: jax.Array) -> jax.Array:
    """x, bit for bit, through an op XLA:CPU's library (YNNPACK) fusions cannot absorb.

    On CPU, the fusion that computes a LayerNorm's mean grows upward through PA's gate into the nine
    shifted slices of its depthwise conv and materialises each padded slice as a separate operand:
    the stem's PA + LayerNorm took ~50 ms per batch of 8 at 56x56x96 instead of ~10. A
    reduce_precision to the array's own format is the identity (denormals, NaN and -0 included)
    that XLA keeps and YNNPACK does not fuse, so the conv and gate stay one loop fusion.
    """
    info = jnp.finfo(x.dtype)
    return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


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
            xf = x.astype(jnp.float32)
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
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


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (PyTorch's nn.GELU() is the erf form; Flax defaults to tanh)."""
    hidden_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = x.shape[-1]
        x = dense(self.hidden_features, dtype=self.dtype, name='fc1')(x)
        x = exact_gelu(x)
        return dense(out, dtype=self.dtype, name='fc2')(x)


@jax.custom_vjp
def exact_gelu(x: jax.Array) -> jax.Array:
    """PyTorch's nn.GELU(): x * Phi(x), the erf form, with PyTorch's formula 0.5 x (1 + erf(x / sqrt 2)).

    Differentiated by hand: autodiff evaluates erf and the Gaussian density in the forward pass and
    keeps both for the backward pass (three passes over the MLP's hidden activations, two stored);
    here the forward pass computes only the output and keeps x, and the backward pass evaluates
    Phi(x) + x * phi(x) in one pass. Both passes take Phi from erf, not erfc (which Flax's
    nn.gelu(approximate=False) uses): XLA:CPU runs erf in YNNPACK and erfc as a slow rational
    approximation (erfc made a rest_lite training step ~15% slower, and restv2_tiny's first fc1 +
    GELU 39 ms instead of 33 per batch of 8); the cost is an absolute error of ~6e-8 in Phi's lower
    tail, the error PyTorch's own kernel has, far below float32 gradient noise. In float32 whatever
    the input dtype, as PyTorch does for bfloat16: in bfloat16, 1 + erf(x) cancels to nothing below x ~ -1.5.
    """
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1 + lax.erf(xf * 0.7071067811865476))).astype(x.dtype)


def _exact_gelu_fwd(x):
    return exact_gelu(x), x


def _exact_gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    cdf = 0.5 + 0.5 * lax.erf(xf * 0.7071067811865476)         # Phi(x)
    pdf = jnp.exp(-0.5 * xf * xf) * 0.3989422804014327         # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


exact_gelu.defvjp(_exact_gelu_fwd, _exact_gelu_bwd)


class DepthwiseUpsample(nn.Module):
    """`nn.Conv2d(C, C * r * r, 3, padding=1, groups=C)` then `nn.PixelShuffle(r)`: ResTv2's upsample branch.

    Parameters as a `DepthwiseConv(C * r * r, 3, 1, 1)`. The 'shift' form writes each of the nine taps
    straight into the shuffled (B, H, r, W, r, C) layout: no (B, H, W, C, r * r) intermediate and no
    pixel-shuffle transpose, ~3x faster forward and ~1.5x faster backward on XLA:CPU; 'lax' is the
    grouped convolution followed by `pixel_shuffle`. Both are the same sums of the same products.
    """
    ratio: int
    dtype: Dtype = jnp.float32
    impl: str = 'auto'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        r = self.ratio
        kernel = self.param('kernel', weight_init, (3, 3, 1, c * r * r)).astype(self.dtype)
        bias = self.param('bias', nn.initializers.zeros, (c * r * r,)).astype(self.dtype)
        x = x.astype(self.dtype)
        impl = resolve_conv_impl(self.impl)
        if impl != 'shift' or r == 1:
            return pixel_shuffle(depthwise_conv(x, kernel, 1, 1, impl) + bias, r)
        # Output channel c * r * r + i * r + j of the conv is pixel (i, j) of channel c after the shuffle.
        taps = kernel.reshape(3, 3, c, r, r).transpose(0, 1, 3, 4, 2)   # (3, 3, r, r, C)
        return _shuffled_depthwise(x, taps, bias.reshape(c, r, r).transpose(1, 2, 0))


@jax.custom_vjp
def _shuffled_depthwise(x: jax.Array, taps: jax.Array, bias: jax.Array) -> jax.Array:
    """Pixel-shuffled depthwise 3x3 conv: x (B, H, W, C), taps (3, 3, r, r, C), bias (r, r, C) ->
    (B, H * r, W * r, C) with out[:, y * r + i, x * r + j] = bias[i, j] + sum of the nine taps."""
    b, h, w, c = x.shape
    r = taps.shape[2]
    nine = taps.reshape(9, r, r, c)
    acc = None
    for t, win in enumerate(_windows(x, 3, 3, 1, h, w)):
        term = win[:, :, None, :, None, :] * nine[t][:, None]
        acc = term if acc is None else acc + term
    return (acc + bias[:, None]).reshape(b, h * r, w * r, c)


def _shuffled_depthwise_by_phase(x: jax.Array, taps: jax.Array, bias: jax.Array) -> jax.Array:
    """`_shuffled_depthwise` (the same products, summed in the same order) computed one output phase
    (i, j) at a time at input resolution, then interleaved by one transpose.

    The forward pass under differentiation takes this form. There the (B, H, r, W, r, C) form's
    output has several consumers (the LayerNorm's statistics and its backward), and XLA:CPU stored
    the broadcast of every tap at full resolution to feed them (~0.3 s of a restv2_tiny training step
    at batch 8). Here every broadcast is of a per-channel scalar.
    """
    b, h, w, c = x.shape
    r = taps.shape[2]
    shifted = _windows(x, 3, 3, 1, h, w)
    nine = taps.reshape(9, r, r, c)
    phases = []
    for i in range(r):
        for j in range(r):
            acc = shifted[0] * nine[0, i, j]
            for t in range(1, 9):
                acc = acc + shifted[t] * nine[t, i, j]
            phases.append(acc + bias[i, j])
    out = jnp.stack(phases).reshape(r, r, b, h, w, c).transpose(2, 3, 0, 4, 1, 5)
    return out.reshape(b, h * r, w * r, c)


def _shuffled_depthwise_fwd(x, taps, bias):
    return _shuffled_depthwise_by_phase(x, taps, bias), (x, taps)


def _shuffled_depthwise_bwd(residuals, g):
    # Written out so that no (B, H, r, W, r, C) broadcast of a shifted input is ever stored (autodiff
    # kept nine): the tap and bias gradients are one variadic reduce over g and x, and the input
    # gradient's nine per-tap sums over the r x r phases another.
    x, taps = residuals
    b, h, w, c = x.shape
    r = taps.shape[2]
    g = g.reshape(b, h, r, w, r, c)
    shifted = [win[:, :, None, :, None, :] for win in _windows(x, 3, 3, 1, h, w)]
    *dtaps, dbias = _sums([g * s for s in shifted] + [g], (0, 1, 3))
    parts = _sums([g * tap[:, None] for tap in taps.reshape(9, r, r, c)], (2, 4))
    dxp = jnp.zeros((b, h + 2, w + 2, c), x.dtype)
    for t, part in enumerate(parts):
        i, j = divmod(t, 3)
        dxp = dxp.at[:, i:i + h, j:j + w].add(part)
    return dxp[:, 1:h + 1, 1:w + 1], jnp.stack(dtaps).reshape(taps.shape), dbias


_shuffled_depthwise.defvjp(_shuffled_depthwise_fwd, _shuffled_depthwise_bwd)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """`torch.nn.PixelShuffle(r)` on NHWC: input channel c * r * r + i * r + j -> pixel (i, j) of c."""
    if r == 1:
        return x
    b, h, w, cr = x.shape
    c = cr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


def stochastic_depth_rates(rate: float, depths) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 to `rate`, as torch.linspace in the official code."""
    n = sum(depths)
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class Backbone(nn.Module):
    """The skeleton both families share: four times (embed -> blocks), then norm, average pool, head.

    A subclass defines, in setup, `stage1`..`stage4` (lists of blocks), `norm`, `head` (when
    num_classes > 0) and `embeddings()`: its four patch embeddings in order. It has fields `dtype`,
    `conv_impl` and `num_classes`.
    """

    def embeddings(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def forward_features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """The outputs of the four stages (strides 4, 8, 16, 32), NHWC, before any norm."""
        check_input(x)
        x = x.astype(self.dtype)
        feats = []
        for embed, stage in zip(self.embeddings(), (self.stage1, self.stage2, self.stage3, self.stage4)):
            x = embed(self._fence(x), train)
            for blk in stage:
                x = blk(self._fence(x), train)
            feats.append(x)
        return feats

    def _fence(self, x: jax.Array) -> jax.Array:
        impl = resolve_conv_impl(self.conv_impl)
        return gradient_fence(x) if impl == 'shift' else x

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (float32), or the pooled features when num_classes == 0."""
        x = self.norm(self.forward_features(x, train)[-1])
        x = x.astype(jnp.float32).mean(axis=(1, 2))
        return self.head(x) if self.num_classes > 0 else x


# The residual stream's gradient is a chain of elementwise terms (the LayerNorm backward of every later
# block). XLA:CPU fuses that chain into each consumer that transposes it for a weight gradient, so each
# block recomputes the chains of all blocks after it: quadratic in depth (~0.5 s of a restv2_tiny
# training step at batch 8). A conditional is a fusion boundary XLA:CPU keeps (it expands
# `optimization_barrier` away), so at every block boundary the gradient passes through a `lax.cond`
# whose branches are both the identity: materialised once, then read. Forward it is the identity.
@jax.custom_vjp
def gradient_fence(x: jax.Array) -> jax.Array:
    return x


def _gradient_fence_fwd(x):
    return x, None


def _gradient_fence_bwd(_, g):
    return (lax.cond(g.reshape(-1)[0] == 0, lambda g: g, lambda g: g + 0, g),)


gradient_fence.defvjp(_gradient_fence_fwd, _gradient_fence_bwd)


def check_input(x: jax.Array) -> None:
    """Reject inputs the models cannot take, with a message that says what to pass instead."""
    if x.ndim != 4:
        raise ValueError(f'expected images as (batch, height, width, channels) NHWC, got shape {x.shape}')
    if min(x.shape[1:3]) < 32:
        raise ValueError(f'images must be at least 32x32 (four stride-2 stages), got {x.shape[1]}x{x.shape[2]}')


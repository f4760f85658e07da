"""The XLA:CPU kernel forms: the portable ops' arithmetic in the shapes XLA:CPU runs fastest.

Each function here equals its namesake in `portable` (the same sums of the same products, up to
float rounding; tests/test_ops.py checks values and gradients). Why each form exists, with the
measurements behind it, is in docs/performance.md. The recurring reasons:

- XLA:CPU runs grouped (depthwise) convolutions ~30x slower than a sum of shifted multiply-adds.
- Where autodiff keeps shifted or broadcast copies of an input for the backward pass, XLA:CPU stores
  each at full size; the hand-written VJPs below keep the inputs and form the sums in one pass.
- XLA:CPU hands single-operand sums to its library (YNNPACK), which needs its operands materialised;
  a variadic reduce (`_sums`) stays in XLA's own fusion.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from rest_jax.ops import cpu_isa, cpu_tune, portable
from rest_jax.ops.portable import attention, conv_output_size, gelu, pixel_shuffle

__all__ = ['attention', 'block_fence', 'conv', 'dense', 'depthwise_conv', 'gelu', 'layer_norm', 'mlp', 'pa_fence',
           'pixel_attention', 'pixel_shuffle', 'upsample']


# --- dense convolutions ---------------------------------------------------------------------------

def conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """`portable.conv`: a 1x1 conv as a matmul; any other as XLA's conv or as patches times a matmul,
    the forward pass, the input gradient and the kernel gradient each in the form measured faster on
    this host (`cpu_tune`)."""
    kh, kw, _, _ = kernel.shape
    if kh == kw == 1 and stride == 1 and pad == 0:
        return dense(x, kernel[0, 0])
    return _measured_conv(x, kernel, stride, pad)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`portable.dense` on x flattened to (tokens, C): autodiff then contracts the tokens of two 2-D
    operands, which XLA:CPU's dot takes as they are. Over (B, H, W, C) it canonicalises the weight
    gradient by transposing its left operand, the output gradient as JAX orders it (a linear layer
    of C -> 4C, the wider one), into a copy of its own: an MLP's forward and backward at 8x56x56x96
    in 121 instead of 174 ms (Intel Xeon 6/106; docs/performance.md)."""
    return portable.dense(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _patches_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The conv as (B * H' * W', kh * kw * C) patches times the (kh * kw * C, O) kernel."""
    kh, kw, c, o = kernel.shape
    b, h, w, _ = x.shape
    ho, wo = conv_output_size(h, kh, stride, pad), conv_output_size(w, kw, stride, pad)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    patches = jnp.concatenate([
        lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                  (1, stride, stride, 1))
        for i in range(kh) for j in range(kw)], axis=-1)
    return dense(patches, kernel.reshape(kh * kw * c, o))


# The two exact forms of a dense conv. Which runs faster on XLA:CPU depends on the machine kind and
# the shape, and differs between the forward pass, the input gradient and the kernel gradient
# (docs/performance.md), so each of the three is measured.
_CONV_FORMS: dict[str, Callable] = {'xla': portable.conv, 'patches': _patches_conv}
_GRADIENTS = ('input', 'kernel')


def _conv_signature(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> str:
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    return f'conv {b}x{h}x{w}x{c} -> {o}, kernel {kh}x{kw}, stride {stride}, pad {pad}, {jnp.dtype(x.dtype).name}'


def _random_inputs(*arrays: jax.Array) -> list[jax.Array]:
    """Normal samples shaped and typed as `arrays`, on the host CPU (what the candidates are timed on)."""
    keys = jax.random.split(jax.random.key(0), len(arrays))
    cpu_device = jax.devices('cpu')[0]
    return [jax.device_put(jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype), cpu_device)
            for k, a in zip(keys, arrays)]


def _timed(f: Callable, *arrays) -> Callable[[], Callable[[], object]]:
    """A `cpu_tune` candidate: builds `f` compiled on random inputs shaped as `arrays`, and returns a
    call that runs it once and waits for it."""
    def compiled_call():
        args = _random_inputs(*arrays)
        compiled = jax.jit(f).lower(*args).compile()
        return lambda: jax.block_until_ready(compiled(*args))
    return compiled_call


def _conv_gradient(form: Callable, wrt: str, x, kernel, g, stride: int, pad: int) -> jax.Array:
    """The input's (`wrt='input'`) or the kernel's gradient of `form` at (x, kernel), given the output's g."""
    if wrt == 'input':
        return jax.vjp(lambda x: form(x, kernel, stride, pad), x)[1](g)[0]
    return jax.vjp(lambda kernel: form(x, kernel, stride, pad), kernel)[1](g)[0]


def _candidates(x, kernel, stride, pad, g=None, wrt: str | None = None) -> dict[str, Callable]:
    """Each form of the conv, compiled at these shapes on random inputs: its forward pass, or with `g`
    one of its two gradients alone (`wrt`: 'input' or 'kernel', from the saved input)."""
    def build(form):
        if g is None:
            return _timed(lambda x, k: form(x, k, stride, pad), x, kernel)
        return _timed(lambda x, k, g: _conv_gradient(form, wrt, x, k, g, stride, pad), x, kernel, g)
    return {name: build(form) for name, form in _CONV_FORMS.items()}


def _forward_form(x, kernel, stride, pad) -> str:
    """The measured-faster forward form; where measuring is off, for a strided conv patches for few
    input channels (the RGB stem) and small outputs (<= 14 x 14), else XLA's conv (the rule measured on
    Zen 3 and Zen 5), and XLA's conv at stride 1."""
    ho = conv_output_size(x.shape[1], kernel.shape[0], stride, pad)
    wo = conv_output_size(x.shape[2], kernel.shape[1], stride, pad)
    rule = 'patches' if stride > 1 and (x.shape[-1] <= 4 or ho * wo <= 14 * 14) else 'xla'
    return cpu_tune.choose(_conv_signature(x, kernel, stride, pad) + ', forward',
                           _candidates(x, kernel, stride, pad), rule, (x.shape,))


def _gradient_form(wrt: str, x, kernel, g, stride, pad) -> str:
    """The measured-faster form of the input's or the kernel's gradient; where measuring is off,
    `cpu_isa`'s rule for a strided conv (both gradients alike), XLA's conv at stride 1."""
    rule = 'xla'
    if stride > 1:
        rule = cpu_isa.strided_conv_gradient_form(x.shape[-1], g.shape[1], g.shape[2], cpu_isa.host_has_avx512())
    return cpu_tune.choose(_conv_signature(x, kernel, stride, pad) + f', {wrt} gradient',
                           _candidates(x, kernel, stride, pad, g, wrt), 'xla' if rule == 'lax' else rule, (x.shape,))


def _conv_choosing(forward_form: Callable[..., str], gradient_form: Callable[..., str]) -> Callable:
    """The dense conv `f(x, kernel, stride, pad)` whose forward pass runs in the form named by
    `forward_form(x, kernel, stride, pad)` and, under differentiation, each gradient in the form named
    by `gradient_form(wrt, x, kernel, g, stride, pad)` ('xla' or 'patches'; `wrt` 'input' or 'kernel')."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def f(x, kernel, stride, pad):
        return _CONV_FORMS[forward_form(x, kernel, stride, pad)](x, kernel, stride, pad)

    def fwd(x, kernel, stride, pad):
        return f(x, kernel, stride, pad), (x, kernel)

    def bwd(stride, pad, residuals, g):
        x, kernel = residuals
        forms = {wrt: gradient_form(wrt, x, kernel, g, stride, pad) for wrt in _GRADIENTS}
        if forms['kernel'] == 'patches':
            # The patches' kernel gradient contracts g over its pixels, for which XLA:CPU transposes g;
            # it fuses g's producer into that transpose (PA's input gradient in ResT's stem: nine shifted
            # slices, recomputed in transposed order beside the copy the input gradient reads).
            g = _materialised(g)
        return tuple(_conv_gradient(_CONV_FORMS[forms[wrt]], wrt, x, kernel, g, stride, pad) for wrt in _GRADIENTS)

    f.defvjp(fwd, bwd)
    return f


# A dense conv: forward in its measured form, and under differentiation each gradient in its own
# measured form (inference never measures the gradients' candidates).
_measured_conv = _conv_choosing(_forward_form, _gradient_form)


def _conv_in_forms(forward: str, input_gradient: str, kernel_gradient: str) -> Callable:
    """The dense conv in the named forms, whatever this host measures: for tests and comparisons."""
    gradients = dict(zip(_GRADIENTS, (input_gradient, kernel_gradient)))
    return _conv_choosing(lambda *_: forward, lambda wrt, *_: gradients[wrt])


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


# --- depthwise convolutions -----------------------------------------------------------------------

def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """`portable.depthwise_conv` as shifted multiply-adds: EMSA's reduction (kernel s + 1, stride s)
    in block form under differentiation, stride-1 convs with a hand-written VJP."""
    kh, kw, _, out = kernel.shape
    c = x.shape[-1]
    if stride > 1 and kh == kw == stride + 1 and out == c:
        return _strided_depthwise(x, kernel[:, :, 0], stride, pad)
    if stride == 1 and out == c:
        return _depthwise_stride1(x, kernel[:, :, 0], pad)
    return _shifted_depthwise(x, kernel, stride, pad)


def _shifted_depthwise(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """A sum of kh * kw strided slices times per-channel weights."""
    kh, kw, _, out = kernel.shape
    b, h, w, c = x.shape
    mult = out // c
    ho, wo = conv_output_size(h, kh, stride, pad), conv_output_size(w, kw, stride, pad)
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
    """Each of `terms` summed over `axes`, in one variadic reduce: the products are formed in registers
    inside XLA's own fusion, and all the sums come out of one pass over the inputs."""
    zero = jnp.zeros((), terms[0].dtype)
    return list(lax.reduce(tuple(terms), (zero,) * len(terms),
                           lambda a, b: tuple(u + v for u, v in zip(a, b)), axes))


def _column_sums(terms: list[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """`_sums` over leading `axes` that keep the channels (a kernel's or bias's gradient), in two stages.

    XLA:CPU runs a variadic sum down to a few channels on one thread, one output at a time (a 3x3
    depthwise kernel's gradient at 8 x 56 x 56 x 64: 14-16 ms on an Intel Xeon). Summed first over the
    last of `axes` alone, the partial sums keep a row per remaining index, which XLA splits over the
    threads, and the small remainder is summed per term (~4 ms there; docs/performance.md).
    """
    *outer, inner = sorted(axes)
    return [jnp.sum(part, tuple(outer)) for part in _sums(terms, (inner,))]


# A stride-1 depthwise conv (PA's gate, ResTv2's r = 1 upsample) differentiated by hand: the kernel
# gradient is one variadic reduce over (g, x) and the input gradient the same conv of g with the
# flipped kernel, instead of autodiff's kh * kw stored shifted inputs.
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
    dkernel = _column_sums([g * win for win in _windows(x, kh, kw, pad, ho, wo)], (0, 1, 2))
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
    ho, wo = conv_output_size(h, s + 1, s, pad), conv_output_size(w, s + 1, s, pad)
    rows, cols = (ho + 1) * s, (wo + 1) * s   # every tap of every output lies inside these
    xp = jnp.pad(x, ((0, 0), (pad, max(rows - h - pad, 0)), (pad, max(cols - w - pad, 0)), (0, 0)))
    blocks = xp[:, :rows, :cols].reshape(b, ho + 1, s, wo + 1, s, c)
    # Multiply-reduce, not einsum: XLA:CPU would make the per-channel contraction a batched matmul
    # with the channels as batch, far slower than this fused elementwise form.
    body = (blocks[:, :ho, :, :wo] * kernel[:s, None, :s]).sum((2, 4))
    below = (blocks[:, 1:, 0, :wo] * kernel[s, :s]).sum(3)
    right = (blocks[:, :ho, :, 1:, 0] * kernel[:s, None, s]).sum(2)
    return body + below + right + blocks[:, 1:, 0, 1:, 0] * kernel[s, s]


# EMSA's reduction `sr` (kernel s + 1, stride s) runs forward as (s + 1)^2 shifted slices, the fastest
# form on XLA:CPU, but the gradient of those slices is slow to compile and to run. So inference takes
# the slices, and under differentiation both passes take the block form: the same function, exactly.
# (The forward pass too: XLA fused the slices into the full-resolution input gradient of the LayerNorm
# that follows and recomputed all (s + 1)^2 taps per input pixel; reductions are never duplicated.)
# Inference writes the slices' sum once: XLA:CPU otherwise fuses all (s + 1)^2 taps into each of the
# LayerNorm's three passes (mean, variance, normalisation) and computes them three times, while the
# output is s^2 times smaller than the input, so writing it costs next to nothing.
_strided_depthwise = _differentiated_as(
    lambda x, kernel, stride, pad: _materialised(_shifted_depthwise(x, kernel[:, :, None], stride, pad)),
    _blocked_depthwise, forward_too=True)


def pixel_attention(x: jax.Array, kernel: jax.Array, bias: jax.Array, norm: tuple | None = None,
                    x_bias: jax.Array | None = None) -> jax.Array:
    """`portable.pixel_attention` with this module's depthwise conv, PA fence and LayerNorm."""
    return portable.compose_pixel_attention(x, kernel, bias, norm, x_bias, depthwise_conv, pa_fence, layer_norm)


# --- ResTv2's upsample branch ---------------------------------------------------------------------

def upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int, norm: tuple | None = None,
             add: jax.Array | None = None) -> jax.Array:
    """`portable.upsample` with each of the nine taps written straight into the shuffled
    (B, H, r, W, r, C) layout: no (B, H, W, C, r * r) intermediate and no pixel-shuffle transpose; with
    `norm`, then this module's `layer_norm`. Inference takes the form of the branch's conv that this
    host ran fastest together with the LayerNorm and sum that read it (`_UPSAMPLE_FORMS`)."""
    after = (None if norm is None else float(norm[2]),
             None if add is None else (tuple(add.shape), jnp.dtype(add.dtype).name))
    return portable.finish_upsample(_upsample(x, kernel, bias, ratio, after), norm, add, layer_norm)


# Inference: the measured form (`after` describes what reads the output: the LayerNorm's eps, the
# shape and dtype of the sum's other term). Under differentiation: `_trained_upsample`.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int, after: tuple) -> jax.Array:
    return _UPSAMPLE_FORMS[_upsample_form(x, kernel, ratio, after)](x, *_shuffled_parameters(kernel, bias, ratio))


def _upsample_fwd(x, kernel, bias, ratio, after):
    return jax.vjp(functools.partial(_trained_upsample, ratio=ratio), x, kernel, bias)


def _upsample_bwd(ratio, after, vjp, g):
    return vjp(g)


_upsample.defvjp(_upsample_fwd, _upsample_bwd)


def _trained_upsample(x: jax.Array, kernel: jax.Array, bias: jax.Array, ratio: int) -> jax.Array:
    """The branch's conv under differentiation: r = 1 a stride-1 depthwise conv, else
    `_shuffled_depthwise` (computed by phase, a hand-written VJP)."""
    if ratio == 1:
        return depthwise_conv(x, kernel, 1, 1) + bias
    return _shuffled_depthwise(x, *_shuffled_parameters(kernel, bias, ratio))


def _shuffled_parameters(kernel: jax.Array, bias: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """The conv's kernel (3, 3, 1, C * r * r) and bias as taps (3, 3, r, r, C) and bias (r, r, C):
    output channel c * r * r + i * r + j of the conv is pixel (i, j) of channel c after the shuffle."""
    c = kernel.shape[-1] // (r * r)
    return kernel.reshape(3, 3, c, r, r).transpose(0, 1, 3, 4, 2), bias.reshape(c, r, r).transpose(1, 2, 0)


# The inference forms of the branch's conv, on x and its taps and bias (`_shuffled_parameters`): the
# same sums of the same products. Which runs fastest
# depends on the ratio and the machine (on an Intel Ice Lake, with the LayerNorm and sum after it:
# 'shuffled' at r = 8 and 4, where writing the large output once more costs more than XLA:CPU
# computing the taps inside each of the LayerNorm's passes; at r = 2 and 1 the other two, 1.5-2.5x
# faster than 'shuffled'; docs/performance.md), so each shape is measured on the host.
_UPSAMPLE_FORMS: dict[str, Callable] = {
    'shuffled': lambda x, taps, bias: _shuffled_taps(x, taps, bias),
    'shuffled, written once': lambda x, taps, bias: _materialised(_shuffled_taps(x, taps, bias)),
    'phases': lambda x, taps, bias: _shuffled_depthwise_by_phase(x, taps, bias),
}


def _upsample_form(x: jax.Array, kernel: jax.Array, ratio: int, after: tuple) -> str:
    """The inference form of the branch's conv this host measured fastest, timed with the LayerNorm and
    sum that read its output; 'shuffled' where measuring is off."""
    eps, added = after
    b, h, w, c = x.shape
    key = (f'upsample {b}x{h}x{w}x{c}, ratio {ratio}, {jnp.dtype(x.dtype).name}'
           + ('' if eps is None else ', LayerNorm') + ('' if added is None else f', added to {added[0][1]}x{added[0][2]}'))

    params = jax.ShapeDtypeStruct((c,), jnp.float32)
    arrays = [x, kernel, jax.ShapeDtypeStruct(kernel.shape[-1:], kernel.dtype), params, params]
    if added is not None:
        arrays.append(jax.ShapeDtypeStruct(*added))

    def build(form):
        def branch(x, kernel, bias, scale, shift, *add):
            norm = None if eps is None else (scale, shift, eps)
            y = form(x, *_shuffled_parameters(kernel, bias, ratio))
            return portable.finish_upsample(y, norm, add[0] if add else None, layer_norm)
        return _timed(branch, *arrays)
    return cpu_tune.choose(key + ', forward', {name: build(form) for name, form in _UPSAMPLE_FORMS.items()},
                           'shuffled', (x.shape,) + (() if added is None else (added[0],)))


def _shuffled_taps(x: jax.Array, taps: jax.Array, bias: jax.Array) -> jax.Array:
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


@jax.custom_vjp
def _shuffled_depthwise(x: jax.Array, taps: jax.Array, bias: jax.Array) -> jax.Array:
    """`_shuffled_taps` with its forward pass by phase and a hand-written VJP under differentiation."""
    return _shuffled_taps(x, taps, bias)


def _shuffled_depthwise_by_phase(x: jax.Array, taps: jax.Array, bias: jax.Array) -> jax.Array:
    """`_shuffled_taps` (the same products, summed in the same order) computed one output phase
    (i, j) at a time at input resolution, then interleaved by one transpose.

    The forward pass under differentiation takes this form. There the (B, H, r, W, r, C) form's
    output has several consumers (the LayerNorm's statistics and its backward), and XLA:CPU stored
    the broadcast of every tap at full resolution to feed them. Here every broadcast is of a
    per-channel scalar.
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
    *dtaps, dbias = _column_sums([g * s for s in shifted] + [g], (0, 1, 3))
    parts = _sums([g * tap[:, None] for tap in taps.reshape(9, r, r, c)], (2, 4))
    dxp = jnp.zeros((b, h + 2, w + 2, c), x.dtype)
    for t, part in enumerate(parts):
        i, j = divmod(t, 3)
        dxp = dxp.at[:, i:i + h, j:j + w].add(part)
    return dxp[:, 1:h + 1, 1:w + 1], jnp.stack(dtaps).reshape(taps.shape), dbias


_shuffled_depthwise.defvjp(_shuffled_depthwise_fwd, _shuffled_depthwise_bwd)


# --- LayerNorm, and the MLP after it --------------------------------------------------------------

def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, dtype) -> jax.Array:
    """`portable.layer_norm` in float32 with a hand-written gradient (see `_layer_norm_f32`)."""
    return _layer_norm_f32(x.astype(jnp.float32), scale, bias, eps).astype(dtype)


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


# Autodiff of the textbook form keeps the centred input and the broadcast statistics for the backward
# pass, and XLA:CPU materialises each full-size broadcast as a library operand. Here the backward pass
# keeps x and the per-row statistics and forms dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat)),
# with g' = g * scale, from one variadic reduce over each row. The parameters' gradients are column
# sums (over every row, one per channel), and those go to the library as single-operand sums: XLA's own
# fusion emits a column sum one channel at a time, each pass re-reading every fused input (the
# residual-stream gradient; rest_lite's training step on Zen 1 spent 404 ms in reduce fusions, 73 after).
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
    rows = tuple(range(x.ndim - 1))
    return dx, jnp.sum(g * xhat, rows), jnp.sum(g, rows)   # column sums: see the comment above


_layer_norm_f32.defvjp(_layer_norm_f32_fwd, _layer_norm_f32_bwd)


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, dtype,
        norm: tuple | None = None) -> jax.Array:
    """`portable.mlp` on x flattened to (tokens, C) (as `dense`), its norm as `layer_norm` above."""
    x = x if norm is None else layer_norm(x, *norm, dtype)
    y = portable.mlp(x.reshape(-1, x.shape[-1]), w1, b1, w2, b2, dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --- fences: identities that shape XLA:CPU's fusions ------------------------------------------------

def pa_fence(x: jax.Array) -> jax.Array:
    """x, bit for bit, through an op XLA:CPU's library (YNNPACK) fusions cannot absorb.

    The fusion that computes a LayerNorm's mean grows upward through PA's gate into the nine shifted
    slices of its depthwise conv and materialises each padded slice as a separate operand. A
    reduce_precision to the array's own format is the identity (denormals, NaN and -0 included)
    that XLA keeps and YNNPACK does not fuse, so the conv and gate stay one loop fusion.
    """
    info = jnp.finfo(x.dtype)
    return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


# The residual stream's gradient is a chain of elementwise terms (the LayerNorm backward of every later
# block). XLA:CPU fuses that chain into each consumer that transposes it for a weight gradient, so each
# block recomputes the chains of all blocks after it: quadratic in depth. A conditional is a fusion
# boundary XLA:CPU keeps (it expands `optimization_barrier` away), so at every block boundary the
# gradient passes through a `lax.cond` whose branches are both the identity: materialised once, then
# read. Forward it is the identity.
@jax.custom_vjp
def block_fence(x: jax.Array) -> jax.Array:
    return x


def _block_fence_fwd(x):
    return x, None


def _block_fence_bwd(_, g):
    return (_materialised(g),)


def _materialised(x: jax.Array) -> jax.Array:
    """x's values, written once: a conditional whose branches are both the identity, which XLA:CPU
    keeps as a fusion boundary (it expands `optimization_barrier` away), so that consumers read x
    instead of fusing (and recomputing) its producers."""
    return lax.cond(x.reshape(-1)[0] == 0, lambda x: x, lambda x: x + 0, x)


block_fence.defvjp(_block_fence_fwd, _block_fence_bwd)

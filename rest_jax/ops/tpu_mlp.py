"""A pre-norm block's second half, LayerNorm then MLP (fc1, exact GELU, fc2), as one Pallas kernel per
pass on TPU, in XLA's own layout for these activations: neither the norm's output nor the hidden
activations (4 C per token) reach HBM.

A Pallas call takes its operands row-major, so the kernels take the activations in the order XLA
keeps them in memory, and the transpose or reshape that gives that order leaves every byte where it
is (XLA emits no copy for it). With a batch per device that fills the 128 lanes (a multiple of 128),
XLA lays out a block's (B, H, W, C) activations batch-minor: tokens major, then channels, the batch in
the lanes ((H, W, C, B) in memory). The kernels then take the tokens as (N, C, B): one token's (C, B)
tile is normalised over its sublanes (the LayerNorm over C is a sum down each lane), then fc1's
weights multiply it, W1^T (F, C) @ x_t (C, B) -> (F, B), GELU, then W2^T (C, F) @ that -> (C, B); a
grid step puts a few tokens side by side in the lanes, (C, T B), so that each product is one wide
matmul. With fewer images XLA keeps the channels minor, and the kernels take rows of C, (B N, C).

They run only where the MLP is differentiated: in inference XLA fuses its own form (the LayerNorm,
fc1, GELU and fc2) into one op, the hidden activations never in HBM either, while for the backward
pass it writes the norm's output, fc1's and GELU's to HBM and reads them back. The forward kernel
keeps only its input; the backward kernel recomputes the norm, fc1 and GELU from it (one matmul more)
and sums the weight gradients (and the norm's) over the grid in VMEM, one partial sum per TensorCore
half. Used where the channels are few (`fits`: at most 128, or 192 with the batch in the lanes and
the norm inside; the first stage of every variant, and the second of all but the two largest), so
that fc1 and fc2 are bound by HBM in XLA's form. The arithmetic is the portable form's (`portable.mlp`, with
`portable.layer_norm` before it): float32 statistics, the norm's output rounded to the compute dtype,
products accumulated in float32, the hidden activations rounded to the compute dtype before GELU and
after it, the MLP's input gradient rounded likewise before the norm's backward; the bias and the
norm's gradients are summed in float32. Without a norm (`ops.mlp(..., norm=None)`) the same kernels
run on x as it is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from rest_jax.ops import pallas_lowering, portable
from rest_jax.ops.portable import gelu_float32, gelu_slope

# Widths whose MLP runs as the kernels: where they lower XLA's estimate. One block's training step on
# v5p:2x2x1 (`python docs/tpu_forms.py --mlp [--batch-per-chip 32]`), portable LayerNorm and MLP -> the
# kernels with the norm inside. The batch in the lanes (128 images per chip): C = 64 (ResT v1 stage 1)
# 2.10 -> 1.42 ms, 96 3.55 -> 2.77, 128 (v1 stage 2, 28 x 28) 1.34 -> 1.19, 128 (restv2_large stage 1)
# 4.84 -> 4.33, 192 (restv2_tiny stage 2) 2.53 -> 2.34 and (rest_base stage 2) 2.09 -> 1.90, but 256
# 2.57 -> 2.79: there fc1 and fc2 are near the chip's ratio of FLOPs to HBM bandwidth in XLA's own form,
# and the recomputed fc1 costs more than the bytes saved. Rows (32 per chip): 96 1.36 -> 1.27, 128 1.50
# -> 1.39, but 192 0.94 -> 1.04. Without the norm inside (`ops.mlp(norm=None)`) 192 loses in the lanes
# too (2.53 -> 2.62 ms), and 128 is the limit.
_MAX_CHANNELS = 128
_MAX_CHANNELS_IN_LANES = pallas_lowering.NARROW_CHANNELS    # the batch in the lanes, the norm inside
_WEIGHT_ELEMENTS = 1 << 18   # C x F of fc1 (and fc2): 0.5 MB per bfloat16 matrix, 1 MB per float32 gradient
_HIDDEN_ELEMENTS = 1 << 19   # F x tokens x lanes per grid step: 2 MB per float32 hidden block
_ROW_HIDDEN_ELEMENTS = 1 << 18   # F x rows per grid step of the row-major kernels
_LANES = pallas_lowering.LANES   # images per grid step
_SPLIT = 2                   # the backward grid's parallel halves (a v4/v5p chip's two TensorCores)
_over_lanes = (((1,), (1,)), ((), ()))


def fits(c: int, f: int, batch: int, norm: bool) -> bool:
    """Whether an MLP of C inputs and F hidden units, with the LayerNorm inside or not, runs as the
    kernels on `batch` images per kernel call (`pallas_lowering.local_batch`)."""
    limit = _MAX_CHANNELS_IN_LANES if pallas_lowering.fills_lanes(batch) and norm else _MAX_CHANNELS
    return c <= limit and c * f <= _WEIGHT_ELEMENTS


def rows_per_step(f: int, r: int) -> int:
    """Rows (tokens of any image) per grid step of the row-major kernels, for F hidden units and R rows:
    a multiple of 16 (a bfloat16 tile's rows) with at most _ROW_HIDDEN_ELEMENTS hidden values, dividing
    R / _SPLIT where one does (else the rows are padded with zeros)."""
    limit = max(_ROW_HIDDEN_ELEMENTS // f // 16 * 16, 16)
    half = r // _SPLIT
    blocks = [d for d in range(16, min(limit, half) + 1, 16) if r % (_SPLIT * d) == 0]
    return blocks[-1] if blocks else min(limit, -(-half // 16) * 16)


def tokens_per_step(f: int, n: int) -> int:
    """Tokens side by side in a grid step, for F hidden units and N tokens: the largest power of two with
    at most _HIDDEN_ELEMENTS hidden values whose grid (_SPLIT steps at a time) pads N by at most N / 8
    zero tokens; one token per step where none does."""
    t = 1
    while 2 * t * f * _LANES <= _HIDDEN_ELEMENTS:
        t *= 2
    while t > 1 and -n % (_SPLIT * t) > n // 8:
        t //= 2
    return t


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array, dtype,
        norm: tuple | None = None) -> jax.Array:
    """`portable.mlp` on x (B, ..., C) in `dtype`, as Pallas kernels where it is differentiated (see the
    module docstring); with `norm` (scale, bias, eps), the kernels apply the LayerNorm to x first.
    Callers check `fits` first."""
    with jax.named_scope('fc1'):
        w1, b1 = w1.astype(dtype), b1.astype(dtype)
    with jax.named_scope('fc2'):
        w2, b2 = w2.astype(dtype), b2.astype(dtype)
    if norm is None:
        return _mlp(x.astype(dtype), (w1, b1, w2, b2), (), None)
    scale, bias, eps = norm
    return _mlp(x, (w1, b1, w2, b2), (scale, bias), eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlp(x, weights, norm, eps):
    # Not differentiated (inference, evaluation): XLA's own form, which it fuses into one op (the
    # LayerNorm, fc1, GELU and fc2), the hidden activations never in HBM either.
    return portable.mlp(x, *weights, weights[0].dtype, None if eps is None else (*norm, eps))


def _mlp_fwd(x, weights, norm, eps):
    fn, axes = functools.partial(_forward_local, eps=eps), pallas_lowering.batch_axes(x.shape[0])
    if axes:
        fn = jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(axes), P(), P()),
                           out_specs=P(axes), check_vma=False)
    return fn(x, weights, norm), (x, weights, norm)


def _mlp_bwd(eps, residuals, g):
    x, weights, norm = residuals
    axes = pallas_lowering.batch_axes(x.shape[0])
    fn = functools.partial(_backward_local, eps=eps, axes=axes)
    if axes:
        fn = jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(P(axes), P(axes), P(), P()),
                           out_specs=(P(axes), P(), P()), check_vma=False)
    return fn(x, g.astype(weights[0].dtype), weights, norm)


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def _tokens(x, t):
    """x (B, ..., C) as (N, C, B), XLA's own layout, padded with zero tokens to whole grid steps of t
    tokens (they are sliced off the output, and their zero output gradient adds nothing to the weight
    gradients)."""
    tokens = jnp.transpose(x.reshape(x.shape[0], -1, x.shape[-1]), (1, 2, 0))
    return jnp.pad(tokens, ((0, -tokens.shape[0] % (_SPLIT * t)), (0, 0), (0, 0)))


def _images(tokens, shape):
    """(N', C, B) back to x's shape (B, ..., C), the padding tokens dropped."""
    n = int(np.prod(shape[1:-1]))
    return jnp.transpose(tokens[:n], (2, 0, 1)).reshape(shape)


def _rows(x, block):
    """x (B, ..., C) as rows (B N, C), padded with zero rows to whole grid steps (as `_tokens`)."""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.pad(rows, ((0, -rows.shape[0] % (_SPLIT * block)), (0, 0)))


def _in_lanes(x) -> bool:
    return pallas_lowering.fills_lanes(x.shape[0])


def _step(x, w1) -> int:
    """Tokens (batch in the lanes) or rows per grid step for x."""
    tokens = int(np.prod(x.shape[1:-1]))
    f = w1.shape[1]
    return tokens_per_step(f, tokens) if _in_lanes(x) else rows_per_step(f, tokens * x.shape[0])


def _norm_operands(norm, lanes):
    """The norm's scale and bias in float32, a column (C, 1) for the kernels on tokens, a row (1, C) on rows."""
    return [p.astype(jnp.float32).reshape((-1, 1) if lanes else (1, -1)) for p in norm]


def _forward_local(x, weights, norm, eps):
    w1, b1, w2, b2 = weights
    step, lanes = _step(x, w1), _in_lanes(x)
    operands = _norm_operands(norm, lanes)
    if lanes:
        out = pallas_lowering.on_platform(functools.partial(_forward_call, t=step, eps=eps), _tokens(x, step),
                                          w1.T, b1.reshape(-1, 1), w2.T, b2.reshape(-1, 1), *operands)
        return _images(out, x.shape)
    out = pallas_lowering.on_platform(functools.partial(_rows_forward_call, block=step, eps=eps), _rows(x, step),
                                      w1, b1.reshape(1, -1), w2, b2.reshape(1, -1), *operands)
    return out[:x.size // x.shape[-1]].reshape(x.shape)


def _backward_local(x, g, weights, norm, eps, axes):
    w1, b1, w2, _ = weights
    step, lanes = _step(x, w1), _in_lanes(x)
    operands = _norm_operands(norm, lanes)
    if lanes:
        dx, *sums = pallas_lowering.on_platform(
            functools.partial(_backward_call, t=step, eps=eps), _tokens(x, step), _tokens(g, step), w1.T,
            b1.reshape(-1, 1), w2, w1, *operands)
        dx = _images(dx, x.shape)
        sums[2] = jnp.swapaxes(sums[2], 1, 2)       # fc2's weight gradient, computed transposed
    else:
        dx, *sums = pallas_lowering.on_platform(
            functools.partial(_rows_backward_call, block=step, eps=eps), _rows(x, step), _rows(g, step), w1,
            b1.reshape(1, -1), w2, *operands)
        dx = dx[:x.size // x.shape[-1]].reshape(x.shape)
    # float32, over the grid's halves; the vectors (a column or a row in the kernels) flattened
    sums = tuple(s.sum(0).reshape(p.shape) for s, p in zip(sums, (*weights, *norm)))
    if axes:
        sums = lax.psum(sums, axes)                 # and over the devices
    grads = tuple(s.astype(p.dtype) for s, p in zip(sums, (*weights, *norm)))
    return dx, grads[:4], grads[4:]


def _rounded(h, dtype):
    """fc1's float32 output rounded to the input dtype, as Flax's Dense gives it, in float32 again."""
    return h.astype(dtype).astype(jnp.float32)


def _normalized(x, scale, bias, eps, axis, dtype):
    """`portable.layer_norm` of x over `axis` (scale and bias float32, broadcast along it), in `dtype`;
    and the normalised x and 1 / std (float32) for the backward pass."""
    xf, n = x.astype(jnp.float32), x.shape[axis]
    xc = xf - jnp.sum(xf, axis, keepdims=True) / n
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis, keepdims=True) / n + eps)
    return (xc * (rstd * scale) + bias).astype(dtype), xc * rstd, rstd


def _norm_gradient(dy, xhat, rstd, scale, axis):
    """The norm's input gradient from its output gradient dy (float32): rstd (g - mean(g) - xhat mean(g
    xhat)) with g = dy scale, the means over `axis`."""
    n = dy.shape[axis]
    gs = dy * scale
    return rstd * (gs - jnp.sum(gs, axis, keepdims=True) / n - xhat * (jnp.sum(gs * xhat, axis, keepdims=True) / n))


# --- the batch in the lanes: 128 images per device, or a multiple --------------------------------

def _side_by_side(ref):
    """A (T, C, L) block as (C, T L): the tokens' tiles side by side in the lanes."""
    return jnp.concatenate([ref[t] for t in range(ref.shape[0])], axis=1)


def _store(ref, value):
    lanes = ref.shape[2]
    for t in range(ref.shape[0]):
        ref[t] = value[:, t * lanes:(t + 1) * lanes].astype(ref.dtype)


def _hidden(w1t, x, b1):
    """fc1's output (F, T L), rounded (`_rounded`)."""
    return _rounded(jnp.dot(w1t, x, preferred_element_type=jnp.float32) + b1.astype(jnp.float32), x.dtype)


def _forward_kernel(x_ref, w1t_ref, b1_ref, w2t_ref, b2_ref, *refs, eps):
    *norm, o_ref = refs
    x = _side_by_side(x_ref)
    if norm:
        x = _normalized(x, norm[0][...], norm[1][...], eps, 0, w1t_ref.dtype)[0]
    a = gelu_float32(_hidden(w1t_ref[...], x, b1_ref[...])).astype(o_ref.dtype)
    _store(o_ref, jnp.dot(w2t_ref[...], a, preferred_element_type=jnp.float32) + b2_ref[...].astype(jnp.float32))


def _backward_kernel(x_ref, g_ref, w1t_ref, b1_ref, w2_ref, w1_ref, *refs, eps):
    norm = refs[:0 if eps is None else 2]
    dx_ref, dw1_ref, db1_ref, dw2t_ref, db2_ref, *dnorm = refs[len(norm):]

    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        for ref in (dw1_ref, db1_ref, dw2t_ref, db2_ref, *dnorm):
            ref[...] = jnp.zeros_like(ref)

    x, g = _side_by_side(x_ref), _side_by_side(g_ref)
    if norm:
        scale = norm[0][...]
        x, xhat, rstd = _normalized(x, scale, norm[1][...], eps, 0, g.dtype)
    h = _hidden(w1t_ref[...], x, b1_ref[...])
    dw2t_ref[0] += lax.dot_general(g, gelu_float32(h).astype(g.dtype), _over_lanes, preferred_element_type=jnp.float32)
    db2_ref[0] += jnp.sum(g.astype(jnp.float32), axis=1, keepdims=True)
    da = jnp.dot(w2_ref[...], g, preferred_element_type=jnp.float32).astype(g.dtype)
    dh = (da.astype(jnp.float32) * gelu_slope(h)).astype(x.dtype)
    dw1_ref[0] += lax.dot_general(x, dh, _over_lanes, preferred_element_type=jnp.float32)
    db1_ref[0] += jnp.sum(dh.astype(jnp.float32), axis=1, keepdims=True)
    dx = jnp.dot(w1_ref[...], dh, preferred_element_type=jnp.float32)
    if norm:
        dx = _rounded(dx, g.dtype)                  # the MLP's input gradient, as XLA's form gives it
        dnorm[0][0] += jnp.sum(dx * xhat, axis=1, keepdims=True)
        dnorm[1][0] += jnp.sum(dx, axis=1, keepdims=True)
        dx = _norm_gradient(dx, xhat, rstd, scale, 0)
    _store(dx_ref, dx)


def _whole(a):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _cost(batch, x, dt, rows, c, f, norm, backward):
    """The kernels' cost for XLA's estimates: `rows` tokens of C channels, F hidden units, the norm's
    and the weight-gradient sums' terms where they apply."""
    weights = dt.itemsize * (2 * c * f + c + f) + 4 * norm * 2 * c
    if not backward:
        return pallas_lowering.cost(batch, flops=(4 * c * f + 8 * norm * c) * rows, transcendentals=rows * f,
                                    bytes_accessed=(x.dtype.itemsize + dt.itemsize) * rows * c + weights)
    sums = 4 * _SPLIT * (2 * c * f + c + f + norm * 2 * c)
    return pallas_lowering.cost(batch, flops=(10 * c * f + 20 * norm * c) * rows, transcendentals=2 * rows * f,
                                bytes_accessed=(2 * x.dtype.itemsize + dt.itemsize) * rows * c + weights + sums)


def _forward_call(x, w1t, b1, w2t, b2, *norm, t, eps, interpret):
    (n, c, b), f = x.shape, w1t.shape[0]
    tokens = pl.BlockSpec((t, c, _LANES), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps), grid=(n // t, b // _LANES),
        in_specs=[tokens] + [_whole(a) for a in (w1t, b1, w2t, b2, *norm)],
        out_specs=tokens, out_shape=jax.ShapeDtypeStruct(x.shape, w1t.dtype),
        compiler_params=pallas_lowering.compiler_params('parallel', 'parallel'),
        cost_estimate=_cost(b, x, w1t.dtype, n * b, c, f, bool(norm), False), interpret=interpret,
        name='mlp')(x, w1t, b1, w2t, b2, *norm)


def _backward_call(x, g, w1t, b1, w2, w1, *norm, t, eps, interpret):
    (n, c, b), f = x.shape, w1t.shape[0]
    steps = n // (_SPLIT * t)
    tokens = pl.BlockSpec((t, c, _LANES), lambda i, j, k: (i * steps + j, 0, k))
    partial = lambda *s: pl.BlockSpec((1, *s), lambda i, j, k: (i, 0, 0))   # noqa: E731
    shapes = [(c, f), (f, 1), (c, f), (c, 1)] + [(c, 1)] * len(norm)
    return pl.pallas_call(
        functools.partial(_backward_kernel, eps=eps), grid=(_SPLIT, steps, b // _LANES),
        in_specs=[tokens, tokens] + [_whole(a) for a in (w1t, b1, w2, w1, *norm)],
        out_specs=[tokens] + [partial(*s) for s in shapes],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)]
        + [jax.ShapeDtypeStruct((_SPLIT, *s), jnp.float32) for s in shapes],
        compiler_params=pallas_lowering.compiler_params('parallel', 'arbitrary', 'arbitrary'),
        cost_estimate=_cost(b, x, g.dtype, n * b, c, f, bool(norm), True), interpret=interpret,
        name='mlp_backward')(x, g, w1t, b1, w2, w1, *norm)


# --- row-major: a batch per device that does not fill the lanes -----------------------------------
# XLA lays such activations out channels-minor, (B, H, W, C) in memory, or tokens-major (H, W, B, C):
# rows of C either way, which the kernels take as (B N, C). One block's training step on v5p:2x2x1, XLA's
# estimate, portable MLP -> kernels: restv2_tiny stage 1, 32 per chip 1.36 -> 1.29 ms, 64 per chip 2.26 ->
# 2.09 ms; restv2_large stage 1, 32 per chip 1.50 -> 1.49 ms.

_over_rows = (((0,), (0,)), ((), ()))


def _rows_forward_kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, *refs, eps):
    *norm, o_ref = refs
    x = x_ref[...]
    if norm:
        x = _normalized(x, norm[0][...], norm[1][...], eps, 1, w1_ref.dtype)[0]
    h = _rounded(jnp.dot(x, w1_ref[...], preferred_element_type=jnp.float32) + b1_ref[...].astype(jnp.float32), x.dtype)
    a = gelu_float32(h).astype(o_ref.dtype)
    o_ref[...] = (jnp.dot(a, w2_ref[...], preferred_element_type=jnp.float32)
                  + b2_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _rows_backward_kernel(x_ref, g_ref, w1_ref, b1_ref, w2_ref, *refs, eps):
    norm = refs[:0 if eps is None else 2]
    dx_ref, dw1_ref, db1_ref, dw2_ref, db2_ref, *dnorm = refs[len(norm):]

    @pl.when(pl.program_id(1) == 0)
    def _():
        for ref in (dw1_ref, db1_ref, dw2_ref, db2_ref, *dnorm):
            ref[...] = jnp.zeros_like(ref)

    x, g, w1 = x_ref[...], g_ref[...], w1_ref[...]
    if norm:
        scale = norm[0][...]
        x, xhat, rstd = _normalized(x, scale, norm[1][...], eps, 1, g.dtype)
    h = _rounded(jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1_ref[...].astype(jnp.float32), x.dtype)
    dw2_ref[0] += lax.dot_general(gelu_float32(h).astype(g.dtype), g, _over_rows, preferred_element_type=jnp.float32)
    db2_ref[0] += jnp.sum(g.astype(jnp.float32), axis=0, keepdims=True)
    da = lax.dot_general(g, w2_ref[...], _over_lanes, preferred_element_type=jnp.float32).astype(g.dtype)
    dh = (da.astype(jnp.float32) * gelu_slope(h)).astype(x.dtype)
    dw1_ref[0] += lax.dot_general(x, dh, _over_rows, preferred_element_type=jnp.float32)
    db1_ref[0] += jnp.sum(dh.astype(jnp.float32), axis=0, keepdims=True)
    dx = lax.dot_general(dh, w1, _over_lanes, preferred_element_type=jnp.float32)
    if norm:
        dx = _rounded(dx, g.dtype)
        dnorm[0][0] += jnp.sum(dx * xhat, axis=0, keepdims=True)
        dnorm[1][0] += jnp.sum(dx, axis=0, keepdims=True)
        dx = _norm_gradient(dx, xhat, rstd, scale, 1)
    dx_ref[...] = dx.astype(dx_ref.dtype)


def _rows_forward_call(x, w1, b1, w2, b2, *norm, block, eps, interpret):
    (r, c), f = x.shape, w1.shape[1]
    rows = pl.BlockSpec((block, c), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_rows_forward_kernel, eps=eps), grid=(r // block,),
        in_specs=[rows] + [_whole(a) for a in (w1, b1, w2, b2, *norm)],
        out_specs=rows, out_shape=jax.ShapeDtypeStruct(x.shape, w1.dtype),
        compiler_params=pallas_lowering.compiler_params('parallel'),
        cost_estimate=_cost(r, x, w1.dtype, r, c, f, bool(norm), False), interpret=interpret,
        name='mlp')(x, w1, b1, w2, b2, *norm)


def _rows_backward_call(x, g, w1, b1, w2, *norm, block, eps, interpret):
    (r, c), f = x.shape, w1.shape[1]
    steps = r // (_SPLIT * block)
    rows = pl.BlockSpec((block, c), lambda i, j: (i * steps + j, 0))
    partial = lambda *s: pl.BlockSpec((1, *s), lambda i, j: (i, 0, 0))   # noqa: E731
    shapes = [(c, f), (1, f), (f, c), (1, c)] + [(1, c)] * len(norm)
    return pl.pallas_call(
        functools.partial(_rows_backward_kernel, eps=eps), grid=(_SPLIT, steps),
        in_specs=[rows, rows] + [_whole(a) for a in (w1, b1, w2, *norm)],
        out_specs=[rows] + [partial(*s) for s in shapes],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)]
        + [jax.ShapeDtypeStruct((_SPLIT, *s), jnp.float32) for s in shapes],
        compiler_params=pallas_lowering.compiler_params('parallel', 'arbitrary'),
        cost_estimate=_cost(r, x, g.dtype, r, c, f, bool(norm), True), interpret=interpret,
        name='mlp_backward')(x, g, w1, b1, w2, *norm)
